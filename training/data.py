"""Data sets in Medical Segmentation Decathlon layout (dataset.json + NIfTI), real or phantom.

A data set may label only some structures (partial labels, e.g. a spleen-only set next to a
multi-organ set): each label name is mapped to a canonical target through the prompt
vocabulary's synonyms, and training asks a data set only about the targets it labels.
Multi-channel Decathlon images (e.g. prostate T2 + ADC) give one record per channel.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from duplus.vocabulary import REGIONS, canonical_target

log = logging.getLogger(__name__)

DECATHLON_MODALITIES = {"CT": "CT", "MRI": "MR", "MR": "MR", "T1": "MR", "T2": "MR", "T1W": "MR", "T2W": "MR",
                        "FLAIR": "MR", "T1GD": "MR", "ADC": "MR", "PET": "PET", "FDG-PET": "PET"}
REGION_KEYWORDS = {"abdomen": ("liver", "spleen", "pancreas", "kidney", "abdom", "colon", "hepatic", "btcv"),
                   "head_neck": ("head and neck", "head_neck", "hecktor", "oropharyn", "neck")}


@dataclass(frozen=True)
class CaseRecord:
    """One single-modality image (+ its label map) ready for preprocessing."""

    case_id: str
    image: Path
    label: Path | None
    modality: str
    region: str
    dataset: str
    targets: dict[int, str] = field(default_factory=dict)  # label value -> canonical target
    sequence: str | None = None
    channel: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"case {self.case_id}: unknown region {self.region!r}; expected one of {REGIONS}")


def _guess_region(meta: dict) -> str | None:
    text = " ".join(str(meta.get(k, "")) for k in ("name", "description", "reference")).lower()
    for region, words in REGION_KEYWORDS.items():
        if any(w in text for w in words):
            return region
    return None


def load_decathlon(path: str | Path, *, region: str | None = None) -> list[CaseRecord]:
    """Read a Decathlon-style ``dataset.json`` (or the folder holding it) into case records."""
    path = Path(path)
    json_path = path / "dataset.json" if path.is_dir() else path
    if not json_path.is_file():
        raise FileNotFoundError(f"no dataset.json at {json_path}")
    meta = json.loads(json_path.read_text())
    root = json_path.parent
    for key in ("modality", "labels", "training"):
        if key not in meta:
            raise ValueError(f"{json_path}: missing Decathlon field {key!r}")
    region = region or meta.get("region") or _guess_region(meta)
    if region is None:
        raise ValueError(f"{json_path}: cannot tell the body region; pass region= (one of {REGIONS})")
    channels: dict[int, str] = {}
    for ch, name in sorted(meta["modality"].items(), key=lambda kv: int(kv[0])):
        key = str(name).upper().replace(" ", "")
        if key not in DECATHLON_MODALITIES:
            raise ValueError(f"{json_path}: unsupported modality {name!r} in channel {ch}")
        channels[int(ch)] = DECATHLON_MODALITIES[key]
    targets: dict[int, str] = {}
    for value, name in meta["labels"].items():
        if int(value) == 0:
            continue
        target = canonical_target(str(name))
        if target is None:
            log.warning("%s: label %s=%r is not in the prompt vocabulary; it is not trained", json_path, value, name)
            continue
        targets[int(value)] = target
    name = str(meta.get("name", root.name))
    records = []
    for entry in meta["training"]:
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        case_id = Path(entry["image"]).name.split(".nii")[0]
        for ch, modality in channels.items():
            seq = entry.get("sequence")
            if seq is None and modality == "MR":
                seq = {"T1": "T1", "T1W": "T1", "T1GD": "T1", "T2": "T2", "T2W": "T2"}.get(
                    str(meta["modality"][str(ch)]).upper().replace(" ", ""))
            records.append(CaseRecord(
                case_id=case_id if len(channels) == 1 else f"{case_id}_ch{ch}", image=image, label=label,
                modality=modality, region=region, dataset=name, targets=dict(targets), sequence=seq,
                channel=ch if len(channels) > 1 else None, seed=entry.get("seed")))
    log.info("%s: %d cases, modalities %s, region %s, targets %s", name, len(records),
             sorted(set(channels.values())), region, sorted(targets.values()))
    return records


def read_case(record: CaseRecord):
    """Load (image array, label array or None, affine) with nibabel."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(record.image))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if record.channel is not None:
        data = data[..., record.channel]
    if data.ndim != 3:
        raise ValueError(f"{record.image}: expected a 3-D image (or 4-D with channels), got shape {data.shape}")
    label = None
    if record.label is not None:
        label = np.asarray(nib.load(str(record.label)).dataobj).astype(np.uint8)
        if label.shape != data.shape:
            raise ValueError(f"{record.label}: label shape {label.shape} differs from image shape {data.shape}")
    return data, label, img.affine.astype(np.float64)


# --------------------------------------------------------------------------------------
# HECKTOR layout: paired PET/CT, one label on the CT's grid
# --------------------------------------------------------------------------------------

#: HECKTOR's label values and the prompt vocabulary's targets for them.
HECKTOR_TARGETS = {1: "primary tumour", 2: "lymph node"}


@dataclass(frozen=True)
class PetCtRecord:
    """One HECKTOR case: CT and/or PET of one patient (same frame of reference) and the label on the CT's grid."""

    case_id: str
    centre: str
    ct: Path | None
    pet: Path | None
    label: Path | None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.ct is None and self.pet is None:
            raise ValueError(f"case {self.case_id}: neither a CT nor a PET image")


def load_hecktor(path: str | Path) -> list[PetCtRecord]:
    """Read a HECKTOR-layout folder: ``<id>__CT.nii.gz``, ``<id>__PT.nii.gz`` and the label ``<id>.nii.gz``.

    Images may sit in ``imagesTr/`` (labels in ``labelsTr/``) or all in one folder; the centre is
    the part of ``<id>`` before the first ``-`` (HECKTOR's ``CHUM-001``).  A ``cases.json`` (as
    :func:`duplus.synth.phantoms.write_hecktor_dataset` writes) adds each case's seed.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no HECKTOR folder at {root}")
    images = root / "imagesTr" if (root / "imagesTr").is_dir() else root
    labels = root / "labelsTr" if (root / "labelsTr").is_dir() else images
    seeds = {}
    if (root / "cases.json").is_file():
        seeds = {e["id"]: e.get("seed") for e in json.loads((root / "cases.json").read_text()).get("cases", [])}
    ids = sorted({p.name.split("__")[0] for p in images.glob("*__*.nii*")})
    records = []
    for case_id in ids:
        def find(folder: Path, stem: str) -> Path | None:
            for suffix in (".nii.gz", ".nii"):
                if (folder / f"{stem}{suffix}").is_file():
                    return (folder / f"{stem}{suffix}").resolve()
            return None

        ct, pet = find(images, f"{case_id}__CT"), find(images, f"{case_id}__PT")
        if ct is None and pet is None:
            log.warning("%s: %s has neither __CT nor __PT; skipped", root, case_id)
            continue
        records.append(PetCtRecord(case_id=case_id, centre=case_id.split("-")[0], ct=ct, pet=pet,
                                   label=find(labels, case_id), seed=seeds.get(case_id)))
    if not records:
        raise ValueError(f"{root}: no <id>__CT.nii.gz / <id>__PT.nii.gz files (HECKTOR layout)")
    log.info("%s: %d PET/CT cases from centres %s", root, len(records), sorted({r.centre for r in records}))
    return records


def read_petct(record: PetCtRecord):
    """Load ``(ct, ct_affine, pet, pet_affine, label)`` with nibabel (None for what the case lacks)."""
    import nibabel as nib
    import numpy as np

    def read(path):
        if path is None:
            return None, None
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 3-D image, got shape {data.shape}")
        return data, img.affine.astype(np.float64)

    ct, ct_affine = read(record.ct)
    pet, pet_affine = read(record.pet)
    label = None
    if record.label is not None:
        label = np.asarray(nib.load(str(record.label)).dataobj).astype(np.uint8)
        reference = ct if ct is not None else pet
        if label.shape != reference.shape:
            raise ValueError(f"{record.label}: label shape {label.shape} differs from the "
                             f"{'CT' if ct is not None else 'PET'} shape {reference.shape}")
    return ct, ct_affine, pet, pet_affine, label
