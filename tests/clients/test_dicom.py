"""DICOM series in with correct geometry, DICOM SEG out, T1 from the header, and `python -m clients segment`
end to end through the real Triton server (DICOM path == NIfTI path, voxel for voxel)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest

from clients.__main__ import main as clients_main
from clients.dicom_io import DicomSeriesError, normal_ordered, read_series, write_series
from clients.dicom_seg import SNOMED, derive_t1, seg_to_labels, write_seg
from duplus.synth.phantoms import generate_phantom
from tests.conftest import tumour_crop


def _rotation(deg_z, deg_x):
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = np.eye(4)
    r[:3, :3] = rx @ rz
    return r


@pytest.fixture(scope="module")
def oblique_ct(tmp_path_factory):
    """A head-and-neck CT phantom (cut to about 100 x 100 x 70 mm around its tumour: one or two sliding windows)
    written as a DICOM series that is not axis-aligned with RAS."""
    ph = tumour_crop(generate_phantom("head_neck", "CT", 454545), (56, 56, 40))
    affine = _rotation(15, 10) @ ph.affine
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    write_series(ph.image, affine, folder, body_part="HEADNECK", series_description="CT neck with contrast")
    return ph, affine, folder


def test_series_geometry_round_trip(oblique_ct):
    ph, affine, folder = oblique_ct
    s = read_series(folder)
    volume, affine = normal_ordered(ph.image, affine)
    assert s.volume.shape == ph.image.shape
    np.testing.assert_allclose(s.affine, affine, atol=1e-4)
    np.testing.assert_allclose(s.volume, np.round(volume), atol=0.5)
    # every voxel keeps its world position: the centre voxel's value and position agree with the original
    centre = np.array(ph.image.shape) // 2
    world = ph.affine[:3, :3] @ centre + ph.affine[:3, 3]
    world = (_rotation(15, 10) @ np.append(world, 1))[:3]
    ijk = np.round(np.linalg.solve(s.affine[:3, :3], world - s.affine[:3, 3])).astype(int)
    assert abs(s.volume[tuple(ijk)] - np.round(ph.image[tuple(centre)])) <= 0.5
    # LPS in the files, RAS in the affine: the first voxel's IPP is the affine's origin with x, y negated
    ipp = np.array([float(v) for v in s.datasets[0].ImagePositionPatient])
    np.testing.assert_allclose(ipp, s.affine[:3, 3] * [-1, -1, 1], atol=1e-4)
    assert abs(np.round(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0), 3)).max() < 0.999  # oblique


def test_shuffled_files_are_sorted_along_the_normal(oblique_ct, tmp_path):
    ph, affine, folder = oblique_ct
    _, affine = normal_ordered(ph.image, affine)
    files = sorted(folder.glob("*.dcm"))
    rng = np.random.default_rng(0)
    for i, f in enumerate(rng.permutation(files)):
        shutil.copy(f, tmp_path / f"x{i:04d}.dcm")
    np.testing.assert_allclose(read_series(tmp_path).affine, affine, atol=1e-4)


def _copy(folder, dst, skip=()):
    dst.mkdir()
    for i, f in enumerate(sorted(folder.glob("*.dcm"))):
        if i not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_broken_series_are_refused_with_the_reason(oblique_ct, tmp_path):
    ph, affine, folder = oblique_ct
    with pytest.raises(DicomSeriesError, match="missing slice"):
        read_series(_copy(folder, tmp_path / "gap", skip=(5,)))
    mixed = _copy(folder, tmp_path / "mixed")
    write_series(ph.image[:, :, :4], affine, mixed / "other", modality="CT")
    with pytest.raises(DicomSeriesError, match="mixed series"):
        read_series(mixed)
    tilted = _copy(folder, tmp_path / "tilt")
    for i, f in enumerate(sorted(tilted.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.3 * i * float(ds.SliceThickness), ipp[2]]
        ds.save_as(f)
    with pytest.raises(DicomSeriesError, match="gantry tilt"):
        read_series(tilted)
    with pytest.raises(DicomSeriesError, match="no DICOM image"):
        read_series((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_volume_units_by_modality(oblique_ct, tmp_path):
    ph, affine, folder = oblique_ct
    assert read_series(folder).units == "HU"
    write_series(ph.image[:, :, :4], affine, tmp_path / "mr", modality="MR", series_description="t1_vibe")
    mr = read_series(tmp_path / "mr", pet_units="SUV")      # pet_units applies to PT only
    assert mr.units == "" and mr.modality == "MR"
    with pytest.raises(ValueError, match="pet_units"):
        read_series(folder, pet_units="Bq/ml")


@pytest.mark.parametrize("modality, body, desc, expected", [
    ("CT", "ABDOMEN", "", ("CT of the abdomen", "CT", None)),
    ("PT", "", "PET HN WB", ("PET of the head and neck", "PET", None)),
    ("MR", "ABDOMEN", "t2_haste_tra", (None, "MR", "T2")),
])
def test_t1_from_the_header(modality, body, desc, expected):
    ds = pydicom.Dataset()
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = modality, body, desc
    t1, mod, seq = derive_t1(ds)
    assert (mod, seq) == expected[1:]
    if expected[0]:
        assert t1 == expected[0]
    else:
        assert "T2" in t1 and "abdomen" in t1
    ds.Modality = "US"
    with pytest.raises(ValueError, match="no stem"):
        derive_t1(ds)


def test_seg_round_trip_and_coding(oblique_ct, tmp_path):
    ph, _, folder = oblique_ct
    s = read_series(folder)
    label, _ = normal_ordered(ph.label, ph.affine)
    labels = np.zeros(s.volume.shape, np.uint8)
    labels[label == ph.label_names.index("primary tumour") + 1] = 1
    labels[label == ph.label_names.index("lymph node") + 1] = 2
    seg = write_seg(s, labels, ["GTVp", "lymph node"], ["primary tumour", "lymph node"], tmp_path / "seg.dcm")
    back = seg_to_labels(pydicom.dcmread(tmp_path / "seg.dcm"), s)
    np.testing.assert_array_equal(back, labels)
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == s.datasets[0].StudyInstanceUID
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in s.datasets}
    seg1 = seg.SegmentSequence[0]
    assert seg1.SegmentLabel == "GTVp"
    assert seg1.SegmentedPropertyTypeCodeSequence[0].CodeValue == SNOMED["primary tumour"][0]
    assert seg1.SegmentAlgorithmName == "DuPLUS"


@pytest.mark.server
def test_cli_dicom_path_equals_nifti_path(triton_server, oblique_ct, tmp_path):
    _, _, folder = oblique_ct
    s = read_series(folder)
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(s.volume, s.affine), str(nifti))
    url = triton_server.grpc_url
    assert clients_main(["segment", str(folder), "--targets", "primary tumour", "lymph node", "--out",
                         str(tmp_path / "dicom_out"), "--url", url, "--png"]) == 0
    assert clients_main(["segment", str(nifti), "--t1", "CT of the head and neck", "--modality", "CT", "--targets",
                         "primary tumour", "lymph node", "--out", str(tmp_path / "nifti_out"), "--url", url]) == 0
    result = json.loads((tmp_path / "dicom_out" / "result.json").read_text())
    assert result["t1"] == "CT of the head and neck"           # derived from the header
    from_nifti = np.asarray(nib.load(str(tmp_path / "nifti_out" / "labels.nii.gz")).dataobj)
    from_seg = seg_to_labels(pydicom.dcmread(tmp_path / "dicom_out" / "seg.dcm"), s)
    np.testing.assert_array_equal(from_seg, from_nifti)
    assert (from_nifti == 1).sum() > 100                        # the tumour is there
    assert (tmp_path / "dicom_out" / "overlay.png").stat().st_size > 1000
    assert clients_main(["segment", str(nifti), "--targets", "liver", "--out", str(tmp_path / "x"),
                         "--url", url]) == 2                    # NIfTI without --t1
