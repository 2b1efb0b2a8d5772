"""The unit runners the python-backend models use: ONNX Runtime and PyTorch agree; TensorRT where it exists."""

import re
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
def small_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(1)
    ckpt = root / "small.pt"
    model = DuPLUS(SMALL)
    torch.nn.init.normal_(model.conditioning.film[-1].weight, std=0.05)
    torch.save({"model_config": SMALL.to_dict(), "state_dict": model.state_dict(),
                "vocabulary": PromptVocabulary().to_dict()}, ckpt)
    return ckpt


@pytest.fixture(scope="module")
def small_repo(small_checkpoint):
    """ONNX Runtime units (model.onnx files)."""
    repo = small_checkpoint.parent / "repo"
    manifest = build(small_checkpoint, repo, engine="onnxruntime", units=("conditioning", "segmenter"))
    return repo, manifest, small_checkpoint


@pytest.fixture(scope="module")
def torch_repo(small_checkpoint):
    """PyTorch units: they run from the repository's checkpoint.pt, no ONNX is exported."""
    repo = small_checkpoint.parent / "torch_repo"
    manifest = build(small_checkpoint, repo, engine="torch", units=("conditioning", "segmenter"))
    return repo, manifest, small_checkpoint


@pytest.mark.parametrize("unit", ["conditioning", "segmenter"])
def test_onnxruntime_and_torch_runners_agree(small_repo, torch_repo, unit):
    repo, manifest, _ = small_repo
    contract = UnitContract.from_manifest(unit, manifest["units"][unit])
    feed = {k: v.numpy() for k, v in example_inputs(unit, SMALL, batch=2, k=3, seed=11).items()}
    ort = make_runner(unit, repo / unit / "1", contract, "onnxruntime", threads=1)(feed)
    trepo = torch_repo[0]
    eager = make_runner(unit, trepo / unit / "1", contract, "torch", checkpoint=trepo / "checkpoint.pt")(feed)
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
from serving.requests import read_manifest
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


def test_torch_engine_exports_no_onnx_and_its_repository_checks(torch_repo, tmp_path):
    """--engine torch: no model.onnx (the units run from checkpoint.pt); each manifest entry names the checkpoint
    and its sha256, check_repository accepts the repository and still catches an edited or missing checkpoint."""
    from serving.serve import RepositoryError

    repo, manifest, ckpt = torch_repo
    assert not list(repo.glob("*/1/model.onnx")) and not list(repo.glob("*/1/model.plan"))
    for name, entry in manifest["units"].items():
        assert "onnx" not in entry and "parity" not in entry, name
        assert entry["checkpoint"] == "checkpoint.pt" and entry["sha256"] == manifest["checkpoint_sha256"], name
        assert UnitContract.from_manifest(name, entry).inputs  # the serving side reads its contract from here
    assert check_repository(repo, ckpt)["engine"] == "torch"
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    with open(copy / "checkpoint.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match="checkpoint.pt changed since the build"):
        check_repository(copy)
    (copy / "checkpoint.pt").unlink()
    with pytest.raises(RepositoryError, match="incomplete.*checkpoint.pt"):
        check_repository(copy)


def test_a_rebuild_with_another_engine_leaves_no_stale_unit_files(small_checkpoint, tmp_path):
    out = tmp_path / "repo"
    build(small_checkpoint, out, engine="onnxruntime", units=("conditioning",))
    assert (out / "conditioning" / "1" / "model.onnx").is_file()
    manifest = build(small_checkpoint, out, engine="torch", units=("conditioning",), max_batch_size=3)
    assert not (out / "conditioning" / "1" / "model.onnx").exists()
    assert manifest["max_batch_size"] == 3      # an explicit window batch wins over the CPU default of one
    assert check_repository(out, small_checkpoint)["units"] == manifest["units"]


def test_torch_engine_with_prognosis_runs_from_both_checkpoints(torch_repository, tmp_path):
    """The shipped checkpoints with --engine torch: image_features runs from checkpoint.pt, the EHR encoder and
    the head from prognosis_checkpoint.pt; the LoRA merge is still checked; editing either copy is caught."""
    from serving.requests import read_manifest
    from serving.serve import RepositoryError
    from tests.conftest import DEMO_CHECKPOINT

    out = tmp_path / "repo"
    shutil.copytree(torch_repository, out)   # the session's torch build, copied: this test edits a checkpoint
    manifest = read_manifest(out)
    assert not list(out.glob("*/1/model.onnx"))
    units = manifest["units"]
    assert units["image_features"]["checkpoint"] == "checkpoint.pt"
    assert units["text_encoder_ehr"]["checkpoint"] == units["prognosis"]["checkpoint"] == "prognosis_checkpoint.pt"
    assert units["prognosis"]["sha256"] == manifest["prognosis"]["checkpoint_sha256"]
    assert manifest["prognosis"]["lora_merge_max_abs"] <= 1e-5
    check_repository(out, DEMO_CHECKPOINT)
    with open(out / "prognosis_checkpoint.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match="prognosis_checkpoint.pt changed since the build"):
        check_repository(out, DEMO_CHECKPOINT)


def test_tensorrt_runner_names_a_shape_outside_the_profile():
    """set_input_shape's refusal becomes an InvalidRequest naming the unit, the tensor, the shape and the
    profile (a stand-in engine and context: the runner's own code, without TensorRT or a GPU)."""
    from duplus.contract import InvalidRequest, contracts
    from serving.runtime import TensorRTRunner

    class Engine:
        def get_tensor_profile_shape(self, name, profile):
            return [(1, 1, 32, 32, 16), (4, 1, 32, 32, 16), (4, 1, 32, 32, 16)]

    class Context:
        def set_input_shape(self, name, shape):
            return shape[0] <= 4

        def set_tensor_address(self, name, ptr):
            pass

    runner = TensorRTRunner.__new__(TensorRTRunner)
    runner.torch, runner.device, runner.engine, runner.context = torch, torch.device("cpu"), Engine(), Context()
    runner.contract = contracts(SMALL)["segmenter"]
    runner.stream = None
    feed = {k: v.numpy() for k, v in example_inputs("segmenter", SMALL, batch=6, k=2, seed=1).items()}
    with pytest.raises(InvalidRequest, match=r"segmenter: TensorRT refused input image of shape \(6, 1, 32, 32, 16\)"
                                             r".*allows \(1, 1, 32, 32, 16\) to \(4, 1, 32, 32, 16\)"):
        runner(feed)


def test_torch_units_on_cpu_take_one_window_per_call(torch_repository):
    """The window batch defaults by engine and device (one for PyTorch units on CPU, the fastest there; four
    otherwise) and reaches segment_volume's limits (an explicit value wins: test_a_rebuild_with_another_engine_leaves_no_stale_unit_files)."""
    from duplus.contract import ServingLimits
    from export.build_engines import default_max_batch_size
    from serving.requests import read_manifest

    manifest = read_manifest(torch_repository)
    assert (manifest["engine"], manifest["device"]) == ("torch", "cpu")
    assert manifest["max_batch_size"] == 1
    config = (torch_repository / "segment_volume" / "config.pbtxt").read_text()
    params = dict(re.findall(r'key: "(\w+)"\s+value \{\s+string_value: "([^"]*)"', config))
    assert ServingLimits.from_parameters(params).sw_batch_size == 1
    assert [default_max_batch_size(*ed) for ed in (("onnxruntime", "cpu"), ("torch", "gpu"), ("tensorrt", "gpu"))] \
        == [4, 4, 4]
