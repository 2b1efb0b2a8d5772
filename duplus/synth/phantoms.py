"""Procedural, seeded phantoms: labelled 3D CT, MR and PET volumes for training and tests.

No labelled CT/PET data can be downloaded here, so the segmentation stack trains and is
tested on volumes drawn by this module.  Each case is a small synthetic patient:

* **Anatomy** (shapes, sizes, positions, a smooth random deformation, tumour and lymph-node
  placement, tissue texture) is drawn only from ``anatomy_seed``.  Shapes are implicit
  functions (super-ellipsoids, tubes, columns and their unions / differences) of world
  coordinates in RAS+ millimetres (+x = the subject's right, +y = anterior, +z = superior),
  so one anatomy can be sampled on any grid: a CT and a PET of the same ``anatomy_seed``
  are co-registered (paired PET/CT).
* **Acquisition** (voxel spacing, which world axis each array axis runs along, flips, noise
  level, MR sequence) and the noise itself are drawn from ``seed``.
* **Contrast** follows each modality's physics: Hounsfield units for CT (contrast-enhanced),
  T1- / T2-weighted relative intensities with a bias field and Rician noise for MR, SUV with
  partial-volume blur and signal-dependent noise for PET.

Supported region / modality pairs are :data:`REGION_MODALITIES`.  The generator writes
Medical Segmentation Decathlon folders (:func:`write_decathlon_dataset`), which the real-data
loaders read like any other Decathlon task.  Command line: ``python -m duplus.synth.phantoms --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger("duplus.synth.phantoms")  # stable name also under `python -m`

__all__ = [
    "MODALITIES",
    "REGIONS",
    "STRUCTURES",
    "REGION_MODALITIES",
    "MR_SEQUENCES",
    "DECATHLON_MODALITY",
    "AcquisitionSpec",
    "Phantom",
    "random_acquisition",
    "generate_phantom",
    "save_nifti",
    "write_decathlon_dataset",
    "preview_png",
    "main",
]

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
#: Decathlon's dataset.json spells MR as "MRI".
DECATHLON_MODALITY = {"CT": "CT", "MR": "MRI", "PET": "PET"}

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


# --------------------------------------------------------------------------------------
# Public data types
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


@dataclass(frozen=True, eq=False)
class Phantom:
    """One generated case.  ``label`` value i (1-based) marks ``label_names[i - 1]``.

    ``factors`` are anatomy facts for prognosis.  Head and neck: tumour site / side / volume,
    designed tumour SUVmax (also for CT: it belongs to the patient), node count / volume /
    sides / SUVmax, necrotic node count; lesion volumes are measured on a fixed 1 mm world
    grid, so paired scans of one anatomy report identical factors.  Abdomen: organ volumes
    (ml, from this grid's labels), subcutaneous fat thickness, aortic diameter, body width.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    modality: str
    region: str
    sequence: str | None
    label_names: tuple[str, ...]
    seed: int
    anatomy_seed: int
    factors: dict
    acquisition: AcquisitionSpec | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_combination(region: str, modality: str) -> None:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if modality not in REGION_MODALITIES[region]:
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


def _anatomy_rng(anatomy_seed: int, region: str) -> np.random.Generator:
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


# --------------------------------------------------------------------------------------
# Voxel grid and smooth random fields in world space
# --------------------------------------------------------------------------------------


class _Grid:
    """An axis-aligned voxel grid (array axes along permuted, possibly flipped world axes)."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, spacing, axis_order, flips) -> None:
        self.axis_order = tuple(axis_order)
        self.spacing = tuple(float(s) for s in spacing)
        centre = (np.asarray(lo, float) + np.asarray(hi, float)) / 2.0
        extent = np.asarray(hi, float) - np.asarray(lo, float)
        shape, coords = [], []
        affine = np.eye(4)
        affine[:3, :3] = 0.0
        for a, w in enumerate(self.axis_order):
            n = max(8, int(math.ceil(extent[w] / self.spacing[a])) + 1)
            sign = -1.0 if flips[a] else 1.0
            step = sign * self.spacing[a]
            start = centre[w] - step * (n - 1) / 2.0
            affine[w, a] = step
            affine[w, 3] = start
            shape.append(n)
            coords.append((start + step * np.arange(n)).astype(np.float32))
        self.shape = tuple(shape)
        self.affine = affine
        self.coords = coords

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def block(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the world box [lo, hi], or None."""
        slices = []
        for a, w in enumerate(self.axis_order):
            c = self.coords[a]
            inside = np.nonzero((c >= lo[w]) & (c <= hi[w]))[0]
            if inside.size == 0:
                return None
            slices.append(slice(int(inside[0]), int(inside[-1]) + 1))
        return tuple(slices)

    def world(self, sl) -> list[np.ndarray]:
        """World x, y, z of the voxel centres in block ``sl`` as broadcastable float32 arrays."""
        out: list[np.ndarray] = [None, None, None]  # type: ignore[list-item]
        for a, w in enumerate(self.axis_order):
            shape = [1, 1, 1]
            c = self.coords[a][sl[a]]
            shape[a] = c.size
            out[w] = c.reshape(shape)
        return out

    def full(self) -> tuple[slice, slice, slice]:
        return tuple(slice(0, n) for n in self.shape)


def _bspline_weights(coords: np.ndarray, origin: float, step: float, n_nodes: int) -> np.ndarray:
    t = (coords.astype(np.float32) - np.float32(origin)) / np.float32(step)
    d = np.abs(t[:, None] - np.arange(n_nodes, dtype=np.float32)[None, :])
    w = np.where(d < 1.0, 2.0 / 3.0 - d * d + 0.5 * d**3, np.where(d < 2.0, (2.0 - d) ** 3 / 6.0, 0.0))
    return w.astype(np.float32)


class _WorldField:
    """A smooth scalar field in world space: cubic B-spline over random node values.

    Sampling on a grid is three small matrix products (the grids are axis aligned), so a
    field costs about as much as one pass over the output, and the same world position gets
    the same value on every grid (what keeps paired PET/CT co-registered).
    """

    def __init__(self, values: np.ndarray, origin, step) -> None:
        self.values = values.astype(np.float32)
        self.origin = np.asarray(origin, float)
        self.step = np.asarray(step, float)

    @classmethod
    def random(cls, rng: np.random.Generator, lo, hi, step: float) -> _WorldField:
        """Zero-mean field with roughly unit standard deviation and correlation length ~step."""
        lo = np.asarray(lo, float) - 2.0 * step
        hi = np.asarray(hi, float) + 2.0 * step
        n = tuple(int(math.ceil((top - bottom) / step)) + 1 for bottom, top in zip(lo, hi))
        # cubic B-spline smoothing of white noise keeps ~1/3 of its standard deviation
        values = rng.standard_normal(n).astype(np.float32) * 3.0
        return cls(values, lo, (step, step, step))

    def sample(self, grid: _Grid, sl) -> np.ndarray:
        f = self.values.transpose(grid.axis_order)
        w = [
            _bspline_weights(grid.coords[a][sl[a]], self.origin[ax], self.step[ax], f.shape[a])
            for a, ax in enumerate(grid.axis_order)
        ]
        out = np.tensordot(w[0], f, axes=(1, 0))
        out = np.tensordot(out, w[1], axes=(1, 1))
        out = np.tensordot(out, w[2], axes=(1, 1))
        return np.ascontiguousarray(out, dtype=np.float32)


class _Deformation:
    """Smooth displacement d(p) with |d| <= amplitude; shapes are evaluated at p + d(p)."""

    def __init__(self, rng: np.random.Generator, lo, hi, amplitude: float, step: float) -> None:
        self.amplitude = float(amplitude)
        self.fields = [_WorldField.random(rng, lo, hi, step) for _ in range(3)]
        peak = max(float(np.abs(f.values).max()) for f in self.fields)
        for f in self.fields:  # B-spline weights are a partition of unity: |d| <= max |node|
            f.values *= np.float32(self.amplitude / peak)

    def apply(self, grid: _Grid, sl) -> list[np.ndarray]:
        base = grid.world(sl)
        if self.amplitude <= 0:
            return [np.broadcast_to(b, tuple(s.stop - s.start for s in sl)) for b in base]
        return [base[w] + self.fields[w].sample(grid, sl) for w in range(3)]


# --------------------------------------------------------------------------------------
# Implicit shapes (level <= 1 inside)
# --------------------------------------------------------------------------------------


def _rotation(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> np.ndarray:
    """Rz @ Ry @ Rx; columns are the local axes in world coordinates."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _jitter_rotation(rng: np.random.Generator, base=(0.0, 0.0, 0.0), max_deg: float = 8.0) -> np.ndarray:
    return _rotation(*base) @ _rotation(*rng.uniform(-max_deg, max_deg, 3))


def _f32(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


@dataclass
class _Ellipsoid:
    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    power: float = 2.0

    def __post_init__(self) -> None:
        self.center, self.radii, self.rot = _f32(self.center), _f32(self.radii), _f32(self.rot)

    def local(self, p: list[np.ndarray]) -> list[np.ndarray]:
        d = [p[w] - self.center[w] for w in range(3)]
        r = self.rot
        return [(d[0] * r[0, i] + d[1] * r[1, i] + d[2] * r[2, i]) / self.radii[i] for i in range(3)]

    def level(self, p: list[np.ndarray]) -> np.ndarray:
        q = self.local(p)
        if self.power == 2.0:
            return q[0] * q[0] + q[1] * q[1] + q[2] * q[2]
        e = np.float32(self.power)
        return np.abs(q[0]) ** e + np.abs(q[1]) ** e + np.abs(q[2]) ** e

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.abs(self.rot.astype(float)) @ self.radii.astype(float)
        return self.center - half, self.center + half


@dataclass
class _Tube:
    """Capsule chain through ``points`` with radius interpolated linearly along each segment."""

    points: np.ndarray
    radii: np.ndarray

    def __post_init__(self) -> None:
        self.points, self.radii = _f32(self.points), _f32(self.radii)

    def level(self, p: list[np.ndarray]) -> np.ndarray:
        best = None
        for i in range(len(self.points) - 1):
            a, b = self.points[i], self.points[i + 1]
            ab = b - a
            d = [p[w] - a[w] for w in range(3)]
            t = (d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / np.float32(ab @ ab)
            t = np.clip(t, 0.0, 1.0)
            dist2 = (d[0] - t * ab[0]) ** 2 + (d[1] - t * ab[1]) ** 2 + (d[2] - t * ab[2]) ** 2
            r = self.radii[i] + t * (self.radii[i + 1] - self.radii[i])
            lev = dist2 / (r * r)
            best = lev if best is None else np.minimum(best, lev)
        return best

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r


@dataclass
class _Column:
    """Elliptic cross-section running along world z; centre and radii interpolated in z."""

    z: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    rx: np.ndarray
    ry: np.ndarray

    def __post_init__(self) -> None:
        self.z, self.cx, self.cy, self.rx, self.ry = (
            np.asarray(v, float) for v in (self.z, self.cx, self.cy, self.rx, self.ry)
        )

    def level(self, p: list[np.ndarray]) -> np.ndarray:
        z = p[2]
        if all(np.ptp(v) == 0 for v in (self.cx, self.cy, self.rx, self.ry)):
            cx, cy, rx, ry = (np.float32(v[0]) for v in (self.cx, self.cy, self.rx, self.ry))
        else:
            cx, cy, rx, ry = (np.interp(z, self.z, v).astype(np.float32) for v in (self.cx, self.cy, self.rx, self.ry))
        lev = ((p[0] - cx) / rx) ** 2 + ((p[1] - cy) / ry) ** 2
        outside = (z < self.z[0]) | (z > self.z[-1])
        return np.where(outside, np.float32(np.inf), lev)

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array([np.min(self.cx - self.rx), np.min(self.cy - self.ry), self.z[0]])
        hi = np.array([np.max(self.cx + self.rx), np.max(self.cy + self.ry), self.z[-1]])
        return lo, hi


def _union_bbox(*boxes) -> tuple[np.ndarray, np.ndarray]:
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


# --------------------------------------------------------------------------------------
# Tissue classes (what the renderers colour) and the canvas they are painted on
# --------------------------------------------------------------------------------------


class _T(enum.IntEnum):
    AIR = 0
    LUNG = enum.auto()
    FAT = enum.auto()
    VISCERAL_FAT = enum.auto()
    MUSCLE = enum.auto()
    BOWEL = enum.auto()
    BOWEL_GAS = enum.auto()
    CORTICAL_BONE = enum.auto()
    CANCELLOUS_BONE = enum.auto()
    DISC = enum.auto()
    CSF = enum.auto()
    CORD = enum.auto()
    LIVER = enum.auto()
    HEPATIC_VESSEL = enum.auto()
    SPLEEN = enum.auto()
    KIDNEY_CORTEX = enum.auto()
    KIDNEY_MEDULLA = enum.auto()
    AORTA = enum.auto()
    IVC = enum.auto()
    PANCREAS = enum.auto()
    STOMACH_WALL = enum.auto()
    STOMACH_FLUID = enum.auto()
    STOMACH_GAS = enum.auto()
    GALLBLADDER = enum.auto()
    ARTERY = enum.auto()
    VEIN = enum.auto()
    TUMOUR = enum.auto()
    NODE = enum.auto()
    NECROSIS = enum.auto()
    THYROID = enum.auto()
    SUBMANDIBULAR = enum.auto()
    PAROTID = enum.auto()
    AIRWAY = enum.auto()
    MUCOSA = enum.auto()


_N_TISSUES = len(_T)
# A shape function maps deformed world coordinates to a tissue code per voxel (0 = not this
# structure), optionally with a per-voxel PET uptake (SUV, 0 = use the tissue's value).
_ShapeFn = Callable[[list[np.ndarray]], "np.ndarray | tuple[np.ndarray, np.ndarray]"]


class _Canvas:
    """Tissue, label and uptake maps of one grid, painted structure by structure.

    ``paint`` is first-come-first-served: a voxel already taken by an earlier structure is
    never repainted, so the painting order is the priority order and labels never overlap.
    """

    def __init__(self, grid: _Grid, deformation: _Deformation) -> None:
        self.grid = grid
        self.deformation = deformation
        self.tissue = np.zeros(grid.shape, np.uint8)
        self.label = np.zeros(grid.shape, np.uint8)
        self.occupied = np.zeros(grid.shape, bool)
        self.uptake: np.ndarray | None = None
        self._deformed: list[np.ndarray] | None = None

    def coords(self, sl) -> list[np.ndarray]:
        """Deformed world coordinates of block ``sl`` (views into one full-grid evaluation).

        Blocks of different structures overlap heavily, so sampling the displacement once over
        the whole grid is cheaper than sampling it per block.
        """
        if self._deformed is None:
            self._deformed = self.deformation.apply(self.grid, self.grid.full())
        return [c[sl] for c in self._deformed]

    def paint(self, bbox, fn: _ShapeFn, label: int = 0, within: np.ndarray | None = None) -> int:
        margin = self.deformation.amplitude + 1.0
        sl = self.grid.block(np.asarray(bbox[0]) - margin, np.asarray(bbox[1]) + margin)
        if sl is None:
            return 0
        result = fn(self.coords(sl))
        tissue, uptake = result if isinstance(result, tuple) else (result, None)
        mask = (tissue > 0) & ~self.occupied[sl]
        if within is not None:
            mask &= within[sl]
        self.tissue[sl][mask] = tissue[mask]
        if label:
            self.label[sl][mask] = label
        self.occupied[sl] |= mask
        if uptake is not None:
            if self.uptake is None:
                self.uptake = np.zeros(self.grid.shape, np.float32)
            self.uptake[sl][mask] = uptake[mask]
        return int(mask.sum())


def _codes(mask: np.ndarray, code: int) -> np.ndarray:
    return np.where(mask, np.uint8(code), np.uint8(0))


# --------------------------------------------------------------------------------------
# Anatomy: abdomen
# --------------------------------------------------------------------------------------


class _Anatomy:
    region: str
    lo: np.ndarray  # field of view (world mm)
    hi: np.ndarray
    deformation: _Deformation
    texture: _WorldField

    def paint(self, canvas: _Canvas) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def factors(self, canvas: _Canvas) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


class _Abdomen(_Anatomy):
    """Upper abdomen from the liver dome to the lower renal poles."""

    region = "abdomen"

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        g = u(0.9, 1.1)
        self.g = g
        # body wall: super-ellipse, flatter at the back; the fat layer adds to a cavity sized by g
        self.fat = u(10.0, 25.0)
        self.muscle = u(8.0, 14.0)
        wall = self.fat + self.muscle
        self.a = 131.0 * g * u(0.94, 1.06) + wall
        self.b_ant = 86.0 * g * u(0.92, 1.08) + wall
        self.b_post = (self.b_ant - wall) * u(0.88, 0.98) + wall
        self.p_body = u(2.2, 2.8)
        self.z_wobble = (u(0.0, 0.04), u(150.0, 300.0), u(0, 2 * math.pi))

        # spine
        self.vb_y = -self.b_post + self.fat + u(52.0, 62.0) * g
        self.vb_r = (u(20.0, 24.0) * g, u(15.0, 18.0) * g)
        self.canal_r = u(8.0, 10.0) * g
        self.canal_y = self.vb_y - self.vb_r[1] - self.canal_r - 2.0
        self.disc_period = u(32.0, 38.0) * g
        self.disc_phase = u(0.0, self.disc_period)
        self.disc_t = u(7.0, 10.0) * g

        # kidneys (left higher than right)
        z_kr = -40.0 * g + u(-8.0, 8.0)
        z_kl = z_kr + u(10.0, 25.0)
        self.kidneys = {}
        for side, z in (("left", z_kl), ("right", z_kr)):
            sign = -1.0 if side == "left" else 1.0  # RAS+: the subject's left is -x
            s = u(0.93, 1.1) * g
            center = (sign * u(65.0, 80.0) * g, self.vb_y - u(2.0, 10.0), z)
            # upper pole medial (about y) and posterior (about x); hilum faces antero-medially (about z)
            rot = _jitter_rotation(rng, (u(8.0, 14.0), -sign * u(10.0, 18.0), -sign * u(20.0, 35.0)))
            body = _Ellipsoid(center, (28.5 * s, 23.0 * s, 56.0 * s), rot)
            self.kidneys[side] = (body, -sign, u(-1.0, 1.0, 2))  # medial direction in local x, pyramid phase

        # aorta (left of midline) and IVC (right)
        self.aorta_r = u(11.0, 14.0)
        ax = -u(8.0, 16.0) * g
        ay = self.vb_y + self.vb_r[1] + self.aorta_r + u(1.0, 4.0)
        self.aorta_xy = (ax, ay)
        self.aorta_wobble = rng.uniform(-3.0, 3.0, (3, 2))
        self.ivc = (u(18.0, 26.0) * g, self.vb_y + self.vb_r[1] + u(4.0, 10.0), u(10.0, 14.0) * g, u(7.0, 10.0) * g)

        # liver: right lobe super-ellipsoid + left lobe, portal vessels inside
        s = u(0.93, 1.07) * math.sqrt(g)  # liver volume ~ g^1.5: keeps 1.0-2.3 l
        rl_center = np.array([u(50.0, 62.0) * g, u(-4.0, 10.0) * g, z_kr + u(45.0, 58.0) * g])
        self.liver_right = _Ellipsoid(
            rl_center, np.array([71.0, 81.0, 69.0]) * s, _jitter_rotation(rng), power=u(2.0, 2.3)
        )
        ll_center = rl_center + np.array([-u(68.0, 82.0) * g, u(38.0, 50.0) * g, u(8.0, 18.0)])
        self.liver_left = _Ellipsoid(
            ll_center, np.array([52.0, 25.0, 34.0]) * s, _jitter_rotation(rng, (0.0, 0.0, -15.0))
        )
        porta = rl_center + np.array([-30.0, 8.0, -30.0]) * g
        self.liver_vessels = [
            _Tube([porta, porta + np.array([45.0, -10.0, 30.0]) * g], [6.0, 3.0]),
            _Tube([porta, porta + np.array([-55.0, 35.0, 20.0]) * g], [5.5, 3.0]),
            _Tube([porta, porta + np.array([15.0, -25.0, 55.0]) * g], [5.0, 3.0]),
        ]
        self.gallbladder = None
        if rng.random() < 0.7:
            gb_center = rl_center + np.array([-u(25.0, 40.0), u(35.0, 48.0), -u(45.0, 58.0)]) * g
            self.gallbladder = _Ellipsoid(
                gb_center,
                np.array([14.0, 14.0, 32.0]) * u(0.8, 1.15) * g,
                _jitter_rotation(rng, (-30.0, 0.0, 0.0), 15.0),
            )

        # spleen: postero-lateral left, long axis tilted, concave medial face
        s = u(0.92, 1.15) * g
        sp_center = np.array([-u(88.0, 102.0) * g, -u(22.0, 38.0) * g, z_kl + u(42.0, 55.0) * g])
        sp_rot = _jitter_rotation(rng, (u(18.0, 30.0), 0.0, u(30.0, 45.0)))
        self.spleen = _Ellipsoid(sp_center, np.array([22.0, 40.0, 55.0]) * s, sp_rot)
        cut_center = sp_center + sp_rot @ np.array([22.0 * s * 1.25, 0.0, 0.0])
        self.spleen_cut = _Ellipsoid(cut_center, np.array([22.0 * 0.9, 40.0 * 0.85, 55.0 * 0.85]) * s, sp_rot)

        # pancreas: head right of midline by the IVC, body arching over the aorta, tail to the spleen
        kl_center = self.kidneys["left"][0].center
        z_p = z_kr + u(20.0, 35.0) * g
        head = np.array([self.ivc[0] + u(-4.0, 6.0), ay + self.aorta_r + u(14.0, 22.0), z_p])
        tail = np.array([kl_center[0] - u(5.0, 20.0) * g, kl_center[1] + 22.5 + u(12.0, 22.0), z_p + u(18.0, 32.0) * g])
        ctrl = np.array([ax, ay + self.aorta_r + u(22.0, 32.0), z_p + 10.0])
        t = np.linspace(0.0, 1.0, 6)[:, None]
        pts = (1 - t) ** 2 * head + 2 * (1 - t) * t * ctrl + t**2 * tail
        s = u(0.88, 1.12) * g
        radii = np.linspace(15.0, 8.5, 6) * s
        uncinate = head + np.array([u(0.0, 6.0), -u(4.0, 10.0), -u(18.0, 26.0)]) * g
        self.pancreas = [_Tube(pts, radii), _Tube([head, uncinate], [14.0 * s, 11.0 * s])]

        # stomach: fundus, body and antrum, air-fluid level (supine: gas anterior)
        s = u(0.85, 1.15) * g
        top = rl_center[2] + self.liver_right.radii[2]
        fundus = np.array([-u(50.0, 62.0) * g, u(0.0, 15.0) * g, top - u(24.0, 36.0)])
        body_c = fundus + np.array([u(0.0, 10.0), u(22.0, 32.0), -u(35.0, 45.0)]) * g
        antrum = np.array([-u(0.0, 15.0) * g, u(42.0, 55.0) * g, body_c[2] - u(30.0, 42.0) * g])
        self.stomach = [
            _Ellipsoid(fundus, np.array([32.0, 30.0, 32.0]) * s, _jitter_rotation(rng)),
            _Ellipsoid(body_c, np.array([36.0, 28.0, 45.0]) * s, _jitter_rotation(rng, (-20.0, 0.0, 0.0))),
            _Ellipsoid(antrum, np.array([34.0, 22.0, 22.0]) * s, _jitter_rotation(rng, (0.0, 0.0, 20.0))),
            # lower body bending into the antrum keeps the stomach in one piece
            _Ellipsoid((body_c + antrum) / 2, np.array([30.0, 24.0, 30.0]) * s, _jitter_rotation(rng)),
        ]
        self.stomach_wall = u(3.0, 6.0)
        self.gas_level = body_c[1] + u(0.1, 0.6) * 28.0 * s

        # field of view: liver dome / spleen top to the lower renal poles
        tops = [e.center[2] + e.radii[2] for e in (self.liver_right, self.liver_left, self.spleen, self.stomach[0])]
        bottoms = [k[0].center[2] - k[0].radii[2] for k in self.kidneys.values()]
        z_top = max(tops) + u(5.0, 15.0)
        z_bottom = min(bottoms) - u(5.0, 15.0)
        margin = u(8.0, 20.0)
        self.lo = np.array([-self.a - margin, -self.b_post - margin, z_bottom])
        self.hi = np.array([self.a + margin, self.b_ant + margin, z_top])

        # lungs: bases reach into the top slices, postero-lateral recesses
        self.lungs = [
            _Ellipsoid(
                (sign * u(70.0, 85.0) * g, -u(15.0, 30.0) * g, z_top + u(35.0, 50.0)),
                np.array([68.0, 72.0, 75.0]) * g,
                _jitter_rotation(rng),
            )
            for sign in (1.0, -1.0)
        ]
        self.rib_period = u(28.0, 34.0) * g
        self.rib_phase = u(0.0, self.rib_period)
        self.rib_extent = u(90.0, 130.0)
        self.psoas_x = self.vb_r[0] + u(12.0, 18.0) * g

        # smooth random fields
        self.deformation = _Deformation(rng, self.lo, self.hi, amplitude=u(2.0, 6.0), step=u(45.0, 70.0))
        self.texture = _WorldField.random(rng, self.lo, self.hi, step=u(4.0, 6.0))
        self.bowel = _WorldField.random(rng, self.lo, self.hi, step=u(9.0, 13.0))
        self.bowel_threshold = u(-0.3, 0.3)

    # body outline -----------------------------------------------------------------------
    def _body_level(self, p, shrink: float) -> np.ndarray:
        amp, period, phase = self.z_wobble
        zf = 1.0 + amp * np.sin(2 * np.pi * p[2] / period + phase)
        e = np.float32(self.p_body)
        bx = np.abs(p[0]) / (np.float32(self.a - shrink) * zf)
        by = np.abs(p[1]) / (np.where(p[1] > 0, np.float32(self.b_ant - shrink), np.float32(self.b_post - shrink)) * zf)
        return bx**e + by**e

    def paint(self, canvas: _Canvas) -> None:
        grid = canvas.grid
        full = grid.full()
        p = grid.world(full)
        body = self._body_level(p, 0.0) <= 1.0
        inner = self._body_level(p, self.fat) <= 1.0
        cavity = self._body_level(p, self.fat + self.muscle) <= 1.0
        # the posterior paraspinal compartment belongs to the spine and back muscles
        cavity &= ~((p[1] < np.float32(self.vb_y)) & (np.abs(p[0]) < np.float32(38.0 * self.g)))
        canvas.tissue[body] = _T.FAT
        canvas.tissue[inner] = _T.MUSCLE
        canvas.tissue[cavity] = _T.VISCERAL_FAT
        wall = inner & ~cavity
        del inner
        labels = {name: i + 1 for i, name in enumerate(STRUCTURES["abdomen"])}
        big = 1e4
        zlo, zhi = self.lo[2] - 30.0, self.hi[2] + 30.0

        # spine: vertebral bodies with discs, canal, cord, posterior elements
        vb = _Column([zlo, zhi], [0.0, 0.0], [self.vb_y] * 2, [self.vb_r[0]] * 2, [self.vb_r[1]] * 2)
        canal = _Column([zlo, zhi], [0.0, 0.0], [self.canal_y] * 2, [self.canal_r] * 2, [self.canal_r] * 2)
        cy, cr = np.float32(self.canal_y), np.float32(self.canal_r)
        shell = np.float32((1.0 - 2.5 / min(self.vb_r)) ** 2)

        def spine(q):
            lev = vb.level(q)
            in_disc = np.mod(q[2] - self.disc_phase, self.disc_period) < self.disc_t
            out = _codes(lev <= 1.0, _T.CANCELLOUS_BONE)
            out[(lev <= 1.0) & (lev > shell)] = _T.CORTICAL_BONE
            out[(lev <= 1.0) & in_disc] = _T.DISC
            c = canal.level(q)
            out[c <= 1.0] = _T.CSF
            out[c <= 0.3] = _T.CORD
            r = np.sqrt(q[0] ** 2 + (q[1] - cy) ** 2)
            ring = (r > cr) & (r <= cr + 7.0) & (q[1] < cy + 0.5 * cr)
            spinous = (np.abs(q[0]) < 4.5) & (q[1] < cy) & (q[1] > cy - cr - 32.0 * self.g)
            level_in_vertebra = np.mod(q[2] - self.disc_phase, self.disc_period)
            # each vertebra's arch covers ~70 % of its height: gaps between laminae / spinous processes
            arch = np.mod(level_in_vertebra + 0.2 * self.disc_period, self.disc_period) < 0.7 * self.disc_period
            ring &= arch
            spinous &= arch
            transverse = (
                (np.abs(q[1] - cy - 4.0) < 3.5)
                & (np.abs(q[0]) < 32.0 * self.g)
                & (level_in_vertebra > self.disc_period - 12.0)
            )
            out[(out == 0) & (ring | spinous | transverse)] = _T.CORTICAL_BONE
            return out

        spine_box = ([-45.0 * self.g, cy - cr - 40.0 * self.g, zlo], [45.0 * self.g, self.vb_y + self.vb_r[1], zhi])
        canvas.paint(spine_box, spine, within=body)

        # muscles: psoas (growing caudally) and erector spinae
        zc = (self.lo[2] + self.hi[2]) / 2
        for sign in (1.0, -1.0):
            psoas = _Column(
                [zlo, zc + 20.0, zhi],
                [sign * self.psoas_x] * 3,
                [self.vb_y + 2.0] * 3,
                [20.0 * self.g, 9.0 * self.g, 3.0],
                [18.0 * self.g, 8.0 * self.g, 3.0],
            )
            canvas.paint(psoas.bbox(), lambda q, m=psoas: _codes(m.level(q) <= 1.0, _T.MUSCLE), within=body)
            erector = _Column(
                [zlo, zhi],
                [sign * 30.0 * self.g] * 2,
                [self.canal_y - 16.0 * self.g] * 2,
                [24.0 * self.g] * 2,
                [20.0 * self.g] * 2,
            )
            canvas.paint(erector.bbox(), lambda q, m=erector: _codes(m.level(q) <= 1.0, _T.MUSCLE), within=body)

        # great vessels
        ax, ay = self.aorta_xy
        wob = self.aorta_wobble
        aorta = _Column(
            [zlo, (zlo + zhi) / 2, zhi], ax + wob[:, 0], ay + wob[:, 1], [self.aorta_r] * 3, [self.aorta_r] * 3
        )
        canvas.paint(aorta.bbox(), lambda q: _codes(aorta.level(q) <= 1.0, _T.AORTA), labels["aorta"], within=body)
        ix, iy, irx, iry = self.ivc
        ivc = _Column([zlo, zhi], [ix, ix], [iy, iy], [irx, irx], [iry, iry])
        canvas.paint(ivc.bbox(), lambda q: _codes(ivc.level(q) <= 1.0, _T.IVC), within=cavity)

        # kidneys: cortex, medullary pyramids, renal sinus fat at the hilum (unlabelled)
        for side in ("left", "right"):
            kid, medial, phase = self.kidneys[side]

            def kidney(q, sinus: bool, kid=kid, medial=medial, phase=phase):
                loc = kid.local(q)
                lev = loc[0] ** 2 + loc[1] ** 2 + loc[2] ** 2
                hilum = ((loc[0] - medial) ** 2 / 0.3 + loc[1] ** 2 / 0.3 + loc[2] ** 2 / 0.12 <= 1.0) & (lev <= 1.15)
                if sinus:
                    return _codes(hilum, _T.VISCERAL_FAT)
                out = _codes((lev <= 1.0) & ~hilum, _T.KIDNEY_CORTEX)
                pyramids = np.sin(5.0 * np.arctan2(loc[2], loc[0] * medial) + phase[0]) > -0.4
                out[(lev <= 0.55) & pyramids & ~hilum] = _T.KIDNEY_MEDULLA
                return out

            lo, hi = kid.bbox()
            canvas.paint((lo - 5.0, hi + 5.0), lambda q, fn=kidney: fn(q, True), within=cavity)
            canvas.paint((lo, hi), lambda q, fn=kidney: fn(q, False), labels[f"{side} kidney"], within=cavity)

        if self.gallbladder is not None:
            gb = self.gallbladder
            canvas.paint(gb.bbox(), lambda q: _codes(gb.level(q) <= 1.0, _T.GALLBLADDER), within=cavity)

        # pancreas
        pan = self.pancreas

        def pancreas(q):
            return _codes(np.minimum(pan[0].level(q), pan[1].level(q)) <= 1.0, _T.PANCREAS)

        canvas.paint(_union_bbox(pan[0].bbox(), pan[1].bbox()), pancreas, labels["pancreas"], within=cavity)

        # liver with portal / hepatic vessels (labelled as liver, as in public datasets)
        lr, ll, vessels = self.liver_right, self.liver_left, self.liver_vessels

        def liver(q):
            return _codes((lr.level(q) <= 1.0) | (ll.level(q) <= 1.0), _T.LIVER)

        def liver_vessel(q, v):
            return _codes((v.level(q) <= 1.0) & (liver(q) > 0), _T.HEPATIC_VESSEL)

        for v in vessels:  # evaluated in each vessel's own box: far fewer voxels than the liver's
            canvas.paint(v.bbox(), lambda q, v=v: liver_vessel(q, v), labels["liver"], within=cavity)
        canvas.paint(_union_bbox(lr.bbox(), ll.bbox()), liver, labels["liver"], within=cavity)

        sp, cut = self.spleen, self.spleen_cut
        canvas.paint(
            sp.bbox(),
            lambda q: _codes((sp.level(q) <= 1.0) & (cut.level(q) > 1.0), _T.SPLEEN),
            labels["spleen"],
            within=cavity,
        )

        # stomach: wall, fluid and an anterior gas cap
        st, wall_t, gas_y = self.stomach, self.stomach_wall, np.float32(self.gas_level)
        inner_st = [_Ellipsoid(e.center, e.radii - wall_t, e.rot) for e in st]

        def stomach(q):
            outer = np.minimum.reduce([e.level(q) for e in st]) <= 1.0
            lumen = np.minimum.reduce([e.level(q) for e in inner_st]) <= 1.0
            out = _codes(outer, _T.STOMACH_WALL)
            out[lumen] = _T.STOMACH_FLUID
            out[lumen & (q[1] > gas_y)] = _T.STOMACH_GAS
            return out

        canvas.paint(_union_bbox(*[e.bbox() for e in st]), stomach, labels["stomach"], within=cavity)

        # ribs in the upper body wall (absent anteriorly)
        rib_lo = [-big, -big, self.hi[2] - self.rib_extent]

        def ribs(q):
            # oblique bands (ribs descend anteriorly): short arcs in each axial slice
            band = np.mod(q[2] + 0.5 * q[1] - self.rib_phase, self.rib_period) < 7.0 * self.g
            return _codes(band & (q[1] < 0.35 * self.b_ant), _T.CORTICAL_BONE)

        canvas.paint((rib_lo, [big, big, big]), ribs, within=wall)

        for lung in self.lungs:
            canvas.paint(lung.bbox(), lambda q, e=lung: _codes(e.level(q) <= 1.0, _T.LUNG), within=cavity)

        # bowel loops and gas in the remaining visceral fat
        free = cavity & ~canvas.occupied
        field_ = self.bowel.sample(grid, full)
        canvas.tissue[free & (field_ > self.bowel_threshold)] = _T.BOWEL
        canvas.tissue[free & (field_ > self.bowel_threshold + 2.2)] = _T.BOWEL_GAS

    def factors(self, canvas: _Canvas) -> dict:
        counts = np.bincount(canvas.label.ravel(), minlength=len(STRUCTURES["abdomen"]) + 1)
        out = {
            f"{name.replace(' ', '_')}_volume_ml": round(float(counts[i + 1]) * canvas.grid.voxel_ml, 2)
            for i, name in enumerate(STRUCTURES["abdomen"])
        }
        out.update(
            subcutaneous_fat_mm=round(self.fat, 1),
            aorta_diameter_mm=round(2 * self.aorta_r, 1),
            body_width_mm=round(2 * self.a, 1),
        )
        return out


# --------------------------------------------------------------------------------------
# Anatomy: head and neck
# --------------------------------------------------------------------------------------


@dataclass
class _Lesion:
    """Tumour or lymph node: union of ellipsoids, a rough surface and a radial uptake profile."""

    parts: list[_Ellipsoid]
    suv_max: float
    necrosis: float = 0.0  # level below which the core is necrotic (0 = none)
    waves: np.ndarray | None = None  # (n, 4): wave vector (1/mm) and phase, surface roughness
    roughness_mm: float = 0.0

    def bbox(self):
        lo, hi = _union_bbox(*[e.bbox() for e in self.parts])
        return lo - self.roughness_mm, hi + self.roughness_mm

    def bounding_radius(self) -> float:
        c = self.parts[0].center
        return max(float(np.linalg.norm(e.center - c) + e.radii.max()) for e in self.parts) + self.roughness_mm

    def level(self, q):
        if self.waves is not None:
            # irregular margin: shift each coordinate by a few random sinusoids (<= roughness_mm)
            amp = np.float32(self.roughness_mm / len(self.waves))
            shifted = []
            for w in range(3):
                s = q[w]
                for k in self.waves:
                    s = s + amp * np.sin(k[0] * q[0] + k[1] * q[1] + k[2] * q[2] + np.float32(k[3] + 2.1 * w))
                shifted.append(s)
            q = shifted
        levels = [e.level(q) for e in self.parts]
        return np.minimum.reduce(levels) if len(levels) > 1 else levels[0]

    def shape_fn(self, code: int):
        def fn(q):
            lev = self.level(q)
            inside = lev <= 1.0
            out = _codes(inside, code)
            # hotter centre: SUVmax at the core falling to 40 % at the margin
            uptake = np.where(inside, np.float32(self.suv_max) * (1.0 - 0.6 * lev), np.float32(0.0)).astype(np.float32)
            if self.necrosis > 0:
                core = inside & (lev <= self.necrosis)
                out[core] = _T.NECROSIS
                uptake[core] = 0.0
            return out, uptake

        return fn


def _random_waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> np.ndarray:
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    k = direction * (2 * np.pi / rng.uniform(*wavelength, size=(n, 1)))
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, (n, 1))], axis=1).astype(np.float32)


class _HeadNeck(_Anatomy):
    """Neck from the mandible to the thoracic inlet with an oropharyngeal/laryngeal primary."""

    region = "head_neck"

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        g = u(0.9, 1.1)
        self.g = g
        self.height = u(140.0, 180.0)
        self.top, self.bottom = self.height / 2, -self.height / 2
        self.a = 72.0 * g * u(0.92, 1.08)
        self.b_ant = 62.0 * g * u(0.92, 1.08)
        self.b_post = self.b_ant * u(0.95, 1.05)
        self.p_body = u(2.0, 2.4)
        self.fat = u(4.0, 9.0)
        self.jaw_grow = (u(0.2, 0.35), u(0.05, 0.12))  # anterior / lateral widening at the jaw

        # spine and airway
        self.vb_y = u(-8.0, -2.0) * g
        self.vb_r = (u(14.0, 17.0) * g, u(11.0, 13.0) * g)
        self.canal_r = u(7.0, 8.5) * g
        self.canal_y = self.vb_y - self.vb_r[1] - self.canal_r - 1.5
        self.disc_period = u(17.0, 21.0) * g
        self.disc_phase = u(0.0, self.disc_period)
        self.airway_y = (u(30.0, 36.0) * g, u(18.0, 22.0) * g)  # bottom (trachea), top (oropharynx)
        self.airway_r = ((u(8.0, 10.0), u(7.0, 9.0)), (u(8.0, 10.0), u(8.0, 10.0)), (u(12.0, 16.0), u(6.0, 9.0)))

        # vessels: carotid medial, jugular lateral (bottom -> top)
        self.carotid = ((u(18.0, 22.0) * g, 12.0 * g), (u(27.0, 32.0) * g, 8.0 * g), u(3.0, 4.0))
        self.jugular = ((u(27.0, 31.0) * g, 13.0 * g), (u(37.0, 42.0) * g, 2.0 * g), u(5.0, 6.5))

        # mandible at the top of the field of view
        self.jaw = (u(0.0, 8.0) * g, u(44.0, 50.0) * g, u(48.0, 56.0) * g, u(8.0, 10.0), self.top - u(30.0, 38.0))

        # primary tumour: union of 2-3 ellipsoids by the airway, rough surface
        self.site = "oropharynx" if rng.random() < 0.6 else "larynx"
        self.side = 1.0 if rng.random() < 0.5 else -1.0
        if self.site == "oropharynx":
            zt = self.top - u(40.0, 58.0)
            center = np.array([self.side * u(6.0, 14.0), self._airway_y(zt) + u(-6.0, 4.0), zt])
        else:
            zt = u(-20.0, 12.0)
            center = np.array([self.side * u(4.0, 10.0), self._airway_y(zt) + u(-2.0, 6.0), zt])
        main = _Ellipsoid(center, rng.uniform(10.0, 20.0, 3), _jitter_rotation(rng, max_deg=30.0))
        parts = [main]
        for _ in range(int(rng.integers(1, 3))):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            offset = direction * main.radii.mean() * u(0.45, 0.75)
            parts.append(
                _Ellipsoid(
                    center + offset, main.radii * rng.uniform(0.45, 0.75, 3), _jitter_rotation(rng, max_deg=40.0)
                )
            )
        self.tumour = _Lesion(
            parts, suv_max=u(6.0, 15.0), waves=_random_waves(rng, 3, (14.0, 30.0)), roughness_mm=u(1.5, 3.0)
        )

        # lymph nodes: levels II-III, ipsilateral more often, never touching the tumour
        self.nodes: list[_Lesion] = []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(60):
                side = self.side if rng.random() < 0.7 else -self.side
                zn = self.top - u(35.0, 70.0) if rng.random() < 0.6 else u(-30.0, 10.0)
                r = u(7.0, 14.0)
                radii = np.array([r, r * u(0.7, 1.0), r * u(0.8, 1.2)])
                jx, jy = self._vessel_xy(self.jugular, zn)
                x = side * min(jx + self.jugular[2] + u(-2.0, 8.0), self.a - self.fat - radii.max() - 6.0)
                node = _Ellipsoid((x, jy + u(-4.0, 14.0), zn), radii, _jitter_rotation(rng, max_deg=25.0))
                cand = _Lesion(
                    [node], suv_max=u(3.0, 9.0), necrosis=u(0.15, 0.35) if (r > 10.0 and rng.random() < 0.35) else 0.0
                )
                if (
                    self._separate(cand, [self.tumour, *self.nodes], gap=4.0)
                    and self.bottom + r + 8 < zn < self.top - r - 8
                ):
                    self.nodes.append(cand)
                    break
        if not self.nodes:  # every case has at least one node: a small contralateral level III node
            zn = self.bottom + 0.4 * self.height
            jx, jy = self._vessel_xy(self.jugular, zn)
            node = _Ellipsoid(
                (-self.side * (jx + self.jugular[2] + 4.0), jy + 6.0, zn), np.array([7.0, 6.0, 8.0]), np.eye(3)
            )
            self.nodes.append(_Lesion([node], suv_max=u(3.0, 9.0)))

        margin = u(8.0, 20.0)
        self.lo = np.array([-self.a * (1 + self.jaw_grow[1]) - margin, -self.b_post - margin, self.bottom])
        self.hi = np.array(
            [self.a * (1 + self.jaw_grow[1]) + margin, self.b_ant * (1 + self.jaw_grow[0]) + margin, self.top]
        )
        self.glands = {
            "submandibular": [
                _Ellipsoid(
                    (sg * u(30.0, 38.0) * g, self.jaw[0] + u(15.0, 25.0), self.top - u(34.0, 42.0)),
                    np.array([13.0, 10.0, 11.0]) * g,
                    _jitter_rotation(rng),
                )
                for sg in (1, -1)
            ],
            "parotid": [
                _Ellipsoid(
                    (sg * u(52.0, 58.0) * g, u(-10.0, 0.0), self.top - u(0.0, 10.0)),
                    np.array([11.0, 17.0, 22.0]) * g,
                    _jitter_rotation(rng),
                )
                for sg in (1, -1)
            ],
        }
        th_z = self.bottom + u(22.0, 32.0)
        ty = self.airway_y[0]
        self.thyroid = [
            _Ellipsoid(
                (sg * u(16.0, 20.0) * g, ty + 2.0, th_z),
                np.array([8.0, 9.0, 20.0]) * g * u(0.85, 1.2),
                _jitter_rotation(rng),
            )
            for sg in (1, -1)
        ]
        self.thyroid.append(_Ellipsoid((0.0, ty + 12.0 * g, th_z - 8.0), np.array([14.0, 4.0, 7.0]) * g))

        self.deformation = _Deformation(rng, self.lo, self.hi, amplitude=u(2.0, 4.0), step=u(40.0, 60.0))
        self.texture = _WorldField.random(rng, self.lo, self.hi, step=u(3.0, 5.0))
        self.fat_planes = _WorldField.random(rng, self.lo, self.hi, step=u(6.0, 9.0))

    # helpers ---------------------------------------------------------------------------
    def _airway_y(self, z):
        t = (np.asarray(z, float) - self.bottom) / self.height
        return self.airway_y[0] + (self.airway_y[1] - self.airway_y[0]) * t

    def _vessel_xy(self, vessel, z) -> tuple[float, float]:
        (xb, yb), (xt, yt), _ = vessel
        t = float(np.clip((z - self.bottom) / self.height, 0.0, 1.0))
        return xb + (xt - xb) * t, yb + (yt - yb) * t

    @staticmethod
    def _separate(cand: _Lesion, others: list[_Lesion], gap: float) -> bool:
        c = cand.parts[0].center
        return all(
            min(float(np.linalg.norm(c - e.center)) - float(e.radii.max()) for e in o.parts) - cand.bounding_radius()
            > gap
            for o in others
        )

    def _body_level(self, p, shrink: float) -> np.ndarray:
        jaw = _smoothstep((p[2] - (self.top - 65.0)) / 40.0)
        e = np.float32(self.p_body)
        ax = np.float32(self.a - shrink) * (1.0 + np.float32(self.jaw_grow[1]) * jaw)
        by_ant = np.float32(self.b_ant - shrink) * (1.0 + np.float32(self.jaw_grow[0]) * jaw)
        by = np.where(p[1] > 0, by_ant, np.float32(self.b_post - shrink))
        return (np.abs(p[0]) / ax) ** e + (np.abs(p[1]) / by) ** e

    def paint(self, canvas: _Canvas) -> None:
        grid = canvas.grid
        full = grid.full()
        p = grid.world(full)
        body = self._body_level(p, 0.0) <= 1.0
        inner = self._body_level(p, self.fat) <= 1.0
        canvas.tissue[body] = _T.FAT
        labels = {name: i + 1 for i, name in enumerate(STRUCTURES["head_neck"])}
        zlo, zhi = self.bottom - 30.0, self.top + 30.0

        canvas.paint(self.tumour.bbox(), self.tumour.shape_fn(_T.TUMOUR), labels["primary tumour"], within=inner)
        for node in self.nodes:
            canvas.paint(node.bbox(), node.shape_fn(_T.NODE), labels["lymph node"], within=inner)

        # airway lumen with a mucosal / constrictor lining; oesophagus behind the trachea
        (rb, rm, rt) = self.airway_r
        zs = [zlo, self.bottom + 0.45 * self.height, zhi]
        ys = [float(self._airway_y(z)) for z in zs]
        airway = _Column(zs, [0.0] * 3, ys, [rb[0], rm[0], rt[0]], [rb[1], rm[1], rt[1]])
        lining = _Column(zs, [0.0] * 3, ys, [rb[0] + 3, rm[0] + 3, rt[0] + 4], [rb[1] + 3, rm[1] + 3, rt[1] + 4])

        def airway_fn(q):
            out = _codes(lining.level(q) <= 1.0, _T.MUCOSA)
            out[airway.level(q) <= 1.0] = _T.AIRWAY
            return out

        canvas.paint(lining.bbox(), airway_fn, within=inner)
        oes_y = self.vb_y + self.vb_r[1] + 7.0
        oesophagus = _Column(
            [zlo, self.bottom + 0.5 * self.height], [-3.0, -3.0], [oes_y, oes_y], [8.0, 8.0], [5.5, 5.5]
        )
        canvas.paint(oesophagus.bbox(), lambda q: _codes(oesophagus.level(q) <= 1.0, _T.MUCOSA), within=inner)

        # cervical spine
        vb = _Column([zlo, zhi], [0.0, 0.0], [self.vb_y] * 2, [self.vb_r[0]] * 2, [self.vb_r[1]] * 2)
        cy, cr = np.float32(self.canal_y), np.float32(self.canal_r)
        shell = np.float32((1.0 - 2.0 / min(self.vb_r)) ** 2)

        def spine(q):
            lev = vb.level(q)
            in_disc = np.mod(q[2] - self.disc_phase, self.disc_period) < 5.0 * self.g
            out = _codes(lev <= 1.0, _T.CANCELLOUS_BONE)
            out[(lev <= 1.0) & (lev > shell)] = _T.CORTICAL_BONE
            out[(lev <= 1.0) & in_disc] = _T.DISC
            r = np.sqrt(q[0] ** 2 + (q[1] - cy) ** 2)
            out[r <= cr] = _T.CSF
            out[r <= cr * 0.6] = _T.CORD
            ring = (r > cr) & (r <= cr + 5.5) & (q[1] < cy + 0.7 * cr)
            spinous = (np.abs(q[0]) < 3.5) & (q[1] < cy) & (q[1] > cy - cr - 22.0 * self.g)
            lateral = (np.abs(q[1] - self.vb_y + 2.0) < 3.0) & (np.abs(q[0]) < self.vb_r[0] + 11.0 * self.g) & ~in_disc
            arch = np.mod(q[2] - self.disc_phase + 0.2 * self.disc_period, self.disc_period) < 0.7 * self.disc_period
            ring &= arch
            spinous &= arch
            out[(out == 0) & (ring | spinous | lateral)] = _T.CORTICAL_BONE
            return out

        canvas.paint(([-45.0, cy - cr - 30.0, zlo], [45.0, self.vb_y + self.vb_r[1], zhi]), spine, within=inner)

        # mandible: U-shaped bone slab open posteriorly, marrow inside a cortical shell
        jy, jax, jay, jt, jz = self.jaw
        mean_r = (jax + jay) / 2

        def mandible(q):
            rho = np.sqrt((q[0] / jax) ** 2 + ((q[1] - jy) / jay) ** 2)
            dist = np.abs(rho - 1.0) * mean_r
            slab = (q[2] > jz) & (q[2] < self.top - 3.0) & (q[1] > jy - 14.0)
            out = _codes(slab & (dist < jt / 2), _T.CORTICAL_BONE)
            out[slab & (dist < jt / 2 - 2.0)] = _T.CANCELLOUS_BONE
            return out

        canvas.paint(([-jax - jt, jy - 20.0, jz], [jax + jt, jy + jay + jt, zhi]), mandible, within=inner)

        # vessels (contrast-enhanced carotids, jugular veins)
        for sign in (1.0, -1.0):
            for vessel, code in ((self.carotid, _T.ARTERY), (self.jugular, _T.VEIN)):
                (xb, yb), (xt, yt), r = vessel
                tube = _Tube([[sign * xb, yb, zlo], [sign * xt, yt, zhi]], [r, r])
                canvas.paint(tube.bbox(), lambda q, t=tube, c=code: _codes(t.level(q) <= 1.0, c), within=inner)

        for gland in self.thyroid:
            canvas.paint(gland.bbox(), lambda q, e=gland: _codes(e.level(q) <= 1.0, _T.THYROID), within=inner)
        for name, code in (("submandibular", _T.SUBMANDIBULAR), ("parotid", _T.PAROTID)):
            for gland in self.glands[name]:
                canvas.paint(gland.bbox(), lambda q, e=gland, c=code: _codes(e.level(q) <= 1.0, c), within=inner)

        # muscles: sternocleidomastoids, posterior and prevertebral muscles, tongue, straps
        muscles = [
            _Tube(
                [
                    [sign * 54.0 * self.g, -8.0 * self.g, self.top + 10.0],
                    [sign * 24.0 * self.g, 42.0 * self.g, self.bottom - 10.0],
                ],
                [9.0 * self.g, 7.5 * self.g],
            )
            for sign in (1.0, -1.0)
        ]
        muscles.append(
            _Column(
                [zlo, zhi],
                [0.0, 0.0],
                [self.canal_y - 12.0 * self.g] * 2,
                [self.a * 0.72] * 2,
                [self.b_post * 0.38] * 2,
            )
        )
        for sign in (1.0, -1.0):  # scalenes (lateral to the spine, diverging caudally) and levator scapulae
            sx = self.vb_r[0] + 14.0 * self.g
            muscles.append(
                _Column([zlo, zhi], [sign * (sx + 14.0), sign * sx], [self.vb_y - 4.0] * 2, [10.0, 8.0], [7.0, 6.0])
            )
            muscles.append(
                _Column(
                    [zlo, zhi],
                    [sign * 46.0 * self.g, sign * 40.0 * self.g],
                    [self.canal_y - 4.0] * 2,
                    [11.0, 9.0],
                    [9.0, 8.0],
                )
            )
        muscles += [
            _Column([zlo, zhi], [sign * 9.0] * 2, [self.vb_y + self.vb_r[1] + 2.0] * 2, [6.0, 6.0], [3.5, 3.5])
            for sign in (1.0, -1.0)
        ]
        muscles.append(_Ellipsoid((0.0, jy + 12.0, self.top - 12.0), np.array([30.0, 32.0, 24.0]) * self.g))
        muscles.append(
            _Column([zlo, self.top - 50.0], [0.0, 0.0], [self.airway_y[0] + 17.0] * 2, [24.0, 24.0], [4.0, 4.0])
        )
        for m in muscles:
            canvas.paint(m.bbox(), lambda q, m=m: _codes(m.level(q) <= 1.0, _T.MUSCLE), within=inner)

        # remaining interior: fat planes between muscle bundles
        free = inner & ~canvas.occupied
        planes = self.fat_planes.sample(grid, full)
        canvas.tissue[free & (planes > 1.3)] = _T.MUSCLE

    def _lesion_volume_ml(self, lesion: _Lesion) -> float:
        """Volume on a fixed 1 mm world grid, so the factor is the same for every acquisition."""
        lo, hi = lesion.bbox()
        margin = self.deformation.amplitude + 1.0
        grid = _Grid(lo - margin, hi + margin, (1.0, 1.0, 1.0), (0, 1, 2), (False, False, False))
        canvas = _Canvas(grid, self.deformation)
        canvas.paint(lesion.bbox(), lesion.shape_fn(_T.TUMOUR), 1)
        return float(canvas.label.sum()) * grid.voxel_ml

    def factors(self, canvas: _Canvas) -> dict:
        node_volumes = [self._lesion_volume_ml(n) for n in self.nodes]
        sides = {("right" if n.parts[0].center[0] > 0 else "left") for n in self.nodes}
        return {
            "tumour_site": self.site,
            "tumour_side": "right" if self.side > 0 else "left",
            "tumour_volume_ml": round(self._lesion_volume_ml(self.tumour), 2),
            "suv_max": round(self.tumour.suv_max, 2),
            "node_count": len(self.nodes),
            "node_volume_ml": round(sum(node_volumes), 2),
            "node_suv_max": round(max((n.suv_max for n in self.nodes), default=0.0), 2),
            "node_sides": "bilateral" if len(sides) > 1 else (sides.pop() if sides else "none"),
            "necrotic_nodes": sum(1 for n in self.nodes if n.necrosis > 0),
        }


_ANATOMIES: dict[str, type[_Anatomy]] = {"abdomen": _Abdomen, "head_neck": _HeadNeck}


# --------------------------------------------------------------------------------------
# Modality physics
# --------------------------------------------------------------------------------------


def _tables(values: dict[_T, tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    missing = [t.name for t in _T if t not in values]
    if missing:  # a programming error, not a user error
        raise AssertionError(f"tissue table lacks {missing}")
    mean = np.array([values[t][0] for t in _T], np.float32)
    texture = np.array([values[t][1] for t in _T], np.float32)
    return mean, texture


def _render_ct(canvas: _Canvas, anatomy: _Anatomy, acq: AcquisitionSpec, rng: np.random.Generator) -> np.ndarray:
    """Contrast-enhanced CT in HU (portal-venous phase, the standard abdominal protocol): tissue values,
    texture, slight blur, Gaussian noise."""
    u = rng.uniform
    liver, aorta, cortex = u(95.0, 115.0), u(160.0, 220.0), u(150.0, 190.0)
    T = _T
    mean, tex = _tables(
        {
            T.AIR: (-1000.0, 0.0),
            T.LUNG: (u(-870.0, -830.0), 25.0),
            T.FAT: (u(-110.0, -90.0), 8.0),
            T.VISCERAL_FAT: (u(-105.0, -85.0), 10.0),
            T.MUSCLE: (u(40.0, 50.0), 5.0),
            T.BOWEL: (u(25.0, 45.0), 12.0),
            T.BOWEL_GAS: (-950.0, 40.0),
            T.CORTICAL_BONE: (u(750.0, 900.0), 60.0),
            T.CANCELLOUS_BONE: (u(380.0, 480.0), 40.0),
            T.DISC: (u(80.0, 100.0), 8.0),
            T.CSF: (u(5.0, 15.0), 3.0),
            T.CORD: (u(30.0, 40.0), 4.0),
            T.LIVER: (liver, 6.0),
            T.HEPATIC_VESSEL: (aorta * u(0.6, 0.75), 8.0),
            T.SPLEEN: (liver - u(12.0, 18.0), 5.0),
            T.KIDNEY_CORTEX: (cortex, 10.0),
            T.KIDNEY_MEDULLA: (cortex - u(30.0, 50.0), 10.0),
            T.AORTA: (aorta, 8.0),
            T.IVC: (aorta * u(0.55, 0.75), 8.0),
            T.PANCREAS: (u(70.0, 82.0), 7.0),
            T.STOMACH_WALL: (u(45.0, 58.0), 5.0),
            T.STOMACH_FLUID: (u(5.0, 15.0), 4.0),
            T.STOMACH_GAS: (-1000.0, 0.0),
            T.GALLBLADDER: (u(5.0, 15.0), 3.0),
            T.ARTERY: (u(180.0, 250.0), 8.0),
            T.VEIN: (u(130.0, 180.0), 8.0),
            T.TUMOUR: (u(80.0, 95.0), 10.0),
            T.NODE: (u(65.0, 75.0), 6.0),
            T.NECROSIS: (u(25.0, 35.0), 5.0),
            T.THYROID: (u(95.0, 130.0), 8.0),
            T.SUBMANDIBULAR: (u(40.0, 55.0), 5.0),
            T.PAROTID: (u(-5.0, 20.0), 8.0),
            T.AIRWAY: (-1000.0, 0.0),
            T.MUCOSA: (u(45.0, 60.0), 5.0),
        }
    )
    texture = anatomy.texture.sample(canvas.grid, canvas.grid.full())
    image = mean[canvas.tissue]
    image += tex[canvas.tissue] * texture
    del texture
    image = ndimage.gaussian_filter(image, sigma=0.6, truncate=3.0)
    sigma = u(10.0, 25.0) * acq.noise
    if sigma > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    # scanners store integer HU; it also lets the gzipped NIfTI shrink by about half
    return np.round(image, out=image)


def _render_mr(canvas: _Canvas, anatomy: _Anatomy, acq: AcquisitionSpec, rng: np.random.Generator) -> np.ndarray:
    """T1- or T2-weighted magnitude image: relative intensities, bias field, Rician noise."""
    u = rng.uniform
    T = _T
    t1 = acq.sequence == "T1"
    bright_blood = t1 and rng.random() < 0.5  # T1 after gadolinium, else flow void
    blood = u(650.0, 850.0) if bright_blood else u(20.0, 60.0)
    table = {  # (T1, T2) relative signal, relative texture amplitude
        T.AIR: (0.0, 0.0),
        T.LUNG: (15.0, 25.0),
        T.FAT: (950.0, 700.0),
        T.VISCERAL_FAT: (900.0, 650.0),
        T.MUSCLE: (320.0, 170.0),
        T.BOWEL: (350.0, 450.0),
        T.BOWEL_GAS: (5.0, 5.0),
        T.CORTICAL_BONE: (25.0, 20.0),
        T.CANCELLOUS_BONE: (600.0, 420.0),
        T.DISC: (250.0, 600.0),
        T.CSF: (150.0, 1000.0),
        T.CORD: (380.0, 400.0),
        T.LIVER: (520.0, 220.0),
        T.HEPATIC_VESSEL: (blood * 0.9, 60.0),
        T.SPLEEN: (380.0, 560.0),
        T.KIDNEY_CORTEX: (480.0, 620.0),
        T.KIDNEY_MEDULLA: (300.0, 780.0),
        T.AORTA: (blood, 40.0),
        T.IVC: (blood * 0.85, 60.0),
        T.PANCREAS: (560.0, 300.0),
        T.STOMACH_WALL: (360.0, 280.0),
        T.STOMACH_FLUID: (100.0, 1000.0),
        T.STOMACH_GAS: (5.0, 5.0),
        T.GALLBLADDER: (120.0, 1050.0),
        T.ARTERY: (blood, 40.0),
        T.VEIN: (blood * 0.85, 60.0),
        T.TUMOUR: (350.0, 600.0),
        T.NODE: (330.0, 550.0),
        T.NECROSIS: (150.0, 900.0),
        T.THYROID: (450.0, 500.0),
        T.SUBMANDIBULAR: (420.0, 450.0),
        T.PAROTID: (600.0, 500.0),
        T.AIRWAY: (0.0, 0.0),
        T.MUCOSA: (330.0, 300.0),
    }
    scale = u(0.5, 2.0)  # arbitrary scanner units
    jitter = rng.uniform(0.92, 1.08, _N_TISSUES)
    mean, _ = _tables({t: (v[0 if t1 else 1], 0.0) for t, v in table.items()})
    mean = (mean * jitter * scale).astype(np.float32)
    texture = anatomy.texture.sample(canvas.grid, canvas.grid.full())
    image = mean[canvas.tissue]
    image *= 1.0 + np.float32(0.04) * texture
    del texture
    image = ndimage.gaussian_filter(image, sigma=0.6, truncate=3.0)
    bias_field = _WorldField.random(rng, anatomy.lo, anatomy.hi, step=u(120.0, 180.0))
    bias = bias_field.sample(canvas.grid, canvas.grid.full())
    image *= np.clip(np.exp(np.float32(u(0.06, 0.12)) * bias), 0.7, 1.3)
    del bias
    sigma = np.float32(u(0.015, 0.035) * 500.0 * scale * acq.noise)
    if sigma > 0:  # magnitude of a complex signal with Gaussian noise in both channels (Rician)
        real = image + rng.standard_normal(image.shape, dtype=np.float32) * sigma
        imag = rng.standard_normal(image.shape, dtype=np.float32) * sigma
        image = np.sqrt(real * real + imag * imag)
    return np.maximum(image, np.float32(1e-3))


def _render_pet(canvas: _Canvas, anatomy: _Anatomy, acq: AcquisitionSpec, rng: np.random.Generator) -> np.ndarray:
    """SUV map: tissue uptake, lesion profiles, partial-volume blur, signal-dependent noise."""
    u = rng.uniform
    T = _T
    soft = u(0.8, 1.2)
    mean, tex = _tables(
        {
            T.AIR: (0.0, 0.0),
            T.LUNG: (0.4, 0.03),
            T.FAT: (0.3, 0.03),
            T.VISCERAL_FAT: (0.35, 0.03),
            T.MUSCLE: (soft, 0.06),
            T.BOWEL: (u(1.2, 2.0), 0.2),
            T.BOWEL_GAS: (0.0, 0.0),
            T.CORTICAL_BONE: (0.5, 0.04),
            T.CANCELLOUS_BONE: (u(0.6, 0.9), 0.05),
            T.DISC: (0.6, 0.04),
            T.CSF: (0.3, 0.02),
            T.CORD: (u(0.9, 1.2), 0.05),
            T.LIVER: (u(1.8, 2.6), 0.1),
            T.HEPATIC_VESSEL: (1.8, 0.05),
            T.SPLEEN: (u(1.5, 2.2), 0.08),
            T.KIDNEY_CORTEX: (u(2.0, 3.5), 0.1),
            T.KIDNEY_MEDULLA: (u(2.5, 4.5), 0.1),
            T.AORTA: (u(1.5, 2.0), 0.05),
            T.IVC: (u(1.4, 1.9), 0.05),
            T.PANCREAS: (u(1.2, 1.7), 0.06),
            T.STOMACH_WALL: (u(1.5, 2.5), 0.1),
            T.STOMACH_FLUID: (0.5, 0.03),
            T.STOMACH_GAS: (0.0, 0.0),
            T.GALLBLADDER: (0.3, 0.02),
            T.ARTERY: (u(1.5, 2.0), 0.05),
            T.VEIN: (u(1.4, 1.9), 0.05),
            T.TUMOUR: (6.0, 0.6),
            T.NODE: (4.0, 0.3),
            T.NECROSIS: (u(0.6, 1.0), 0.05),
            T.THYROID: (u(1.2, 2.0), 0.08),
            T.SUBMANDIBULAR: (u(2.0, 3.0), 0.15),
            T.PAROTID: (u(2.0, 3.0), 0.15),
            T.AIRWAY: (0.0, 0.0),
            T.MUCOSA: (u(1.2, 2.0), 0.1),
        }
    )
    texture = anatomy.texture.sample(canvas.grid, canvas.grid.full())
    image = mean[canvas.tissue]
    if canvas.uptake is not None:  # tumour and nodes: radial profile, hotter centre
        hot = canvas.uptake > 0
        image[hot] = canvas.uptake[hot]
    image += tex[canvas.tissue] * texture
    del texture
    fwhm = u(4.0, 6.0)
    sigma_vox = [fwhm * _FWHM_TO_SIGMA / s for s in acq.spacing]
    image = ndimage.gaussian_filter(image, sigma=sigma_vox, truncate=3.0)
    np.maximum(image, 0.0, out=image)
    gain = np.float32(u(0.01, 0.03) * acq.noise)  # noise variance per unit SUV
    if gain > 0:
        image += np.sqrt(image * gain) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.maximum(image, 0.0)


_RENDERERS = {"CT": _render_ct, "MR": _render_mr, "PET": _render_pet}


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def generate_phantom(
    region: str,
    modality: str,
    seed: int,
    *,
    acquisition: AcquisitionSpec | None = None,
    anatomy_seed: int | None = None,
) -> Phantom:
    """Draw one labelled case.

    The anatomy comes only from ``anatomy_seed`` (default: ``seed``); the acquisition (when
    not given) and the noise come from ``seed``.  Two calls with the same ``anatomy_seed`` and
    different modalities or acquisitions therefore image the same, co-registered patient.
    """
    _check_combination(region, modality)
    seed = _check_seed("seed", seed)
    anatomy_seed = seed if anatomy_seed is None else _check_seed("anatomy_seed", anatomy_seed)
    acq_rng, render_rng = _acquisition_rngs(seed)
    if acquisition is None:
        acquisition = random_acquisition(acq_rng, modality, region)
    elif not isinstance(acquisition, AcquisitionSpec):
        raise ValueError(f"acquisition must be an AcquisitionSpec, got {type(acquisition).__name__}")
    if modality == "MR" and acquisition.sequence is None:
        acquisition = dataclasses.replace(acquisition, sequence=str(render_rng.choice(MR_SEQUENCES)))
    if modality != "MR" and acquisition.sequence is not None:
        raise ValueError(f"sequence={acquisition.sequence!r} applies to MR only, not modality {modality!r}")

    t0 = time.perf_counter()
    anatomy = _ANATOMIES[region](_anatomy_rng(anatomy_seed, region))
    grid = _Grid(anatomy.lo, anatomy.hi, acquisition.spacing, acquisition.axis_order, acquisition.flips)
    if grid.size > HARD_MAX_VOXELS:
        raise ValueError(
            f"spacing={acquisition.spacing} gives {grid.size} voxels over this field of view "
            f"(limit {HARD_MAX_VOXELS}); use a coarser spacing"
        )
    canvas = _Canvas(grid, anatomy.deformation)
    anatomy.paint(canvas)
    t1 = time.perf_counter()
    image = _RENDERERS[modality](canvas, anatomy, acquisition, render_rng)
    factors = anatomy.factors(canvas)
    logger.debug(
        "%s %s seed=%d anatomy_seed=%d shape=%s (%.1f Mvox): anatomy %.2f s, render %.2f s",
        modality,
        region,
        seed,
        anatomy_seed,
        grid.shape,
        grid.size / 1e6,
        t1 - t0,
        time.perf_counter() - t1,
    )
    return Phantom(
        image=np.ascontiguousarray(image, dtype=np.float32),
        label=canvas.label,
        affine=grid.affine.copy(),
        modality=modality,
        region=region,
        sequence=acquisition.sequence,
        label_names=STRUCTURES[region],
        seed=seed,
        anatomy_seed=anatomy_seed,
        factors=factors,
        acquisition=acquisition,
    )


def save_nifti(phantom: Phantom, image_path, label_path) -> None:
    """Write the image (float32) and label (uint8) as NIfTI-1; the affine goes in qform and sform."""
    import nibabel as nib

    for data, path, dtype in ((phantom.image, image_path, np.float32), (phantom.label, label_path, np.uint8)):
        img = nib.Nifti1Image(np.asarray(data, dtype=dtype), phantom.affine)
        img.header.set_data_dtype(dtype)
        img.set_qform(phantom.affine, code=1)  # 1 = scanner anatomical coordinates
        img.set_sform(phantom.affine, code=1)
        img.header.set_xyzt_units("mm")
        if dtype is np.uint8:
            img.header.set_intent("label")
        else:
            img.header["descrip"] = f"phantom {phantom.modality} {phantom.region} seed {phantom.seed}".encode()[:79]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_decathlon_dataset(
    root,
    task_name: str,
    region: str,
    modality: str,
    n_cases: int,
    seed: int,
    *,
    labelled: Sequence[str] | None = None,
    sequence: str | None = None,
    anatomy_seeds: Sequence[int] | None = None,
    progress: bool = True,
) -> Path:
    """Write ``n_cases`` phantoms as a Medical Segmentation Decathlon task; return its folder.

    ``labelled`` lists the structures kept in the label files, renumbered 1..n in the given
    order (others are left as background: partial labels).  ``sequence`` fixes the MR
    sequence (None: drawn per case).  ``anatomy_seeds`` gives each case's anatomy (e.g. the
    same list for a CT task and a PET task makes paired PET/CT).
    """
    _check_combination(region, modality)
    seed = _check_seed("seed", seed)
    if (
        not task_name
        or not isinstance(task_name, str)
        or any(c in task_name for c in "/\\")
        or task_name.strip() != task_name
    ):
        raise ValueError(f"task_name must be a plain folder name, got task_name={task_name!r}")
    if isinstance(n_cases, bool) or not isinstance(n_cases, int | np.integer) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got n_cases={n_cases!r}")
    structures = STRUCTURES[region]
    labelled = tuple(structures if labelled is None else labelled)
    for name in labelled:
        if name not in structures:
            raise ValueError(f"labelled structure {name!r} is not drawn for region {region!r} (known: {structures})")
    if len(set(labelled)) != len(labelled) or not labelled:
        raise ValueError(f"labelled must list distinct structures, got labelled={labelled!r}")
    if sequence is not None and (modality != "MR" or sequence not in MR_SEQUENCES):
        raise ValueError(f"sequence={sequence!r} is only valid for MR as one of {MR_SEQUENCES}")
    if anatomy_seeds is not None:
        anatomy_seeds = [_check_seed("anatomy_seeds[i]", s) for s in anatomy_seeds]
        if len(anatomy_seeds) != n_cases:
            raise ValueError(f"anatomy_seeds has {len(anatomy_seeds)} entries, expected n_cases={n_cases}")

    task_dir = Path(root) / task_name
    (task_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (task_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    remap = np.zeros(len(structures) + 1, np.uint8)
    for new, name in enumerate(labelled, start=1):
        remap[structures.index(name) + 1] = new

    indices = range(int(n_cases))
    if progress:
        try:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=task_name, unit="case")
        except ImportError:  # progress is cosmetic
            logger.info("tqdm not installed; writing %d cases without a progress bar", n_cases)
    training = []
    for i in indices:
        case_seed = _case_seed(seed, i)
        anatomy_seed = case_seed if anatomy_seeds is None else anatomy_seeds[i]
        acquisition = None
        if sequence is not None:
            acquisition = dataclasses.replace(
                random_acquisition(_acquisition_rngs(case_seed)[0], modality, region), sequence=sequence
            )
        phantom = generate_phantom(region, modality, case_seed, acquisition=acquisition, anatomy_seed=anatomy_seed)
        phantom = dataclasses.replace(phantom, label=remap[phantom.label])
        name = f"{task_name}_{i:03d}.nii.gz"
        save_nifti(phantom, task_dir / "imagesTr" / name, task_dir / "labelsTr" / name)
        training.append(
            {
                "image": f"./imagesTr/{name}",
                "label": f"./labelsTr/{name}",
                "seed": case_seed,
                "anatomy_seed": anatomy_seed,
                "sequence": phantom.sequence,
                "spacing": [round(s, 4) for s in phantom.spacing],
                "factors": phantom.factors,
            }
        )
        logger.debug("wrote %s", name)

    description = f"Procedural {modality} phantoms of the {region.replace('_', ' and ')} (duplus/synth/phantoms.py)"
    dataset = {
        "name": task_name,
        "description": description,
        "reference": f"procedurally generated, seed {seed}",
        "licence": "CC0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": DECATHLON_MODALITY[modality]},
        "labels": {"0": "background", **{str(i): name for i, name in enumerate(labelled, start=1)}},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "region": region,
    }
    (task_dir / "dataset.json").write_text(json.dumps(dataset, indent=2))
    logger.info("wrote %d %s %s cases to %s", len(training), modality, region, task_dir)
    return task_dir


# --------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------

_OVERLAY_COLOURS = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c")


def _to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder array axes to world x, y, z, each increasing; return the volume and spacing."""
    world_axis = np.argmax(np.abs(affine[:3, :3]), axis=0)
    order = np.argsort(world_axis)  # array axis that runs along world x, y, z
    vol = np.transpose(volume, order)
    spacing = np.abs(affine[:3, :3])[world_axis[order], order]
    for w, a in enumerate(order):
        if affine[w, a] < 0:
            vol = np.flip(vol, axis=w)
    return vol, spacing


def preview_png(phantom: Phantom, path) -> None:
    """Axial, coronal and sagittal slices through the label centroid (radiological display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, sp = _to_ras(phantom.image, phantom.affine)
    label, _ = _to_ras(phantom.label, phantom.affine)
    idx = np.argwhere(label > 0)
    centre = idx.mean(axis=0).round().astype(int) if len(idx) else np.array(label.shape) // 2
    for axis in range(3):  # structures can straddle the centroid (tumour above, node below)
        per_plane = np.moveaxis(label > 0, axis, 0).sum(axis=(1, 2))
        if len(idx) and per_plane[centre[axis]] == 0:
            centre[axis] = int(np.argmax(per_plane))
    if phantom.modality == "CT":
        vmin, vmax = (-160.0, 240.0) if phantom.region == "abdomen" else (-125.0, 225.0)
    elif phantom.modality == "PET":
        vmin, vmax = 0.0, max(5.0, float(np.percentile(image[label > 0], 99)) if len(idx) else 5.0)
    else:
        vmin, vmax = np.percentile(image, [1.0, 99.5])
    # radiological convention: subject's right on the viewer's left, anterior / superior up
    views = {
        "axial": (image[::-1, ::-1, centre[2]].T, label[::-1, ::-1, centre[2]].T, sp[1] / sp[0]),
        "coronal": (image[::-1, centre[1], ::-1].T, label[::-1, centre[1], ::-1].T, sp[2] / sp[0]),
        "sagittal": (image[centre[0], ::-1, ::-1].T, label[centre[0], ::-1, ::-1].T, sp[2] / sp[1]),
    }
    n = len(phantom.label_names)
    cmap = ListedColormap(list(_OVERLAY_COLOURS[:n]))
    fig = Figure(figsize=(13, 8.5))
    FigureCanvasAgg(fig)
    for col, (view, (img, lab, aspect)) in enumerate(views.items()):
        for row in range(2):
            ax = fig.add_subplot(2, 3, row * 3 + col + 1)
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            if row == 1:
                masked = np.ma.masked_where(lab == 0, lab)
                ax.imshow(masked, cmap=cmap, vmin=0.5, vmax=n + 0.5, alpha=0.45, aspect=aspect, interpolation="nearest")
            ax.set_title(view if row == 0 else f"{view} + labels", fontsize=9)
            ax.set_axis_off()
    seq = f" {phantom.sequence}" if phantom.sequence else ""
    spacing = ", ".join(f"{s:.2f}" for s in phantom.spacing)
    fig.suptitle(
        f"{phantom.modality}{seq} {phantom.region}  shape {phantom.image.shape}  spacing ({spacing}) mm  "
        f"seed {phantom.seed} / anatomy {phantom.anatomy_seed}",
        fontsize=10,
    )
    fig.legend(
        handles=[Patch(color=_OVERLAY_COLOURS[i], label=name) for i, name in enumerate(phantom.label_names)],
        loc="lower center",
        ncol=min(n, 7),
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m duplus.synth.phantoms",
        description="Write procedurally generated, labelled CT / MR / PET phantoms as a Medical "
        "Segmentation Decathlon task (imagesTr/, labelsTr/, dataset.json).",
    )
    parser.add_argument("--out", required=True, type=Path, help="root folder; the task is written to OUT/TASK")
    parser.add_argument("--task", required=True, help="task name, e.g. Task901_PhantomAbdomenCT; also the file prefix")
    parser.add_argument("--region", required=True, choices=REGIONS, help="body region to draw")
    parser.add_argument(
        "--modality",
        required=True,
        choices=MODALITIES,
        help="imaging modality (abdomen: CT or MR; head_neck: CT or PET)",
    )
    parser.add_argument("--cases", type=int, default=10, help="number of cases to write (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; case i uses a seed derived from (SEED, i)")
    parser.add_argument(
        "--labelled",
        nargs="+",
        metavar="STRUCTURE",
        help="structures to keep in the label files, renumbered 1..n in this order "
        "(default: all of the region's structures); quote names with spaces, e.g. 'left kidney'",
    )
    parser.add_argument("--sequence", choices=MR_SEQUENCES, help="MR only: fix the sequence (default: drawn per case)")
    parser.add_argument(
        "--preview", action="store_true", help="also write a PNG of three mid-slices per case to OUT/TASK/previews/"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    task_dir = write_decathlon_dataset(
        args.out,
        args.task,
        args.region,
        args.modality,
        args.cases,
        args.seed,
        labelled=args.labelled,
        sequence=args.sequence,
        progress=not args.quiet,
    )
    if args.preview:
        dataset = json.loads((task_dir / "dataset.json").read_text())
        for entry in dataset["training"]:
            acq = None
            if entry["sequence"] is not None:
                acq = dataclasses.replace(
                    random_acquisition(_acquisition_rngs(entry["seed"])[0], args.modality, args.region),
                    sequence=entry["sequence"],
                )
            phantom = generate_phantom(
                args.region, args.modality, entry["seed"], acquisition=acq, anatomy_seed=entry["anatomy_seed"]
            )
            preview_png(phantom, task_dir / "previews" / (Path(entry["image"]).name.removesuffix(".nii.gz") + ".png"))
    print(task_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
