"""The shipped PEMMA checkpoint (checkpoints/pemma_lora.pt, trained by configs/pemma.yaml's stages): what it
records, the trainable share and the merge of its LoRA adapters at full size."""

from __future__ import annotations

import copy

import pytest
import torch

from duplus.models.pemma import INPUT_MODES, PemmaUNETR, model_from_state
from tests.conftest import ROOT

CHECKPOINT = ROOT / "checkpoints" / "pemma_lora.pt"


@pytest.fixture(scope="module")
def state():
    if not CHECKPOINT.is_file():
        pytest.fail(f"the shipped PEMMA checkpoint is missing: {CHECKPOINT}")
    return torch.load(CHECKPOINT, weights_only=False)


def test_record_of_the_training_run(state):
    assert state["stage"] == "pemma_lora" and state["format"] == "pemma-checkpoint/1"
    counts = state["parameters"]
    assert counts["trainable"] / counts["total"] <= 0.10, counts
    assert state["model"]["adapter"]["kind"] == "lora" and state["model"]["pet"]
    assert all(case.startswith("E-") for case in state["training_cases"] + state["validation_cases"])
    assert set(state["history"]["modes"]) == set(INPUT_MODES) and min(state["history"]["modes"].values()) > 50


def test_merged_equals_adapted_at_full_size(state):
    """The merge itself is exact (float64: about 2e-14); in float32 the two graphs only round differently, by about
    1e-6 of the logits' magnitude (1.1e-5 on logits up to 11 on a 2-core Intel Xeon, 2026-12-04: an absolute 1e-5
    bar failed there). A wrong merge moves logits by 1e-2 or more."""
    model = model_from_state(state["model"])
    assert isinstance(model, PemmaUNETR) and model.adapter is not None
    merged = copy.deepcopy(model).merge_adapters()
    model64 = copy.deepcopy(model).double()
    merged64 = copy.deepcopy(model64).merge_adapters()
    x = torch.randn(1, 2, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for mode in INPUT_MODES:
            ref = model.forward_channels(x, mode)
            err = float((ref - merged.forward_channels(x, mode)).abs().max())
            assert err <= 1e-5 * float(ref.abs().max()), (mode, err)
            err64 = float((model64.forward_channels(x.double(), mode) - merged64.forward_channels(x.double(), mode))
                          .abs().max())
            assert err64 < 1e-10, (mode, err64)
