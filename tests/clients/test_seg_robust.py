"""DICOM SEG for what real PACS send: an anonymised series without its Type 2 patient/study attributes still
gets a SEG that dciodvfy accepts (those attributes present and empty); the SEG's UIDs are deterministic per
source series and model version; what cannot be written is refused with ``SegWriteError`` naming why."""

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from clients.dicom_io import read_series, write_series
from clients.dicom_seg import SOURCE_TYPE2, SegWriteError, seg_to_labels, seg_uids, write_seg
from duplus.synth.phantoms import generate_phantom

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def anonymised(tmp_path_factory):
    """A 40 x 40 x 8 CT piece with every Type 2 patient/study attribute deleted from its files, and its labels."""
    ph = generate_phantom("head_neck", "CT", 474747)
    folder = tmp_path_factory.mktemp("anon") / "ct"
    sl = (slice(25, 65), slice(25, 65), slice(40, 48))
    write_series(ph.image[sl], ph.affine, folder, body_part="HEADNECK")
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        for keyword in SOURCE_TYPE2:
            delattr(ds, keyword)
        ds.save_as(f)
    s = read_series(folder)
    labels = np.zeros(s.volume.shape, np.uint8)
    labels[s.volume > 200] = 1                          # bone
    labels[(s.volume > -100) & (s.volume < 100)] = 2    # soft tissue
    return s, labels


def test_anonymised_series_gets_a_valid_seg(anonymised, tmp_path):
    s, labels = anonymised
    assert not any(k in s.datasets[0] for k in SOURCE_TYPE2)
    seg = write_seg(s, labels, ["bone", "soft tissue"], ["bone", "soft tissue"], tmp_path / "seg.dcm")
    assert not any(k in s.datasets[0] for k in SOURCE_TYPE2)     # the caller's datasets are unchanged
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    for keyword in SOURCE_TYPE2:
        assert keyword in back and str(back[keyword].value or "") == "", keyword
    assert back.StudyInstanceUID == s.datasets[0].StudyInstanceUID and back.SOPInstanceUID == seg.SOPInstanceUID
    np.testing.assert_array_equal(seg_to_labels(back, s), labels)
    assert (labels == 1).sum() > 50 and (labels == 2).sum() > 50
    if DCIODVFY is None:
        pytest.skip("dciodvfy is not installed (make pacs-tools): the SEG was written, not validated")
    check = subprocess.run([DCIODVFY, str(tmp_path / "seg.dcm")], capture_output=True, text=True, timeout=60)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_seg_uids_are_deterministic_per_model_version(anonymised, tmp_path):
    s, labels = anonymised
    args = (s, labels, ["bone", "soft tissue"], ["bone", "soft tissue"])
    a = write_seg(*args, tmp_path / "a.dcm", model_version="1.0.0")
    again = write_seg(*args, tmp_path / "b.dcm", model_version="1.0.0")
    other = write_seg(*args, tmp_path / "c.dcm", model_version="1.1.0")
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == seg_uids(s.series_uid, "DuPLUS", "1.0.0")
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (a.SeriesInstanceUID, a.SOPInstanceUID)
    assert other.SeriesInstanceUID != a.SeriesInstanceUID and other.SOPInstanceUID != a.SOPInstanceUID
    assert len({a.SeriesInstanceUID, a.SOPInstanceUID, s.series_uid}) == 3
    fixed = write_seg(*args, tmp_path / "d.dcm", model_version="1.0.0", sop_instance_uid="1.2.826.0.1.3680043.8.1")
    assert fixed.SOPInstanceUID == "1.2.826.0.1.3680043.8.1" and fixed.SeriesInstanceUID == a.SeriesInstanceUID


def test_what_cannot_be_written_is_refused_naming_it(anonymised, tmp_path):
    s, labels = anonymised
    names = ["bone", "soft tissue"]
    with pytest.raises(SegWriteError, match="do not lie on the series grid"):
        write_seg(s, labels[:, :, :4], names, names, tmp_path / "x.dcm")
    with pytest.raises(SegWriteError, match=r"label values 0\.\.2 outside 0\.\.1"):
        write_seg(s, labels, names[:1], names[:1], tmp_path / "x.dcm")
    no_frame = type(s)(s.volume, s.affine, tuple(_without(ds, "FrameOfReferenceUID") for ds in s.datasets),
                       s.series_uid, s.modality, s.units)
    with pytest.raises(SegWriteError, match="FrameOfReferenceUID is missing on 8 source image"):
        write_seg(no_frame, labels, names, names, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def _without(ds, keyword):
    out = pydicom.Dataset()
    out.update(ds)
    delattr(out, keyword)
    return out
