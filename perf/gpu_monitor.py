"""pynvml GPU monitor: samples utilisation, memory, power and clocks in a background thread.

    with GpuMonitor(interval_s=0.2) as mon:
        run_benchmark()
    mon.write_csv("gpu.csv"); mon.plot("gpu.png")

On a machine without NVML (no driver, no GPU, no nvidia-ml-py) it logs one line saying so and
records nothing; the benchmark goes on.
"""

from __future__ import annotations

import csv
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    t_s: float
    gpu: int
    util_pct: float
    mem_util_pct: float
    mem_used_mib: float
    power_w: float
    sm_clock_mhz: float
    mem_clock_mhz: float


class GpuMonitor:
    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.samples: list[GpuSample] = []
        self.available = False
        self.reason = ""
        self.devices: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None

    def _init(self) -> bool:
        try:
            import pynvml  # from nvidia-ml-py

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                raise RuntimeError("NVML sees no GPU")
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.devices = [str(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
            return True
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError, no GPU: all mean "no monitor"
            self.reason = f"{type(exc).__name__}: {exc}"
            return False

    def _sample(self, t0: float) -> None:
        nv = self._nvml
        for i, h in enumerate(self._handles):
            util = nv.nvmlDeviceGetUtilizationRates(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            try:
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            except nv.NVMLError:
                power = float("nan")
            self.samples.append(GpuSample(round(time.perf_counter() - t0, 3), i, float(util.gpu), float(util.memory),
                                          mem.used / 2**20, power,
                                          float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                                          float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM))))

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            try:
                self._sample(t0)
            except Exception as exc:  # noqa: BLE001
                log.warning("GPU monitor stopped: %s", exc)
                return
            self._stop.wait(self.interval_s)

    def start(self) -> GpuMonitor:
        self.available = self._init()
        if not self.available:
            log.info("no GPU monitor on this machine (%s); the benchmark goes on without it", self.reason)
            return self
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_csv(self, path: str | Path) -> Path | None:
        if not self.samples:
            return None
        path = Path(path)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(asdict(self.samples[0])))
            w.writeheader()
            w.writerows(asdict(s) for s in self.samples)
        return path

    def plot(self, path: str | Path, marks: list[tuple[float, str]] | None = None) -> Path | None:
        if not self.samples:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
        for gpu in sorted({s.gpu for s in self.samples}):
            rows = [s for s in self.samples if s.gpu == gpu]
            t = [s.t_s for s in rows]
            axes[0].plot(t, [s.util_pct for s in rows], label=f"GPU {gpu} {self.devices[gpu]}")
            axes[1].plot(t, [s.mem_used_mib for s in rows])
            axes[2].plot(t, [s.power_w for s in rows])
        for ax, label in zip(axes, ("utilisation %", "memory used MiB", "power W")):
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            for x, text in marks or []:
                ax.axvline(x, color="grey", lw=0.8, ls="--")
                if ax is axes[0]:
                    ax.text(x, 0.97, text, rotation=90, va="top", fontsize=7, transform=ax.get_xaxis_transform())
        axes[0].legend(loc="lower right", fontsize=8)
        axes[2].set_xlabel("seconds")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)
