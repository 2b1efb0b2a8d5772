"""Prompt vocabulary for the two DuPLUS prompts.

T1 (context) names the imaging modality and the body region, e.g. "CT of the abdomen".
T2 (target) names the structure to segment, e.g. "liver".

Every canonical entry carries paraphrases and synonyms. Training draws from them at
random (prompt augmentation), so that what a user types is not limited to one template.
Following Zeus, each target also has a short *descriptive instruction* drawn from a small
offline knowledge base ("the liver, the large organ of the right upper abdomen"), which
conditions the model in the same way as a bare class name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MODALITIES: tuple[str, ...] = ("CT", "MR", "PET")

# the prompt rules, in one place: what a prompt may be (in-process and served alike) and how a target prompt is
# matched to a trained target (below TARGET_SIMILARITY: unknown; best two within AMBIGUITY_MARGIN: ambiguous)
MAX_PROMPT_CHARS = 256
MAX_PROMPT_TOKENS = 64
TARGET_SIMILARITY = 0.6
AMBIGUITY_MARGIN = 0.05
REGIONS: tuple[str, ...] = ("abdomen", "head_neck")

# modality (+ MR sequence) -> how people write it
MODALITY_PHRASES: dict[str, tuple[str, ...]] = {
    "CT": ("CT", "computed tomography", "CT scan", "contrast-enhanced CT", "CT image", "x-ray CT"),
    "MR:T1": ("T1-weighted MRI", "T1-weighted MR", "T1w MRI", "MRI T1", "T1 weighted magnetic resonance image"),
    "MR:T2": ("T2-weighted MRI", "T2-weighted MR", "T2w MRI", "MRI T2", "T2 weighted magnetic resonance image"),
    "MR": ("MRI", "MR", "magnetic resonance imaging", "MR scan"),
    "PET": ("PET", "FDG PET", "FDG-PET", "positron emission tomography", "18F-FDG PET", "PET scan"),
}

REGION_PHRASES: dict[str, tuple[str, ...]] = {
    "abdomen": ("the abdomen", "abdomen", "the abdominal region", "the upper abdomen", "the abdominal cavity"),
    "head_neck": ("the head and neck", "head and neck", "the neck", "the head-and-neck region", "the oropharynx and neck"),
}

T1_TEMPLATES: tuple[str, ...] = (
    "{modality} of {region}",
    "{modality} scan of {region}",
    "{modality} image of {region}",
    "a {modality} of {region}",
    "{modality} showing {region}",
)

# canonical target -> synonyms (the first is the canonical display name)
TARGET_SYNONYMS: dict[str, tuple[str, ...]] = {
    "liver": ("liver", "the liver", "hepatic parenchyma", "liver parenchyma", "hepar"),
    "spleen": ("spleen", "the spleen", "splenic parenchyma", "lien"),
    "left kidney": ("left kidney", "the left kidney", "kidney left", "left renal parenchyma", "kidney_left", "l kidney"),
    "right kidney": ("right kidney", "the right kidney", "kidney right", "right renal parenchyma", "kidney_right", "r kidney"),
    "aorta": ("aorta", "the aorta", "abdominal aorta", "aortic lumen"),
    "pancreas": ("pancreas", "the pancreas", "pancreatic gland", "pancreatic parenchyma"),
    "stomach": ("stomach", "the stomach", "gastric wall and lumen", "gaster"),
    "primary tumour": ("primary tumour", "primary tumor", "the primary tumour", "GTVp", "primary gross tumour volume",
                       "primary cancer"),
    "lymph node": ("lymph node", "lymph nodes", "metastatic lymph node", "GTVn", "nodal gross tumour volume",
                   "involved cervical lymph nodes", "nodal metastasis"),
}

# targets that are one connected structure in every body: inference keeps the largest connected component of their
# masks (duplus/preprocessing.py keep_largest_components); tumours and lymph nodes may be several lesions
SINGLE_STRUCTURE_TARGETS = frozenset({"liver", "spleen", "left kidney", "right kidney", "aorta", "pancreas", "stomach"})

# Zeus-style instructions: descriptive text from an offline knowledge base.
TARGET_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "liver": ("the liver, the large organ of the right upper abdomen under the diaphragm",),
    "spleen": ("the spleen, an oval organ in the left upper abdomen behind the stomach",),
    "left kidney": ("the left kidney, a bean-shaped organ beside the spine on the left",),
    "right kidney": ("the right kidney, a bean-shaped organ below the liver on the right",),
    "aorta": ("the aorta, the large artery running down in front of the spine",),
    "pancreas": ("the pancreas, an elongated gland lying across the back of the abdomen",),
    "stomach": ("the stomach, the hollow organ of the left upper abdomen",),
    "primary tumour": ("the primary tumour, an FDG-avid mass in the oropharynx",),
    "lymph node": ("a metastatic lymph node in the lateral neck",),
}

# Structures this model does not segment: TotalSegmentator's classes (v2, in words) other than the targets above.
# Their embeddings sit beside the targets' when a target prompt is matched; a prompt nearer to one of them than to
# every target is refused as "not a target" instead of being matched to the nearest target (the gallbladder is
# not the liver). Taken from an external list, not chosen on any prompt set.
NON_TARGETS: tuple[str, ...] = (
    "gallbladder", "left adrenal gland", "right adrenal gland", "upper lobe of the left lung",
    "lower lobe of the left lung", "upper lobe of the right lung", "middle lobe of the right lung",
    "lower lobe of the right lung", "oesophagus", "trachea", "thyroid gland", "small bowel", "duodenum", "colon",
    "urinary bladder", "prostate", "left kidney cyst", "right kidney cyst", "sacrum", "lumbar vertebra",
    "thoracic vertebra", "cervical vertebra", "heart", "pulmonary vein", "brachiocephalic trunk",
    "right subclavian artery", "left subclavian artery", "right common carotid artery", "left common carotid artery",
    "left brachiocephalic vein", "right brachiocephalic vein", "left atrial appendage", "superior vena cava",
    "inferior vena cava", "portal vein and splenic vein", "left iliac artery", "right iliac artery",
    "left iliac vein", "right iliac vein", "left humerus", "right humerus", "left scapula", "right scapula",
    "left clavicle", "right clavicle", "left femur", "right femur", "left hip bone", "right hip bone", "spinal cord",
    "gluteus maximus muscle", "gluteus medius muscle", "gluteus minimus muscle", "autochthonous back muscle",
    "iliopsoas muscle", "brain", "skull", "rib", "sternum", "costal cartilages",
)
NOT_A_TARGET = "not a target: "        # the prefix of a non-target's name among the known target phrasings

_SIDE_WORDS = {"left": ("left", "sinistral", "sinister", "sinistra", "lt", "l"),
               "right": ("right", "dextral", "dexter", "dextra", "rt", "r")}
_BOTH_SIDES = re.compile(r"\b(both|bilateral|bilaterally|each|left and right|right and left)\b")


def laterality(text: str) -> str | None:
    """The side a prompt names: 'left', 'right', 'both' (both sides, or both words) or None.

    Parsed from words before any embedding ("the patient's left kidney", "sinistral kidney", "kidney (right)",
    "right-sided"), because a sentence embedding barely separates left from right."""
    t = re.sub(r"[-_/(),.;:]", " ", normalise_text(text))
    if _BOTH_SIDES.search(t):
        return "both"
    sides = {side for side, words in _SIDE_WORDS.items() if re.search(r"\b(" + "|".join(words) + r")\b", t)}
    if len(sides) == 2:
        return "both"
    return sides.pop() if sides else None


def side_of(target: str) -> str | None:
    """'left' / 'right' for a lateral target ('left kidney'), else None."""
    first = target.split(" ", 1)[0]
    return first if first in ("left", "right") and " " in target else None


def counterpart(target: str) -> str | None:
    """The other side's target of a lateral one ('left kidney' -> 'right kidney'), else None."""
    side = side_of(target)
    if side is None:
        return None
    return ("right" if side == "left" else "left") + target[len(side):]


# which targets exist in which region (used for validation and default target lists)
REGION_TARGETS: dict[str, tuple[str, ...]] = {
    "abdomen": ("liver", "spleen", "left kidney", "right kidney", "aorta", "pancreas", "stomach"),
    "head_neck": ("primary tumour", "lymph node"),
}


def normalise_text(text: str) -> str:
    """Lower-case, collapse whitespace and underscores; used as the embedding-cache key."""
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip().lower()


def validate_prompt(text: str, what: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """Reject empty, non-string or over-long prompts with an error that names the problem."""
    if not isinstance(text, str):
        raise ValueError(f"{what} prompt must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{what} prompt is empty")
    if len(stripped) > max_chars:
        raise ValueError(f"{what} prompt is {len(stripped)} characters long; at most {max_chars} are allowed")
    return stripped


# words that name a modality in a free-text T1 prompt (matched on whole words, after normalise_text)
T1_MODALITY_PATTERNS: dict[str, tuple[str, ...]] = {
    "CT": (r"ct", r"computed tomography", r"cat scan"),
    "MR": (r"mri?", r"magnetic resonance", r"t[12]w", r"t[12][- ]weighted"),
    "PET": (r"pet", r"positron emission( tomography)?", r"(18f[- ])?fdg"),
}


def t1_modality(text: str) -> str | None:
    """The modality a context (T1) prompt names, or None when it names none or more than one.

    The T1 prompt decides which input stem a volume goes through (and FiLM conditions every stage
    on it), as in DuPLUS: the context is a prompt the model follows, so a CT volume sent with
    "MRI of the abdomen" is segmented as MR. "abdominal CT scan" -> CT, "T2w MRI" -> MR,
    "FDG-PET of the neck" -> PET; "PET/CT of the neck" and "scan of the abdomen" -> None, and the
    caller falls back to the modality declared with the volume.
    """
    norm = normalise_text(text)
    named = [m for m, patterns in T1_MODALITY_PATTERNS.items()
             if any(re.search(rf"(?<![a-z0-9]){p}(?![a-z0-9])", norm) for p in patterns)]
    return named[0] if len(named) == 1 else None


def stem_modality(t1: str, modality: str, modalities: tuple[str, ...] | list[str] = MODALITIES) -> str:
    """Which stem a request runs through: the modality its T1 names, else the declared ``modality``.

    A T1 that names a modality the model has no stem for is an error that names it.
    """
    named = t1_modality(t1)
    if named is None:
        return modality
    if named not in modalities:
        raise ValueError(f"context (T1) prompt {t1!r} names modality {named!r}; this model has stems for "
                         f"{list(modalities)}")
    return named


def modality_key(modality: str, sequence: str | None = None) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if modality == "MR" and sequence:
        if sequence not in ("T1", "T2"):
            raise ValueError(f"unknown MR sequence {sequence!r}; expected 'T1' or 'T2'")
        return f"MR:{sequence}"
    return modality


def canonical_t1(modality: str, region: str, sequence: str | None = None) -> str:
    """The plain context prompt, e.g. 'CT of the abdomen'."""
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    return T1_TEMPLATES[0].format(modality=MODALITY_PHRASES[modality_key(modality, sequence)][0],
                                  region=REGION_PHRASES[region][0])


def t1_paraphrases(modality: str, region: str, sequence: str | None = None) -> list[str]:
    """All T1 prompts the vocabulary can write for one context."""
    keys = [modality_key(modality, sequence)]
    if modality == "MR" and sequence:
        keys.append("MR")  # a T1w image may also be called just 'MRI of the abdomen'
    out = []
    for key in keys:
        for mod in MODALITY_PHRASES[key]:
            for reg in REGION_PHRASES[region]:
                for template in T1_TEMPLATES:
                    out.append(template.format(modality=mod, region=reg))
    return out


def t2_paraphrases(target: str, descriptions: bool = True) -> list[str]:
    if target not in TARGET_SYNONYMS:
        raise ValueError(f"unknown target {target!r}; expected one of {tuple(TARGET_SYNONYMS)}")
    out = list(TARGET_SYNONYMS[target])
    if descriptions:
        out += list(TARGET_DESCRIPTIONS.get(target, ()))
    return out


def canonical_target(name: str) -> str | None:
    """Map a label name from a data set (e.g. 'GTVp', 'kidney_left', 'Liver') to a canonical target."""
    key = normalise_text(name)
    for target, synonyms in TARGET_SYNONYMS.items():
        if key in {normalise_text(s) for s in synonyms}:
            return target
    return None


@dataclass(frozen=True)
class PromptVocabulary:
    """The vocabulary a checkpoint was trained with; stored inside the checkpoint."""

    targets: tuple[str, ...] = tuple(TARGET_SYNONYMS)
    target_synonyms: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TARGET_SYNONYMS))
    target_descriptions: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TARGET_DESCRIPTIONS))
    modality_phrases: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(MODALITY_PHRASES))
    region_phrases: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(REGION_PHRASES))

    def __post_init__(self) -> None:
        missing = [t for t in self.targets if t not in self.target_synonyms]
        if missing:
            raise ValueError(f"targets without synonyms in the vocabulary: {missing}")

    def all_t2(self) -> dict[str, list[str]]:
        return {t: list(self.target_synonyms[t]) + list(self.target_descriptions.get(t, ())) for t in self.targets}

    def all_t1(self) -> dict[str, list[str]]:
        """context key ('CT|abdomen', 'MR:T1|abdomen', ...) -> paraphrases."""
        out: dict[str, list[str]] = {}
        for key, mods in self.modality_phrases.items():
            for region, regs in self.region_phrases.items():
                out[f"{key}|{region}"] = [t.format(modality=m, region=r) for m in mods for r in regs for t in T1_TEMPLATES]
        return out

    def to_dict(self) -> dict:
        return {"targets": list(self.targets),
                "target_synonyms": {k: list(v) for k, v in self.target_synonyms.items()},
                "target_descriptions": {k: list(v) for k, v in self.target_descriptions.items()},
                "modality_phrases": {k: list(v) for k, v in self.modality_phrases.items()},
                "region_phrases": {k: list(v) for k, v in self.region_phrases.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> PromptVocabulary:
        return cls(targets=tuple(d["targets"]),
                   target_synonyms={k: tuple(v) for k, v in d["target_synonyms"].items()},
                   target_descriptions={k: tuple(v) for k, v in d["target_descriptions"].items()},
                   modality_phrases={k: tuple(v) for k, v in d["modality_phrases"].items()},
                   region_phrases={k: tuple(v) for k, v in d["region_phrases"].items()})
