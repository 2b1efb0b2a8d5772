"""Overlays in radiological (default) and neurological convention, from any affine: where the patient's
right, anterior and superior land on the displayed slices, checked on a marked volume and on the
abdomen phantom's liver (patient's right) and spleen (patient's left)."""

import numpy as np
import pytest

from duplus.visualize import display_views, overlay_png

SHAPE = (20, 24, 28)


def _marked(affine_kind: str):
    """A volume whose label 1 sits towards the patient's right, anterior and superior (RAS), under two affines."""
    ras = np.zeros(SHAPE, np.uint8)
    ras[15:18, 17:20, 20:24] = 1            # index grows towards R, A, S: a blob in the R-A-S octant
    if affine_kind == "ras":
        return ras, np.diag([1.0, 1.2, 1.5, 1.0])
    # the same patient stored as DICOM does (LPS order: i towards L, j towards P) with the slice axis first
    lps = ras[::-1, ::-1, :].transpose(2, 0, 1)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 1.5, -1.0, -1.2, 1.0   # array axes -> S, L, P
    return np.ascontiguousarray(lps), affine


def _where(view):
    rows, cols = np.nonzero(view.labels)
    h, w = view.labels.shape
    return rows.mean() / h, cols.mean() / w


@pytest.mark.parametrize("affine_kind", ["ras", "lps_permuted"])
@pytest.mark.parametrize("convention, right_side", [("radiological", "left"), ("neurological", "right")])
def test_patient_directions_on_screen(affine_kind, convention, right_side):
    labels, affine = _marked(affine_kind)
    views = {v.name: v for v in display_views(labels.astype(np.float32), labels, affine, convention=convention)}
    axial, coronal, sagittal = views["axial"], views["coronal"], views["sagittal"]
    for view in (axial, coronal):
        _, col = _where(view)
        assert (col < 0.5) == (right_side == "left"), (view.name, col)      # patient's right where the convention says
        assert (view.left, view.right) == (("R", "L") if right_side == "left" else ("L", "R"))
    row, _ = _where(axial)
    assert row < 0.5 and (axial.top, axial.bottom) == ("A", "P")             # anterior up on the axial view
    row, _ = _where(coronal)
    assert row < 0.5 and (coronal.top, coronal.bottom) == ("S", "I")         # superior up
    row, col = _where(sagittal)
    assert row < 0.5 and col < 0.5 and (sagittal.left, sagittal.top) == ("A", "S")   # anterior left, superior up
    assert axial.image.shape == (SHAPE[1], SHAPE[0]) and sagittal.image.shape == (SHAPE[2], SHAPE[1])
    assert axial.aspect == pytest.approx(1.2) and sagittal.aspect == pytest.approx(1.5 / 1.2)


def test_phantom_liver_on_the_image_left_in_radiological_convention(tmp_path):
    from duplus.synth.phantoms import generate_phantom

    ph = generate_phantom("abdomen", "CT", 7)     # stored with a permuted, flipped (non-RAS) affine
    liver, spleen = ph.label_names.index("liver") + 1, ph.label_names.index("spleen") + 1
    for convention, liver_left in (("radiological", True), ("neurological", False)):
        axial = display_views(ph.image, ph.label, ph.affine, convention=convention)[0]
        cols = {k: np.nonzero(axial.labels == k)[1].mean() for k in (liver, spleen) if (axial.labels == k).any()}
        assert len(cols) == 2, "the axial slice through the labels' centre shows liver and spleen"
        assert (cols[liver] < cols[spleen]) == liver_left
    path = overlay_png(ph.image, ph.label, ph.affine, tmp_path / "o.png", list(ph.label_names), window=(-200, 300))
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="convention must be one of"):
        display_views(ph.image, ph.label, ph.affine, convention="feet-first")
