"""A volume as three orthogonal 2D views for the context classifier's image tower.

The views are sampled in world space (RAS+ millimetres, from the affine), so that the array's axis order,
flips and spacing do not matter: an axial, a coronal and a sagittal slab through the volume's centre, each
``size`` x ``size`` pixels at ``spacing`` mm (64 x 64 at 4 mm: a 256 mm field of view), averaged over
``slab`` planes 2 mm apart. The volume is box-filtered to about ``spacing`` first, so that a 0.7 mm CT and
a 4 mm PET are seen at the same resolution. Intensities are scaled per volume from the 1st to the 99th
percentile of the sampled values to [0, 1]: the modality is unknown here (it is what the classifier
predicts), so no modality's window can be used; outside the field of view is 0.

Only the three slabs are sampled (3 x 64 x 64 x 5 points), never the whole volume, so a 512 x 512 x 300 CT
costs its box filter and little else.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from duplus.checks import check_volume

VIEW_SPACING_MM = 4.0
VIEW_SIZE = 64
VIEW_SLAB = 5
_SLAB_STEP_MM = 2.0


def _plane_points(centre: np.ndarray, size: int, spacing: float, slab: int) -> np.ndarray:
    """World points [3 views, slab, size, size, 3]: axial (x, y at z), coronal (x, z at y), sagittal (y, z at x)."""
    half = (size - 1) / 2.0
    u = (np.arange(size) - half) * spacing
    s = (np.arange(slab) - (slab - 1) / 2.0) * _SLAB_STEP_MM
    out = np.empty((3, slab, size, size, 3), np.float64)
    for v, (a, b, n) in enumerate(((0, 1, 2), (0, 2, 1), (1, 2, 0))):
        grid_a, grid_b = np.meshgrid(u, u, indexing="ij")
        for k, off in enumerate(s):
            pts = np.broadcast_to(centre, (size, size, 3)).copy()
            pts[..., a] += grid_a
            pts[..., b] += grid_b
            pts[..., n] += off
            out[v, k] = pts
    return out


def context_views(image: np.ndarray | torch.Tensor, affine: np.ndarray, *, size: int = VIEW_SIZE,
                  spacing: float = VIEW_SPACING_MM, slab: int = VIEW_SLAB, check: bool = True) -> torch.Tensor:
    """[3, size, size] float32 views (axial, coronal, sagittal) of a [I, J, K] volume with a 4 x 4 affine."""
    vol = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image).float()
    affine = np.asarray(affine, dtype=np.float64)
    if check:
        check_volume(vol.numpy() if vol.device.type == "cpu" else vol.cpu().numpy(), affine)
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    # never wider than the axis itself (a single slice, a thin slab)
    kernel = tuple(int(min(n, max(1, np.floor(spacing / max(v, 1e-6))))) for v, n in zip(vox, vol.shape))
    vol5 = vol[None, None]
    if any(k > 1 for k in kernel):
        vol5 = F.avg_pool3d(vol5, kernel_size=kernel, stride=kernel, ceil_mode=True, count_include_pad=False)
    # the pooled grid: voxel (i, j, k) covers input voxels [i*k0, (i+1)*k0); its centre in input index space
    scale = np.diag([*kernel, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = (np.asarray(kernel) - 1) / 2.0
    pooled_affine = affine @ shift @ scale
    shape = np.asarray(vol.shape, np.float64)
    centre = (affine @ np.append((shape - 1) / 2.0, 1.0))[:3]
    pts = _plane_points(centre, size, spacing, slab)
    ijk = (np.linalg.inv(pooled_affine) @ np.concatenate([pts.reshape(-1, 3).T, np.ones((1, pts[..., 0].size))]))[:3]
    pshape = np.asarray(vol5.shape[2:], np.float64)
    # grid_sample wants (x, y, z) = (last, middle, first) array axes in [-1, 1] (align_corners=True)
    norm = 2.0 * ijk / np.maximum(pshape[:, None] - 1, 1) - 1.0
    grid = torch.from_numpy(norm[::-1].T.copy()).float().reshape(1, 1, 1, -1, 3)
    inside = torch.from_numpy(np.all(np.abs(norm) <= 1.0 + 1e-6, axis=0))
    if not bool(inside.any()):
        # a volume smaller than one view pixel (a single voxel, a tiny slab): the pixels within half a pixel of its
        # extent (voxels have extent: index -0.5 .. n - 0.5) see it
        tol = (spacing / 2.0) / np.maximum(np.linalg.norm(pooled_affine[:3, :3], axis=0), 1e-6)
        inside = torch.from_numpy(np.all((ijk >= -0.5 - tol[:, None]) & (ijk <= pshape[:, None] - 0.5 + tol[:, None]),
                                         axis=0))
    values = F.grid_sample(vol5, grid, mode="bilinear", padding_mode="border", align_corners=True).reshape(-1)
    if not bool(inside.any()):
        raise ValueError("the volume's field of view does not reach its own centre planes")  # pragma: no cover
    finite = values[inside]
    lo, hi = torch.quantile(finite, torch.tensor([0.01, 0.99]))
    scaled = ((values - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
    scaled = torch.where(inside, scaled, torch.zeros_like(scaled))
    return scaled.reshape(3, slab, size, size).mean(1).contiguous()
