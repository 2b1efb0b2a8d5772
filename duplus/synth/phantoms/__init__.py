"""Procedural, seeded phantoms: labelled 3D CT, MR and PET volumes for training and tests.

No labelled CT/PET data can be downloaded here, so the segmentation stack trains and is
tested on volumes drawn by this package.  Each case is a small synthetic patient:

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

Modules (everything public is re-exported here; names starting with ``_`` are internal):

* :mod:`~duplus.synth.phantoms.acquisition`: regions, modalities, structures, :class:`AcquisitionSpec`,
  :class:`ScannerProfile`,
  :func:`random_acquisition`, the seeded random streams (:func:`anatomy_rng`).
* :mod:`~duplus.synth.phantoms.geometry`: voxel grid, smooth world fields and deformations, implicit shapes.
* :mod:`~duplus.synth.phantoms.anatomy`: tissue classes, the canvas, the :class:`Anatomy` base class.
* :mod:`~duplus.synth.phantoms.abdomen`, :mod:`~duplus.synth.phantoms.head_neck`: the two anatomies.
* :mod:`~duplus.synth.phantoms.render`: CT / MR / PET physics.
* :mod:`~duplus.synth.phantoms.generate`: :class:`Phantom` and :func:`generate_phantom`.
* :mod:`~duplus.synth.phantoms.petct`: paired head-and-neck PET/CT from simulated centres (:data:`CENTRES`),
  :func:`generate_petct`, :func:`write_hecktor_dataset` (HECKTOR layout).
* :mod:`~duplus.synth.phantoms.decathlon`: :func:`save_nifti`, :func:`case_seed`, :func:`write_decathlon_dataset`.
* :mod:`~duplus.synth.phantoms.preview`: :func:`preview_png`.
* :mod:`~duplus.synth.phantoms.cli` (run by ``__main__``): :func:`main`.
"""

from __future__ import annotations

from duplus.synth.phantoms.abdomen import AbdomenAnatomy
from duplus.synth.phantoms.acquisition import (
    HARD_MAX_VOXELS,
    MODALITIES,
    MR_SEQUENCES,
    REGION_MODALITIES,
    REGIONS,
    SPACING_RANGE_MM,
    STRUCTURES,
    TARGET_MAX_VOXELS,
    AcquisitionSpec,
    ScannerProfile,
    anatomy_rng,
    random_acquisition,
)
from duplus.synth.phantoms.anatomy import Anatomy
from duplus.synth.phantoms.cli import main
from duplus.synth.phantoms.decathlon import DECATHLON_MODALITY, case_seed, save_nifti, write_decathlon_dataset
from duplus.synth.phantoms.generate import Phantom, generate_phantom
from duplus.synth.phantoms.head_neck import HeadNeckAnatomy
from duplus.synth.phantoms.petct import (
    CENTRES,
    HECKTOR_LABELS,
    Centre,
    PetCtPair,
    generate_petct,
    write_hecktor_dataset,
)
from duplus.synth.phantoms.preview import preview_png

__all__ = [
    "MODALITIES",
    "REGIONS",
    "STRUCTURES",
    "REGION_MODALITIES",
    "MR_SEQUENCES",
    "DECATHLON_MODALITY",
    "SPACING_RANGE_MM",
    "TARGET_MAX_VOXELS",
    "HARD_MAX_VOXELS",
    "AcquisitionSpec",
    "ScannerProfile",
    "Centre",
    "CENTRES",
    "HECKTOR_LABELS",
    "PetCtPair",
    "generate_petct",
    "write_hecktor_dataset",
    "Phantom",
    "Anatomy",
    "AbdomenAnatomy",
    "HeadNeckAnatomy",
    "anatomy_rng",
    "case_seed",
    "random_acquisition",
    "generate_phantom",
    "save_nifti",
    "write_decathlon_dataset",
    "preview_png",
    "main",
]
