"""Medical Segmentation Decathlon output: NIfTI writing, per-case seeds and whole tasks."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from duplus.synth.phantoms.acquisition import (
    MR_SEQUENCES,
    STRUCTURES,
    _acquisition_rngs,
    _check_combination,
    _check_seed,
    random_acquisition,
)
from duplus.synth.phantoms.generate import Phantom, generate_phantom

logger = logging.getLogger("duplus.synth.phantoms")  # stable name also under `python -m`

#: Decathlon's dataset.json spells MR as "MRI".
DECATHLON_MODALITY = {"CT": "CT", "MR": "MRI", "PET": "PET"}


def save_nifti(phantom: Phantom, image_path, label_path=None) -> None:
    """Write the image (float32) and label (uint8, unless ``label_path`` is None) as NIfTI-1; the affine goes in
    qform and sform."""
    import nibabel as nib

    items = [(phantom.image, image_path, np.float32)]
    if label_path is not None:
        items.append((phantom.label, label_path, np.uint8))
    for data, path, dtype in items:
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


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a data set drawn with ``seed`` (the Decathlon writer's and the cohort's)."""
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
        seed_i = case_seed(seed, i)
        anatomy_seed = seed_i if anatomy_seeds is None else anatomy_seeds[i]
        acquisition = None
        if sequence is not None:
            acquisition = dataclasses.replace(
                random_acquisition(_acquisition_rngs(seed_i)[0], modality, region), sequence=sequence
            )
        phantom = generate_phantom(region, modality, seed_i, acquisition=acquisition, anatomy_seed=anatomy_seed)
        phantom = dataclasses.replace(phantom, label=remap[phantom.label])
        name = f"{task_name}_{i:03d}.nii.gz"
        save_nifti(phantom, task_dir / "imagesTr" / name, task_dir / "labelsTr" / name)
        training.append(
            {
                "image": f"./imagesTr/{name}",
                "label": f"./labelsTr/{name}",
                "seed": seed_i,
                "anatomy_seed": anatomy_seed,
                "sequence": phantom.sequence,
                "spacing": [round(s, 4) for s in phantom.spacing],
                "factors": phantom.factors,
            }
        )
        logger.debug("wrote %s", name)

    description = f"Procedural {modality} phantoms of the {region.replace('_', ' and ')} (duplus.synth.phantoms)"
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
