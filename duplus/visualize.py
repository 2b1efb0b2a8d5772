"""PNG overlays of label maps on their image, oriented from the affine whatever the input's axes.

Display conventions, as PACS viewers show them:
- **radiological** (default): axial and coronal views with the patient's right on the image's left, as if
  facing the patient (how radiologists read);
- **neurological**: the patient's right on the image's right.
Sagittal views have anterior on the image's left and superior up in both. Every panel carries its
orientation letters (R/L, A/P, S/I) at its edges and the figure says which convention it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONVENTIONS = ("radiological", "neurological")

COLOURS = np.array([[0.90, 0.30, 0.20], [0.20, 0.60, 0.95], [0.25, 0.80, 0.35], [0.95, 0.75, 0.15],
                    [0.70, 0.35, 0.85], [0.10, 0.80, 0.80], [0.95, 0.45, 0.70], [0.55, 0.55, 0.20],
                    [0.40, 0.40, 0.95]])


def _canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(volume, ornt)


@dataclass(frozen=True)
class View:
    """One displayed slice: arrays as shown (row 0 at the top), and the patient direction at each edge."""

    name: str                       # axial | coronal | sagittal
    image: np.ndarray               # [rows, columns]
    labels: np.ndarray
    truth: np.ndarray | None
    aspect: float                   # height / width of one pixel, for imshow
    left: str
    right: str
    top: str
    bottom: str


def display_views(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, *, truth: np.ndarray | None = None,
                  convention: str = "radiological", centre: tuple[int, int, int] | None = None) -> list[View]:
    """Axial, coronal and sagittal slices through ``centre`` (default: the labelled region's centre), as displayed.

    The volume is first reoriented to RAS+ from its affine (array index 0 growing towards the patient's right,
    1 towards anterior, 2 towards superior, to the nearest axis), then each slice is laid out with
    superior (axial: anterior) up, and the patient's left-right axis as ``convention`` says.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    img = _canonical(np.asarray(image, dtype=np.float32), affine)
    lab = _canonical(np.asarray(labels), affine)
    tru = _canonical(np.asarray(truth), affine) if truth is not None else None
    if centre is None:
        ref = lab if lab.any() else (tru if tru is not None and tru.any() else None)
        centre = tuple(np.argwhere(ref > 0).mean(0).astype(int)) if ref is not None else tuple(np.array(img.shape) // 2)
    vox = np.abs(np.asarray(affine)[:3, :3])
    sizes = [float(np.linalg.norm(np.asarray(affine)[:3, i])) for i in range(3)]
    mm = [0.0, 0.0, 0.0]   # voxel size along each RAS axis of the canonical array
    for arr_axis in range(3):
        mm[int(vox[:, arr_axis].argmax())] = sizes[arr_axis]
    radiological = convention == "radiological"
    views = []
    # (name, fixed axis, horizontal axis, vertical axis); canonical index grows towards R (0), A (1), S (2)
    for name, axis, h, v in (("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2)):
        idx = [slice(None)] * 3
        idx[axis] = int(np.clip(centre[axis], 0, img.shape[axis] - 1))

        def lay_out(vol, h=h, v=v, idx=tuple(idx)):
            if vol is None:
                return None
            plane = vol[idx]                         # [h, v] in canonical order (the fixed axis removed)
            plane = plane.T[::-1]                    # rows: v decreasing (S or A at the top); columns: h increasing
            flip = (h == 0 and radiological) or h == 1   # R on the left (radiological); A on the left (sagittal)
            return np.ascontiguousarray(plane[:, ::-1] if flip else plane)

        if h == 0:
            left, right = ("R", "L") if radiological else ("L", "R")
        else:
            left, right = "A", "P"
        top, bottom = ("A", "P") if v == 1 else ("S", "I")
        views.append(View(name, lay_out(img), lay_out(lab), lay_out(tru), mm[v] / mm[h], left, right, top, bottom))
    return views


def overlay_png(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, path: str | Path,
                names: tuple[str, ...] | list[str], *, truth: np.ndarray | None = None, title: str = "",
                window: tuple[float, float] | None = None, convention: str = "radiological") -> Path:
    """Axial, coronal and sagittal slices through the labelled region; predictions filled, truth outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    views = display_views(image, labels, affine, truth=truth, convention=convention)
    lo, hi = window or tuple(np.percentile(np.asarray(image, dtype=np.float32), [1, 99.5]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, view in zip(axes, views):
        ax.imshow(view.image, cmap="gray", vmin=lo, vmax=hi, aspect=view.aspect)
        rgba = np.zeros(view.labels.shape + (4,))
        for v in range(1, len(names) + 1):
            rgba[view.labels == v, :3] = COLOURS[(v - 1) % len(COLOURS)]
            rgba[view.labels == v, 3] = 0.45
        ax.imshow(rgba, aspect=view.aspect)
        if view.truth is not None:
            for v in range(1, len(names) + 1):
                if (view.truth == v).any():
                    ax.contour(view.truth == v, levels=[0.5], colors=[COLOURS[(v - 1) % len(COLOURS)]],
                               linewidths=1.0)
        style = dict(color="yellow", fontsize=11, fontweight="bold", transform=ax.transAxes)
        ax.text(0.01, 0.5, view.left, ha="left", va="center", **style)
        ax.text(0.99, 0.5, view.right, ha="right", va="center", **style)
        ax.text(0.5, 0.99, view.top, ha="center", va="top", **style)
        ax.text(0.5, 0.01, view.bottom, ha="center", va="bottom", **style)
        ax.set_title(view.name)
        ax.axis("off")
    handles = [Patch(color=COLOURS[i % len(COLOURS)], label=n) for i, n in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 7), fontsize=9)
    side = "patient's right on the image's left" if convention == "radiological" else \
        "patient's right on the image's right"
    fig.suptitle(f"{title}  ({'fill: prediction, outline: ground truth; ' if truth is not None else ''}"
                 f"{convention} convention: {side})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
