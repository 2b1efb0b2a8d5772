"""The raw results of one benchmark run (``raw.json``): what :mod:`perf.measure` records and
:mod:`perf.report` turns into tables and plots. Every timing is kept, not only its median."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

RAW_JSON = "raw.json"


@dataclass
class Results:
    machine: dict = field(default_factory=dict)
    volume_latency_s: dict = field(default_factory=dict)      # path -> volume -> [seconds]
    patch_latency_ms: dict = field(default_factory=dict)      # path -> [ms]
    prompt_latency_ms: dict = field(default_factory=dict)     # uncached / cached -> [ms]
    throughput: list = field(default_factory=list)            # [{concurrency, requests, volumes_per_s, p50_s, p95_s}]
    agreement: dict = field(default_factory=dict)             # volume -> Dice(triton, eager) per target
    extra: dict = field(default_factory=dict)

    @property
    def volumes(self) -> tuple[str, ...]:
        """The volumes every path ran on, in the order they ran."""
        return tuple(next(iter(self.volume_latency_s.values()), {}))

    @property
    def repeats(self) -> int:
        """Timed runs per path and volume."""
        first = next(iter(self.volume_latency_s.values()), {})
        return len(next(iter(first.values()), []))

    @property
    def concurrency(self) -> tuple[int, ...]:
        return tuple(r["concurrency"] for r in self.throughput)


def write_raw(res: Results, out: Path) -> Path:
    path = Path(out) / RAW_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(res), indent=2, default=str))
    return path


def read_raw(out: Path) -> Results:
    """The results saved in ``out/raw.json``."""
    path = Path(out) / RAW_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m perf.bench` first (it measures and writes it)")
    return Results(**json.loads(path.read_text()))
