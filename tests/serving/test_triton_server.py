"""End to end through the real Triton server (nvidia-pytriton's tritonserver 2.51) over gRPC.

One server for the session (tests/conftest.py), started on free loopback ports from a repository
built from the shipped checkpoint; stopped at the end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.grpc_client import SegmentationClient
from duplus.checkpoint import load_checkpoint
from duplus.metrics import dice
from duplus.synth.phantoms import generate_phantom
from serving.serve import RepositoryError, check_repository
from tests.conftest import DEMO_CHECKPOINT, ROOT
from training.evaluate import case_seed, evaluate

pytestmark = pytest.mark.server

# evaluation seed whose first head-and-neck CT case is anisotropic (2.54 x 0.8 x 0.8 mm), with
# permuted axes and a flipped one, and not 1.5 mm anywhere
EVAL_SEED = 7003
T1 = "CT of the head and neck"
TARGETS = ["primary tumour", "lymph node"]


@pytest.fixture(scope="module")
def client(triton_server):
    with SegmentationClient(triton_server.grpc_url) as c:
        c.check_ready()
        yield c


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom("head_neck", "CT", case_seed(EVAL_SEED, 0))


def _strings(values):
    return np.array([v if isinstance(v, bytes) else v.encode() for v in values], dtype=np.object_)


def _infer(server, model, arrays):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, (arr, dtype) in arrays.items():
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return client.infer(model, inputs)


def _prompts(modality="CT", t1=T1, targets=TARGETS):
    return {"MODALITY": (_strings([modality]), "BYTES"), "T1": (_strings([t1]), "BYTES"),
            "TARGETS": (_strings(targets), "BYTES")}


def test_segment_volume_equals_in_process_and_evaluation(client, demo_predictor, phantom):
    affine = phantom.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert not np.allclose(spacing, 1.5) and spacing.max() / spacing.min() > 2    # anisotropic, not 1.5 mm
    assert np.linalg.det(affine[:3, :3]) < 0 or (np.sign(affine[:3, :3].sum(0)) < 0).any()  # a flipped axis

    served = client.segment_volume(phantom.image, affine, "CT", T1, TARGETS)
    assert served.labels.shape == phantom.image.shape and served.labels.dtype == np.uint8
    np.testing.assert_array_equal(served.affine, affine)
    assert served.resolved == tuple(TARGETS) and served.conditioned_by == tuple(TARGETS)
    assert served.stem == "CT"
    # the T1 guard ran on it (every response carries its verdict) and the labels below still equal the in-process
    # pipeline's, which has no guard
    assert set(served.context_verdict) == {"looks_like", "probability", "t1", "agrees", "reason", "alpha"}
    assert served.context_verdict["alpha"] == 0.1          # the shipped classifier's guard alpha, for T1 fills

    # in process: the evaluation command's function on the same case (its phantom is this fixture's), keeping
    # its prediction, so one in-process pass serves both comparisons
    kept = []
    report = evaluate(demo_predictor, load_checkpoint(DEMO_CHECKPOINT), "CT", 1, EVAL_SEED, region="head_neck",
                      targets=TARGETS, t1=T1, progress=False, predictions=kept)
    local = kept[0]
    np.testing.assert_array_equal(local.affine, affine)
    for k in range(1, len(TARGETS) + 1):
        both_empty = not (served.labels == k).any() and not (local.labels == k).any()
        assert both_empty or dice(served.labels == k, local.labels == k) >= 0.99, TARGETS[k - 1]

    for k, name in enumerate(TARGETS, start=1):
        truth = phantom.label == phantom.label_names.index(name) + 1
        assert abs(dice(served.labels == k, truth) - report["per_case"][0]["dice"][name]) <= 0.01, name
    assert report["per_case"][0]["dice"]["primary tumour"] > 0.5   # the model does segment it

    # free text: paraphrases resolve to the targets and their canonical names condition the heads, served as in
    # process, so the labels are the names' labels exactly
    para = client.segment_volume(phantom.image, affine, "CT", T1, ["the primary cancer of the oropharynx",
                                                                   "metastatic neck nodes"])
    assert para.resolved == tuple(TARGETS) and min(para.similarity) > 0.6
    np.testing.assert_array_equal(para.labels, served.labels)


def test_segment_volume_with_generated_instructions_equals_in_process(client, demo_predictor, phantom):
    """INSTRUCTIONS auto (Zeus): the served generator (the instructions model before the tokenizer, in the
    encode_instructions ensemble) writes each target's instruction for the image's context; the response names them,
    and the labels equal the in-process pipeline's."""
    from duplus.instructions import named_targets

    # the part of the case around its tumour and nodes (the affine moved with the crop): a quicker test
    box = np.argwhere(phantom.label > 0)
    lo, hi = np.maximum(box.min(0) - 12, 0), np.minimum(box.max(0) + 13, phantom.label.shape)
    image = np.ascontiguousarray(phantom.image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    affine = phantom.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    header = {"patient_sex": "F", "patient_age_years": 58, "contrast_phase": "portal venous"}
    served = client.segment_volume(image, affine, "CT", T1, ["GTVp", "metastatic neck nodes"],
                                   instructions="auto", context=header)
    local = demo_predictor.predict_array(image, affine, "CT", T1, ["GTVp", "metastatic neck nodes"],
                                         instructions="auto", context=header)
    assert served.resolved == local.resolved == tuple(TARGETS)
    assert served.conditioned_by == local.conditioned_by
    for target, text in zip(TARGETS, served.conditioned_by):
        assert named_targets(text) == {target} and len(text.split()) >= 8, text
    assert (served.labels == 1).sum() > 100, "the instruction-conditioned tumour head segments nothing"
    for k, name in enumerate(TARGETS, start=1):
        both_empty = not (served.labels == k).any() and not (local.labels == k).any()
        assert both_empty or dice(served.labels == k, local.labels == k) >= 0.99, name


def test_instructions_model_refuses_bad_requests(triton_server):
    ok = _infer(triton_server, "instructions", {"TARGETS": (_strings(["liver"]), "BYTES"),
                                                "CONTEXT": (_strings(['{"modality": "MR", "sequence": "T2"}']), "BYTES")})
    assert "liver" in ok.as_numpy("INSTRUCTIONS")[0].decode()
    for targets, context, words in ((["banana"], "{}", "unknown target 'banana'"),
                                    (["liver"], '{"modality": "XR"}', "CONTEXT: modality must be one of"),
                                    (["liver"], "{", "CONTEXT is not valid JSON")):
        with pytest.raises(InferenceServerException) as err:
            _infer(triton_server, "instructions", {"TARGETS": (_strings(targets), "BYTES"),
                                                   "CONTEXT": (_strings([context]), "BYTES")})
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and words in err.value.message(), str(err.value)


def test_segment_patch_ensemble_equals_pytorch(triton_server, demo_predictor):
    rng = np.random.default_rng(0)
    patch = rng.normal(0, 0.5, (1, 1, 96, 96, 64)).astype(np.float32)
    res = _infer(triton_server, "segment_patch", {"IMAGE": (patch, "FP32"), **_prompts()})
    probs = res.as_numpy("PROBABILITIES")
    import torch

    cond = demo_predictor.condition(T1, TARGETS)
    ref = torch.sigmoid(demo_predictor.patch_logits(torch.from_numpy(patch), "CT", cond)).numpy()
    assert probs.shape == (1, 2, 96, 96, 64)
    assert np.abs(probs - ref).max() < 1e-3


@pytest.mark.parametrize("modality,t1,stem", [
    ("CT", "T2-weighted MRI of the abdomen", "MR"),    # the context prompt picks the stem
    ("CT", "scan of the abdomen", "CT"),               # it names no modality: the declared one
    ("PET", "PET/CT of the head and neck", "PET"),     # it names two: the declared one
])
def test_context_prompt_picks_the_stem(triton_server, modality, t1, stem):
    prompts = _prompts(modality, t1, ["liver"])
    index = _infer(triton_server, "encode_prompts", prompts).as_numpy("MODALITY_INDEX")
    assert index.tolist() == [["CT", "MR", "PET"].index(stem)]
    served = _infer(triton_server, "segment_volume", _volume_request(SMALL_VOLUME, SMALL_AFFINE, modality, t1,
                                                                     ["liver"]))
    assert [s.decode() for s in served.as_numpy("STEM")] == [stem]
    assert served.as_numpy("LABELS").shape == SMALL_VOLUME.shape


def _execution_count(server, model="text_encoder"):
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0]["execution_count"])


def test_prompt_cache_skips_the_text_encoder(triton_server):
    request = _volume_request(SMALL_VOLUME, SMALL_AFFINE, "PET", "PET of the head and neck",
                              ["primary tumor", "lymph nodes"])
    first = _infer(triton_server, "segment_volume", request)
    executions = _execution_count(triton_server)
    second = _infer(triton_server, "segment_volume", request)
    assert _execution_count(triton_server) == executions      # the prompt set came from segment_volume's LRU
    np.testing.assert_array_equal(first.as_numpy("LABELS"), second.as_numpy("LABELS"))
    np.testing.assert_array_equal(first.as_numpy("SIMILARITY"), second.as_numpy("SIMILARITY"))


@pytest.mark.parametrize("model, feed", [
    ("text_encoder", {"input_ids": (np.array([[101, 99999, 102]]), "INT64"),
                      "attention_mask": (np.ones((1, 3), np.int64), "INT64")}),
    ("conditioning", {"t1_embedding": (np.full((1, 384), np.nan, np.float32), "FP32"),
                      "t2_embedding": (np.zeros((2, 384), np.float32), "FP32")}),
    ("text_encoder_ehr", {"input_ids": (np.array([[101, -5, 102]]), "INT64"),
                          "attention_mask": (np.ones((1, 3), np.int64), "INT64")}),
])
def test_a_repeated_bad_request_is_refused_every_time(triton_server, model, feed):
    # Triton 2.51's response cache stored a python-backend error response as an empty success: the second
    # identical bad request came back OK with no outputs (why the embedded units run without that cache)
    for _ in range(3):
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT|allowed are|NaN"):
            _infer(triton_server, model, feed)


def _volume_request(volume, affine, modality="CT", t1=T1, targets=TARGETS, volume_dtype="FP32"):
    return {"VOLUME": (volume, volume_dtype), "AFFINE": (np.asarray(affine, dtype=np.float64), "FP64"),
            **_prompts(modality, t1, targets)}


SMALL_VOLUME = np.zeros((40, 40, 30), dtype=np.float32)
SMALL_AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


def _nan_volume():
    v = SMALL_VOLUME.copy()
    v[3, 4, 5] = np.nan
    return v


BAD_REQUESTS = {
    "wrong shape": (_volume_request(np.zeros((40, 40), np.float32), SMALL_AFFINE), "VOLUME"),
    "wrong dtype": (_volume_request(SMALL_VOLUME.astype(np.float64), SMALL_AFFINE, volume_dtype="FP64"),
                    "VOLUME"),
    "unknown modality": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, modality="XR"), "unknown modality 'XR'"),
    "empty T1": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, t1="   "), "T1 (context) prompt is empty"),
    "empty target": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=["liver", ""]), "TARGETS[1] prompt is empty"),
    "over-long prompt": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=["liver " * 60]), "characters long"),
    "over-long in tokens": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=["a-b-c-d " * 20]), "tokens long"),
    "non-UTF-8 prompt": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=[b"liv\xff\xfeer"]), "not valid UTF-8"),
    "unknown target": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=["banana"]), "unknown target prompt"),
    "not a target": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=["liver", "left kidney cyst"]),
                     "which this model does not segment; the nearest targets are 'left kidney'"),
    "both sides": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=["both kidneys"]), "names both sides"),
    "NaN in volume": (_volume_request(_nan_volume(), SMALL_AFFINE), "NaN or Inf"),
    "singular affine": (_volume_request(SMALL_VOLUME, np.diag([2.0, 0.0, 2.0, 1.0])), "spacing"),
    "too large": (_volume_request(np.zeros((100, 100, 100), np.float32), np.diag([10.0, 10.0, 10.0, 1.0])),
                  "the limit is"),
    "too many targets": (_volume_request(SMALL_VOLUME, SMALL_AFFINE, targets=["liver"] * 17), "at most 16"),
    "unknown INSTRUCTIONS": ({**_volume_request(SMALL_VOLUME, SMALL_AFFINE),
                              "INSTRUCTIONS": (_strings(["sometimes"]), "BYTES")}, "INSTRUCTIONS must be one of"),
    "malformed CONTEXT": ({**_volume_request(SMALL_VOLUME, SMALL_AFFINE), "INSTRUCTIONS": (_strings(["auto"]), "BYTES"),
                           "CONTEXT": (_strings(['{"patient_age_years": 300}']), "BYTES")}, "patient_age_years"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_server_stays_healthy(triton_server, case):
    request, needle = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as err:
        _infer(triton_server, "segment_volume", request)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", str(err.value)
    assert needle in err.value.message(), err.value.message()
    # a good request right after it succeeds
    ok = _infer(triton_server, "segment_volume", _volume_request(SMALL_VOLUME, SMALL_AFFINE))
    labels = ok.as_numpy("LABELS")
    assert labels.shape == SMALL_VOLUME.shape and labels.dtype == np.uint8


def test_direct_unit_calls_are_checked(triton_server):
    bad = {"image": (np.zeros((1, 1, 30, 32, 32), np.float32), "FP32"), "modality": (np.zeros(1, np.int64), "INT64"),
           "film": (np.zeros((1, 736), np.float32), "FP32"), "head_params": (np.zeros((1, 281), np.float32), "FP32")}
    with pytest.raises(InferenceServerException) as err:
        _infer(triton_server, "segmenter", bad)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "multiples of 16" in err.value.message()


def test_stale_or_missing_repository_is_refused(triton_repository, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(DEMO_CHECKPOINT.read_bytes() + b"\0")
    with pytest.raises(RepositoryError, match="stale"):
        check_repository(triton_repository, other)
    with pytest.raises(RepositoryError, match="no model repository"):
        check_repository(tmp_path / "nowhere")
    proc = subprocess.run([sys.executable, "-m", "serving.serve", "--model-repository", str(triton_repository),
                           "--checkpoint", str(other)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "stale" in proc.stderr
    manifest = json.loads((triton_repository / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] != "" and check_repository(triton_repository, DEMO_CHECKPOINT)


def test_a_model_subset_loads_what_it_calls_and_unknown_names_are_refused(triton_repository):
    from serving.serve import TritonServer

    full = TritonServer(triton_repository, checkpoint=DEMO_CHECKPOINT).models()
    assert len(full) == 17 and "prognose" in full and "encode_instructions" in full and "segment_petct" in full
    assert "classify_context" in full and "context_classifier" in full
    seg = TritonServer(triton_repository, models=["segment_volume"]).models()
    # the context classifier (segment_volume's T1 guard) comes with it where the repository has one
    assert seg == ["tokenizer", "text_encoder", "conditioning", "encode_prompts", "instructions",
                   "encode_instructions", "segmenter", "context_classifier", "segment_volume"]
    prog = TritonServer(triton_repository, models=["prognose", "segmenter"]).models()
    assert set(prog) == {"tokenizer", "text_encoder", "conditioning", "encode_prompts", "image_features",
                         "text_encoder_ehr", "prognosis", "prognose", "segmenter"} and len(prog) == 9
    with pytest.raises(ValueError, match=r"cannot serve \['banana'\]"):
        TritonServer(triton_repository, models=["segment_volume", "banana"])
    with pytest.raises(ValueError, match="no models"):
        TritonServer(triton_repository, models=[])
    proc = subprocess.run([sys.executable, "-m", "serving.serve", "--model-repository", str(triton_repository),
                           "--checkpoint", str(DEMO_CHECKPOINT), "--models", "banana"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot serve ['banana']" in proc.stderr


