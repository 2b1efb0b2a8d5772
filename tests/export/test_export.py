"""Export: ONNX per unit, contract checks, PyTorch vs ONNX Runtime parity, LoRA merge contract, TensorRT gate."""

import json

import onnx
import pytest
import torch

from duplus.contract import contracts
from duplus.models.duplus import DuPLUS, DuPLUSConfig
from duplus.models.units import ConditioningUnit, SegmenterUnit, example_inputs
from duplus.vocabulary import PromptVocabulary
from export.adapters import has_adapters, merge_adapters
from export.build_engines import build
from export.onnx_export import ContractError, check_onnx, export_onnx, parity
from export.tensorrt_engine import ShapeProfile, tensorrt_available

SMALL = DuPLUSConfig(channels=(4, 8, 16), patch_size=(32, 32, 16), film_hidden=32, controller_hidden=32,
                     head_channels=4, head_levels=2)


def _small_model(seed=0):
    torch.manual_seed(seed)
    model = DuPLUS(SMALL).eval()
    torch.nn.init.normal_(model.conditioning.film[-1].weight, std=0.05)  # non-identity FiLM: parity must see it
    return model


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    model = _small_model()
    torch.save({"model_config": SMALL.to_dict(), "state_dict": model.state_dict(),
                "vocabulary": PromptVocabulary().to_dict()}, path)
    return path


@pytest.mark.parametrize("unit", ["conditioning", "segmenter"])
def test_unit_export_matches_contract_and_pytorch(tmp_path, unit):
    model = _small_model()
    module = {"conditioning": ConditioningUnit, "segmenter": SegmenterUnit}[unit](model)
    contract = contracts(SMALL)[unit]
    path = export_onnx(module, contract, example_inputs(unit, SMALL), tmp_path / f"{unit}.onnx")
    check_onnx(path, contract)
    # fresh inputs with other batch, K and spatial sizes than the traced example
    fresh = [example_inputs(unit, SMALL, batch=b, k=k, spatial=s, seed=7 + b)
             for b, k, s in [(1, 1, (32, 32, 16)), (3, 5, (48, 32, 32))]]
    results = parity(module, path, contract, fresh, atol=1e-4, rtol=1e-3)
    assert all(r.ok for r in results), [str(r) for r in results]
    assert max(r.max_abs for r in results) < 1e-4


def test_mixed_modality_batch_in_onnx(tmp_path):
    """The exported segmenter selects each sample's own stem (one-hot path), like eager PyTorch."""
    model = _small_model()
    contract = contracts(SMALL)["segmenter"]
    path = export_onnx(SegmenterUnit(model), contract, example_inputs("segmenter", SMALL), tmp_path / "s.onnx")
    feed = example_inputs("segmenter", SMALL, batch=3, k=2, seed=5)
    feed["modality"] = torch.tensor([0, 1, 2])
    results = parity(SegmenterUnit(model), path, contract, [feed], atol=1e-4, rtol=1e-3)
    assert all(r.ok for r in results)


def test_contract_violation_is_reported(tmp_path):
    model = _small_model()
    contract = contracts(SMALL)["conditioning"]
    path = export_onnx(ConditioningUnit(model), contract, example_inputs("conditioning", SMALL), tmp_path / "c.onnx")
    m = onnx.load(str(path))
    m.graph.output[0].name = "gamma_beta"
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(Exception, match="gamma_beta|film"):
        check_onnx(tmp_path / "bad.onnx", contract)


def test_build_engines_writes_checked_units(small_checkpoint, tmp_path):
    out = tmp_path / "repo"
    manifest = build(small_checkpoint, out, engine="onnxruntime")
    assert set(manifest["units"]) == {"text_encoder", "conditioning", "segmenter"}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["checkpoint_sha256"] == manifest["checkpoint_sha256"]
    for name, entry in manifest["units"].items():
        assert (out / entry["onnx"]).is_file()
        for p in entry["parity"]:
            assert p["max_abs"] <= p["atol"] or p["max_rel"] <= p["rtol"], (name, p)
    # the text encoder matches PyTorch very closely (DESIGN.md measured 1.4e-7)
    assert max(p["max_abs"] for p in manifest["units"]["text_encoder"]["parity"]) < 1e-5


def test_build_engines_cli_rejects_bad_patch(small_checkpoint, tmp_path):
    from export.build_engines import main

    assert main(["--checkpoint", str(small_checkpoint), "--output", str(tmp_path), "--patch-size", "30", "32", "16",
                 "--units", "segmenter"]) == 1


def test_lora_merge_contract(text_encoder):
    """peft LoRA on the text encoder: merged == unmerged, no adapter layers remain, differs from base,
    and a save/load round trip of the merged weights gives the same outputs."""
    import copy

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(text_encoder)
    feed = example_inputs("text_encoder", SMALL, seed=3)

    def run(m):
        return m(feed["input_ids"], feed["attention_mask"])

    adapted = copy.deepcopy(text_encoder)
    adapted.model = get_peft_model(adapted.model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                             init_lora_weights=False))
    assert has_adapters(adapted)
    merged = merge_adapters(adapted, run, atol=1e-5)
    assert not has_adapters(merged)
    with torch.no_grad():
        torch.testing.assert_close(run(merged), run(adapted), atol=1e-5, rtol=1e-4)
        assert (run(merged) - run(base)).abs().max() > 1e-3
        state = {k: v.clone() for k, v in merged.state_dict().items()}
        reloaded = copy.deepcopy(base)
        reloaded.load_state_dict(state)
        torch.testing.assert_close(run(reloaded), run(merged))


def test_shape_profile_validation():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeProfile({"image": ((1, 1, 96), (4, 1, 64), (4, 1, 96))})


def test_tensorrt_engine_where_available(small_checkpoint, tmp_path):
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT engine test needs tensorrt and a GPU: {why}")
    manifest = build(small_checkpoint, tmp_path / "trt", engine="tensorrt", precision="fp16",
                     units=("conditioning", "segmenter"))
    for name in ("conditioning", "segmenter"):
        assert (tmp_path / "trt" / manifest["units"][name]["plan"]).is_file()


def test_contract_error_type():
    assert issubclass(ContractError, ValueError)
