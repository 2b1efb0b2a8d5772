"""The context classes of a volume: modality (with the MR sequence) x body region.

A class key is the vocabulary's context key ('CT|abdomen', 'MR:T1|head_neck'); its *name* is the plain
context (T1) prompt the segmenter is trained with ('T1-weighted MRI of the head and neck'), so a predicted
class is at once a T1 prompt. Base classes are the five contexts the segmentation data cover; novel classes
are new combinations of words the base classes use (a PET of the abdomen, an MR of the head and neck).
"""

from __future__ import annotations

from dataclasses import dataclass

from duplus.vocabulary import MODALITY_PHRASES, REGION_PHRASES, canonical_t1


@dataclass(frozen=True)
class ContextClass:
    key: str                 # 'MR:T1|abdomen'
    modality: str            # 'CT', 'MR', 'PET'
    sequence: str | None     # 'T1' / 'T2' for MR, else None
    region: str              # 'abdomen', 'head_neck'

    @property
    def name(self) -> str:
        """The class name the text tower reads, also the canonical T1 prompt: 'CT of the abdomen'."""
        return canonical_t1(self.modality, self.region, self.sequence)

    @property
    def modality_key(self) -> str:
        return f"MR:{self.sequence}" if self.sequence else self.modality


def parse_key(key: str) -> ContextClass:
    try:
        mod, region = key.split("|")
    except ValueError:
        raise ValueError(f"context key {key!r} is not 'MODALITY|region'") from None
    if mod not in MODALITY_PHRASES or region not in REGION_PHRASES or mod == "MR":
        raise ValueError(f"unknown context {key!r}")
    modality, _, sequence = mod.partition(":")
    return ContextClass(key, modality, sequence or None, region)


CONTEXT_KEYS: tuple[str, ...] = (
    "CT|abdomen", "MR:T1|abdomen", "MR:T2|abdomen", "PET|abdomen",
    "CT|head_neck", "MR:T1|head_neck", "MR:T2|head_neck", "PET|head_neck",
)
CONTEXT_CLASSES: tuple[ContextClass, ...] = tuple(parse_key(k) for k in CONTEXT_KEYS)
# base: the contexts the segmentation data cover; novel: new combinations of the same words
BASE_KEYS: tuple[str, ...] = ("CT|abdomen", "MR:T1|abdomen", "MR:T2|abdomen", "CT|head_neck", "PET|head_neck")
NOVEL_KEYS: tuple[str, ...] = ("PET|abdomen", "MR:T1|head_neck", "MR:T2|head_neck")


def classes_of(keys) -> tuple[ContextClass, ...]:
    return tuple(parse_key(k) for k in keys)
