"""The report from saved raw results only (``python -m perf.bench --report-only``): tables, summary and PNGs from
a small raw.json fixture, with nothing measured and nothing heavy imported."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from perf.bench import main
from perf.raw import read_raw
from perf.report import report_only, summarise

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).with_name("fixtures") / "raw.json"


@pytest.fixture
def results_dir(tmp_path):
    out = tmp_path / "fixture"
    out.mkdir()
    shutil.copy(FIXTURE, out / "raw.json")
    return out


def test_report_only_lists_every_row_and_writes_the_pngs(results_dir, capsys):
    assert main(["--report-only", "--label", "fixture", "--out-root", str(results_dir.parent)]) == 0
    text = (results_dir / "report.md").read_text()
    assert text == capsys.readouterr().out.removesuffix("\n")   # the CLI prints the report it wrote
    assert text.startswith("# Benchmark `fixture`")
    assert "python -m perf.bench --label fixture --volumes ct_256 ct_head_neck --repeats 3 --concurrency 1 2 4" in text
    assert "| path | ct_256 (s) | ct_head_neck (s) | volumes/s |" in text
    for row in ("| pytorch_eager | 35.00 | 7.10 |", "| onnxruntime | 19.20 | 4.00 |", "| triton | 21.10 | 4.50 |",
                "| pytorch_eager | 1193.0 |", "| onnxruntime | 523.0 |", "| triton | 526.0 |",
                "| triton_ensemble | 518.0 |", "| uncached | 27.7 |", "| cached | 1.1 |",
                "| 1 | 4 | 0.046 | 21.50 | 22.00 |", "| 2 | 4 | 0.052 | 38.00 | 39.00 |",
                "| 4 | 4 | 0.053 | 75.00 | 76.00 |"):
        assert row in text, row
    assert "## Triton throughput vs concurrency (ct_256)" in text and "no GPU" in text
    assert "Fixture CPU, 2 cores, GPU: none" in text and '"lymph node": 0.998' in text
    assert "![gpu]" not in text and "## perf_analyzer" not in text and "## locust" not in text
    for png in ("latency_by_path.png", "throughput_vs_concurrency.png"):
        data = (results_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["speedup_vs_pytorch_eager"] == pytest.approx((35.0 + 7.1) / (21.1 + 4.5), abs=1e-3)
    assert summary["triton_overhead_ratio"] == pytest.approx(518.0 / 523.0, abs=1e-3)
    assert summary == json.loads(json.dumps(summarise(read_raw(results_dir))))
    assert (results_dir / "raw.json").read_bytes() == FIXTURE.read_bytes()   # the raw results stay as they were


def test_report_only_measures_nothing_and_imports_no_runtime(results_dir):
    code = ("import sys; from perf.bench import main; "
            f"main(['--report-only', '--label', 'fixture', '--out-root', {str(results_dir.parent)!r}]); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tritonclient', 'duplus', 'serving', 'clients') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (results_dir / "report.md").is_file()


def test_report_only_without_raw_results_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m perf.bench"):
        report_only(tmp_path)
