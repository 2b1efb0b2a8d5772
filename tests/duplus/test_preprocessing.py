"""Preprocessing: orientation + resampling + normalisation, and the exact inverse grid."""

import numpy as np
import pytest
import torch

from duplus.preprocessing import (
    BODY_MARGIN,
    body_box,
    check_volume,
    fuse_labels,
    normalise_intensity,
    to_input_grid,
    to_model_space,
)


def _affine(perm, flips, spacing, origin=(10.0, -20.0, 30.0)):
    a = np.zeros((4, 4))
    for arr_axis, world_axis in enumerate(perm):
        a[world_axis, arr_axis] = spacing[arr_axis] * (-1 if flips[arr_axis] else 1)
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


GRIDS = [
    # (axis order, flips, spacing mm, shape)
    ((0, 1, 2), (False, False, False), (1.5, 1.5, 1.5), (40, 36, 30)),
    ((2, 0, 1), (True, False, True), (0.8, 0.8, 3.0), (50, 44, 16)),
    ((1, 2, 0), (False, True, False), (2.0, 0.7, 1.2), (30, 60, 40)),
    ((0, 1, 2), (True, True, False), (4.0, 4.0, 5.0), (12, 11, 9)),
]


@pytest.mark.parametrize("perm,flips,spacing,shape", GRIDS)
def test_round_trip_returns_the_input_grid_exactly(perm, flips, spacing, shape):
    rng = np.random.default_rng(0)
    affine = _affine(perm, flips, spacing)
    image = rng.normal(40, 20, size=shape).astype(np.float32)
    x, _ = to_model_space(image, affine, "CT")
    # model space is RAS at 1.5 mm
    np.testing.assert_allclose(np.diag(np.asarray(x.affine))[:3], [1.5, 1.5, 1.5])
    np.testing.assert_allclose(np.asarray(x.affine)[:3, :3], np.diag([1.5, 1.5, 1.5]))
    back = to_input_grid(torch.zeros(2, *x.shape[1:]), x.affine, affine, shape)
    assert tuple(back.shape) == (2, *shape)


@pytest.mark.parametrize("perm,flips,spacing,shape", GRIDS[:3])
def test_label_round_trip_keeps_a_sphere_in_place(perm, flips, spacing, shape):
    """A sphere labelled in world space comes back where it was (Dice close to 1, coarser spacing aside)."""
    affine = _affine(perm, flips, spacing)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = world.mean(0) + np.array([4.0, -3.0, 2.0])
    label = (np.linalg.norm(world - centre, axis=1) < 14).reshape(shape).astype(np.uint8)
    image = label.astype(np.float32) * 100
    x, lab = to_model_space(image, affine, "CT", label=label)
    assert lab.shape == x.shape
    back = to_input_grid(lab.float(), x.affine, affine, shape)[0].numpy() > 0.5
    dice = 2 * (back & (label > 0)).sum() / (back.sum() + label.sum())
    assert dice > 0.9


def test_identity_grid_is_untouched():
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image = np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32) * 100
    x, _ = to_model_space(image, affine, "CT")
    assert x.shape == (1, 32, 32, 32)
    back = to_input_grid(x.as_tensor(), x.affine, affine, (32, 32, 32))
    torch.testing.assert_close(back, x.as_tensor(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modality,values,expected", [
    ("CT", [-250.0, 50.0, 350.0, -1000.0], [-1.0, 0.0, 1.0, -1.5]),
    ("PET", [0.0, 5.0, 10.0, 40.0], [0.0, 1.0, 2.0, 5.0]),
])
def test_fixed_windows(modality, values, expected):
    out = normalise_intensity(torch.tensor(values), modality)
    torch.testing.assert_close(out, torch.tensor(expected))


def test_mr_zscore_is_scale_free():
    rng = np.random.default_rng(2)
    img = torch.from_numpy(rng.gamma(4.0, 50.0, size=(20, 20, 20)).astype(np.float32))
    a, b = normalise_intensity(img, "MR"), normalise_intensity(img * 7.0, "MR")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


ILL = [
    (np.zeros((10, 10)), np.eye(4), "3-D"),
    (np.full((8, 8, 8), np.nan, dtype=np.float32), np.eye(4), "NaN"),
    (np.zeros((8, 8, 8)), np.diag([0.05, 1, 1, 1]), "spacing"),
    (np.zeros((8, 8, 8)), np.diag([1, 1, 20, 1]), "spacing"),
    (np.zeros((8, 8, 8)), np.eye(3), "4x4"),
    (np.zeros((8, 8, 8), dtype=bool).astype(np.complex64), np.eye(4), "dtype"),
]


@pytest.mark.parametrize("image,affine,message", ILL)
def test_ill_volumes_are_rejected(image, affine, message):
    with pytest.raises(ValueError, match=message):
        check_volume(image, affine)


def test_unknown_modality():
    with pytest.raises(ValueError, match="unknown modality 'US'"):
        normalise_intensity(torch.zeros(3), "US")


def test_fuse_labels():
    p = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.7, 0.8]])
    assert fuse_labels(p).tolist() == [1, 2, 2]
    assert fuse_labels(torch.full((2, 3), 0.3)).tolist() == [0, 0, 0]


def test_largest_component_is_kept_for_single_structures_only():
    from duplus.preprocessing import keep_largest_components

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1        # liver: the organ ...
    labels[12:14, 12:14, 12:14] = 1  # ... and a false-positive island
    labels[9, 9, 9] = 1              # an island touching the organ only at a corner (6-connectivity: apart)
    labels[8, 8, 8] = 1
    labels[2:5, 12:15, 2:5] = 2      # two lymph nodes: both stay
    labels[15:18, 2:5, 15:18] = 2
    labels[16:19, 16:19, 2:4] = 3    # spleen, one component: unchanged
    out = keep_largest_components(labels, ("liver", "lymph node", "spleen"))
    assert out.dtype == np.uint8 and out.shape == labels.shape
    assert (out == 1).sum() == 6 ** 3 and out[12, 12, 12] == 0 and out[8, 8, 8] == 0 and out[9, 9, 9] == 0
    np.testing.assert_array_equal(out == 2, labels == 2)
    np.testing.assert_array_equal(out == 3, labels == 3)
    assert labels[12, 12, 12] == 1   # the input is not modified
    np.testing.assert_array_equal(keep_largest_components(labels, ("liver", "lymph node", "spleen"), frozenset()),
                                  labels)


def _ct_in_air(shape=(80, 70, 40), body=((20, 50), (15, 45), (0, 40)), seed=0):
    """A CT field of view: air (-1000 HU, noise 20 HU) around a soft-tissue block (40 HU)."""
    rng = np.random.default_rng(seed)
    image = (-1000.0 + rng.normal(0, 20, shape)).astype(np.float32)
    image[tuple(slice(lo, hi) for lo, hi in body)] = 40.0
    return image


def test_body_box_is_the_body_plus_a_margin_and_ignores_specks():
    image = _ct_in_air()
    image[75, 5, 3] = 500.0                       # a bright speck in the air (a cable, a noise spike)
    x, _ = to_model_space(image, np.eye(4), "CT", (1.0, 1.0, 1.0))
    box = body_box(x, "CT")
    assert box == (slice(20 - BODY_MARGIN, 50 + BODY_MARGIN), slice(15 - BODY_MARGIN, 45 + BODY_MARGIN), slice(0, 40))


@pytest.mark.parametrize("modality,image", [
    ("MR", _ct_in_air() + 1000.0),                # no absolute air level in MR: never cropped
    ("CT", np.full((30, 30, 20), 40.0, np.float32)),   # the body fills the field of view
    ("CT", np.full((30, 30, 20), -1000.0, np.float32)),  # no body at all: nothing to crop to
])
def test_body_box_leaves_the_volume_whole(modality, image):
    x, _ = to_model_space(image, np.eye(4), modality, (1.0, 1.0, 1.0))
    assert body_box(x, modality) is None
