"""PEMMA: the PET pathway, LoRA / DoRA adapters (peft), their merge, freezing and the three input modes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from duplus.models.pemma import (
    INPUT_MODES,
    AdapterConfig,
    EarlyFusionUNETR,
    PemmaUNETR,
    UnetrConfig,
    model_from_state,
    model_state,
    parameter_counts,
    segment_petct,
    supported_modes,
)

TINY = UnetrConfig(crop=32, hidden_size=48, mlp_dim=96, num_heads=4, feature_size=8, spacing=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def ct_model():
    torch.manual_seed(0)
    return PemmaUNETR(TINY).eval()


def adapted(base: PemmaUNETR, kind: str, **pathway) -> PemmaUNETR:
    model = (copy.deepcopy(base).add_pet_pathway(**pathway).add_adapters(AdapterConfig(kind=kind, rank=4))
             .freeze_for_adaptation())
    with torch.no_grad():                       # adapters that do something (peft starts LoRA's B at zero)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_ct_only_is_the_plain_unetr(ct_model):
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(ct_model.forward_channels(x, "ct"), ct_model.unetr(x[:, :1]))
    assert supported_modes(ct_model) == ("ct", "pet")
    with pytest.raises(ValueError, match="one input pathway"):
        ct_model.forward_channels(x, "ct+pet")


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_equals_adapted_in_every_mode(ct_model, kind):
    model = adapted(ct_model, kind)
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        before = {m: model.forward_channels(x, m) for m in INPUT_MODES}
        merged = copy.deepcopy(model).merge_adapters()
        after = {m: merged.forward_channels(x, m) for m in INPUT_MODES}
    from export.adapters import has_adapters

    assert not has_adapters(merged) and type(merged.unetr.vit).__name__ == "ViT"
    for m in INPUT_MODES:
        assert float((before[m] - after[m]).abs().max()) < 1e-5, m
    # the adapters and the PET pathway change the outputs (they are not idle)
    with torch.no_grad():
        assert float((before["ct"] - ct_model.forward_channels(x, "ct")).abs().max()) > 1e-4
        assert float((before["ct+pet"] - before["ct"]).abs().max()) > 1e-4


def test_only_the_pemma_parameters_train(ct_model):
    model = adapted(ct_model, "lora").train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("pet_") for n in trainable)
    assert any(".attn.qkv.lora_A" in n for n in trainable) and any(".attn.out_proj.lora_B" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 2, 32, 32, 32)
    for mode in INPUT_MODES:
        opt.zero_grad()
        model.forward_channels(x, mode).square().mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen CT weight {name} changed"
    # full fine-tuning (the baseline) trains everything
    full = copy.deepcopy(ct_model).add_pet_pathway().freeze_for_adaptation(full=True)
    assert parameter_counts(full)["trainable"] == parameter_counts(full)["total"]


def test_trainable_share_of_the_shipped_size_is_below_ten_percent():
    """configs/pemma.yaml's model: hidden 192, MLP 768, 16 features, 64³ crops; LoRA and DoRA of rank 8."""
    import yaml

    from tests.conftest import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "pemma.yaml").read_text())
    base = PemmaUNETR(UnetrConfig(**cfg["model"]))
    for kind in ("lora", "dora"):
        model = copy.deepcopy(base).add_pet_pathway().add_adapters(
            AdapterConfig(**{**cfg["adapter"], "kind": kind})).freeze_for_adaptation()
        counts = parameter_counts(model)
        assert 0.05 < counts["trainable"] / counts["total"] <= 0.10, (kind, counts)


def test_early_fusion_starts_from_the_ct_model(ct_model):
    fused = EarlyFusionUNETR.from_ct(ct_model).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused.forward_channels(x, "ct"), ct_model.forward_channels(x, "ct"))


def test_checkpoint_state_round_trip(ct_model):
    for model in (adapted(ct_model, "dora"), EarlyFusionUNETR.from_ct(ct_model).eval(), ct_model):
        again = model_from_state(model_state(model))
        x = torch.randn(1, 2, 32, 32, 32)
        with torch.no_grad():
            mode = supported_modes(model)[0]
            assert torch.equal(again.forward_channels(x, mode), model.forward_channels(x, mode))


def test_segment_petct_returns_labels_in_the_reference_geometry(ct_model):
    from duplus.synth.phantoms import generate_petct

    pair = generate_petct("F", 11)
    model = adapted(ct_model, "lora")
    labels, mode = segment_petct(model, pair.ct.image, pair.ct.affine, pair.pet.image, pair.pet.affine)
    assert mode == "ct+pet" and labels.shape == pair.ct.image.shape and labels.dtype == np.uint8
    labels, mode = segment_petct(model, pet=pair.pet.image, pet_affine=pair.pet.affine)
    assert mode == "pet" and labels.shape == pair.pet.image.shape
    labels, _ = segment_petct(model, pet=pair.pet.image, pet_affine=pair.pet.affine,
                              reference=(pair.ct.affine, pair.ct.image.shape))
    assert labels.shape == pair.ct.image.shape
    with pytest.raises(ValueError, match="runs"):
        segment_petct(ct_model, pair.ct.image, pair.ct.affine, pair.pet.image, pair.pet.affine)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_the_exported_graph_equals_each_mode(ct_model, kind):
    """The unit that is exported (adapters merged, one graph, the mode an input) gives each mode's own forward:
    the masked attention is the same softmax as a sequence without the absent modality's tokens."""
    from duplus.models.pemma import merged_for_export
    from duplus.models.units import PemmaSegmenterUnit, pemma_example_inputs

    model = adapted(ct_model, kind)
    with torch.no_grad():
        model.pet_skip_weight.fill_(0.6)        # a skip weight other than 1 tells the CT+PET and PET skips apart
    merged, diff = merged_for_export(model)
    assert diff["max_abs"] < 1e-9 and diff["max_abs_float32"] < 1e-5, diff
    unit = PemmaSegmenterUnit(merged).eval()
    for i, mode in enumerate(INPUT_MODES):
        feed = pemma_example_inputs(TINY.crop, batch=2, mode=i, seed=i)
        with torch.no_grad():
            logits, probs = unit(**feed)
            expected = model.forward_channels(feed["image"], mode)
        assert float((logits - expected).abs().max()) < 1e-5, mode
        assert torch.allclose(probs.sum(dim=1), torch.ones(()), atol=1e-5)
    with pytest.raises(ValueError, match="merge the adapters"):
        PemmaSegmenterUnit(model)
    with pytest.raises(ValueError, match="PET pathway"):
        ct_model.forward_mode(feed["image"], feed["mode"])


def test_adapter_config_is_checked():
    with pytest.raises(ValueError, match="lora' or 'dora"):
        AdapterConfig(kind="ia3")
    with pytest.raises(ValueError, match="multiple of 16"):
        UnetrConfig(crop=40)


def test_pet_skips_at_every_resolution_and_a_low_rank_pet_embedding(ct_model):
    """The ``pemma_lora_ms`` variant: PET's own copies of encoder2..4 on the PET tokens, added with learnable
    weights (replacing the CT's with PET alone), and the CT's patch embedding frozen under a LoRA for PET. Under
    10 % trainable at the shipped size; the CT convolution under the PET LoRA stays frozen; merged and exported
    as one graph it gives each mode's own forward; its checkpoint state rebuilds it."""
    import yaml

    from duplus.models.pemma import merged_for_export
    from duplus.models.units import PemmaSegmenterUnit, pemma_example_inputs
    from tests.conftest import ROOT

    cfg = yaml.safe_load((ROOT / "configs" / "pemma.yaml").read_text())
    pathway = cfg["stages"]["pemma_lora_ms"]["pet_pathway"]
    full = PemmaUNETR(UnetrConfig(**cfg["model"])).add_pet_pathway(**pathway).add_adapters(
        AdapterConfig(**cfg["adapter"])).freeze_for_adaptation()
    counts = parameter_counts(full)
    assert 0.05 < counts["trainable"] / counts["total"] <= 0.10, counts
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert not any("base_layer" in n for n in trainable if n.startswith("pet_embedding"))
    assert any(n.startswith("pet_embedding") and "lora_A" in n for n in trainable)
    assert any(n.startswith("pet_deep_skips.2.") for n in trainable) and "pet_deep_weights" in trainable

    model = adapted(ct_model, "lora", deep_skips=True, embedding_rank=4)
    with torch.no_grad():       # weights other than 1 tell the CT+PET and PET-alone skips apart
        model.pet_skip_weight.fill_(0.6)
        model.pet_deep_weights.copy_(torch.tensor([0.5, 0.7, 1.3]))
    merged, diff = merged_for_export(model)
    assert diff["max_abs"] < 1e-9 and diff["max_abs_float32"] < 1e-5, diff
    assert merged.pet_pathway == {"deep_skips": True, "embedding_rank": None}
    unit = PemmaSegmenterUnit(merged).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        for i, mode in enumerate(INPUT_MODES):
            feed = pemma_example_inputs(TINY.crop, batch=2, mode=i, seed=i)
            expected = model.forward_channels(feed["image"], mode)
            assert float((unit(**feed)[0] - expected).abs().max()) < 1e-5, mode
        again = model_from_state(model_state(model))      # the checkpoint's state gives the same model back
        assert torch.equal(again.forward_channels(x, "ct+pet"), model.forward_channels(x, "ct+pet"))
        before = model.forward_channels(x, "ct+pet")      # the deep PET skips are not idle
        model.pet_deep_weights.zero_()
        assert float((model.forward_channels(x, "ct+pet") - before).abs().max()) > 1e-4
