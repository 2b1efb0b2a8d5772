"""Tests for the duplus.synth.phantoms package: determinism, anatomy, world geometry, ill inputs, Decathlon output."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from duplus.synth.phantoms import (
    DECATHLON_MODALITY,
    MODALITIES,
    REGION_MODALITIES,
    SPACING_RANGE_MM,
    STRUCTURES,
    TARGET_MAX_VOXELS,
    AcquisitionSpec,
    generate_phantom,
    main,
    random_acquisition,
    write_decathlon_dataset,
)

COMBINATIONS = [(region, modality) for region, mods in REGION_MODALITIES.items() for modality in mods]


def _acq(spacing=(2.5, 2.5, 2.5), axis_order=(0, 1, 2), flips=(False, False, False), noise=1.0, sequence=None):
    return AcquisitionSpec(spacing=spacing, axis_order=axis_order, flips=flips, noise=noise, sequence=sequence)


def _centroid_mm(phantom, name: str) -> np.ndarray:
    """Centroid of a labelled structure in world (RAS+) millimetres, through the affine."""
    idx = np.argwhere(phantom.label == phantom.label_names.index(name) + 1)
    assert len(idx), f"{name} missing"
    return (phantom.affine @ np.append(idx.mean(axis=0), 1.0))[:3]


def _volume_ml(phantom, name: str) -> float:
    count = int((phantom.label == phantom.label_names.index(name) + 1).sum())
    return count * float(np.prod(phantom.spacing)) / 1000.0


# --------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "region, modality, acquisition",
    [
        ("abdomen", "CT", _acq((3.0, 3.0, 3.0))),
        ("abdomen", "MR", _acq((3.0, 3.0, 3.0), sequence="T2")),
        ("head_neck", "CT", _acq((2.0, 2.0, 2.0))),
        ("head_neck", "PET", None),  # random acquisition drawn from the seed (small for PET)
    ],
)
def test_same_seed_same_phantom_and_different_seed_differs(region, modality, acquisition):
    a = generate_phantom(region, modality, 11, acquisition=acquisition)
    b = generate_phantom(region, modality, 11, acquisition=acquisition)
    c = generate_phantom(region, modality, 12, acquisition=acquisition)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.factors == b.factors
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.label.shape != c.label.shape or not np.array_equal(a.label, c.label)


def test_anatomy_seed_alone_fixes_anatomy_and_seed_fixes_noise():
    acq = _acq((3.0, 3.0, 3.0))
    a = generate_phantom("abdomen", "CT", 1, acquisition=acq, anatomy_seed=5)
    b = generate_phantom("abdomen", "CT", 2, acquisition=acq, anatomy_seed=5)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.image, b.image)  # different noise
    assert a.anatomy_seed == b.anatomy_seed == 5 and (a.seed, b.seed) == (1, 2)


# --------------------------------------------------------------------------------------
# every region / modality: shapes, dtypes, labels, plausible volumes
# --------------------------------------------------------------------------------------

VOLUME_ML = {  # plausible adult ranges (wide enough for the generator's variation)
    "liver": (900.0, 2500.0),
    "spleen": (60.0, 450.0),
    "left kidney": (80.0, 300.0),
    "right kidney": (80.0, 300.0),
    "aorta": (30.0, 250.0),
    "pancreas": (30.0, 150.0),
    "stomach": (100.0, 1000.0),
    "primary tumour": (5.0, 60.0),
    "lymph node": (0.5, 40.0),
}


@pytest.mark.parametrize(
    "region, modality, seed, acquisition",
    [
        ("abdomen", "CT", 0, _acq((2.0, 2.0, 2.0))),
        ("abdomen", "CT", 7, _acq((1.0, 1.0, 4.0), flips=(True, True, False))),
        ("abdomen", "MR", 3, _acq((2.0, 2.0, 3.0), sequence="T1")),
        ("abdomen", "MR", 4, _acq((2.0, 2.0, 3.0), sequence="T2")),
        ("head_neck", "CT", 0, _acq((1.5, 1.5, 1.5))),
        ("head_neck", "CT", 9, _acq((0.8, 0.8, 3.0), axis_order=(2, 0, 1))),
        ("head_neck", "PET", 0, _acq((3.0, 3.0, 3.0))),
        ("head_neck", "PET", 5, _acq((2.0, 2.0, 4.0))),
    ],
)
def test_phantom_contents(region, modality, seed, acquisition):
    p = generate_phantom(region, modality, seed, acquisition=acquisition)
    assert p.image.ndim == 3 and p.image.shape == p.label.shape
    assert p.image.dtype == np.float32 and p.label.dtype == np.uint8
    assert p.affine.shape == (4, 4) and p.affine.dtype == np.float64
    np.testing.assert_allclose(p.spacing, acquisition.spacing, rtol=1e-9)
    assert np.isfinite(p.image).all()
    assert p.label_names == STRUCTURES[region]
    assert (p.modality, p.region) == (modality, region)
    assert p.label.max() <= len(p.label_names)
    for name in p.label_names:
        lo, hi = VOLUME_ML[name]
        assert lo <= _volume_ml(p, name) <= hi, (name, _volume_ml(p, name))
    if modality == "CT":  # HU: air outside the body, bone inside
        assert p.image.min() < -900 and p.image.max() > 500
    elif modality == "MR":
        assert p.image.min() > 0 and p.sequence == acquisition.sequence
    else:  # SUV: the hottest voxels are lesions, never negative
        assert p.image.min() >= 0
        hottest = np.unravel_index(np.argmax(p.image), p.image.shape)
        assert p.label[hottest] > 0 or p.image[p.label > 0].max() > 0.8 * p.image.max()
    if region == "abdomen":
        assert {f"{n.replace(' ', '_')}_volume_ml" for n in p.label_names} <= set(p.factors)
    else:
        assert {"tumour_volume_ml", "suv_max", "node_count", "node_volume_ml"} <= set(p.factors)
        assert 1 <= p.factors["node_count"] <= 3
        assert 6.0 <= p.factors["suv_max"] <= 15.0
        # the factor is measured on a fixed 1 mm grid; the label on this grid agrees roughly
        assert _volume_ml(p, "primary tumour") == pytest.approx(p.factors["tumour_volume_ml"], rel=0.25)


@pytest.mark.parametrize(
    "region, modality, seed, structure, brighter_than",
    [
        ("abdomen", "CT", 2, "liver", "spleen"),  # liver ~15 HU above spleen
        ("abdomen", "CT", 2, "aorta", "liver"),  # arterial contrast
        ("head_neck", "CT", 2, "primary tumour", None),  # enhancing vs surrounding tissue
        ("head_neck", "PET", 2, "primary tumour", None),
    ],
)
def test_contrast(region, modality, seed, structure, brighter_than):
    p = generate_phantom(region, modality, seed, acquisition=_acq((2.0, 2.0, 2.0), noise=0.0))
    inside = p.label == p.label_names.index(structure) + 1
    if brighter_than is not None:
        other = p.label == p.label_names.index(brighter_than) + 1
        assert np.median(p.image[inside]) > np.median(p.image[other]) + 5
    else:
        from scipy import ndimage

        shell = (
            ndimage.binary_dilation(inside, iterations=4)
            & ~ndimage.binary_dilation(inside, iterations=2)
            & (p.label == 0)
        )
        assert np.median(p.image[inside]) > np.median(p.image[shell])


# --------------------------------------------------------------------------------------
# world geometry: laterality and co-registration
# --------------------------------------------------------------------------------------

ORIENTATIONS = [
    ((2.5, 2.5, 2.5), (0, 1, 2), (False, False, False)),
    ((2.0, 3.0, 2.5), (2, 0, 1), (True, False, True)),
    ((3.0, 2.0, 2.0), (1, 2, 0), (False, True, False)),
    ((2.2, 2.8, 2.4), (0, 2, 1), (True, True, True)),
]


@pytest.mark.parametrize("spacing, axis_order, flips", ORIENTATIONS)
@pytest.mark.parametrize("seed", [3, 8])
def test_laterality_in_world_coordinates(seed, spacing, axis_order, flips):
    p = generate_phantom("abdomen", "CT", seed, acquisition=_acq(spacing, axis_order, flips))
    c = {name: _centroid_mm(p, name) for name in p.label_names}
    # RAS+: +x is the subject's right
    assert c["liver"][0] > 0 and c["right kidney"][0] > 0
    assert c["spleen"][0] < 0 and c["left kidney"][0] < 0
    assert c["aorta"][0] < 0  # left of the midline
    assert c["stomach"][1] > c["aorta"][1]  # stomach anterior to the aorta (+y = anterior)
    assert c["left kidney"][2] > c["right kidney"][2]  # left kidney higher (+z = superior)
    assert c["liver"][2] > c["right kidney"][2]


def test_world_centroids_do_not_depend_on_grid_orientation():
    centroids = []
    for spacing, axis_order, flips in ORIENTATIONS:
        p = generate_phantom("abdomen", "CT", 1, acquisition=_acq(spacing, axis_order, flips), anatomy_seed=21)
        centroids.append(np.array([_centroid_mm(p, n) for n in ("liver", "left kidney", "aorta")]))
    for other in centroids[1:]:
        np.testing.assert_allclose(other, centroids[0], atol=1.5)


@pytest.mark.parametrize("anatomy_seed", [0, 1, 2])
def test_paired_pet_ct_are_coregistered(anatomy_seed):
    ct = generate_phantom(
        "head_neck",
        "CT",
        100,
        acquisition=_acq((0.9, 0.9, 2.5), (1, 0, 2), (True, False, False)),
        anatomy_seed=anatomy_seed,
    )
    pet = generate_phantom(
        "head_neck",
        "PET",
        200,
        acquisition=_acq((3.5, 3.5, 3.0), (0, 1, 2), (False, True, True)),
        anatomy_seed=anatomy_seed,
    )
    assert ct.image.shape != pet.image.shape
    assert np.linalg.norm(_centroid_mm(ct, "primary tumour") - _centroid_mm(pet, "primary tumour")) < 2.0
    assert np.linalg.norm(_centroid_mm(ct, "lymph node") - _centroid_mm(pet, "lymph node")) < 3.0
    assert ct.factors == pet.factors


# --------------------------------------------------------------------------------------
# acquisitions
# --------------------------------------------------------------------------------------

_MAX_FOV_MM = {"abdomen": (400.0, 300.0, 250.0), "head_neck": (200.0, 200.0, 185.0)}


@pytest.mark.parametrize("region, modality", COMBINATIONS)
def test_random_acquisition_ranges(region, modality):
    rng = np.random.default_rng(0)
    specs = [random_acquisition(rng, modality, region) for _ in range(200)]
    for spec in specs:
        assert sorted(spec.axis_order) == [0, 1, 2]
        assert all(SPACING_RANGE_MM[0] <= s <= SPACING_RANGE_MM[1] for s in spec.spacing)
        assert 0.5 <= spec.noise <= 1.5
        voxels = np.prod([_MAX_FOV_MM[region][w] / spec.spacing[a] for a, w in enumerate(spec.axis_order)])
        assert voxels <= TARGET_MAX_VOXELS * 1.01
        if modality == "PET":
            assert all(2.0 <= s <= 4.0 for s in spec.spacing)
        assert (spec.sequence in ("T1", "T2")) if modality == "MR" else spec.sequence is None
    assert len({s.axis_order for s in specs}) > 3 and len({s.flips for s in specs}) > 4
    if modality != "PET":  # both isotropic-ish and thick-slice acquisitions occur
        assert any(max(s.spacing) >= 2.5 for s in specs) and any(max(s.spacing) <= 2.0 for s in specs)


def test_acquisition_spec_normalises_sequences():
    spec = AcquisitionSpec(
        spacing=[1, 2, 3], axis_order=np.array([2, 0, 1]), flips=[True, False, np.bool_(True)], noise=1
    )
    assert spec.spacing == (1.0, 2.0, 3.0) and spec.axis_order == (2, 0, 1) and spec.flips == (True, False, True)


# --------------------------------------------------------------------------------------
# ill cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: generate_phantom("abdomen", "XR", 0), "XR"),
        (lambda: generate_phantom("thorax", "CT", 0), "thorax"),
        (lambda: generate_phantom("head_neck", "MR", 0), "MR"),
        (lambda: generate_phantom("abdomen", "PET", 0), "PET"),
        (lambda: generate_phantom("abdomen", "CT", -1), "seed"),
        (lambda: generate_phantom("abdomen", "CT", 0, acquisition=_acq(sequence="T1")), "T1"),
        (lambda: _acq((0.1, 1.0, 1.0)), "0.1"),
        (lambda: _acq((1.0, 1.0)), "spacing"),
        (lambda: _acq((1.0, 9.0, 1.0)), "9.0"),
        (lambda: _acq(axis_order=(0, 0, 1)), "axis_order"),
        (lambda: _acq(flips=(True, False)), "flips"),
        (lambda: _acq(noise=-1.0), "noise"),
        (lambda: _acq(sequence="T3"), "T3"),
        (lambda: random_acquisition(np.random.default_rng(0), "MR", "head_neck"), "head_neck"),
        (lambda: write_decathlon_dataset("/nonexistent", "T", "abdomen", "CT", 1, 0, labelled=["kidney"]), "kidney"),
        (
            lambda: write_decathlon_dataset("/nonexistent", "T", "abdomen", "CT", 2, 0, anatomy_seeds=[1]),
            "anatomy_seeds",
        ),
        (lambda: write_decathlon_dataset("/nonexistent", "T", "abdomen", "CT", 1, 0, sequence="T1"), "T1"),
        (lambda: write_decathlon_dataset("/nonexistent", "T", "abdomen", "CT", 0, 0), "n_cases"),
    ],
)
def test_ill_inputs_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_modality_and_region_tables_are_consistent():
    assert set(DECATHLON_MODALITY) == set(MODALITIES) and DECATHLON_MODALITY["MR"] == "MRI"
    assert all(set(mods) <= set(MODALITIES) for mods in REGION_MODALITIES.values())


# --------------------------------------------------------------------------------------
# Decathlon output and command line
# --------------------------------------------------------------------------------------


def test_write_decathlon_dataset_with_partial_labels(tmp_path):
    task = write_decathlon_dataset(
        tmp_path, "Task900_Abd", "abdomen", "CT", 1, 5, labelled=["spleen", "liver"], progress=False
    )
    assert task == tmp_path / "Task900_Abd"
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "spleen", "2": "liver"}
    assert meta["modality"] == {"0": "CT"} and meta["tensorImageSize"] == "3D"
    assert meta["numTraining"] == 1 and meta["test"] == [] and meta["region"] == "abdomen"
    entry = meta["training"][0]
    assert (
        entry["image"] == "./imagesTr/Task900_Abd_000.nii.gz" and entry["label"] == "./labelsTr/Task900_Abd_000.nii.gz"
    )
    assert entry["seed"] == int(np.random.SeedSequence([5, 0]).generate_state(1)[0])

    image = nib.load(task / entry["image"])
    label = nib.load(task / entry["label"])
    assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
    assert int(image.header["qform_code"]) > 0 and int(image.header["sform_code"]) > 0
    lab = np.asarray(label.dataobj)
    assert set(np.unique(lab)) == {0, 1, 2}

    again = generate_phantom("abdomen", "CT", entry["seed"], anatomy_seed=entry["anatomy_seed"])
    np.testing.assert_allclose(image.affine, again.affine, atol=1e-4)
    np.testing.assert_allclose(label.affine, again.affine, atol=1e-4)
    np.testing.assert_array_equal(lab == 1, again.label == again.label_names.index("spleen") + 1)
    np.testing.assert_array_equal(lab == 2, again.label == again.label_names.index("liver") + 1)
    np.testing.assert_allclose(np.asarray(image.dataobj), again.image)
    assert entry["factors"] == json.loads(json.dumps(again.factors))


def test_write_decathlon_dataset_paired_and_mr_sequences(tmp_path):
    anatomy = [31, 32]
    ct = write_decathlon_dataset(tmp_path, "HN_CT", "head_neck", "CT", 2, 1, anatomy_seeds=anatomy, progress=False)
    pet = write_decathlon_dataset(tmp_path, "HN_PET", "head_neck", "PET", 2, 2, anatomy_seeds=anatomy, progress=False)
    ct_meta, pet_meta = (json.loads((t / "dataset.json").read_text()) for t in (ct, pet))
    assert pet_meta["modality"] == {"0": "PET"}
    for a, b in zip(ct_meta["training"], pet_meta["training"]):
        assert a["anatomy_seed"] == b["anatomy_seed"] and a["factors"] == b["factors"] and a["seed"] != b["seed"]


def test_write_decathlon_dataset_mr_fixed_sequence(tmp_path, monkeypatch):
    import duplus.synth.phantoms.decathlon as decathlon

    # a coarse acquisition keeps the test fast; the sequence must still be forced to T2
    monkeypatch.setattr(
        decathlon, "random_acquisition", lambda rng, modality, region: _acq((4.0, 4.0, 4.0), sequence="T1")
    )
    task = write_decathlon_dataset(tmp_path, "AbdMR", "abdomen", "MR", 2, 3, sequence="T2", progress=False)
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["modality"] == {"0": "MRI"}
    assert [e["sequence"] for e in meta["training"]] == ["T2", "T2"]
    assert len(meta["labels"]) == len(STRUCTURES["abdomen"]) + 1


def test_command_line_writes_task_and_previews(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--task",
                "HNPET",
                "--region",
                "head_neck",
                "--modality",
                "PET",
                "--cases",
                "2",
                "--seed",
                "4",
                "--labelled",
                "lymph node",
                "--preview",
                "--quiet",
            ]
        )
        == 0
    )
    task = tmp_path / "HNPET"
    assert capsys.readouterr().out.strip().endswith(str(task))
    meta = json.loads((task / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "lymph node"}
    assert sorted(p.name for p in (task / "imagesTr").iterdir()) == ["HNPET_000.nii.gz", "HNPET_001.nii.gz"]
    previews = sorted((task / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["HNPET_000.png", "HNPET_001.png"]
    assert all(p.stat().st_size > 10_000 for p in previews)


def test_command_line_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--out",
        "--task",
        "--region",
        "--modality",
        "--cases",
        "--seed",
        "--labelled",
        "--sequence",
        "--preview",
    ):
        assert option in text


# --------------------------------------------------------------------------------------
# Package layout: public API, `python -m`, no private names used from outside
# --------------------------------------------------------------------------------------


def test_public_api_is_exported_and_public():
    import duplus.synth.phantoms as phantoms

    assert all(not name.startswith("_") for name in phantoms.__all__)
    for name in phantoms.__all__:
        assert getattr(phantoms, name) is not None, name
    # the seeds the cohort and the Decathlon writer derive their cases from
    assert phantoms.case_seed(7, 0) == phantoms.case_seed(7, 0) != phantoms.case_seed(7, 1)
    anatomy = phantoms.HeadNeckAnatomy(phantoms.anatomy_rng(phantoms.case_seed(7, 0), "head_neck"))
    assert isinstance(anatomy, phantoms.Anatomy) and anatomy.labels == {"primary tumour": 1, "lymph node": 2}


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "duplus.synth.phantoms", "--help"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("usage: python -m duplus.synth.phantoms") and not out.stderr


def test_no_private_phantom_names_imported_from_outside_the_package():
    import ast
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    package = root / "duplus" / "synth" / "phantoms"
    offenders = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules")]
        if Path(folder) == package or package in Path(folder).parents:
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = Path(folder) / name
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("duplus.synth.phantoms"):
                    offenders += [f"{path.relative_to(root)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders
