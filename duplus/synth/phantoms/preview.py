"""PNG previews of a phantom: axial, coronal and sagittal slices with a label overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duplus.synth.phantoms.generate import Phantom

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
