"""Paired head-and-neck PET/CT from simulated centres, and HECKTOR-layout folders: :func:`generate_petct`.

As in HECKTOR (the MICCAI head-and-neck PET/CT challenge), the CT of a PET/CT is a low-dose,
non-contrast scan on which the primary tumour (GTVp) and the nodes (GTVn) are nearly isodense
with muscle, while on FDG-PET they are the hottest things in the neck.  One ``anatomy_seed`` is
imaged twice: a CT on a fine grid and a PET on its own coarser grid, both in the same frame of
reference (world millimetres), so the pair is co-registered the way a hybrid scanner's is.

A :class:`Centre` is what differs between hospitals: CT pixel size and slice thickness,
reconstruction kernel, noise, PET voxel size, system resolution and SUV calibration, and how the
arrays are stored (flips).  :data:`CENTRES` holds six, ``A`` to ``F``; PEMMA pretrains on A-D
(CT), adapts on E (PET/CT) and updates on F.  Labels follow HECKTOR: 1 = GTVp ("primary
tumour"), 2 = GTVn ("lymph node"), on the CT's grid.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duplus.synth.phantoms.acquisition import AcquisitionSpec, ScannerProfile, _check_seed
from duplus.synth.phantoms.decathlon import case_seed, save_nifti
from duplus.synth.phantoms.generate import Phantom, generate_phantom

logger = logging.getLogger("duplus.synth.phantoms")

#: HECKTOR's label values.
HECKTOR_LABELS = {1: "primary tumour", 2: "lymph node"}


@dataclass(frozen=True)
class Centre:
    """One simulated hospital: its PET/CT scanner and protocol.

    Spacings are (x, y, z) mm of axial acquisitions; ``flips`` says which array axes run against
    the world axis (DICOM's LPS storage gives x and y flipped in RAS).  ``ct_noise`` and
    ``pet_noise`` scale each modality's typical noise; each case jitters them by up to 20 %.
    """

    name: str
    description: str
    ct_spacing: tuple[float, float, float]
    pet_spacing: tuple[float, float, float]
    flips: tuple[bool, bool, bool]
    ct_noise: float
    pet_noise: float
    scanner: ScannerProfile = field(default_factory=ScannerProfile)


_NON_CONTRAST = (5.0, 20.0)  # GTV attenuation above muscle on the CT of a PET/CT (HU)

CENTRES: dict[str, Centre] = {
    c.name: c
    for c in (
        Centre("A", "sharp kernel, 3 mm slices; PET 4 mm, 5.5 mm FWHM", (0.98, 0.98, 3.0), (4.0, 4.0, 4.0),
               (True, True, False), 1.0, 1.0, ScannerProfile(_NON_CONTRAST, 0.8, 5.5, 1.0)),
        Centre("B", "smooth kernel, 2 mm slices, low noise; PET 2.7 mm, 4.5 mm FWHM, reads 8 % high",
               (1.17, 1.17, 2.0), (2.73, 2.73, 3.27), (False, False, False), 0.7, 0.8,
               ScannerProfile(_NON_CONTRAST, 2.0, 4.5, 1.08)),
        Centre("C", "fine pixels, 5 mm slices, noisy; PET 4.7 mm, 7 mm FWHM, reads 8 % low",
               (0.8, 0.8, 5.0), (4.7, 4.7, 3.3), (True, True, False), 1.4, 1.3,
               ScannerProfile(_NON_CONTRAST, 1.0, 7.0, 0.92)),
        Centre("D", "1.4 mm pixels, 3.75 mm slices; PET 4 x 4 x 2 mm, 6 mm FWHM", (1.37, 1.37, 3.75),
               (4.0, 4.0, 2.0), (False, True, False), 0.9, 1.0, ScannerProfile(_NON_CONTRAST, 1.5, 6.0, 1.0)),
        Centre("E", "thin 1.5 mm slices, noisy; PET 3.65 mm, 5 mm FWHM, reads 12 % high", (0.98, 0.98, 1.5),
               (3.65, 3.65, 3.27), (True, True, False), 1.2, 1.1, ScannerProfile(_NON_CONTRAST, 0.8, 5.0, 1.12)),
        Centre("F", "digital PET 2 mm, 3.5 mm FWHM, reads 5 % low; smooth CT kernel, 2.5 mm slices",
               (1.2, 1.2, 2.5), (2.0, 2.0, 2.0), (False, False, False), 0.8, 0.7,
               ScannerProfile(_NON_CONTRAST, 1.2, 3.5, 0.95)),
    )
}


@dataclass(frozen=True, eq=False)
class PetCtPair:
    """One patient imaged on one centre's PET/CT: ``ct`` and ``pet`` share ``anatomy_seed``."""

    case_id: str
    centre: str
    ct: Phantom
    pet: Phantom

    @property
    def label(self) -> np.ndarray:
        """HECKTOR labels (1 GTVp, 2 GTVn) on the CT's grid."""
        return self.ct.label


def _centre(centre: str | Centre) -> Centre:
    if isinstance(centre, Centre):
        return centre
    if centre not in CENTRES:
        raise ValueError(f"unknown centre {centre!r}; expected one of {tuple(CENTRES)}")
    return CENTRES[centre]


def generate_petct(centre: str | Centre, seed: int, *, anatomy_seed: int | None = None,
                   case_id: str | None = None) -> PetCtPair:
    """Image one head-and-neck patient (``anatomy_seed``, default ``seed``) on ``centre``'s PET/CT.

    The CT and the PET draw their noise from different streams of ``seed``; the anatomy (and so
    the labels, in world space) is the same.
    """
    c = _centre(centre)
    seed = _check_seed("seed", seed)
    anatomy_seed = seed if anatomy_seed is None else _check_seed("anatomy_seed", anatomy_seed)
    rng = np.random.default_rng([seed, 0x9E7C])
    jitter = rng.uniform(0.8, 1.2, 2)
    ct_acq = AcquisitionSpec(c.ct_spacing, (0, 1, 2), c.flips, float(c.ct_noise * jitter[0]))
    pet_acq = AcquisitionSpec(c.pet_spacing, (0, 1, 2), c.flips, float(c.pet_noise * jitter[1]))
    ct = generate_phantom("head_neck", "CT", seed, acquisition=ct_acq, anatomy_seed=anatomy_seed, scanner=c.scanner)
    pet = generate_phantom("head_neck", "PET", case_seed(seed, 1), acquisition=pet_acq, anatomy_seed=anatomy_seed,
                           scanner=c.scanner)
    return PetCtPair(case_id or f"{c.name}-{seed}", c.name, ct, pet)


def write_hecktor_dataset(root, centre: str | Centre, n_cases: int, seed: int, *, progress: bool = True) -> Path:
    """Write ``n_cases`` PET/CT pairs of ``centre`` in HECKTOR's layout; return ``root``.

    ``imagesTr/<id>__CT.nii.gz``, ``imagesTr/<id>__PT.nii.gz`` and ``labelsTr/<id>.nii.gz`` with
    ``<id> = <centre>-<index:03d>`` (HECKTOR's ``CHUM-001``), and ``cases.json`` with every case's
    seeds and anatomy facts.  Case ``i`` is :func:`generate_petct` of ``case_seed(seed, i)``.
    Cases already on disk with the same seed are kept (the call is idempotent).
    """
    c = _centre(centre)
    seed = _check_seed("seed", seed)
    if isinstance(n_cases, bool) or not isinstance(n_cases, int | np.integer) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got n_cases={n_cases!r}")
    root = Path(root)
    manifest_path = root / "cases.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"cases": []}
    known = {(e["id"], e["seed"]) for e in manifest["cases"]}
    indices = range(int(n_cases))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"centre {c.name}", unit="pair")
    entries = []
    for i in indices:
        seed_i = case_seed(seed, i)
        case_id = f"{c.name}-{i:03d}"
        ct_path = root / "imagesTr" / f"{case_id}__CT.nii.gz"
        pet_path = root / "imagesTr" / f"{case_id}__PT.nii.gz"
        label_path = root / "labelsTr" / f"{case_id}.nii.gz"
        if (case_id, seed_i) not in known or not all(p.is_file() for p in (ct_path, pet_path, label_path)):
            pair = generate_petct(c, seed_i, case_id=case_id)
            save_nifti(pair.ct, ct_path, label_path)
            save_nifti(pair.pet, pet_path)
            factors = pair.ct.factors
        else:
            factors = next(e["factors"] for e in manifest["cases"] if e["id"] == case_id)
        entries.append({"id": case_id, "centre": c.name, "seed": seed_i, "anatomy_seed": seed_i, "factors": factors})
    others = [e for e in manifest["cases"] if e["centre"] != c.name]
    manifest = {
        "description": "Procedural head-and-neck PET/CT pairs in HECKTOR layout (duplus.synth.phantoms.petct)",
        "labels": {"0": "background", **{str(k): v for k, v in HECKTOR_LABELS.items()}},
        "centres": {name: CENTRES[name].description for name in sorted({e["centre"] for e in others + entries})
                    if name in CENTRES},
        "cases": others + entries,
    }
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    logger.info("wrote %d PET/CT pairs of centre %s to %s", len(entries), c.name, root)
    return root
