import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = ROOT / "checkpoints" / "duplus_demo.pt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def text_encoder():
    from training.text_encoder import TextEncoder

    return TextEncoder()


@pytest.fixture(scope="session")
def demo_predictor():
    from training.inference import Predictor

    if not DEMO_CHECKPOINT.is_file():
        pytest.fail(f"the shipped demo checkpoint is missing: {DEMO_CHECKPOINT}")
    return Predictor.from_checkpoint(DEMO_CHECKPOINT)
