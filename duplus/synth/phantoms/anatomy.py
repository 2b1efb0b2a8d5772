"""What the two anatomies share: tissue classes, the canvas they paint on and the base class.

``_T`` enumerates the tissues the renderers colour; ``_Canvas`` holds one grid's tissue, label
and PET uptake maps, painted structure by structure (first come, first served); :class:`Anatomy`
is the base of :class:`~duplus.synth.phantoms.abdomen.AbdomenAnatomy` and
:class:`~duplus.synth.phantoms.head_neck.HeadNeckAnatomy`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np

from duplus.synth.phantoms.acquisition import STRUCTURES
from duplus.synth.phantoms.geometry import _Column, _Deformation, _Grid, _WorldField

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


def _solid(shape, code: int) -> _ShapeFn:
    """Shape function giving ``code`` wherever ``shape.level(q) <= 1`` (a structure of one tissue)."""
    return lambda q: _codes(shape.level(q) <= 1.0, code)


# --------------------------------------------------------------------------------------
# Anatomy base class
# --------------------------------------------------------------------------------------


class Anatomy:
    """One synthetic patient of a region, drawn in ``__init__`` from a seeded generator.

    Subclasses draw their parameters from ``rng`` in ``__init__`` (the order of the draws is
    part of the seed contract: changing it changes every phantom), then :meth:`paint` fills a
    :class:`_Canvas` and :meth:`factors` reports the prognostic facts of the case.
    """

    region: str
    lo: np.ndarray  # field of view (world mm)
    hi: np.ndarray
    deformation: _Deformation
    texture: _WorldField
    # body: global size factor, super-ellipse half-axes (lateral, anterior, posterior), exponent, fat layer
    g: float
    a: float
    b_ant: float
    b_post: float
    p_body: float
    fat: float
    # spine: vertebral body centre (y) and radii, spinal canal centre (y) and radius, disc spacing
    vb_y: float
    vb_r: tuple[float, float]
    canal_y: float
    canal_r: float
    disc_period: float
    disc_phase: float

    def __init__(self, rng: np.random.Generator) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def labels(self) -> dict[str, int]:
        """Label value of each labelled structure of the region (1-based, in STRUCTURES order)."""
        return {name: i + 1 for i, name in enumerate(STRUCTURES[self.region])}

    def _body_level(self, p, shrink: float) -> np.ndarray:  # pragma: no cover - interface
        """Body outline (<= 1 inside) at world coordinates ``p``, shrunk inwards by ``shrink`` mm."""
        raise NotImplementedError

    def _outline(self, canvas: _Canvas) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Paint the body as subcutaneous fat; return the undeformed world coordinates of the
        whole grid, the body mask and the mask inside the fat layer."""
        p = canvas.grid.world(canvas.grid.full())
        body = self._body_level(p, 0.0) <= 1.0
        inner = self._body_level(p, self.fat) <= 1.0
        canvas.tissue[body] = _T.FAT
        return p, body, inner

    def _vertebral_body(self, zlo: float, zhi: float, cortex_mm: float) -> tuple[_Column, np.float32]:
        """The vertebral body column and the level above which its cortical shell (``cortex_mm`` thick) lies."""
        vb = _Column([zlo, zhi], [0.0, 0.0], [self.vb_y] * 2, [self.vb_r[0]] * 2, [self.vb_r[1]] * 2)
        return vb, np.float32((1.0 - cortex_mm / min(self.vb_r)) ** 2)

    def paint(self, canvas: _Canvas) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def factors(self, canvas: _Canvas | None) -> dict:  # pragma: no cover - interface
        raise NotImplementedError
