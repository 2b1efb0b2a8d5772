"""classify_context and segment_volume's T1 guard (Biomed-DPT served): the exported unit against PyTorch, the pipeline
without a server, then the real Triton server over gRPC.

The image is an abdominal CT phantom of a seed outside the context classifier's splits (training.context_data:
1,000,000 and up) on a coarse grid (3 mm, as the classifier's renderings: 2.5-5 mm). The segment_volume requests
cost what the classifier needs: the whole CT trimmed left-right to the views' 256 mm field of view (12 sliding
windows at 1.5 mm, the same views) where the verdict must be a contradiction, and a 252 x 144 x 168 mm box of it (4
windows) where it must only agree.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from clients.grpc_client import SegmentationClient
from duplus.context.classes import CONTEXT_KEYS, parse_key
from duplus.context.model import load_classifier
from duplus.contract import InvalidRequest
from serving.pipelines import NO_CONTEXT_CLASSIFIER, ContextContradiction, ContextGuard, VolumeContextClassifier
from tests.conftest import CONTEXT_CHECKPOINT, cut

pytestmark = pytest.mark.server

SEED = 4322
WRONG_T1 = "MRI of the abdomen"
RIGHT_T1 = "CT of the abdomen"


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(CONTEXT_CHECKPOINT)[0]


@pytest.fixture(scope="module")
def manifest(triton_repository):
    return json.loads((triton_repository / "manifest.json").read_text())


@pytest.fixture(scope="module")
def ct():
    """(image, affine) of the whole abdominal CT phantom (348 x 240 x 207 mm) on a 3 mm grid, axes x, y, z."""
    from duplus.synth.phantoms import AcquisitionSpec, generate_phantom

    p = generate_phantom("abdomen", "CT", SEED, acquisition=AcquisitionSpec(
        spacing=(3.0, 3.0, 3.0), axis_order=(0, 1, 2), flips=(False, True, False), noise=1.0))
    return p.image.astype(np.float32), p.affine


def _centre(image, affine, size):
    """The central ``size`` voxels (per axis, at most the image's), the affine moved with them."""
    size = np.minimum(size, image.shape)
    return cut(image, affine, (np.asarray(image.shape) - size) // 2, size)


@pytest.fixture(scope="module")
def ct_trimmed(ct):
    """The whole CT, 252 mm left-right: the views (256 mm wide) see what they see of the whole."""
    return _centre(*ct, (84, 1000, 1000))


@pytest.fixture(scope="module")
def ct_part(ct):
    """The central 252 x 144 x 168 mm of the CT (4 sliding windows)."""
    return _centre(*ct, (84, 48, 56))


def _torch_classify(classifier):
    def classify(views: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return classifier(torch.from_numpy(views)).numpy()

    return classify


# ---- the exported unit and the build's record ---------------------------------------------------------------

def test_onnx_unit_equals_pytorch_on_views_and_random_inputs(triton_repository, manifest, classifier, ct):
    from duplus.context.views import context_views
    from duplus.models.units import context_example_inputs
    from duplus.ort import ort_session

    session = ort_session(triton_repository / "context_classifier" / "1" / "model.onnx")
    views = torch.cat([context_views(ct[0], ct[1])[None], context_example_inputs(64, batch=3, seed=7)["views"]])
    with torch.no_grad():
        expected = classifier(views).numpy()
    served = session.run(["probabilities"], {"views": views.numpy()})[0]
    assert served.shape == (4, len(CONTEXT_KEYS)) and np.allclose(served.sum(1), 1.0, atol=1e-5)
    assert float(np.abs(served - expected).max()) <= 1e-4
    record = manifest["context"]
    assert record["keys"] == list(classifier.keys) and record["t1"] == [parse_key(k).name for k in classifier.keys]
    assert record["parity_max_abs"] <= 1e-4 and record["meta"] == load_classifier(CONTEXT_CHECKPOINT)[1]
    assert {"classify_context", "context_classifier"} <= set(manifest["models"])


def test_torch_engine_unit_equals_the_onnx_unit(triton_repository, torch_repository):
    """``--engine torch``: context_classifier runs from the repository's copy of the checkpoint."""
    from duplus.contract import UnitContract
    from duplus.models.units import context_example_inputs
    from serving.runtime import make_runner

    runners = {}
    for name, repo in (("onnxruntime", triton_repository), ("torch", torch_repository)):
        entry = json.loads((repo / "manifest.json").read_text())["units"]["context_classifier"]
        runners[name] = make_runner("context_classifier", repo / "context_classifier" / "1",
                                    UnitContract.from_manifest("context_classifier", entry), name,
                                    checkpoint=repo / "checkpoint.pt")
    assert (torch_repository / "context_checkpoint.pt").is_file()
    feed = {"views": context_example_inputs(64, batch=2, seed=11)["views"].numpy()}
    a, b = runners["onnxruntime"](feed)["probabilities"], runners["torch"](feed)["probabilities"]
    assert a.shape == (2, len(CONTEXT_KEYS)) and float(np.abs(a - b).max()) <= 1e-4


# ---- the pipeline, no server -----------------------------------------------------------------------------

def _fixed(key: str, p: float = 0.99):
    """A classifier that always gives ``key`` probability ``p`` (the rest spread evenly)."""
    probs = np.full(len(CONTEXT_KEYS), (1 - p) / (len(CONTEXT_KEYS) - 1), np.float32)
    probs[CONTEXT_KEYS.index(key)] = p
    return lambda views: probs[None]


@pytest.fixture(scope="module")
def pipeline(manifest, classifier):
    return VolumeContextClassifier(manifest, _torch_classify(classifier))


@pytest.mark.parametrize("volume, affine, t1, message", [
    (np.full((8, 8, 8), np.nan, np.float32), np.eye(4), None, "NaN"),
    (np.zeros((8, 8, 8), np.float32), np.zeros((4, 4)), None, "voxel spacing"),
    (np.zeros((8, 8), np.float32), np.eye(4), None, "3-D"),
    (np.zeros((8, 0, 8), np.float32), np.eye(4), None, "empty axis"),
    (np.zeros((8, 8, 8), np.float32), np.eye(3), None, "4x4"),
    (np.zeros((8, 8, 8), np.float32), np.eye(4), "   ", "T1 (context) prompt is empty"),
    (np.zeros((8, 8, 8), np.float32), np.eye(4), "CT " * 400, "characters long"),
])
def test_pipeline_refusals_name_the_problem(pipeline, volume, affine, t1, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        pipeline(volume, affine, t1)


@pytest.mark.parametrize("shape, spacing", [((1, 1, 1), 0.5), ((300, 300, 1), 0.7), ((2, 3, 1), 0.3)])
def test_a_slice_thinner_than_the_views_filter_is_classified(pipeline, shape, spacing):
    """One slice (or a thin slab) at fine spacing: thinner than the 4 mm box filter along an axis."""
    out = pipeline(np.random.default_rng(0).normal(size=shape).astype(np.float32),
                   np.diag([spacing, spacing, spacing, 1.0]))
    assert out.probabilities.shape == (len(CONTEXT_KEYS),) and abs(float(out.probabilities.sum()) - 1) < 1e-4


def test_guard_verdicts_and_the_strict_refusal(manifest, ct_part):
    image, affine = ct_part
    assert ContextGuard(None)(image, affine, WRONG_T1, strict=True) == {
        "looks_like": None, "probability": None, "t1": None, "agrees": None, "reason": NO_CONTEXT_CLASSIFIER}
    guard = ContextGuard(VolumeContextClassifier(manifest, _fixed("CT|abdomen")))
    assert guard(image, affine, RIGHT_T1, strict=True)["agrees"] is True
    assert guard(image, affine, "scan of the belly", strict=True)["agrees"] is None   # names neither
    verdict = guard(image, affine, WRONG_T1)
    assert verdict["agrees"] is False and verdict["looks_like"] == "CT|abdomen" and "names MR" in verdict["reason"]
    with pytest.raises(ContextContradiction, match=r"context \(T1\) prompt 'MRI of the abdomen' contradicts the "
                                                   r"image, which looks like CT of the abdomen \(p=0\.99\): "):
        guard(image, affine, WRONG_T1, strict=True)


# ---- the served models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(triton_server):
    with SegmentationClient(triton_server.grpc_url) as c:
        c.check_ready()
        yield c


def test_classify_context_names_the_ct_abdomen_and_judges_t1_prompts(client, ct, classifier):
    image, affine = ct
    res = client.classify_context(image, affine)
    assert list(res.probabilities) == list(classifier.keys)
    assert abs(sum(res.probabilities.values()) - 1) < 1e-4
    assert res.context == "CT|abdomen" and res.t1 == "CT of the abdomen", res
    assert res.verdict["agrees"] is None and res.verdict["looks_like"] == "CT|abdomen"
    assert client.classify_context(image, affine, RIGHT_T1).verdict["agrees"] is True
    wrong = client.classify_context(image, affine, WRONG_T1).verdict
    assert wrong["agrees"] is False and "names MR" in wrong["reason"], wrong


def test_a_silent_header_gets_the_classifiers_t1_unless_the_image_contradicts_its_modality(
        triton_server, manifest, ct_part, tmp_path, caplog):
    """`python -m clients segment` on the CT as a DICOM series whose header names no region: CT series -> the T1 is
    the classifier's (CT of the abdomen), noted and logged, and the verdict agrees; the same image as an MR series ->
    no T1 from the classifier's MR contexts (renormalised, one of them would get p near 1): exit 2 naming the
    modality's probability and the server's alpha (the verdict carries it), nothing written."""
    import logging

    from clients.__main__ import main as clients_main
    from clients.dicom_io import write_series

    image, affine = ct_part
    for modality in ("CT", "MR"):
        write_series(image, affine, tmp_path / modality, modality=modality, body_part="", series_description="")
    with SegmentationClient(triton_server.grpc_url) as c:
        assert c.classify_context(image, affine).verdict["alpha"] == manifest["context"]["alpha"] == 0.1
    runs = {}
    for modality in ("CT", "MR"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = clients_main(["segment", str(tmp_path / modality), "--targets", "liver", "--out",
                                 str(tmp_path / f"out_{modality}"), "--url", triton_server.grpc_url])
        runs[modality] = code, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    code, warnings = runs["CT"]
    assert code == 0, warnings
    result = json.loads((tmp_path / "out_CT" / "result.json").read_text())
    assert result["t1"] == "CT of the abdomen" and "from the context classifier" in result["t1_note"]
    assert result["context_verdict"]["agrees"] is True
    assert any("from the context classifier" in w for w in warnings)
    code, messages = runs["MR"]
    assert code == 2 and not (tmp_path / "out_MR" / "result.json").exists(), messages
    assert re.search(r"cannot tell the body region .*header says MR but the image does not look like MR .*"
                     r"p\(MR\) = 0\.\d{3}, under the guard's alpha 0\.1; it looks like CT of the abdomen", messages[-1]), messages
    # a NIfTI (no header) given --modality MR and no --t1: the same refusal from the command's other fill path
    import nibabel as nib

    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "ct.nii.gz"))
    caplog.clear()
    code = clients_main(["segment", str(tmp_path / "ct.nii.gz"), "--modality", "MR", "--targets", "liver", "--out",
                         str(tmp_path / "out_nifti"), "--url", triton_server.grpc_url])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and not (tmp_path / "out_nifti" / "result.json").exists(), errors
    assert errors[0].startswith("no T1 prompt from the context classifier: --modality says MR but the image does "
                                "not look like MR") and errors[0].endswith("give --t1"), errors


def test_segment_volume_reports_and_strictly_refuses_a_contradicting_t1(client, ct_trimmed, ct_part):
    image, affine = ct_trimmed
    wrong = client.segment_volume(image, affine, "CT", WRONG_T1, ["liver"])
    assert wrong.labels.shape == image.shape and wrong.stem == "MR"        # segmented as the prompt says
    assert wrong.context_verdict["agrees"] is False and wrong.context_verdict["looks_like"] == "CT|abdomen"
    with pytest.raises(InferenceServerException) as err:
        client.segment_volume(image, affine, "CT", WRONG_T1, ["liver"], strict_context=True)
    message = err.value.message()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", str(err.value)
    assert "'MRI of the abdomen' contradicts the image" in message and "looks like CT of the abdomen" in message
    # the right T1, with and without the strict guard: the same labels
    image, affine = ct_part
    right = client.segment_volume(image, affine, "CT", RIGHT_T1, ["liver"])
    strict = client.segment_volume(image, affine, "CT", RIGHT_T1, ["liver"], strict_context=True)
    assert right.context_verdict["agrees"] is True and strict.context_verdict == right.context_verdict
    np.testing.assert_array_equal(strict.labels, right.labels)
    assert (right.labels == 1).sum() > 100, "the liver head segments nothing"


def test_bad_requests_are_invalid_argument_and_the_server_stays_healthy(client, ct_part):
    image, affine = ct_part
    for volume, aff, t1, words in ((np.full((8, 8, 8), np.inf, np.float32), np.eye(4), None, "NaN or Inf"),
                                   (image, np.zeros((4, 4)), None, "voxel spacing"),
                                   (image, affine, "", "T1 (context) prompt is empty"),
                                   (image, affine, b"\xff\xfe".decode("latin-1") * 600, "characters long")):
        with pytest.raises(InferenceServerException) as err:
            client.classify_context(volume, aff, t1)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and words in err.value.message(), str(err.value)
    assert client.client.is_server_ready()
    assert all(client.client.is_model_ready(m) for m in ("classify_context", "context_classifier", "segment_volume"))
    assert client.classify_context(image, affine).probabilities
