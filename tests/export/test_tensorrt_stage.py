"""The TensorRT stage without TensorRT: int8 calibration data (phantom patches at the profile's opt shapes), its
stream and cache, the profiles and the engine-parity inputs inside them; and, where TensorRT and a GPU exist,
engines checked against ONNX Runtime (skipped here with the reason)."""

import numpy as np
import pytest
import torch

from duplus.contract import contracts, prognosis_contracts
from export.calibration import (
    CalibrationCache,
    CalibrationCase,
    CalibrationStream,
    PhantomCalibration,
    calibration_batches,
    random_patch,
)
from export.stages import ENGINE_TOLERANCES, INT8_UNITS, engine_tolerances, profile_inputs, unit_precision, unit_profile
from export.tensorrt_engine import ShapeProfile, build_engine, tensorrt_available
from tests.export.test_triton_config import SMALL

PATCH = (32, 32, 16)
IMAGE_DIM, TEXT_DIM = 5 + 3 * SMALL.head_in_channels, SMALL.text_dim


def _cases(n=2, k=3, grid=(40, 20, 30)):
    rng = np.random.default_rng(0)
    return [CalibrationCase(rng.normal(size=grid).astype(np.float32), i % 3,
                            rng.normal(size=SMALL.film_size).astype(np.float32),
                            rng.normal(size=(k, SMALL.head_params)).astype(np.float32)) for i in range(n)]


def _opt(name="segmenter", max_batch=4, max_targets=16):
    return unit_profile(name, SMALL, PATCH, max_batch=max_batch, max_targets=max_targets, image_dim=IMAGE_DIM)


def test_calibration_batches_match_the_contract_at_the_profile_opt_shapes():
    shapes = _opt().at("opt")
    cases = _cases()
    batches = calibration_batches(cases, shapes, n_batches=5, seed=1)
    contract = contracts(SMALL)["segmenter"]
    assert len(batches) == 5
    for j, batch in enumerate(batches):
        assert list(batch) == [t.name for t in contract.inputs]
        for spec in contract.inputs:
            assert batch[spec.name].shape == shapes[spec.name] and batch[spec.name].dtype == np.dtype(spec.dtype)
        case = cases[j % len(cases)]
        assert (batch["modality"] == case.modality).all()
        np.testing.assert_array_equal(batch["film"], np.repeat(case.film[None], 4, 0))
        # K = 4 head rows from the case's 3 targets, cycled
        np.testing.assert_array_equal(batch["head_params"], case.head_params[[0, 1, 2, 0]])
        # each patch is a window of the case's volume (y is shorter than the patch: edge-padded)
        padded = np.pad(case.image, [(0, 0), (0, 12), (0, 0)], mode="edge")
        for patch in batch["image"][:, 0]:
            hits = [(x, z) for x in range(padded.shape[0] - 31) for z in range(padded.shape[2] - 15)
                    if np.array_equal(padded[x:x + 32, :32, z:z + 16], patch)]
            assert hits
    again = calibration_batches(cases, shapes, n_batches=5, seed=1)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, again))   # seeded
    with pytest.raises(ValueError, match="batch size"):
        calibration_batches(cases, dict(shapes, modality=(3,)), n_batches=1)
    with pytest.raises(ValueError, match="do not fit"):
        calibration_batches(_cases(), dict(shapes, film=(4, SMALL.film_size + 1)), n_batches=1)


def test_random_patch_pads_short_axes_with_the_edge():
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    patch = random_patch(image, (8, 5, 2), np.random.default_rng(0))
    assert patch.shape == (8, 5, 2)
    np.testing.assert_array_equal(patch[4:], np.repeat(patch[3:4], 4, axis=0))


def test_calibration_stream_is_lazy_ordered_and_checked():
    shapes = _opt().at("opt")
    made = []

    def make():
        made.append(1)
        return calibration_batches(_cases(), shapes, n_batches=2)

    stream = CalibrationStream(make, shapes)
    assert not made                              # no phantom drawn until TensorRT asks (a cached table: never)
    first = stream.next(["film", "image", "modality", "head_params"])
    assert made == [1] and [a.shape for a in first] == [shapes[n] for n in ("film", "image", "modality",
                                                                              "head_params")]
    assert all(a.flags["C_CONTIGUOUS"] for a in first)
    assert stream.next(["image", "modality", "film", "head_params"]) is not None
    assert stream.next(["image"]) is None and made == [1]
    with pytest.raises(ValueError, match="no input 'pixels'"):
        CalibrationStream(make, shapes).next(["pixels"])
    with pytest.raises(ValueError, match="opt shape"):
        CalibrationStream(make, dict(shapes, image=(1, 1) + PATCH)).next(["image"])
    with pytest.raises(ValueError, match="no calibration batches"):
        CalibrationStream(list, shapes).next(["image"])


def test_calibration_cache_is_keyed(tmp_path):
    path = tmp_path / ".segmenter.int8-calibration"
    cache = CalibrationCache(path, "onnx-sha phantoms")
    assert cache.read() is None
    table = b"TRT-8600-EntropyCalibration2\nimage: 3c010a14\n"
    cache.write(table)
    assert cache.read() == table and not list(tmp_path.glob("*.tmp"))
    assert CalibrationCache(path, "onnx-sha phantoms").read() == table
    assert CalibrationCache(path, "another onnx file").read() is None       # a changed unit calibrates again
    cache.write(b"")
    assert cache.read() is None
    path.write_bytes(table)                                                  # a bare table of unknown origin
    assert cache.read() is None


def test_phantom_calibration_draws_preprocessed_phantoms_with_their_prompts():
    """Real phantoms (a coarse acquisition keeps it quick) through to_model_space, conditioned on their own
    T1 and structures; the key names the data and the shapes."""
    from duplus.synth.phantoms import AcquisitionSpec

    seen = []

    def condition(t1, targets):
        seen.append((t1, list(targets)))
        return np.zeros(SMALL.film_size, np.float32), np.ones((len(targets), SMALL.head_params), np.float32)

    acq = AcquisitionSpec((4.0, 4.0, 4.0), (0, 1, 2), (False, False, False), 1.0)
    source = PhantomCalibration(SMALL, condition, contexts=(("head_neck", "PET"), ("head_neck", "CT")), n_cases=2,
                                n_batches=3, acquisition=acq)
    shapes = _opt(max_batch=2).at("opt")
    batches = source.batches(shapes)
    assert len(batches) == 3 and all(b["image"].shape == (2, 1) + PATCH for b in batches)
    assert [t for t, _ in seen] == ["PET of the head and neck", "CT of the head and neck"]
    assert seen[0][1] == ["primary tumour", "lymph node"]
    assert [int(b["modality"][0]) for b in batches] == [SMALL.modalities.index(m) for m in ("PET", "CT", "PET")]
    for b in batches:
        assert np.isfinite(b["image"]).all() and b["image"].std() > 0   # normalised intensities, not padding
    assert source.key(shapes) != source.key(_opt(max_batch=4).at("opt"))


def test_engine_parity_inputs_lie_inside_every_profile_and_match_the_contract():
    units = dict(contracts(SMALL), **prognosis_contracts(SMALL, IMAGE_DIM, TEXT_DIM))
    for name, contract in units.items():
        profile = _opt(name, max_batch=2, max_targets=3)
        feeds = profile_inputs(name, SMALL, profile, image_dim=IMAGE_DIM, text_dim=TEXT_DIM)
        assert [{k: tuple(v.shape) for k, v in f.items()} for f in feeds] == [
            {k: v for k, v in profile.at(w).items()} for w in ("min", "opt")], name
        for feed in feeds:
            assert list(feed) == [t.name for t in contract.inputs], name
            for spec in contract.inputs:
                assert str(feed[spec.name].dtype).removeprefix("torch.") == spec.dtype, (name, spec.name)
            if "attention_mask" in feed:
                assert (feed["attention_mask"].sum(1) > 0).all()
    assert ShapeProfile({"x": ((1, 2), (2, 2), (4, 2))}).admits({"x": (3, 2)})
    assert not ShapeProfile({"x": ((1, 2), (2, 2), (4, 2))}).admits({"x": (5, 2)})


def test_int8_precision_per_unit_and_engine_tolerances():
    assert INT8_UNITS == ("segmenter", "image_features")
    assert [unit_precision(u, "int8") for u in ("segmenter", "image_features", "text_encoder", "prognosis")] == [
        "int8", "int8", "fp16", "fp16"]
    assert unit_precision("text_encoder", "bf16") == "bf16"
    # reduced precision gets wider tolerances than fp32, and never tighter than ONNX Runtime vs PyTorch
    assert engine_tolerances("segmenter", "fp16") > engine_tolerances("segmenter", "fp32") >= (2e-3, 1e-2)
    assert ENGINE_TOLERANCES["fp16"] < ENGINE_TOLERANCES["int8"]
    # a profile never asks for more targets at opt than it allows at max
    assert _opt(max_targets=2).at("opt")["head_params"] == (2, SMALL.head_params)


def test_int8_without_calibration_data_is_refused_before_any_build(tmp_path):
    contract = contracts(SMALL)["segmenter"]
    with pytest.raises(ValueError, match="int8 needs calibration data"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", contract, _opt(), precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", contract, _opt(), precision="fp8")


def test_tensorrt_engines_match_onnxruntime_where_available(tmp_path):
    """fp32 and fp16 engines of every main unit, and an int8 segmenter calibrated on phantom patches (its table
    cached and reused by a rebuild), each within its tolerances of ONNX Runtime."""
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT engine parity needs tensorrt and a GPU: {why}")
    from duplus.models.duplus import DuPLUS
    from duplus.vocabulary import PromptVocabulary
    from export.build_engines import build

    torch.manual_seed(0)
    ckpt = tmp_path / "small.pt"
    torch.save({"model_config": SMALL.to_dict(), "state_dict": DuPLUS(SMALL).state_dict(),
                "vocabulary": PromptVocabulary().to_dict()}, ckpt)
    for precision in ("fp32", "fp16", "int8"):
        units = ("segmenter",) if precision == "int8" else ("text_encoder", "conditioning", "segmenter")
        out = tmp_path / precision
        manifest = build(ckpt, out, engine="tensorrt", precision=precision, units=units)
        for name, entry in manifest["units"].items():
            assert (out / entry["plan"]).is_file() and entry["precision"] == unit_precision(name, precision)
            assert entry["plan_parity"], name
            for row in entry["plan_parity"]:
                assert row["max_abs"] <= row["atol"] or row["max_rel"] <= row["rtol"], (precision, name, row)
    cache = tmp_path / "int8" / ".segmenter.int8-calibration"
    assert cache.is_file()
    before = cache.stat().st_mtime_ns
    build(ckpt, tmp_path / "int8", engine="tensorrt", precision="int8", units=("segmenter",))
    assert cache.stat().st_mtime_ns == before    # the cached table was read, not recalibrated
