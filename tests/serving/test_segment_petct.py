"""segment_petct (PEMMA served): the pipeline without a server, then the real Triton server over gRPC.

Parity: the served model (adapters merged, one ONNX graph for the three input modes, BLS sliding window) against
the in-process PyTorch model of the shipped checkpoint (adapters not merged), Dice >= 0.99 per target in each
mode.  The PET/CT pair is a centre-E phantom of a seed outside every training and held-out set, cut to the region
around its lesions so that each mode needs two windows (blending checked, a few seconds per mode).
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from clients.grpc_client import SegmentationClient
from duplus.contract import InvalidRequest
from duplus.models.pemma import INPUT_MODES, load_pemma_checkpoint, segment_petct
from serving.pipelines import PetCtSegmenter
from tests.conftest import PEMMA_CHECKPOINT, ROOT


@pytest.fixture(scope="module")
def pair(petct_pair):
    return petct_pair


@pytest.fixture(scope="module")
def model():
    return load_pemma_checkpoint(PEMMA_CHECKPOINT)[0]


def _inputs(pair, mode):
    ct, ct_affine, pet, pet_affine = pair
    return ((ct, ct_affine) if "ct" in mode.split("+") else (None, None)) + \
           ((pet, pet_affine) if "pet" in mode.split("+") else (None, None))


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = x.sum() + y.sum()
    return 1.0 if total == 0 else float(2 * (x & y).sum() / total)


@pytest.fixture(scope="module")
def in_process(model, pair):
    """The in-process PyTorch labels of each mode (the reference of every parity check here)."""
    return {mode: segment_petct(model, *_inputs(pair, mode))[0] for mode in INPUT_MODES}


# ---- the pipeline, no server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(model):
    """``PetCtSegmenter`` whose window function is the merged unit in PyTorch (the served recipe, no server)."""
    from duplus.contract import PETCT_LABELS, PETCT_MODES
    from duplus.models.pemma import merged_for_export
    from duplus.models.units import PemmaSegmenterUnit

    unit = PemmaSegmenterUnit(merged_for_export(model, check=False)[0]).eval()   # checked by the build

    def segment(image, mode):
        with torch.no_grad():
            return unit(torch.from_numpy(image), torch.from_numpy(mode))[0].numpy()

    manifest = {"pemma": {"crop": model.cfg.crop, "spacing": list(model.cfg.spacing), "modes": list(PETCT_MODES),
                          "labels": list(PETCT_LABELS)}}
    return PetCtSegmenter(manifest, segment)


@pytest.mark.parametrize("args, message", [
    ((None, None, None, None), "neither a CT"),
    ((np.zeros((8, 8, 8), np.float32), None, None, None), "without CT_AFFINE"),
    ((None, None, None, np.eye(4)), "PET_AFFINE was given without PET"),
    ((np.full((8, 8, 8), np.nan, np.float32), np.eye(4), None, None), "CT: volume contains NaN"),
    ((np.zeros((8, 8, 8), np.float32), np.zeros((4, 4)), None, None), "CT: voxel spacing"),
    # small on its own grid, too large once resampled to the model's 2 mm (the limit is on model-space voxels)
    ((np.zeros((200, 200, 200), np.float32), np.diag([8.0, 8.0, 8.0, 1.0]), None, None), "at the model spacing"),
])
def test_pipeline_refusals_name_the_problem(pipeline, args, message):
    with pytest.raises(InvalidRequest, match=message):
        pipeline(*args)


def test_torch_engine_unit_equals_the_onnx_unit(triton_repository, torch_repository):
    """``--engine torch``: pemma_segmenter runs from the repository's copy of the checkpoint, merged at load; it
    gives the ONNX unit's logits on a window of each mode."""
    from duplus.contract import UnitContract
    from duplus.models.units import pemma_example_inputs
    from serving.runtime import make_runner

    runners = {}
    for name, repo in (("onnxruntime", triton_repository), ("torch", torch_repository)):
        manifest = json.loads((repo / "manifest.json").read_text())
        contract = UnitContract.from_manifest("pemma_segmenter", manifest["units"]["pemma_segmenter"])
        runners[name] = make_runner("pemma_segmenter", repo / "pemma_segmenter" / "1", contract, name,
                                    checkpoint=repo / "checkpoint.pt")
    assert (torch_repository / "pemma_checkpoint.pt").is_file()
    for mode in range(3):
        feed = {k: v.numpy() for k, v in pemma_example_inputs(64, mode=mode, seed=50 + mode).items()}
        a, b = runners["onnxruntime"](feed)["logits"], runners["torch"](feed)["logits"]
        assert a.shape == (1, 3, 64, 64, 64) and float(np.abs(a - b).max()) < 2e-3, mode


# ---- the served model -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(triton_server):
    with SegmentationClient(triton_server.grpc_url) as c:
        yield c


def test_repository_records_the_merge_and_the_unit_parity(triton_repository):
    manifest = json.loads((triton_repository / "manifest.json").read_text())
    record = manifest["pemma"]
    assert record["adapter"] == "lora" and record["merge_max_abs"] < 1e-9 and record["crop"] == 64
    assert record["merge_max_abs_float32"] < 1e-4          # the two float32 graphs round differently
    assert record["parameters"]["trainable"] / record["parameters"]["total"] <= 0.10
    rows = manifest["units"]["pemma_segmenter"]["parity"]
    # one row per output, the worst over the three parity inputs (one per input mode)
    assert {r["output"] for r in rows} == {"logits", "probabilities"}, rows
    assert all(r["max_abs"] <= 1e-3 for r in rows), rows
    assert "segment_petct" in manifest["models"] and "pemma_segmenter" in manifest["models"]


def test_served_labels_equal_in_process_pytorch_in_each_mode(client, pair, in_process):
    for mode in INPUT_MODES:
        res = client.segment_petct(*_inputs(pair, mode))
        expected = in_process[mode]
        assert res.mode == mode and res.labels.dtype == np.uint8 and res.labels.shape == expected.shape
        assert res.label_names == ("background", "primary tumour", "lymph node")
        for label in (1, 2):
            assert _dice(res.labels, expected, label) >= 0.99, (mode, label)
    # the model finds the primary tumour with both images (a trained checkpoint, not a constant)
    assert (in_process["ct+pet"] == 1).sum() > 100


def test_bad_requests_are_invalid_argument_and_the_server_stays_healthy(client, pair):
    ct, ct_affine, pet, pet_affine = pair
    far = pet_affine.copy()
    far[:3, 3] += 500.0                                   # another patient position: no overlap
    for args, message in (((ct, ct_affine, pet, far), "do not overlap"),
                          ((None, None, None, None), "neither a CT"),
                          ((ct, None, pet, pet_affine), "without CT_AFFINE"),
                          ((ct, np.zeros((4, 4)), None, None), "spacing")):
        with pytest.raises(InferenceServerException) as err:
            client.segment_petct(*args)
        assert "INVALID_ARG" in str(err.value.status()) and message in str(err.value), str(err.value)
    assert client.client.is_server_ready() and client.client.is_model_ready("segment_petct")
    assert client.segment_petct(pet=pet, pet_affine=pet_affine).mode == "pet"


def test_segment_petct_command_line_pairs_a_study_and_its_seg_references_both(triton_server, pair, tmp_path):
    """A study folder with a CT and a PET series of one Frame of Reference (and an MR series beside them): the
    command pairs them, labels come back on the CT grid, the DICOM SEG references both series."""
    import pydicom
    from pydicom.uid import generate_uid

    from clients.dicom_io import DicomSeriesError, pair_petct, write_series

    ct, ct_affine, pet, pet_affine = pair
    study, frame = generate_uid(), generate_uid()
    write_series(ct, ct_affine, tmp_path / "study" / "ct", modality="CT", body_part="HEADNECK", study_uid=study,
                 series_uid=(ct_uid := generate_uid()), frame_of_reference_uid=frame)
    write_series(pet, pet_affine, tmp_path / "study" / "pet", modality="PT", body_part="HEADNECK", study_uid=study,
                 series_uid=(pet_uid := generate_uid()), frame_of_reference_uid=frame)
    write_series(ct[:8, :8, :4], ct_affine, tmp_path / "study" / "mr", modality="MR", study_uid=study)
    assert pair_petct(tmp_path / "study") == (ct_uid, pet_uid)
    out = subprocess.run([sys.executable, "-m", "clients", "segment-petct", "--study", str(tmp_path / "study"),
                          "--pet-units", "SUV", "--url", triton_server.grpc_url, "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["mode"] == "ct+pet" and result["grid"] == "CT" and result["files"] == ["labels.nii.gz", "seg.dcm"]
    labels = np.asarray(nib.load(str(tmp_path / "out" / "labels.nii.gz")).dataobj)
    assert labels.shape == ct.shape and result["voxels_per_label"][1] > 100
    seg = pydicom.dcmread(str(tmp_path / "out" / "seg.dcm"))
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["primary tumour", "lymph node"]
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {ct_uid, pet_uid}
    # a PET of another acquisition (its own Frame of Reference) is not paired with the CT
    write_series(pet, pet_affine, tmp_path / "other" / "pet", modality="PT", study_uid=study)
    write_series(ct, ct_affine, tmp_path / "other" / "ct", modality="CT", study_uid=study)
    with pytest.raises(DicomSeriesError, match="sharing a Frame of Reference"):
        pair_petct(tmp_path / "other")
    missing = subprocess.run([sys.executable, "-m", "clients", "segment-petct", "--out", str(tmp_path / "x"),
                              "--url", triton_server.grpc_url], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "give --ct, --pet or both" in missing.stderr
