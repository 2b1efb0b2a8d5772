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
