"""What can be asked for (regions, modalities, structures) and how a case is acquired.

:class:`AcquisitionSpec` (voxel grid orientation, spacing, noise, MR sequence), the random draw of a
plausible acquisition (:func:`random_acquisition`), the seeded random streams every phantom is drawn
from (:func:`anatomy_rng` for the anatomy; ``_acquisition_rngs`` for the acquisition and the noise)
and the argument checks shared by the generator and the Decathlon writer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MODALITIES = ("CT", "MR", "PET")
REGIONS = ("abdomen", "head_neck")
STRUCTURES = {
    "abdomen": ("liver", "spleen", "left kidney", "right kidney", "aorta", "pancreas", "stomach"),
    "head_neck": ("primary tumour", "lymph node"),
}
REGION_MODALITIES = {"abdomen": ("CT", "MR"), "head_neck": ("CT", "PET")}
MR_SEQUENCES = ("T1", "T2")
SPACING_RANGE_MM = (0.7, 5.0)
#: random_acquisition coarsens its spacing so that a case stays below this many voxels.
TARGET_MAX_VOXELS = 12_000_000
#: generate_phantom refuses grids larger than this (memory: ~20 bytes per voxel while drawing).
HARD_MAX_VOXELS = 64_000_000


# --------------------------------------------------------------------------------------
# Acquisition specification
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcquisitionSpec:
    """How a phantom is sampled: voxel grid orientation, spacing and noise.

    ``spacing[a]`` is the voxel size in mm along array axis ``a``; array axis ``a`` runs along
    world axis ``axis_order[a]`` (0 = x, 1 = y, 2 = z), towards the negative world direction
    when ``flips[a]`` is true.  ``noise`` multiplies the modality's typical noise level
    (0 gives a noise-free image).  ``sequence`` is "T1" or "T2" for MR and None otherwise;
    for MR, None lets :func:`generate_phantom` draw it from the seed.
    """

    spacing: tuple[float, float, float]
    axis_order: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    noise: float
    sequence: str | None = None

    def __post_init__(self) -> None:
        spacing = tuple(self.spacing) if isinstance(self.spacing, Sequence | np.ndarray) else ()
        if len(spacing) != 3:
            raise ValueError(f"spacing must have 3 values (mm per array axis), got {self.spacing!r}")
        lo, hi = SPACING_RANGE_MM
        for value in spacing:
            if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool):
                raise ValueError(f"spacing values must be numbers, got {self.spacing!r}")
            if not (math.isfinite(float(value)) and lo <= float(value) <= hi):
                raise ValueError(f"spacing must lie in [{lo}, {hi}] mm per axis, got spacing={self.spacing!r}")
        object.__setattr__(self, "spacing", tuple(float(v) for v in spacing))

        order = tuple(self.axis_order) if isinstance(self.axis_order, Sequence | np.ndarray) else ()
        if len(order) != 3 or sorted(
            int(v) for v in order if isinstance(v, int | np.integer) and not isinstance(v, bool)
        ) != [0, 1, 2]:
            raise ValueError(f"axis_order must be a permutation of (0, 1, 2), got axis_order={self.axis_order!r}")
        object.__setattr__(self, "axis_order", tuple(int(v) for v in order))

        flips = tuple(self.flips) if isinstance(self.flips, Sequence | np.ndarray) else ()
        if len(flips) != 3 or not all(isinstance(v, bool | np.bool_) for v in flips):
            raise ValueError(f"flips must be 3 booleans, got flips={self.flips!r}")
        object.__setattr__(self, "flips", tuple(bool(v) for v in flips))

        if (
            not isinstance(self.noise, int | float | np.integer | np.floating)
            or isinstance(self.noise, bool)
            or not (math.isfinite(float(self.noise)) and 0.0 <= float(self.noise) <= 5.0)
        ):
            raise ValueError(f"noise must be a number in [0, 5], got noise={self.noise!r}")
        object.__setattr__(self, "noise", float(self.noise))

        if self.sequence is not None and self.sequence not in MR_SEQUENCES:
            raise ValueError(f"sequence must be one of {MR_SEQUENCES} or None, got sequence={self.sequence!r}")


@dataclass(frozen=True)
class ScannerProfile:
    """What a scanner and its protocol change in the image, beyond the grid and the noise level.

    Every field left None keeps the renderer's own draw, so a phantom generated without a profile
    is the same as before profiles existed.  ``ct_lesion_hu``: tumour and node attenuation above
    muscle (HU, a (low, high) range drawn per case): the low-dose, non-contrast CT of a PET/CT,
    where the primary and the nodes are nearly isodense (HECKTOR).  ``ct_kernel_fwhm_mm``: the
    reconstruction kernel as a Gaussian blur (smooth kernels blur more).  ``pet_fwhm_mm``: the PET
    system resolution.  ``pet_calibration``: the scanner's SUV cross-calibration factor (1 = exact).
    """

    ct_lesion_hu: tuple[float, float] | None = None
    ct_kernel_fwhm_mm: float | None = None
    pet_fwhm_mm: float | None = None
    pet_calibration: float = 1.0

    def __post_init__(self) -> None:
        if self.ct_lesion_hu is not None:
            lo_hi = tuple(float(v) for v in self.ct_lesion_hu)
            if len(lo_hi) != 2 or not (-50.0 <= lo_hi[0] <= lo_hi[1] <= 200.0):
                raise ValueError(f"ct_lesion_hu must be (low, high) HU with -50 <= low <= high <= 200, "
                                 f"got {self.ct_lesion_hu!r}")
            object.__setattr__(self, "ct_lesion_hu", lo_hi)
        for name, lo, hi in (("ct_kernel_fwhm_mm", 0.0, 5.0), ("pet_fwhm_mm", 1.0, 12.0)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and lo <= float(value) <= hi):
                raise ValueError(f"{name} must be a number in [{lo}, {hi}] mm or None, got {value!r}")
        if not (isinstance(self.pet_calibration, int | float) and 0.5 <= float(self.pet_calibration) <= 2.0):
            raise ValueError(f"pet_calibration must be a factor in [0.5, 2.0], got {self.pet_calibration!r}")


# --------------------------------------------------------------------------------------
# Validation helpers and seeded random streams
# --------------------------------------------------------------------------------------


def _check_combination(region: str, modality: str, any_modality: bool = False) -> None:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if not any_modality and modality not in REGION_MODALITIES[region]:
        raise ValueError(
            f"unsupported combination: modality {modality!r} for region {region!r} "
            f"(supported for {region}: {REGION_MODALITIES[region]})"
        )


def _check_seed(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {name}={value!r}")
    return int(value)


def _acquisition_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams for drawing the acquisition and for rendering/noise."""
    acq, render = np.random.SeedSequence([seed, 0x51A7]).spawn(2)
    return np.random.default_rng(acq), np.random.default_rng(render)


def anatomy_rng(anatomy_seed: int, region: str) -> np.random.Generator:
    """The stream an anatomy of ``region`` is drawn from (independent of the acquisition seed)."""
    return np.random.default_rng([anatomy_seed, 0xA7A, REGIONS.index(region)])


# --------------------------------------------------------------------------------------
# Acquisition
# --------------------------------------------------------------------------------------

# Largest field of view (mm, world x/y/z) an anatomy of the region can ask for; used to
# keep random acquisitions under TARGET_MAX_VOXELS before the anatomy is known.
_MAX_FOV_MM = {"abdomen": (400.0, 300.0, 250.0), "head_neck": (200.0, 200.0, 185.0)}


def random_acquisition(rng: np.random.Generator, modality: str, region: str) -> AcquisitionSpec:
    """Draw a plausible acquisition for ``modality`` in ``region``.

    CT / MR: isotropic-ish 1.0-2.0 mm, or in-plane 0.7-1.0 mm with 2.5-5.0 mm slices; the
    slice axis is world z three times in four, else coronal or sagittal.  PET: 2.0-4.0 mm.
    Array axis order and flips are random; noise is 0.5-1.5.  The spacing is coarsened
    uniformly when the region's largest field of view would exceed TARGET_MAX_VOXELS.
    """
    _check_combination(region, modality)
    slice_world_axis = int(rng.choice(3, p=[0.125, 0.125, 0.75]))
    if modality == "PET":
        in_plane = float(rng.uniform(2.0, 4.0))
        through = float(rng.uniform(2.0, 4.0))
        world_spacing = [in_plane, in_plane, in_plane]
        world_spacing[slice_world_axis] = through
    elif rng.random() < 0.5:
        base = float(rng.uniform(1.0, 2.0))
        world_spacing = [float(np.clip(base * rng.uniform(0.92, 1.08), 1.0, 2.0)) for _ in range(3)]
    else:
        in_plane = float(rng.uniform(0.7, 1.0))
        world_spacing = [in_plane, in_plane, in_plane]
        world_spacing[slice_world_axis] = float(rng.uniform(2.5, 5.0))

    fov = _MAX_FOV_MM[region]
    voxels = float(np.prod([fov[w] / world_spacing[w] for w in range(3)]))
    if voxels > TARGET_MAX_VOXELS:
        factor = (voxels / TARGET_MAX_VOXELS) ** (1.0 / 3.0)
        world_spacing = [min(s * factor, SPACING_RANGE_MM[1]) for s in world_spacing]

    axis_order = (0, 1, 2) if rng.random() < 0.4 else tuple(int(v) for v in rng.permutation(3))
    flips = tuple(bool(v) for v in rng.random(3) < 0.5)
    spacing = tuple(round(world_spacing[w], 4) for w in axis_order)
    noise = float(rng.uniform(0.5, 1.5))
    sequence = str(rng.choice(MR_SEQUENCES)) if modality == "MR" else None
    return AcquisitionSpec(spacing=spacing, axis_order=axis_order, flips=flips, noise=noise, sequence=sequence)
