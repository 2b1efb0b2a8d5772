"""The unit runners the python-backend models use: ONNX Runtime and PyTorch agree; TensorRT where it exists."""

import shutil

import numpy as np
import pytest
import torch

from duplus.contract import UnitContract
from duplus.models.duplus import DuPLUS
from duplus.models.units import example_inputs
from duplus.vocabulary import PromptVocabulary
from export.build_engines import build
from export.tensorrt_engine import tensorrt_available
from serving.runtime import make_runner
from serving.serve import check_repository
from tests.export.test_triton_config import SMALL


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(1)
    ckpt = root / "small.pt"
    model = DuPLUS(SMALL)
    torch.nn.init.normal_(model.conditioning.film[-1].weight, std=0.05)
    torch.save({"model_config": SMALL.to_dict(), "state_dict": model.state_dict(),
                "vocabulary": PromptVocabulary().to_dict()}, ckpt)
    manifest = build(ckpt, root / "repo", engine="torch", units=("conditioning", "segmenter"))
    return root / "repo", manifest, ckpt


@pytest.mark.parametrize("unit", ["conditioning", "segmenter"])
def test_onnxruntime_and_torch_runners_agree(small_repo, unit):
    repo, manifest, _ = small_repo
    contract = UnitContract.from_manifest(unit, manifest["units"][unit])
    feed = {k: v.numpy() for k, v in example_inputs(unit, SMALL, batch=2, k=3, seed=11).items()}
    ort = make_runner(unit, repo / unit / "1", contract, "onnxruntime", threads=1)(feed)
    eager = make_runner(unit, repo / unit / "1", contract, "torch", checkpoint=repo / "checkpoint.pt")(feed)
    assert set(ort) == {t.name for t in contract.outputs}
    for name in ort:
        assert ort[name].shape == eager[name].shape
        assert np.abs(ort[name] - eager[name]).max() < 1e-4, name


def test_onnxruntime_runner_loads_without_torch_monai_or_transformers(small_repo):
    """What a python-backend stub of an ONNX Runtime unit imports: the runner, the manifest reader and the
    model's triton module, and nothing heavy (each of torch, MONAI and transformers cost a stub seconds of
    start-up and memory). In a fresh interpreter, as the stub is."""
    import subprocess
    import sys

    repo, _, _ = small_repo
    code = f"""
import sys
from pathlib import Path
import serving.triton_models
from duplus.contract import UnitContract
from serving.runtime import make_runner
from serving.pipelines import read_manifest
repo = Path({str(repo)!r})
manifest = read_manifest(repo)
contract = UnitContract.from_manifest("segmenter", manifest["units"]["segmenter"])
runner = make_runner("segmenter", repo / "segmenter" / "1", contract, "onnxruntime", threads=1)
print(sorted(m for m in ("torch", "monai", "transformers") if m in sys.modules))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout


def test_runner_errors_name_the_problem(small_repo, tmp_path):
    repo, manifest, _ = small_repo
    contract = UnitContract.from_manifest("segmenter", manifest["units"]["segmenter"])
    with pytest.raises(ValueError, match="unknown engine"):
        make_runner("segmenter", repo / "segmenter" / "1", contract, "tflite")
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        make_runner("segmenter", repo / "segmenter" / "1", contract, "torch", checkpoint=tmp_path / "none.pt")


def test_edited_onnx_file_makes_the_repository_stale(small_repo, tmp_path):
    from serving.serve import RepositoryError

    repo, _, ckpt = small_repo
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    check_repository(copy, ckpt)
    with open(copy / "segmenter" / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match="changed since the build"):
        check_repository(copy, ckpt)


def test_tensorrt_runner_matches_onnxruntime(small_repo, tmp_path):
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT runner test needs tensorrt and a GPU: {why}")
    _, _, ckpt = small_repo
    manifest = build(ckpt, tmp_path / "trt", engine="tensorrt", precision="fp32", units=("segmenter",))
    contract = UnitContract.from_manifest("segmenter", manifest["units"]["segmenter"])
    feed = {k: v.numpy() for k, v in example_inputs("segmenter", SMALL, batch=2, k=3, seed=5).items()}
    trt = make_runner("segmenter", tmp_path / "trt" / "segmenter" / "1", contract, "tensorrt")(feed)
    ort = make_runner("segmenter", tmp_path / "trt" / "segmenter" / "1", contract, "onnxruntime")(feed)
    assert np.abs(trt["logits"] - ort["logits"]).max() < 1e-2
