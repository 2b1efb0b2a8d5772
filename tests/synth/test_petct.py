"""Paired head-and-neck PET/CT from simulated centres, the HECKTOR layout and fusing the pair in one frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from duplus.preprocessing import petct_to_model_space, world_bounds
from duplus.synth.phantoms import (
    CENTRES,
    AcquisitionSpec,
    ScannerProfile,
    generate_petct,
    generate_phantom,
    write_hecktor_dataset,
)
from training.data import load_hecktor, read_petct


@pytest.fixture(scope="module")
def pair():
    return generate_petct("E", 4242)


def test_pair_images_one_patient_in_one_frame(pair):
    ct, pet = pair.ct, pair.pet
    assert ct.anatomy_seed == pet.anatomy_seed and ct.factors == pet.factors
    assert min(pet.spacing) > max(ct.spacing[:2])                       # PET on its own, coarser grid
    assert ct.label.shape == ct.image.shape and set(np.unique(ct.label)) <= {0, 1, 2}
    # same frame of reference: the tumour's centre in world mm is where the PET is hottest inside it
    def world_centre(label, weights, affine):
        com = ndimage.center_of_mass(weights * (label == 1))
        return (affine @ np.r_[com, 1.0])[:3]
    from_ct = world_centre(ct.label, np.ones_like(ct.image), ct.affine)
    from_pet = world_centre(pet.label, pet.image, pet.affine)
    assert np.linalg.norm(from_ct - from_pet) < 4.0, (from_ct, from_pet)


def test_lesions_are_isodense_on_ct_and_avid_on_pet(pair):
    ct, pet = pair.ct, pair.pet
    tumour_hu = float(np.median(ct.image[ct.label == 1]))
    # muscle: soft tissue 30-60 HU outside the lesions
    soft = ct.image[(ct.label == 0) & (ct.image > 20) & (ct.image < 70)]
    assert abs(tumour_hu - float(np.median(soft))) < 25.0          # low contrast on the CT of a PET/CT
    tumour_suv = float(np.median(pet.image[pet.label == 1]))
    background = float(np.median(pet.image[(pet.label == 0) & (pet.image > 0.5)]))
    assert tumour_suv > 2.5 * background                            # FDG-avid


def test_centres_differ_as_scanners_do():
    a, c = generate_petct("A", 7), generate_petct("C", 7)
    assert a.ct.factors == c.ct.factors                             # the same patient ...
    assert a.ct.spacing != c.ct.spacing and a.pet.spacing != c.pet.spacing   # ... on other scanners
    assert CENTRES["B"].scanner.pet_calibration > 1.0 > CENTRES["C"].scanner.pet_calibration
    # a calibration factor scales the SUVs of the same PET
    spec = AcquisitionSpec((4.0, 4.0, 4.0), (0, 1, 2), (False, False, False), 0.0)
    exact = generate_phantom("head_neck", "PET", 3, acquisition=spec, scanner=ScannerProfile(pet_calibration=1.0))
    high = generate_phantom("head_neck", "PET", 3, acquisition=spec, scanner=ScannerProfile(pet_calibration=1.2))
    np.testing.assert_allclose(high.image, exact.image * 1.2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"ct_lesion_hu": (30.0, 10.0)}, "ct_lesion_hu"),
    ({"pet_fwhm_mm": 0.1}, "pet_fwhm_mm"),
    ({"pet_calibration": 3.0}, "pet_calibration"),
])
def test_scanner_profile_is_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScannerProfile(**kwargs)


def test_unknown_centre_is_named():
    with pytest.raises(ValueError, match="unknown centre 'Z'"):
        generate_petct("Z", 1)


def test_hecktor_layout_round_trip(tmp_path):
    root = write_hecktor_dataset(tmp_path / "hecktor", "F", 2, seed=5, progress=False)
    names = sorted(p.name for p in (root / "imagesTr").iterdir())
    assert names == ["F-000__CT.nii.gz", "F-000__PT.nii.gz", "F-001__CT.nii.gz", "F-001__PT.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["F-000.nii.gz", "F-001.nii.gz"]
    manifest = json.loads((root / "cases.json").read_text())
    assert [e["id"] for e in manifest["cases"]] == ["F-000", "F-001"]
    before = (root / "imagesTr" / "F-000__CT.nii.gz").stat().st_mtime_ns
    write_hecktor_dataset(root, "F", 2, seed=5, progress=False)         # idempotent: nothing rewritten
    assert (root / "imagesTr" / "F-000__CT.nii.gz").stat().st_mtime_ns == before

    records = load_hecktor(root)
    assert [(r.case_id, r.centre) for r in records] == [("F-000", "F"), ("F-001", "F")]
    ct, ct_affine, pet, pet_affine, label = read_petct(records[0])
    direct = generate_petct("F", records[0].seed)
    np.testing.assert_array_equal(label, direct.label)
    np.testing.assert_allclose(ct_affine, direct.ct.affine)
    np.testing.assert_allclose(pet, direct.pet.image, rtol=1e-6)
    # a flat folder (no imagesTr/labelsTr) reads the same
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in [*(root / "imagesTr").iterdir(), *(root / "labelsTr").iterdir()]:
        (flat / p.name).symlink_to(p)
    assert [r.case_id for r in load_hecktor(flat)] == ["F-000", "F-001"]
    with pytest.raises(ValueError, match="HECKTOR layout"):
        load_hecktor(tmp_path / "hecktor" / "labelsTr")


def test_fusing_the_pair_in_the_ct_frame(pair):
    image, present, affine, ref_shape, label = petct_to_model_space(
        pair.ct.image, pair.ct.affine, pair.pet.image, pair.pet.affine, (2.0, 2.0, 2.0), label=pair.label)
    assert present == (True, True) and ref_shape == pair.ct.image.shape
    assert image.shape[0] == 2 and image.shape[1:] == label.shape
    tumour = label.numpy() == 1
    assert float(image[1][tumour].mean()) > 4 * float(image[1][~tumour].mean())   # PET lands on the lesion
    # PET alone: its own grid is the reference
    image_p, present_p, _, ref_p, _ = petct_to_model_space(None, None, pair.pet.image, pair.pet.affine)
    assert present_p == (False, True) and ref_p == pair.pet.image.shape and float(image_p[0].abs().max()) == 0.0


def test_fusing_refuses_scans_that_do_not_overlap(pair):
    moved = pair.pet.affine.copy()
    moved[2, 3] += 500.0                                          # PET 50 cm away: another frame
    with pytest.raises(ValueError, match="do not overlap") as info:
        petct_to_model_space(pair.ct.image, pair.ct.affine, pair.pet.image, moved)
    assert "CT spans" in str(info.value) and "PET" in str(info.value)
    with pytest.raises(ValueError, match="neither a CT nor a PET"):
        petct_to_model_space(None, None, None, None)
    lo, hi = world_bounds(pair.ct.image.shape, pair.ct.affine)
    assert (hi - lo > 100).all()
