"""PNG overlays of label maps on their image, shown in RAS orientation whatever the input's axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = np.array([[0.90, 0.30, 0.20], [0.20, 0.60, 0.95], [0.25, 0.80, 0.35], [0.95, 0.75, 0.15],
                    [0.70, 0.35, 0.85], [0.10, 0.80, 0.80], [0.95, 0.45, 0.70], [0.55, 0.55, 0.20],
                    [0.40, 0.40, 0.95]])


def _canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(volume, ornt)


def overlay_png(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, path: str | Path,
                names: tuple[str, ...] | list[str], *, truth: np.ndarray | None = None, title: str = "",
                window: tuple[float, float] | None = None) -> Path:
    """Axial, coronal and sagittal slices through the labelled region; predictions filled, truth outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img = _canonical(np.asarray(image, dtype=np.float32), affine)
    lab = _canonical(np.asarray(labels), affine)
    tru = _canonical(np.asarray(truth), affine) if truth is not None else None
    ref = lab if lab.any() else (tru if tru is not None and tru.any() else None)
    centre = (np.argwhere(ref > 0).mean(0).astype(int) if ref is not None else np.array(img.shape) // 2)
    lo, hi = window or tuple(np.percentile(img, [1, 99.5]))
    vox = np.abs(np.asarray(affine)[:3, :3])
    sizes = [float(np.linalg.norm(np.asarray(affine)[:3, i])) for i in range(3)]
    order = [int(vox[:, i].argmax()) for i in range(3)]  # world axis of each array axis
    mm = [0.0, 0.0, 0.0]
    for arr_axis, world_axis in enumerate(order):
        mm[world_axis] = sizes[arr_axis]
    views = [("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, (name, axis, (a, b)) in zip(axes, views):
        idx = [slice(None)] * 3
        idx[axis] = int(np.clip(centre[axis], 0, img.shape[axis] - 1))
        s_img = img[tuple(idx)].T
        s_lab = lab[tuple(idx)].T
        ax.imshow(s_img, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=mm[b] / mm[a])
        rgba = np.zeros(s_lab.shape + (4,))
        for v in range(1, len(names) + 1):
            rgba[s_lab == v, :3] = COLOURS[(v - 1) % len(COLOURS)]
            rgba[s_lab == v, 3] = 0.45
        ax.imshow(rgba, origin="lower", aspect=mm[b] / mm[a])
        if tru is not None:
            s_tru = tru[tuple(idx)].T
            for v in range(1, len(names) + 1):
                if (s_tru == v).any():
                    ax.contour(s_tru == v, levels=[0.5], colors=[COLOURS[(v - 1) % len(COLOURS)]], linewidths=1.0)
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=COLOURS[i % len(COLOURS)], label=n) for i, n in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 7), fontsize=9)
    fig.suptitle(title + ("  (fill: prediction, outline: ground truth; display in RAS: image right = patient right)"
                          if truth is not None else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
