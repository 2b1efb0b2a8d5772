"""The benchmark's parts that need no server: the GPU monitor without NVML, summary ratios, the report from raw
results, the shared volume table, config checks."""

import json

import numpy as np
import pytest

from perf.gpu_monitor import GpuMonitor
from perf.measure import BenchConfig
from perf.raw import Results
from perf.report import summarise, write_report


def test_gpu_monitor_without_nvml_says_so_and_records_nothing(caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the monitor records real samples here")
    with caplog.at_level("INFO"), GpuMonitor(interval_s=0.01) as mon:
        pass
    assert not mon.available and mon.reason
    assert "no GPU monitor" in caplog.text
    assert mon.samples == [] and mon.write_csv("unused.csv") is None and mon.plot("unused.png") is None


def _results():
    r = Results(machine={"cpu": "test cpu", "cores": 2, "gpu": None, "python": "3.11", "torch": "x",
                         "onnxruntime": "y", "onnxruntime_providers": ["CPUExecutionProvider"],
                         "triton_server": "2.51.0", "platform": "linux", "created": "now"})
    r.volume_latency_s = {"pytorch_eager": {"v": [10.0, 12.0, 11.0]}, "onnxruntime": {"v": [6.0, 6.0, 6.0]},
                          "triton": {"v": [8.0, 8.0, 8.0]}}
    r.patch_latency_ms = {"pytorch_eager": [400.0], "onnxruntime": [200.0], "triton": [210.0],
                          "triton_ensemble": [250.0]}
    r.prompt_latency_ms = {"uncached": [30.0, 30.0], "cached": [3.0, 3.0]}
    r.throughput = [{"concurrency": 1, "requests": 4, "volumes_per_s": 0.12, "p50_s": 8.0, "p95_s": 8.5},
                    {"concurrency": 2, "requests": 4, "volumes_per_s": 0.14, "p50_s": 14.0, "p95_s": 15.0}]
    r.extra = {"gpu_monitor": "not available (test)"}
    return r


def test_summary_ratios_are_the_documented_quotients():
    s = summarise(_results())
    assert s["speedup_vs_pytorch_eager"] == pytest.approx(11.0 / 8.0, abs=1e-3)
    assert s["onnxruntime_speedup_vs_pytorch_eager"] == pytest.approx(11.0 / 6.0, abs=1e-3)
    assert s["triton_overhead_ratio"] == pytest.approx(1.25)
    assert s["prompt_cache_speedup"] == pytest.approx(10.0)
    assert "half_vs_fp32_eager" not in s   # GPU only
    assert "fast_paths_speedup" not in s   # no stock eager path in these results
    res = _results()
    res.volume_latency_s["pytorch_eager_stock"] = {"v": [16.5, 16.5, 16.5]}
    assert summarise(res)["fast_paths_speedup"] == pytest.approx(16.5 / 11.0, abs=1e-3)


def test_report_files(tmp_path):
    res = _results()
    res.volume_latency_s = {p: {"ct_head_neck": v["v"]} for p, v in res.volume_latency_s.items()}
    report = write_report(res, tmp_path, label="unit")
    text = report.read_text()
    assert "speedup_vs_pytorch_eager | 1.38" in text and "python -m perf.bench" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"speedup_vs_pytorch_eager", "triton_overhead_ratio", "prompt_cache_speedup"} <= set(summary)
    assert (tmp_path / "latency_by_path.png").stat().st_size > 1000
    assert (tmp_path / "throughput_vs_concurrency.png").stat().st_size > 1000


def test_ct_256_is_an_air_padded_whole_ct_at_1p5_mm():
    from perf.volumes import make_volume

    ph = make_volume("ct_256")
    image, affine, label, names = ph.image, ph.affine, ph.label, ph.label_names
    assert image.shape == (256, 256, 160) and label.shape == image.shape
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), 1.5)
    assert image[0, 0, 0] == -1000.0 and (label == names.index("liver") + 1).sum() > 10000


def test_bench_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown volumes"):
        BenchConfig(label="x", volumes=("mri_brain",))
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(label="x", concurrency=(0,))


def test_report_picks_up_perf_analyzer_and_locust_csvs(tmp_path):
    (tmp_path / "perf_analyzer_segment_patch_concurrency_system.csv").write_text(
        "Concurrency,Inferences/Second,Client Send,p50 latency,p90 latency,p95 latency,p99 latency\n"
        "1,2.5,10,400000,410000,420000,450000\n")
    (tmp_path / "locust_summary.csv").write_text(
        "name,requests,failures,p50_ms,p95_ms,p99_ms,requests_per_s,users,spawn_rate,duration_s\n"
        "Aggregated,12,0,5000,8000,9000,0.13,2,1.0,90\n")
    res = _results()
    res.volume_latency_s = {p: {"ct_head_neck": v["v"]} for p, v in res.volume_latency_s.items()}
    text = write_report(res, tmp_path, label="unit").read_text()
    assert "| segment_patch_concurrency_system | 1 | 2.50 | 400 | 420 | 450 |" in text
    assert "| Aggregated | 12 | 0 | 5000 | 8000 | 9000 | 0.130 |" in text
    assert "no GPU" in text


def test_gpu_monitor_csv_and_plot_from_samples(tmp_path):
    """The CSV/plot writers on samples shaped like NVML's (the sampling itself needs a GPU)."""
    import csv

    from perf.gpu_monitor import GpuSample

    mon = GpuMonitor()
    mon.devices = ["Test GPU"]
    mon.samples = [GpuSample(0.25 * i, 0, 50.0 + i, 20.0, 1000.0 + i, 150.0, 1980.0, 2619.0) for i in range(8)]
    path = mon.write_csv(tmp_path / "gpu.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and set(rows[0]) == {"t_s", "gpu", "util_pct", "mem_util_pct", "mem_used_mib", "power_w",
                                               "sm_clock_mhz", "mem_clock_mhz"}
    assert [float(r["t_s"]) for r in rows] == sorted(float(r["t_s"]) for r in rows)
    assert all(0 <= float(r["util_pct"]) <= 100 for r in rows)
    assert mon.plot(tmp_path / "gpu.png", marks=[(0.5, "eager")]).stat().st_size > 1000


def test_gpu_monitor_samples_a_gpu():
    """The sampling thread on a real device (the counterpart of the no-NVML test above)."""
    import time

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: NVML sampling of a real device (this machine has none)")
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (the perf extra) to sample a GPU")
    with GpuMonitor(interval_s=0.05) as mon:
        time.sleep(0.5)
    assert mon.available, mon.reason
    assert mon.devices and len(mon.samples) >= 2
    assert all(0 <= s.util_pct <= 100 and s.mem_used_mib > 0 for s in mon.samples)
