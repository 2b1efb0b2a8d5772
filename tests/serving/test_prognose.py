"""Prognosis served by the real Triton server: the prognose BLS model vs in-process PyTorch, bad EHR input,
the client method and `python -m clients prognose`; and the held-out C-index of the shipped checkpoint."""

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
from duplus.models.prognosis import ImageFeatureExtractor, load_prognosis_checkpoint
from duplus.synth.cohort import CohortSpec, generate_cohort, pet_volume
from tests.conftest import PROGNOSIS_CHECKPOINT, ROOT

pytestmark = pytest.mark.server

HELD_OUT_SEED = 9001      # never a training or validation seed of the shipped checkpoint
T1 = "PET of the head and neck"


@pytest.fixture(scope="module")
def client(triton_server):
    with SegmentationClient(triton_server.grpc_url) as c:
        c.check_ready()
        yield c


@pytest.fixture(scope="module")
def in_process():
    model, meta = load_prognosis_checkpoint(PROGNOSIS_CHECKPOINT)
    extractor = ImageFeatureExtractor(ROOT / meta["segmentation_checkpoint"], model.cfg.modality, model.cfg.t1)
    return model, extractor, meta


@pytest.fixture(scope="module")
def patients():
    return generate_cohort(CohortSpec(3, HELD_OUT_SEED + 1))


@pytest.fixture(scope="module")
def eager(in_process, patients):
    """The first two patients' PET volumes (3.3 mm flipped; 2-3.8 mm permuted and flipped) and their in-process
    PyTorch features, computed once for the module's parity tests (which zip them with ``patients``)."""
    _, extractor, _ = in_process
    return [(ph, extractor(ph.image, ph.affine)) for ph in (pet_volume(p) for p in patients[:2])]


@pytest.fixture(scope="module")
def torch_server(torch_repository):
    """A second server whose units run PyTorch (``--engine torch``): the served path with in-process numerics."""
    from serving.serve import TritonServer
    from tests.conftest import DEMO_CHECKPOINT

    # prognose and what it calls (not the segmentation-only models): a shorter start
    srv = TritonServer(torch_repository, checkpoint=DEMO_CHECKPOINT, log_file=torch_repository.parent / "triton.log",
                       models=["prognose"]).start()
    yield srv
    srv.kill()                       # no graceful unload at teardown (tests/clients/test_client.py tests that)


def test_served_risk_equals_in_process_pytorch(torch_server, in_process, patients, eager):
    """The prognose BLS (volume checks, preprocessing, one feature pass, radiomics, EHR tokens, merged LoRA
    encoder, head) on PyTorch units gives the in-process PyTorch risk to a relative 1e-4."""
    model, _, meta = in_process
    with SegmentationClient(torch_server.grpc_url) as client:
        for p, (ph, feats) in zip(patients, eager):   # random PET acquisitions: 2-4 mm, permuted and flipped axes
            expected = float(model.risk(feats.vector[None], [p.note])[0])
            served = client.prognose(ph.image, ph.affine, "PET", T1, p.note)
            assert abs(served.risk - expected) <= 1e-4 * max(abs(expected), 1e-2), (served.risk, expected)
            assert list(served.features) == meta["feature_names"]
            got = np.array(list(served.features.values()), np.float32)
            assert np.allclose(got, feats.vector, rtol=1e-4, atol=1e-5)
            # the radiomics describe the patient: measured tumour volume within 40% of the true one
            true_ml = p.clinical["tumour_volume_ml"]
            assert abs(np.exp(served.features["log_tumour_volume"]) - true_ml) < 0.4 * true_ml


def test_onnx_runtime_server_equals_in_process_onnx_and_is_close_to_pytorch(client, in_process, patients,
                                                                            triton_repository, eager):
    """The default server (ONNX Runtime units) equals in-process scoring with the same exported image_features
    unit to a relative 1e-4; against PyTorch eager it differs by what fp32 ONNX Runtime vs PyTorch convolutions
    leave (segmenter logits ~1e-3, amplified by the head's standardisation): well below the risk's spread."""
    from training.evaluate_prognosis import OnnxFeatureExtractor

    model, _, meta = in_process
    onnx = OnnxFeatureExtractor(triton_repository, ROOT / meta["segmentation_checkpoint"], model.cfg.modality,
                                model.cfg.t1)
    for p, (ph, feats) in zip(patients, eager):
        expected = float(model.risk(onnx(ph.image, ph.affine).vector[None], [p.note])[0])
        pytorch = float(model.risk(feats.vector[None], [p.note])[0])
        served = client.prognose(ph.image, ph.affine, "PET", T1, p.note)
        assert abs(served.risk - expected) <= 1e-4 * max(abs(expected), 1e-2), (served.risk, expected)
        assert abs(served.risk - pytorch) < 0.05, (served.risk, pytorch)


def test_served_text_encoder_ehr_is_the_merged_adapted_encoder(triton_server, in_process, patients):
    import tritonclient.grpc as grpcclient

    model, _, _ = in_process
    tok = model.ehr.tokenize([p.note for p in patients])
    with torch.no_grad():
        adapted = model.ehr(tok["input_ids"], tok["attention_mask"]).numpy()
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    inputs = []
    for name in ("input_ids", "attention_mask"):
        t = grpcclient.InferInput(name, list(tok[name].shape), "INT64")
        t.set_data_from_numpy(tok[name].numpy().astype(np.int64))
        inputs.append(t)
    served = c.infer("text_encoder_ehr", inputs).as_numpy("embedding")
    assert np.abs(served - adapted).max() < 1e-5


@pytest.mark.parametrize("ehr, message", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("x" * 5000, "characters"),
    (" ".join(["cT3N2M0"] * 200), "tokens"),
    (b"\xff\xfe p16 negative", "UTF-8"),
])
def test_bad_ehr_is_invalid_argument_and_the_server_stays_healthy(client, triton_server, patients, ehr, message):
    ph = pet_volume(patients[0])
    with pytest.raises(InferenceServerException) as err:
        client.prognose(ph.image, ph.affine, "PET", T1, ehr)
    assert "INVALID_ARG" in str(err.value.status()) and message in str(err.value)
    assert client.client.is_server_ready() and client.client.is_model_ready("prognose")
    ok = client.prognose(ph.image, ph.affine, "PET", T1, patients[0].note)
    assert np.isfinite(ok.risk)


def test_bad_volume_and_prompt_are_invalid_argument(client, patients):
    ph = pet_volume(patients[0])
    for args, message in (((ph.image, ph.affine, "XR", T1), "unknown modality"),
                          ((ph.image, np.zeros((4, 4)), "PET", T1), "spacing"),
                          ((np.zeros((64, 64, 64), np.float32), np.diag([5.0, 5.0, 5.0, 1.0]), "PET", T1),  # 320 mm a side
                           "field of view too large")):
        with pytest.raises(InferenceServerException) as err:
            client.prognose(*args, patients[0].note)
        assert "INVALID_ARG" in str(err.value.status()) and message in str(err.value), str(err.value)


def test_prognose_command_line(triton_server, patients, tmp_path):
    ph = pet_volume(patients[1])
    path = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(path))
    note = tmp_path / "note.txt"
    note.write_text(patients[1].note)
    out = subprocess.run([sys.executable, "-m", "clients", "prognose", str(path), "--ehr-file", str(note),
                          "--url", triton_server.grpc_url, "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["modality"] == "PET" and np.isfinite(printed["risk"])
    assert set(printed["radiomics"]) == {"log_tumour_volume", "suv_max", "suv_mean", "node_count", "log_node_volume"}
    assert len(json.loads((tmp_path / "r.json").read_text())["features"]) > 5
