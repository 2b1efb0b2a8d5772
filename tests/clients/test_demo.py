"""The demo's scoring of a label map on another grid than its truth (PET alone answers on the PET's grid)."""

import numpy as np

from clients.demo import grid_dice

NAMES = ("background", "primary tumour", "lymph node")
CENTRES = {1: np.array([10.0, -6.0, 4.0]), 2: np.array([-22.0, 14.0, -10.0])}   # world mm
RADII = {1: 14.0, 2: 7.0}


def _spheres(shape, affine) -> np.ndarray:
    """Labels painted at each voxel centre of the grid (shape, affine) from the spheres in world space."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = (affine[:3, :3] @ ijk.T).T + affine[:3, 3]
    out = np.zeros(len(world), np.uint8)
    for k, c in CENTRES.items():
        out[np.linalg.norm(world - c, axis=1) <= RADII[k]] = k
    return out.reshape(shape)


def test_labels_on_a_coarser_flipped_grid_are_scored_against_the_resampled_truth():
    ct_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ct_affine[:3, 3] = [-50.0, -50.0, -40.0]
    truth = _spheres((50, 50, 40), ct_affine)
    # a PET grid of 4 mm, its first axis flipped and its second and third swapped, over the same region
    pet_affine = np.array([[-4.0, 0, 0, 48.0], [0, 0, 4.0, -48.0], [0, 4.0, 0, -38.0], [0, 0, 0, 1.0]])
    pet_shape = (25, 19, 25)
    pet_labels = _spheres(pet_shape, pet_affine)

    assert grid_dice(truth, ct_affine, truth, ct_affine, NAMES) == {"primary tumour": 1.0, "lymph node": 1.0}
    scores = grid_dice(pet_labels, pet_affine, truth, ct_affine, NAMES)
    assert set(scores) == {"primary tumour", "lymph node"}
    assert scores["primary tumour"] >= 0.95 and scores["lymph node"] >= 0.85, scores   # nearest neighbour at 4 mm
    # the same labels read as if the PET were not flipped: the geometry matters, the tumour no longer overlaps
    unflipped = pet_affine.copy()
    unflipped[0, 0], unflipped[0, 3] = 4.0, -48.0
    wrong = grid_dice(pet_labels, unflipped, truth, ct_affine, NAMES)
    assert wrong["primary tumour"] < 0.5 and wrong["lymph node"] < 0.1, wrong
