"""Compressed DICOM in: the same series written by ``write_series`` and compressed by independent encoders
(dcmtk's dcmcjpeg, dcmcjpls, dcmcrle; OpenJPEG through pydicom for JPEG 2000, which dcmtk cannot encode
for free) reads back through ``read_series`` as exactly the uncompressed volume and affine for the lossless
syntaxes, and within a stated error for lossy JPEG baseline. End to end: storescu sends every syntax to
the real DICOM node, which decodes, segments through Triton and stores the SEG in Orthanc; the CLI segments
one of them; the labels equal the uncompressed series' (lossless) or overlap with Dice >= 0.99 (baseline)."""

import json
import logging
import shutil
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from clients.dicom_io import DicomSeriesError, read_series, write_series
from duplus.synth.phantoms import generate_phantom
from duplus.synth.phantoms.acquisition import AcquisitionSpec
from tests.clients import test_dicom_node as node_tests

# (id, transfer syntax, dcmtk command or None for pydicom + pylibjpeg, lossless, storescu option proposing it)
SYNTAXES = [
    ("jpeg-baseline", JPEGBaseline8Bit, ["dcmcjpeg", "+eb"], False, "-xy"),
    ("jpeg-lossless-sv1", JPEGLosslessSV1, ["dcmcjpeg", "+e1"], True, "-xs"),
    ("jpeg-ls-lossless", JPEGLSLossless, ["dcmcjpls", "+el"], True, "-xt"),
    ("jpeg2000-lossless", JPEG2000Lossless, None, True, "-xv"),
    ("rle-lossless", RLELossless, ["dcmcrle"], True, "-xr"),
]
MISSING_TOOLS = sorted({s[2][0] for s in SYNTAXES if s[2] and not shutil.which(s[2][0])})
needs_dcmtk = pytest.mark.skipif(bool(MISSING_TOOLS), reason=f"needs dcmtk's {', '.join(MISSING_TOOLS)} "
                                                             "(make pacs-tools)")
log = logging.getLogger(__name__)
ABDOMEN_TARGETS = ["liver", "spleen", "left kidney", "right kidney"]     # the node's CT|abdomen default


def compress_series(src: Path, dst: Path, syntax, command) -> Path:
    """Every file of ``src`` compressed into ``dst`` (two dcmtk processes at a time)."""
    dst.mkdir(parents=True)
    files = sorted(src.glob("*.dcm"))

    def one(f: Path) -> None:
        if command is None:
            ds = pydicom.dcmread(f)
            ds.compress(syntax, encoding_plugin="pylibjpeg")
            ds.save_as(dst / f.name, enforce_file_format=True)
        else:
            subprocess.run([shutil.which(command[0]), *command[1:], str(f), str(dst / f.name)], check=True,
                           capture_output=True, timeout=60)

    if command is None:     # in this thread: openjpeg's encoder logs from C and crashed (SIGSEGV) in a worker thread
        for f in files:
            one(f)
    else:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, files))
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in dst.glob("*.dcm")}
    assert got == {str(syntax)}, got
    return dst


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """48 x 48 x 16 of a CT phantom (-1070..962 HU: stored values below 0 test the signed decoders)."""
    ph = generate_phantom("head_neck", "CT", 474747)
    root = tmp_path_factory.mktemp("compressed")
    write_series(ph.image[20:68, 20:68, 37:53], ph.affine, root / "native", body_part="HEADNECK")
    return root


@needs_dcmtk
@pytest.mark.parametrize("name, syntax, command, lossless, _", SYNTAXES, ids=[s[0] for s in SYNTAXES])
def test_compressed_series_read_as_the_uncompressed_one(small_ct, name, syntax, command, lossless, _):
    native = read_series(small_ct / "native")
    assert native.volume.min() < -1024                 # negative stored values (RescaleIntercept -1024)
    s = read_series(compress_series(small_ct / "native", small_ct / name, syntax, command))
    assert s.series_uid == native.series_uid and s.units == "HU"
    np.testing.assert_array_equal(s.affine, native.affine)
    if lossless:
        assert all(int(ds.BitsStored) == 16 and int(ds.PixelRepresentation) == 1 for ds in s.datasets)
        np.testing.assert_array_equal(s.volume, native.volume)
        return
    # JPEG baseline is 8-bit: dcmcjpeg maps each slice's range onto 0..255 with its own RescaleSlope (about
    # 8 HU per level for this 2000 HU range) and then quantises the DCT at quality 90, which costs most on the
    # phantom's voxel noise. Stated tolerance (measured: 2.4, 10.6 and 12.9 levels): mean |error| <= 3 levels,
    # 99.9th percentile <= 12 levels, maximum <= 16 levels.
    steps = np.array([float(ds.RescaleSlope) for ds in s.datasets])
    assert all(int(ds.BitsStored) == 8 for ds in s.datasets) and 6 < steps.max() < 10
    error = np.abs(s.volume - native.volume)
    level = float(steps.max())
    assert error.mean() <= 3 * level and np.percentile(error, 99.9) <= 12 * level and error.max() <= 16 * level, \
        (error.mean(), np.percentile(error, 99.9), error.max(), level)
    assert np.corrcoef(s.volume.ravel(), native.volume.ravel())[0, 1] > 0.99


def test_unsupported_syntax_and_colour_are_refused_naming_them(small_ct, tmp_path):
    files = sorted((small_ct / "native").glob("*.dcm"))
    mpeg = tmp_path / "mpeg"
    mpeg.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)                        # encapsulated pixel data ...
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"     # ... labelled MPEG2: no decoder exists
        ds.save_as(mpeg / f.name)
    with pytest.raises(DicomSeriesError, match=r"transfer syntax MPEG2 Main Profile / Main Level "
                                               r"\(1\.2\.840\.10008\.1\.2\.4\.100\) is not supported"):
        read_series(mpeg)
    colour = tmp_path / "colour"
    colour.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
        ds.save_as(colour / f.name)
    with pytest.raises(DicomSeriesError, match="YBR_FULL_422 images with 3 samples per pixel are not supported"):
        read_series(colour)


# ---- end to end: storescu -> DICOM node -> Triton -> SEG -> Orthanc, and the CLI --------------------------

orthanc = node_tests.orthanc        # the real Orthanc and DICOM node of test_dicom_node.py, for this module
node = node_tests.node


def _abdomen_ct():
    """A small abdomen CT around the liver: 72 x 72 x 24 voxels of 2 x 2 x 4 mm, axial slices, one window."""
    ph = generate_phantom("abdomen", "CT", 515151,
                          acquisition=AcquisitionSpec((2.0, 2.0, 4.0), (0, 1, 2), (False, False, False), 1.0))
    liver = np.argwhere(ph.label == ph.label_names.index("liver") + 1)
    size = np.array([72, 72, 24])
    start = np.clip((liver.min(0) + liver.max(0)) // 2 - size // 2, 0, np.array(ph.image.shape) - size)
    affine = ph.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ start
    return ph.image[tuple(slice(a, a + n) for a, n in zip(start, size))], affine


def _seg_in_orthanc(orthanc, seg_uid) -> pydicom.Dataset:
    found = json.loads(urllib.request.urlopen(urllib.request.Request(
        orthanc["url"] + "/tools/find", data=json.dumps({"Level": "Instance", "Query": {
            "SOPInstanceUID": seg_uid}}).encode(), method="POST"), timeout=10).read())
    assert len(found) == 1, (seg_uid, found)
    with urllib.request.urlopen(f"{orthanc['url']}/instances/{found[0]}/file", timeout=10) as r:
        return pydicom.dcmread(pydicom.filebase.DicomBytesIO(r.read()))


def _dice(a, b) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


@pytest.mark.server
@needs_dcmtk
@node_tests.needs_peers
def test_compressed_series_through_storescu_node_and_cli(node, orthanc, triton_server, tmp_path):
    from clients.__main__ import main as clients_main
    from clients.dicom_seg import seg_to_labels
    from clients.grpc_client import SegmentationClient

    t0 = time.perf_counter()
    volume, affine = _abdomen_ct()
    folders = {}
    for name, syntax, command, _, _ in SYNTAXES:    # one series per syntax, its own Series Instance UID
        write_series(volume, affine, tmp_path / "native" / name, series_description="CT abdomen")
        folders[name] = compress_series(tmp_path / "native" / name, tmp_path / name, syntax, command)
    for name, _, _, _, propose in SYNTAXES:
        # storescu proposes only uncompressed syntaxes unless told; it cannot decompress to send them that way
        proc = subprocess.run([node_tests.STORESCU, "-aet", "STORESCU", "-aec", "DUPLUS", propose, "+sd",
                               "127.0.0.1", str(node.cfg.port), str(folders[name])],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (name, proc.stderr)
    sent = time.perf_counter()
    # the uncompressed series, segmented in process, is the reference (the node works meanwhile)
    native = read_series(tmp_path / "native" / "jpeg-baseline")
    with SegmentationClient(triton_server.grpc_url) as client:
        expected = client.segment_volume(native.volume, native.affine, "CT", "CT of the abdomen",
                                         ABDOMEN_TARGETS).labels
    assert (expected == 1).sum() > 5000 and (expected == 3).sum() > 500     # liver and left kidney are there
    # the CLI on the series the node received in JPEG-LS (its spool copy: the compressed files as sent)
    jls_uid = read_series(folders["jpeg-ls-lossless"]).series_uid
    spooled = node.spool / jls_uid
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for f in spooled.glob("*.dcm")} == {str(JPEGLSLossless)}
    assert clients_main(["segment", str(spooled), "--url", triton_server.grpc_url, "--targets", *ABDOMEN_TARGETS,
                         "--out", str(tmp_path / "cli")]) == 0
    cli_series = read_series(spooled)
    np.testing.assert_array_equal(seg_to_labels(pydicom.dcmread(tmp_path / "cli" / "seg.dcm"), cli_series),
                                  expected)
    # every SEG the node stored in Orthanc
    for name, _, _, lossless, _ in SYNTAXES:
        series = read_series(folders[name])
        row = node_tests._wait_status(node, series.series_uid, timeout=120)
        assert row["status"] == "done", (name, row["error"])
        labels = seg_to_labels(_seg_in_orthanc(orthanc, row["seg_uid"]), series)
        if lossless:
            np.testing.assert_array_equal(labels, expected, err_msg=name)
        else:
            dice = [_dice(labels == k, expected == k) for k in range(1, len(ABDOMEN_TARGETS) + 1)
                    if (expected == k).sum() > 100]
            assert min(dice) >= 0.99, (name, dice)
            log.info("%s: Dice per segment vs the uncompressed series %s", name, np.round(dice, 4).tolist())
    log.info("compressed end to end: 5 series built, compressed and sent in %.1f s, segmented and checked in "
             "%.1f s", sent - t0, time.perf_counter() - sent)
