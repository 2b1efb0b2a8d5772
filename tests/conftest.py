import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "checkpoints" / "duplus_demo.pt"
PROGNOSIS_CHECKPOINT = ROOT / "checkpoints" / "duplus_prognosis.pt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def text_encoder():
    from duplus.text_encoder import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def demo_predictor():
    from duplus.inference import Predictor

    if not DEMO_CHECKPOINT.is_file():
        pytest.fail(f"the shipped demo checkpoint is missing: {DEMO_CHECKPOINT}")
    return Predictor.from_checkpoint(DEMO_CHECKPOINT)


@pytest.fixture(scope="session")
def triton_repository(tmp_path_factory):
    """The embedded repository built from the shipped checkpoints (ONNX Runtime units, prognosis included)."""
    from export.build_engines import build

    if not PROGNOSIS_CHECKPOINT.is_file():
        pytest.fail(f"the shipped prognosis checkpoint is missing: {PROGNOSIS_CHECKPOINT}")
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    build(DEMO_CHECKPOINT, out, engine="onnxruntime", prognosis_checkpoint=PROGNOSIS_CHECKPOINT)
    return out


@pytest.fixture(scope="session")
def torch_repository(tmp_path_factory):
    """The same checkpoints built with ``--engine torch`` (no ONNX: units run from the copied checkpoints), once."""
    from export.build_engines import build

    out = tmp_path_factory.mktemp("triton_torch") / "model_repository"
    build(DEMO_CHECKPOINT, out, engine="torch", prognosis_checkpoint=PROGNOSIS_CHECKPOINT)
    return out


@pytest.fixture(scope="session")
def triton_server(triton_repository):
    """The real Triton server (nvidia-pytriton's tritonserver) on free loopback ports, for the session."""
    from serving.serve import TritonServer

    with TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT,
                      log_file=triton_repository.parent / "triton.log") as srv:
        yield srv
