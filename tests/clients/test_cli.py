"""`python -m clients` never prints a traceback for what a user can meet: a bad series, a file that is not
an image, a missing header field, an unreachable server, an error answered by the server. Each ends in one
line naming the problem and exit code 2; an unexpected error (a bug) in one line and exit code 1."""

import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from clients.__main__ import COMMANDS
from clients.__main__ import main as clients_main
from clients.dicom_io import write_series
from serving.serve import free_port

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    volume = np.random.default_rng(0).normal(0, 100, (32, 32, 16)).astype(np.float32)
    nifti = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), str(nifti))
    return folder, volume, nifti


def _one_error(caplog) -> str:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message and errors[0].exc_info is None and "Traceback" not in message
    return message


def _run(caplog, argv) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = clients_main(argv)
    return code, _one_error(caplog)


def test_bad_series_and_bad_files(small_ct, caplog, tmp_path):
    folder, volume, nifti = small_ct
    series = tmp_path / "series"
    write_series(volume, AFFINE, series, body_part="ABDOMEN")
    sorted(series.glob("*.dcm"))[7].unlink()                                     # a slice lost in transfer
    code, message = _run(caplog, ["segment", str(series), "--targets", "liver", "--out", str(tmp_path / "o"),
                                  "--url", "127.0.0.1:1"])
    assert code == 2 and "cannot use the DICOM series" in message and "missing slice" in message
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    code, message = _run(caplog, ["segment", str(broken), "--t1", "CT of the abdomen", "--modality", "CT",
                                  "--targets", "liver", "--out", str(tmp_path / "o"), "--url", "127.0.0.1:1"])
    assert code == 2 and "neither a DICOM folder nor a readable NIfTI file" in message
    code, message = _run(caplog, ["segment", str(tmp_path / "nowhere"), "--targets", "liver", "--out",
                                  str(tmp_path / "o")])
    assert code == 2 and "input not found" in message
    code, message = _run(caplog, ["prognose", str(nifti), "--ehr-file", str(tmp_path / "no_note.txt"),
                                  "--url", "127.0.0.1:1"])
    assert code == 2 and "cannot read the EHR note" in message


def test_missing_header_field(small_ct, caplog, tmp_path):
    _, volume, _ = small_ct
    series = tmp_path / "anonymous"
    write_series(volume, AFFINE, series, body_part="", series_description="")   # nothing says which region
    # the server's context classifier would fill the T1 in: without a server, one line that says so
    code, message = _run(caplog, ["segment", str(series), "--targets", "liver", "--out", str(tmp_path / "o"),
                                  "--url", "127.0.0.1:1"])
    assert code == 2 and "127.0.0.1:1" in message


@pytest.mark.server
def test_silent_header_over_noise_gets_no_t1_from_the_context_classifier(triton_server, small_ct, caplog, tmp_path):
    """A "CT" of Gaussian noise whose header names no region: the classifier does not take it for a CT (it gives CT
    less than the guard's alpha), so no T1 is filled in from its CT contexts; one error, exit 2, nothing written.
    A real CT with a silent header is filled in: tests/serving/test_classify_context.py and the node's test."""
    _, volume, _ = small_ct
    series = tmp_path / "anonymous"
    write_series(volume, AFFINE, series, body_part="", series_description="")
    code, message = _run(caplog, ["segment", str(series), "--targets", "liver", "--out", str(tmp_path / "o"),
                                  "--url", triton_server.grpc_url])
    assert code == 2 and "cannot tell the body region" in message and "give its T1 prompt" in message
    assert "the header says CT but the image does not look like CT" in message and "alpha 0.1" in message
    assert not (tmp_path / "o" / "result.json").exists()


def test_pet_without_the_attributes_for_suv(small_ct, caplog, tmp_path):
    from clients.dicom_io import PetHeader

    _, volume, _ = small_ct
    series = tmp_path / "pt"
    write_series(np.abs(volume) * 100, AFFINE, series, modality="PT", body_part="HEADNECK",
                 pet=PetHeader(patient_weight_kg=None))                       # an anonymised export drops the weight
    argv = ["segment", str(series), "--targets", "primary tumour", "--out", str(tmp_path / "o"),
            "--url", "127.0.0.1:1"]
    code, message = _run(caplog, argv)
    assert code == 2 and "PatientWeight" in message and "--pet-units SUV" in message
    code, message = _run(caplog, [*argv, "--pet-units", "SUV"])                 # stated units: on to the server
    assert code == 2 and "cannot reach the Triton server at 127.0.0.1:1" in message


def test_unreachable_server_in_a_real_process(small_ct, tmp_path):
    _, _, nifti = small_ct
    url = f"127.0.0.1:{free_port()}"                                               # nobody listens there
    proc = subprocess.run([sys.executable, "-m", "clients", "segment", str(nifti), "--t1", "CT of the abdomen",
                           "--modality", "CT", "--targets", "liver", "--out", str(tmp_path / "o"), "--url", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot reach the Triton server at {url}" in errors[0], proc.stderr


@pytest.mark.server
def test_errors_answered_by_the_server(triton_server, small_ct, caplog, tmp_path):
    _, _, nifti = small_ct
    base = ["segment", str(nifti), "--t1", "CT of the abdomen", "--modality", "CT", "--out", str(tmp_path / "o"),
            "--url", triton_server.grpc_url]
    code, message = _run(caplog, [*base, "--targets", "liver", "xyzzy plugh"])
    assert code == 2 and "the server refused the request (StatusCode.INVALID_ARGUMENT)" in message
    assert "xyzzy plugh" in message                                             # it names the prompt
    code, message = _run(caplog, [*base, "--targets", "liver " * 400])          # 2,400 characters
    assert code == 2 and "INVALID_ARGUMENT" in message and len(message) < 700   # a short prefix, not the text
    assert triton_server.is_ready()


def test_unexpected_error_is_one_line_and_exit_1(small_ct, caplog, monkeypatch, tmp_path):
    def broken(args):
        raise RuntimeError("an invariant broke")

    monkeypatch.setitem(COMMANDS, "segment", broken)
    code, message = _run(caplog, ["segment", str(small_ct[2]), "--targets", "liver", "--out", str(tmp_path)])
    assert code == 1 and "this is a bug" in message and "an invariant broke" in message


def test_unreachable_job_queue(caplog, tmp_path):
    """A node whose PostgreSQL queue is not there: one line naming the queue, exit 2 (no traceback)."""
    pytest.importorskip("psycopg")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"port: {free_port()}\nworkdir: {tmp_path / 'node'}\nallowed_calling_aes: [STORESCU]\n"
                   f"queue_url: postgresql://duplus@127.0.0.1:{free_port()}/queue\n")
    code, message = _run(caplog, ["dicom-node", "--config", str(cfg)])
    assert code == 2 and message.startswith("cannot use the job queue"), message
