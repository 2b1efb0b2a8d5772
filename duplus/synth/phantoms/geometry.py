"""World-space geometry the anatomies are built from.

The voxel grid of an acquisition (``_Grid``), smooth random fields and deformations in world
space (``_WorldField``, ``_Deformation``), rotations and the implicit shapes (``_Ellipsoid``,
``_Tube``, ``_Column``: level <= 1 inside) with their bounding boxes, and ``_smoothstep``.
Coordinates are RAS+ millimetres; all of it is private to :mod:`duplus.synth.phantoms`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

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
