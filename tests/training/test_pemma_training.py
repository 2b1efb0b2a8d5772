"""The PEMMA study's commands on a tiny configuration: data on first use, two stages, the held-out scoring."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from training import evaluate_pemma, train_pemma
from training.config import PemmaConfig

TINY = {
    "seed": 0,
    "model": {"crop": 32, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "feature_size": 8,
              "spacing": [4.0, 4.0, 4.0]},
    "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
    "data": {"ct": {"centres": ["D"], "cases": 2, "seed": 1}, "pet_ct": {"centres": ["F"], "cases": 2, "seed": 2}},
    "heldout": {"e": {"centres": ["F"], "cases": 1, "seed": 9}},
    "stages": {"pretrain": {"data": "ct", "steps": 2, "lr": 0.001, "val_cases": 1, "val_every": 2},
               "pemma_lora": {"data": "pet_ct", "steps": 3, "lr": 0.001, "val_cases": 1, "ct_only_prob": 0.3,
                              "pet_only_prob": 0.3},
               "pemma_lora_ms": {"data": "pet_ct", "steps": 3, "lr": 0.001, "val_cases": 1,
                                 "pet_pathway": {"deep_skips": True, "embedding_rank": 4}}},
}


@pytest.fixture()
def config_path(tmp_path):
    path = tmp_path / "pemma.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output": str(tmp_path / "run"), "data_root": str(tmp_path / "data")}))
    return path


def test_two_stages_and_the_heldout_scoring(config_path, tmp_path, capsys):
    train_pemma.main(["--config", str(config_path), "--stage", "pretrain", "--stage", "pemma_lora"])
    run = tmp_path / "run"
    state = torch.load(run / "pemma_lora.pt", weights_only=False)
    assert state["stage"] == "pemma_lora" and state["model"]["adapter"]["kind"] == "lora"
    counts = state["parameters"]
    assert 0 < counts["trainable"] < counts["total"]
    assert sum(state["history"]["modes"].values()) == 3 and len(state["history"]["loss"]) == 3
    assert state["training_cases"] == ["F-000"] and state["validation_cases"] == ["F-001"]
    assert (run / "pemma_lora_curves.png").stat().st_size > 1000
    # the held-out set is generated from its own seed, apart from the training data (small-grid centres D and F
    # keep this test short: centre E's 1.5 mm CT is four times the voxels)
    evaluate_pemma.main(["--config", str(config_path), "--heldout", "e"])
    result = json.loads((run / "eval_e.json").read_text())
    assert result["looks"] == 1 and result["cases"] == ["F-000"]
    assert set(result["scores"]) == {"pretrain", "pemma_lora"}
    assert set(result["scores"]["pemma_lora"]) == {"ct+pet", "ct", "pet"}
    assert set(result["scores"]["pretrain"]) == {"ct", "pet"}
    for by_target in result["scores"]["pemma_lora"].values():
        assert all(0.0 <= v <= 1.0 for values in by_target.values() for v in values)
    assert "PEMMA (LoRA)" in (run / "eval_e.md").read_text()
    assert json.loads((run / "heldout_looks.json").read_text()) == {"e": 1}
    _backbone_from_and_the_early_fusion_update(config_path, tmp_path)


def _backbone_from_and_the_early_fusion_update(config_path, tmp_path):
    """--backbone-from gives back the very pretrained UNETR a PEMMA checkpoint was adapted from (adapters unloaded,
    PET pathway dropped), and continual_early_fusion updates every weight of the early-fusion model on CT alone
    (part of the test above: it reuses that test's two trained stages)."""
    from duplus.models.pemma import EarlyFusionUNETR, model_state

    run = tmp_path / "run"
    trained = torch.load(run / "pretrain.pt", weights_only=False)["model"]["state_dict"]
    cfg = PemmaConfig.from_yaml(config_path, output=str(tmp_path / "other"))
    train_pemma.backbone_from(cfg, run / "pemma_lora.pt")
    extracted = torch.load(tmp_path / "other" / "pretrain.pt", weights_only=False)
    assert extracted["stage"] == "pretrain" and set(extracted["model"]["state_dict"]) == set(trained)
    for key, value in trained.items():
        assert torch.equal(extracted["model"]["state_dict"][key], value), key
    with pytest.raises(ValueError, match="not a PEMMA checkpoint"):
        train_pemma.backbone_from(cfg, run / "pretrain.pt")
    base = train_pemma.load_stage_model(cfg, "pretrain")
    torch.save({"model": model_state(EarlyFusionUNETR.from_ct(base))}, tmp_path / "other" / "early_fusion.pt")
    model, modes = train_pemma.build_stage_model(cfg, "continual_early_fusion")
    assert isinstance(model, EarlyFusionUNETR) and modes == ("ct",)
    assert all(p.requires_grad for p in model.parameters())
    # the served variant's stage builds its PET pathway from the stage's configuration, the CT weights frozen
    ms, _ = train_pemma.build_stage_model(cfg, "pemma_lora_ms")
    assert ms.pet_pathway == {"deep_skips": True, "embedding_rank": 4}
    assert all(not p.requires_grad for n, p in ms.named_parameters() if n.startswith("unetr.") and "lora_" not in n)


def test_configuration_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="reuse training seeds"):
        PemmaConfig(**{**TINY, "heldout": {"e": {"centres": ["F"], "cases": 1, "seed": 2}}})
    with pytest.raises(ValueError, match="not in data"):
        PemmaConfig(**{**TINY, "stages": {"pretrain": {"data": "nope", "steps": 1, "lr": 0.1}}})
    with pytest.raises(ValueError, match="centres must be among"):
        PemmaConfig(**{**TINY, "data": {"ct": {"centres": ["Q"], "cases": 1, "seed": 1}}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "stages": {}}))
    with pytest.raises(ValueError, match="not in the configuration"):
        train_pemma.main(["--config", str(path), "--stage", "pretrain"])
