"""One labelled case: :class:`Phantom` and :func:`generate_phantom` (anatomy, grid, painting, rendering)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from duplus.synth.phantoms.abdomen import AbdomenAnatomy
from duplus.synth.phantoms.acquisition import (
    HARD_MAX_VOXELS,
    MR_SEQUENCES,
    REGION_MODALITIES,
    STRUCTURES,
    AcquisitionSpec,
    ScannerProfile,
    _acquisition_rngs,
    _check_combination,
    _check_seed,
    anatomy_rng,
    random_acquisition,
)
from duplus.synth.phantoms.anatomy import Anatomy, _Canvas
from duplus.synth.phantoms.geometry import _Grid
from duplus.synth.phantoms.head_neck import HeadNeckAnatomy
from duplus.synth.phantoms.render import _RENDERERS

logger = logging.getLogger("duplus.synth.phantoms")  # stable name also under `python -m`


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


_ANATOMIES: dict[str, type[Anatomy]] = {"abdomen": AbdomenAnatomy, "head_neck": HeadNeckAnatomy}


def generate_phantom(
    region: str,
    modality: str,
    seed: int,
    *,
    acquisition: AcquisitionSpec | None = None,
    anatomy_seed: int | None = None,
    scanner: ScannerProfile | None = None,
    any_modality: bool = False,
) -> Phantom:
    """Draw one labelled case.

    The anatomy comes only from ``anatomy_seed`` (default: ``seed``); the acquisition (when
    not given) and the noise come from ``seed``.  Two calls with the same ``anatomy_seed`` and
    different modalities or acquisitions therefore image the same, co-registered patient.
    ``scanner`` (default: none) sets what a scanner and protocol change beyond grid and noise
    (:class:`ScannerProfile`; the PET/CT centres of :mod:`~duplus.synth.phantoms.petct` use it).
    ``any_modality`` renders the region in any modality, beyond :data:`REGION_MODALITIES` (an abdominal
    PET, a head-and-neck MR): the renderers' physics covers every tissue, and the context classifier
    (:mod:`duplus.context`) needs these combinations as its novel classes; ``acquisition`` is then required.
    """
    _check_combination(region, modality, any_modality)
    if any_modality and acquisition is None and modality not in REGION_MODALITIES[region]:
        raise ValueError(f"any_modality=True for {modality} of {region} needs an explicit acquisition")
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
    anatomy = _ANATOMIES[region](anatomy_rng(anatomy_seed, region))
    grid = _Grid(anatomy.lo, anatomy.hi, acquisition.spacing, acquisition.axis_order, acquisition.flips)
    if grid.size > HARD_MAX_VOXELS:
        raise ValueError(
            f"spacing={acquisition.spacing} gives {grid.size} voxels over this field of view "
            f"(limit {HARD_MAX_VOXELS}); use a coarser spacing"
        )
    canvas = _Canvas(grid, anatomy.deformation)
    anatomy.paint(canvas)
    t1 = time.perf_counter()
    if scanner is not None and not isinstance(scanner, ScannerProfile):
        raise ValueError(f"scanner must be a ScannerProfile or None, got {type(scanner).__name__}")
    image = _RENDERERS[modality](canvas, anatomy, acquisition, render_rng, scanner)
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
