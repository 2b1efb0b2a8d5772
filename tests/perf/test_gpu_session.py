"""perf.gpu_session: the kit's recorded prompt embeddings, and the report of the committed H200 runs.

The measuring itself needs a CUDA GPU (a lent machine, perf/results/nvidia-h200); what runs here is the part a
wrong result would come from: the embeddings the GPU run looks up, and the tables made from its raw files.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perf.gpu_session import EMBEDDINGS, TOKENIZER, RecordedEncoder, merge_raw, report
from tests.conftest import ROOT

RESULTS = ROOT / "perf" / "results" / "nvidia-h200"
RUNS = sorted(RESULTS.glob("gpu_raw_run*.json"))


def test_recorded_encoder_returns_what_was_recorded_and_names_a_missing_text(tmp_path):
    from duplus.text_encoder import DEFAULT_TEXT_ENCODER, resolve_text_encoder_path

    src = Path(resolve_text_encoder_path(DEFAULT_TEXT_ENCODER))
    (tmp_path / TOKENIZER).mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json"):
        (tmp_path / TOKENIZER / name).write_bytes((src / name).read_bytes())
    emb = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    torch.save({"name": DEFAULT_TEXT_ENCODER, "texts": ["liver", "CT of the abdomen"], "embeddings": emb},
               tmp_path / EMBEDDINGS)
    enc = RecordedEncoder(tmp_path)
    assert enc.dim == 384
    torch.testing.assert_close(enc.encode(["CT of the abdomen", "liver"]), emb[[1, 0]])
    assert len(enc.tokenizer("liver")["input_ids"]) == 3          # [CLS] liver [SEP]
    with pytest.raises(KeyError, match="'spleen' was not encoded by `perf.gpu_session prepare`"):
        enc.encode(["liver", "spleen"])


@pytest.mark.skipif(len(RUNS) < 4, reason="the committed H200 runs are not in this checkout")
def test_report_of_the_committed_h200_runs(tmp_path):
    raw = merge_raw(RUNS)
    assert raw["block_run"]["volumes"] == 4 and raw["block_run"]["patch"] == 1    # later runs replace blocks
    vol = raw["blocks"]["volumes"]
    # the GPU goal: a 512x512x300 CT end to end in at most 1.5 s; the same labels in bf16
    assert vol["ct_512x300"]["shape"] == [512, 512, 300]
    assert vol["ct_512x300"]["gpu_fp32"]["median_s"] <= 1.5
    assert vol["ct_512x300"]["gpu_bf16"]["agreement_vs_gpu_fp32"] >= 0.99
    # the GPU gives the CPU's labels
    for name in ("ct_abdomen", "ct_head_neck", "pet_head_neck"):
        assert vol[name]["gpu_fp32"]["agreement_vs_cpu_fp32"] >= 0.99
    # run 1 (before the body box) vs run 4: the air around ct_256 no longer takes the liver
    first = raw["runs"][0]["volumes"]["ct_256"]["gpu_fp32"]["mean_dice"]
    assert first < 0.6 and vol["ct_256"]["gpu_fp32"]["dice"]["liver"] >= 0.9
    md = report(RUNS, tmp_path, ["a", "b", "c", "d"]).read_text()
    assert "| ct_512x300 | 512×512×300 | 0.93 |" in md
    assert "## Whole volumes run by run" in md and (tmp_path / "gpu_paths.png").stat().st_size > 10_000


def test_help():
    out = subprocess.run([sys.executable, "-m", "perf.gpu_session", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "prepare" in out.stdout and "report" in out.stdout
