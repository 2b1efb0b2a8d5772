"""The DICOM node with real peers on loopback: dcmtk's storescu sends an oblique CT series, the node
segments it through Triton and C-STOREs the DICOM SEG to a real Orthanc; dciodvfy checks the SEG; its
frames equal the NIfTI path's label map. Malformed input gets a DIMSE failure and the node keeps serving."""

import json
import shutil
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from clients.dicom_io import read_series, write_series
from clients.dicom_node import Destination, DicomNode, NodeConfig, seg_uid_for
from clients.dicom_seg import seg_to_labels, seg_uids
from clients.grpc_client import SegmentationClient
from duplus.instructions import ImageContext, named_targets
from duplus.synth.phantoms import generate_phantom
from serving.serve import free_port
from tests.conftest import tumour_crop

pytestmark = pytest.mark.server
ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).exists()), None)
STORESCU = shutil.which("storescu")
DCIODVFY = shutil.which("dciodvfy")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

needs_peers = pytest.mark.skipif(not (ORTHANC and STORESCU and DCIODVFY),
                                 reason="needs Debian's orthanc, dcmtk and dicom3tools (make pacs-tools)")


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if not ORTHANC:
        pytest.skip("Orthanc is not installed (make pacs-tools)")
    d = tmp_path_factory.mktemp("orthanc")
    dicom_port, http_port = free_port(), free_port()
    cfg = {"Name": "duplus-test", "StorageDirectory": str(d / "storage"), "IndexDirectory": str(d / "index"),
           "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
           "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (d / "orthanc.json").write_text(json.dumps(cfg))
    log = open(d / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(d / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    for _ in range(600):     # up to 60 s
        try:
            _get(url + "/system")
            break
        except OSError:
            assert proc.poll() is None, (d / "orthanc.log").read_text()[-2000:]
            time.sleep(0.1)
    yield {"url": url, "dicom_port": dicom_port}
    proc.kill()         # a throw-away PACS: its graceful stop only costs time (2.4 s of idle polling, measured)
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def node(triton_server, orthanc, tmp_path_factory):
    cfg = NodeConfig(ae_title="DUPLUS", port=free_port(), allowed_calling_aes=("STORESCU", "TESTSCU"),
                     workdir=tmp_path_factory.mktemp("node"), quiet_period_s=1.0, poll_s=0.2,
                     triton_url=triton_server.grpc_url,
                     destination=Destination("ORTHANC", "127.0.0.1", orthanc["dicom_port"]))
    n = DicomNode(cfg).start()
    yield n
    n.stop()


def _oblique_series(folder, seed=474747):
    """A head-and-neck CT cut to about 100 x 100 x 70 mm around its tumour, tilted by 12 and 8 degrees: one sliding
    window in model space (the whole phantom takes eight)."""
    ph = tumour_crop(generate_phantom("head_neck", "CT", seed), (56, 56, 40))
    a, b = np.deg2rad(12), np.deg2rad(8)
    rot = np.eye(4)
    rot[:3, :3] = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]]) @ \
        np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    write_series(ph.image, rot @ ph.affine, folder, body_part="HEADNECK", series_description="CT neck")
    return read_series(folder)


def _seg_at_orthanc(orthanc, seg_uid, path):
    """The one SEG instance ``seg_uid`` stored at Orthanc, fetched to ``path``, dciodvfy-clean; its dataset."""
    found = json.loads(urllib.request.urlopen(urllib.request.Request(
        orthanc["url"] + "/tools/find", data=json.dumps({"Level": "Instance", "Query": {
            "SOPInstanceUID": seg_uid}}).encode(), method="POST"), timeout=10).read())
    assert len(found) == 1
    path.write_bytes(_get(f"{orthanc['url']}/instances/{found[0]}/file"))
    check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
    return pydicom.dcmread(path)


def _wait_status(node, series_uid, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = {r["series_uid"]: r for r in node.queue.series()}
        if series_uid in rows and rows[series_uid]["status"] in ("done", "failed"):
            return rows[series_uid]
        time.sleep(0.2)
    raise AssertionError(f"series {series_uid} not finished: {node.queue.series()}")


@needs_peers
def test_storescu_to_node_to_orthanc_seg(node, orthanc, triton_server, tmp_path):
    # for this series the node runs with instructions: auto, as its YAML would say (the shared node of this module
    # and of test_dicom_compressed.py otherwise segments by names)
    node.cfg = replace(node.cfg, instructions="auto")
    try:
        _storescu_to_node_to_orthanc_seg(node, orthanc, triton_server, tmp_path)
    finally:
        node.cfg = replace(node.cfg, instructions="names")


def _storescu_to_node_to_orthanc_seg(node, orthanc, triton_server, tmp_path):
    series = _oblique_series(tmp_path / "ct")
    proc = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", "+sd", "127.0.0.1", str(node.cfg.port),
                           str(tmp_path / "ct")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = _wait_status(node, series.series_uid)
    assert row["status"] == "done" and row["attempts"] == 1, row["error"]
    assert row["seg_uid"] == seg_uid_for(series.series_uid) == seg_uids(series.series_uid)[1]
    from_seg = seg_to_labels(_seg_at_orthanc(orthanc, row["seg_uid"], tmp_path / "seg.dcm"), series)
    # this node is configured with instructions: auto (Zeus): the server wrote each target's instruction from the
    # series header (CT, region, slice thickness); the same request through the client gives the same labels
    context = ImageContext.from_dicom(series.datasets[0]).request_fields()
    assert context["slice_thickness_mm"] > 0 and context["region"] == "head_neck" and "modality" not in context
    with SegmentationClient(triton_server.grpc_url) as client:   # the NIfTI path: same volume + RAS affine
        res = client.segment_volume(series.volume, series.affine, "CT", "CT of the head and neck",
                                    ["primary tumour", "lymph node"], instructions="auto", context=context)
    expected = res.labels
    assert [named_targets(t) for t in res.conditioned_by] == [{"primary tumour"}, {"lymph node"}]
    np.testing.assert_array_equal(from_seg, expected)
    assert (expected == 1).sum() > 100


@needs_peers
def test_petct_study_goes_to_segment_petct_and_its_seg_references_both(node, orthanc, triton_server, petct_pair,
                                                                      tmp_path):
    """``petct: true``: storescu sends a head-and-neck CT and PET of one acquisition (one study, one Frame of
    Reference); the PET's job sends the pair to segment_petct; the SEG at Orthanc lies on the CT grid, references
    both series, passes dciodvfy, and its frames equal the client's labels for the same pair."""
    from pydicom.uid import generate_uid

    ct, ct_affine, pet, pet_affine = petct_pair
    study, frame = generate_uid(), generate_uid()
    write_series(ct, ct_affine, tmp_path / "study" / "ct", modality="CT", body_part="HEADNECK", study_uid=study,
                 frame_of_reference_uid=frame)
    write_series(pet, pet_affine, tmp_path / "study" / "pet", modality="PT", body_part="HEADNECK", study_uid=study,
                 frame_of_reference_uid=frame)
    ct_series = read_series(tmp_path / "study" / "ct")
    pet_series = read_series(tmp_path / "study" / "pet", pet_units="SUV")
    node.cfg = replace(node.cfg, petct=True, pet_units="SUV")
    try:
        proc = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", "+sd", "+r", "127.0.0.1",
                               str(node.cfg.port), str(tmp_path / "study")], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        row = _wait_status(node, pet_series.series_uid)
        ct_row = _wait_status(node, ct_series.series_uid)
    finally:
        node.cfg = replace(node.cfg, petct=False, pet_units=None)
    assert row["status"] == "done" and ct_row["status"] == "done", (row["error"], ct_row["error"])
    seg = _seg_at_orthanc(orthanc, row["seg_uid"], tmp_path / "seg.dcm")
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {ct_series.series_uid,
                                                                          pet_series.series_uid}
    from_seg = seg_to_labels(seg, ct_series)
    with SegmentationClient(triton_server.grpc_url) as client:
        expected = client.segment_petct(ct_series.volume, ct_series.affine, pet_series.volume, pet_series.affine)
    assert expected.mode == "ct+pet" and (expected.labels == 1).sum() > 100
    np.testing.assert_array_equal(from_seg, expected.labels)


@needs_peers
def test_silent_header_gets_the_classifiers_t1_and_a_contradicting_header_is_noted(node, orthanc, triton_server,
                                                                                     tmp_path):
    """A head-and-neck CT whose header names no region (no BodyPartExamined, no SeriesDescription) is segmented with
    the context classifier's T1, end to end to Orthanc, and the job's record says so; the same volume sent as a PET
    (a header that contradicts the image; shifted to positive values, which the classifier's per-volume scaling does
    not see) is segmented as the header says, and the record notes the contradiction. The CT is a neck field of view
    of 140 x 140 x 120 mm around the tumour (two sliding windows, the whole phantom twelve; the classifier gives it
    CT|head_neck 0.92, the whole phantom 0.83, measured 2026-12-05)."""
    from duplus.synth.phantoms import AcquisitionSpec

    ph = tumour_crop(generate_phantom("head_neck", "CT", 494949, acquisition=AcquisitionSpec(
        spacing=(2.5, 2.5, 3.0), axis_order=(0, 1, 2), flips=(True, True, False), noise=1.0)), (56, 56, 40))
    write_series(ph.image, ph.affine, tmp_path / "silent", body_part="", series_description="")
    write_series(ph.image + 1024.0, ph.affine, tmp_path / "as_pet", modality="PT", body_part="HEADNECK")
    silent, as_pet = read_series(tmp_path / "silent"), read_series(tmp_path / "as_pet")
    for folder in ("silent", "as_pet"):
        proc = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", "+sd", "127.0.0.1",
                               str(node.cfg.port), str(tmp_path / folder)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    row = _wait_status(node, silent.series_uid)
    assert row["status"] == "done", row["error"]
    assert "'CT of the head and neck' from the context classifier" in row["note"]
    assert "cannot tell the body region" in row["note"]
    from_seg = seg_to_labels(_seg_at_orthanc(orthanc, row["seg_uid"], tmp_path / "seg.dcm"), silent)
    with SegmentationClient(triton_server.grpc_url) as client:   # what a header naming the region would have given
        expected = client.segment_volume(silent.volume, silent.affine, "CT", "CT of the head and neck",
                                         ["primary tumour", "lymph node"])
    assert expected.context_verdict["agrees"] is True
    np.testing.assert_array_equal(from_seg, expected.labels)
    row = _wait_status(node, as_pet.series_uid)
    assert row["status"] == "done", row["error"]
    assert "'PET of the head and neck' contradicts the image" in row["note"] and "looks like CT" in row["note"]


@needs_peers
def test_bad_input_gets_a_dimse_failure_and_the_node_keeps_serving(node, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    series = _oblique_series(tmp_path / "ct", seed=484848)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.cfg.port, ae_title="DUPLUS")
    assert assoc.is_established
    no_pixels = pydicom.dcmread(sorted((tmp_path / "ct").glob("*.dcm"))[0])
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = pydicom.uid.generate_uid()
    status = assoc.send_c_store(no_pixels)
    assert status.Status == 0xA900
    assert assoc.send_c_echo().Status == 0x0000          # still serving
    assoc.release()
    assert any(p.suffix == ".txt" and "missing" in p.read_text() for p in node.quarantine.iterdir())
    # a series with a missing slice: received, then refused with the reason, files quarantined
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    gap = tmp_path / "gap"
    gap.mkdir()
    for i, f in enumerate(files):
        if i != len(files) // 2:
            shutil.copy(f, gap / f.name)
    proc = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", "+sd", "127.0.0.1", str(node.cfg.port),
                           str(gap)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = _wait_status(node, series.series_uid)
    assert row["status"] == "failed" and "missing slice" in row["error"]
    assert row["attempts"] == 1 and "deterministic" in row["error"]      # failed at once, not retried
    assert (node.quarantine / series.series_uid).is_dir()
    # a calling AE title that is not on the allow-list is rejected at association
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    refused = stranger.associate("127.0.0.1", node.cfg.port, ae_title="DUPLUS")
    assert not refused.is_established


@needs_peers
def test_non_dicom_truncated_and_mixed_orientation_input(node, tmp_path):
    """Bytes that are not a dataset, a truncated instance and a series mixing two orientations: each gets a
    DIMSE failure status or a failed job naming the reason, is quarantined, and the node keeps serving."""
    from pydicom.dataset import FileMetaDataset
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    series = _oblique_series(tmp_path / "ct", seed=494949)
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    before = {p.name for p in node.quarantine.iterdir()}
    assoc = ae.associate("127.0.0.1", node.cfg.port, ae_title="DUPLUS")
    assert assoc.is_established
    # 1. a file whose body is not DICOM at all: pynetdicom streams the bytes after the file meta as they are
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    garbage = tmp_path / "garbage.dcm"
    fake = pydicom.Dataset()
    fake.file_meta = meta
    fake.save_as(garbage, enforce_file_format=True)
    with open(garbage, "ab") as fh:
        fh.write(b"%PDF-1.7 this is a scanned referral letter, not an image" * 20)
    from pynetdicom import _config

    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True   # send the file's bytes after the meta as they are, unparsed
    try:
        status = assoc.send_c_store(garbage)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    assert status.Status in (0xC210, 0xA900), hex(status.Status)
    # 2. a truncated instance: PixelData cut to half its length
    half = pydicom.dcmread(files[0])
    half.SOPInstanceUID = pydicom.uid.generate_uid()
    half.PixelData = half.PixelData[: len(half.PixelData) // 2]
    assert assoc.send_c_store(half).Status == 0xA900
    assert assoc.send_c_echo().Status == 0x0000          # still serving
    assoc.release()
    reasons = [p.read_text() for p in node.quarantine.iterdir() if p.suffix == ".txt" and p.name not in before]
    assert any("cannot parse" in r or "missing" in r for r in reasons), reasons
    assert any("truncated PixelData" in r for r in reasons), reasons
    # 3. a series whose second half is rotated by 90 degrees in-plane: received, then refused with the reason
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if i >= len(files) // 2:
            iop = [float(v) for v in ds.ImageOrientationPatient]
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*iop[3:], *[-x for x in iop[:3]])]
        ds.save_as(mixed / f.name)
    proc = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", "+sd", "127.0.0.1", str(node.cfg.port),
                           str(mixed)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = _wait_status(node, series.series_uid)
    assert row["status"] == "failed" and "ImageOrientationPatient differs" in row["error"], row
    assert (node.quarantine / series.series_uid).is_dir()


def test_node_config_validation(tmp_path):
    with pytest.raises(ValueError, match="ae_title"):
        NodeConfig(ae_title="A_VERY_LONG_AE_TITLE_X")
    (tmp_path / "n.yaml").write_text("ae_title: X\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        NodeConfig.from_yaml(tmp_path / "n.yaml")
    with pytest.raises(ValueError, match="instructions must be one of"):
        NodeConfig(instructions="sometimes")
    with pytest.raises(ValueError, match="petct must be true or false"):
        NodeConfig(petct="yes")


@needs_peers
def test_dicomweb_round_trip_with_orthanc(orthanc, triton_server, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    from clients.dicomweb import segment_study

    series = _oblique_series(tmp_path / "ct", seed=494949)
    web = DICOMwebClient(url=orthanc["url"] + "/dicom-web")
    web.store_instances(datasets=list(series.datasets))                            # STOW-RS of the source
    study = series.datasets[0].StudyInstanceUID
    stored = segment_study(orthanc["url"] + "/dicom-web", study, triton_url=triton_server.grpc_url)
    assert stored == [seg_uid_for(series.series_uid)]
    segs = [s for s in web.search_for_series(study_instance_uid=study)
            if pydicom.Dataset.from_json(s).Modality == "SEG"]
    assert len(segs) == 1
    seg_series = pydicom.Dataset.from_json(segs[0]).SeriesInstanceUID
    seg = web.retrieve_series(study_instance_uid=study, series_instance_uid=seg_series)[0]     # WADO-RS
    with SegmentationClient(triton_server.grpc_url) as client:
        expected = client.segment_volume(series.volume, series.affine, "CT", "CT of the head and neck",
                                         ["primary tumour", "lymph node"]).labels
    np.testing.assert_array_equal(seg_to_labels(seg, series), expected)


def _start_node_process(cfg_path):
    import sys

    return subprocess.Popen([sys.executable, "-m", "clients", "dicom-node", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_port(port, timeout=60):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"node not listening on {port}")


def _queue_rows(workdir):
    import sqlite3

    path = workdir / "queue.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(str(path)) as db:
        return {r[0]: r[1] for r in db.execute("SELECT series_uid, status FROM series")}


@needs_peers
def test_kill_while_receiving_and_while_segmenting_gives_exactly_one_seg(orthanc, triton_server, tmp_path):
    import signal

    series = _oblique_series(tmp_path / "ct", seed=505050)
    workdir, port = tmp_path / "node", free_port()
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"ae_title: DUPLUS\nport: {port}\nallowed_calling_aes: [STORESCU]\nworkdir: {workdir}\n"
                   f"quiet_period_s: 1.5\npoll_s: 0.2\ntriton_url: {triton_server.grpc_url}\n"
                   f"destination: {{ae_title: ORTHANC, host: 127.0.0.1, port: {orthanc['dicom_port']}}}\n")
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    half = tmp_path / "half"
    half.mkdir()
    for f in files[: len(files) // 2]:
        shutil.copy(f, half / f.name)

    def send(folder):
        proc = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", "+sd", "127.0.0.1", str(port),
                               str(folder)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    node = _start_node_process(cfg)
    try:
        _wait_port(port)
        send(half)                                 # half the series arrives ...
        node.send_signal(signal.SIGKILL)           # ... and the node dies while receiving
        node.wait(10)
        node = _start_node_process(cfg)
        _wait_port(port)
        send(tmp_path / "ct")                      # the sender re-sends the whole series
        deadline = time.monotonic() + 120
        while _queue_rows(workdir).get(series.series_uid) != "processing":
            assert time.monotonic() < deadline, _queue_rows(workdir)
            time.sleep(0.05)
        node.send_signal(signal.SIGKILL)           # killed while segmenting
        node.wait(10)
        node = _start_node_process(cfg)            # restart: the series goes back to the queue
        deadline = time.monotonic() + 300
        while _queue_rows(workdir).get(series.series_uid) != "done":
            assert time.monotonic() < deadline and node.poll() is None, _queue_rows(workdir)
            time.sleep(0.2)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)
    study = series.datasets[0].StudyInstanceUID
    segs = json.loads(urllib.request.urlopen(urllib.request.Request(
        orthanc["url"] + "/tools/find", data=json.dumps({"Level": "Instance", "Query": {
            "StudyInstanceUID": study, "Modality": "SEG"}}).encode(), method="POST"), timeout=10).read())
    assert len(segs) == 1                          # exactly one SEG for the series
    assert _get(f"{orthanc['url']}/instances/{segs[0]}/simplified-tags") and \
        json.loads(_get(f"{orthanc['url']}/instances/{segs[0]}/simplified-tags"))["SOPInstanceUID"] == \
        seg_uid_for(series.series_uid)
