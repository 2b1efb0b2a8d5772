"""Zeus-style instruction generation: what is known about an image -> descriptive instructions for one target.

Zeus (arXiv 2504.07336) conditions segmentation on clinical *instructions* written by a frozen language model from
what is known about the image (modality, region, the structure asked for) instead of on bare class names. This module
is that generator stage, behind one interface, ``InstructionGenerator.generate(target, context, n, seed)``, with
three backends:

- ``KnowledgeBaseGenerator`` (the default): composes instructions from the offline facts in ``duplus.knowledge``
  with sentence templates, conditioned on the image's modality, MR sequence, CT contrast phase, region, the
  patient's sex and age and the slice thickness. Deterministic per seed, varied across seeds; no model needed.
- ``TransformersGenerator``: a local causal language model, any folder written by ``save_pretrained`` (never a hub
  download), prompted in Zeus's style.
- ``HttpGenerator``: an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp's server, Ollama),
  called with the standard library.

Every instruction passes the same guard rails (``check_instruction``): it names its target (a synonym of it), names
no other target (nor, for a lateral target, the other side), is printable prose of at most ``MAX_PROMPT_CHARS``
characters and passes ``duplus.vocabulary.validate_prompt``. A language model's answer that fails them, and every
transport or load-time failure of a backend, falls back to the knowledge base with ``fallback_reason`` set and a
logged warning, so a caller always gets valid instructions.

No real language-model weights are available where this was written and tested: the transformers path was run only
on a tiny randomly initialised model (whose garbage is rejected and replaced by the knowledge base) and the HTTP path
only against a local fake server. The quality of real LLM instructions, and whether they help the segmenter more
than the knowledge base's, is unmeasured.

Command: ``python -m duplus.instructions --target liver --modality MR --sequence T2 --region abdomen --n 5``.
"""

from __future__ import annotations

import abc
import argparse
import json
import logging
import math
import os
import random
import re
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from duplus.cache import LRUCache
from duplus.knowledge import CONTRAST_PHASES, KNOWLEDGE, SizeFact, TargetFacts
from duplus.vocabulary import (
    MAX_PROMPT_TOKENS,
    MODALITIES,
    REGION_PHRASES,
    REGION_TARGETS,
    REGIONS,
    TARGET_SYNONYMS,
    canonical_target,
    laterality,
    normalise_text,
    side_of,
    validate_prompt,
)

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("knowledge_base", "transformers", "http")
SEQUENCES: tuple[str, ...] = ("T1", "T2")
SEXES: tuple[str, ...] = ("M", "F")
MAX_INSTRUCTIONS = 64                  # n per call; a language model is run once per instruction
PREDICTION_MIN_PROBABILITY = 0.5       # a context classifier's guess fills a missing field only above this
MIN_WORDS = 4
# The served text encoder (all-MiniLM-L6-v2) reads at most MAX_PROMPT_TOKENS (64) tokens and the server refuses
# longer prompts. The module cannot count them without importing the tokenizer, so the knowledge base keeps to a
# character budget that fitted every one of its texts measured with that tokenizer (at most 63 tokens at <= 200
# characters; 0.34 tokens per character at worst); pass count_tokens to check exactly.
KB_SOFT_MAX_CHARS = 200
CountTokens = Callable[[str], int]


# ----------------------------------------------------------------------------------------------------------------
# what is known about the image


@dataclass(frozen=True)
class ImageContext:
    """What is known about an image when instructions are written; every field is optional.

    ``predicted_context`` is a context classifier's output (e.g. ``{"modality": "CT", "region": "abdomen",
    "probability": 0.93}``); it fills ``modality`` / ``region`` only where the header left them unknown and its
    probability (if given) is at least ``PREDICTION_MIN_PROBABILITY``. It is stored as sorted (key, value) pairs so
    that a context is hashable (a cache key); pass a dict. ``contrast_phase`` is used for CT only.
    """

    modality: str | None = None
    sequence: str | None = None
    region: str | None = None
    contrast_phase: str | None = None
    slice_thickness_mm: float | None = None
    patient_sex: str | None = None
    patient_age_years: float | None = None
    predicted_context: Any = None

    def __post_init__(self) -> None:
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES} or None, got {self.modality!r}")
        if self.sequence is not None:
            if self.sequence not in SEQUENCES:
                raise ValueError(f"sequence must be one of {SEQUENCES} or None, got {self.sequence!r}")
            if self.modality not in ("MR", None):
                raise ValueError(f"sequence {self.sequence!r} applies to MR only, modality is {self.modality!r}")
        if self.region is not None and self.region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS} or None, got {self.region!r}")
        if self.contrast_phase is not None and self.contrast_phase not in CONTRAST_PHASES:
            raise ValueError(f"contrast_phase must be one of {CONTRAST_PHASES} or None, got {self.contrast_phase!r}")
        if self.slice_thickness_mm is not None:
            t = self.slice_thickness_mm
            if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"slice_thickness_mm must be a positive number or None, got {t!r}")
            object.__setattr__(self, "slice_thickness_mm", float(t))
        if self.patient_sex is not None and self.patient_sex not in SEXES:
            raise ValueError(f"patient_sex must be one of {SEXES} or None, got {self.patient_sex!r}")
        if self.patient_age_years is not None:
            a = self.patient_age_years
            if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or not 0 <= a <= 130:
                raise ValueError(f"patient_age_years must be a number in [0, 130] or None, got {a!r}")
            object.__setattr__(self, "patient_age_years", float(a))
        object.__setattr__(self, "predicted_context", _frozen_prediction(self.predicted_context))

    @property
    def predicted(self) -> dict[str, Any]:
        return dict(self.predicted_context or ())

    def _predicted_field(self, name: str, allowed: tuple[str, ...]) -> str | None:
        pred = self.predicted
        p = pred.get("probability")
        if p is not None and p < PREDICTION_MIN_PROBABILITY:
            return None
        value = pred.get(name)
        return value if value in allowed else None

    @property
    def effective_modality(self) -> str | None:
        """The modality from the header, else the context classifier's."""
        return self.modality or self._predicted_field("modality", MODALITIES)

    @property
    def effective_region(self) -> str | None:
        return self.region or self._predicted_field("region", REGIONS)

    @classmethod
    def from_dicom(cls, ds: Any, predicted_context: Mapping[str, Any] | None = None) -> ImageContext:
        """The context from a DICOM header (a pydicom ``Dataset`` or anything with the same attribute names).

        Reads Modality (CT, MR, PT), for MR the weighting from SequenceName / ScanningSequence / SeriesDescription /
        ProtocolName hints ("T2", "HASTE", "VIBE", ...) and else from RepetitionTime / EchoTime, BodyPartExamined,
        for CT the contrast phase from SeriesDescription words ("arterial", "PV", "delayed", "native") and
        ContrastBolusAgent, SliceThickness, PatientSex and PatientAge ("045Y", "006M"). Missing, empty or odd
        values give None for that field, never an error.
        """
        modality = {"CT": "CT", "MR": "MR", "PT": "PET", "PET": "PET"}.get(_text(ds, "Modality").upper())
        sequence = _mr_sequence(ds) if modality == "MR" else None
        phase = _ct_phase(ds) if modality == "CT" else None
        sex = _text(ds, "PatientSex").upper()
        return cls(modality=modality, sequence=sequence, region=_region(_text(ds, "BodyPartExamined")),
                   contrast_phase=phase, slice_thickness_mm=_positive_float(_attr(ds, "SliceThickness")),
                   patient_sex=sex if sex in SEXES else None, patient_age_years=_age_years(_text(ds, "PatientAge")),
                   predicted_context=predicted_context)

    def to_dict(self) -> dict[str, Any]:
        """The known fields as a JSON-ready mapping (what a ``CONTEXT`` request input holds)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.predicted_context is not None:
            out["predicted_context"] = self.predicted
        return out

    def request_fields(self) -> dict[str, Any]:
        """``to_dict`` without the modality: a segment_volume request's CONTEXT (the request names its modality)."""
        return {k: v for k, v in self.to_dict().items() if k != "modality"}

    def describe(self) -> str:
        """What is known, in words, for a language model's prompt."""
        parts = []
        modality = self.effective_modality
        if modality:
            parts.append(f"modality {modality}" + (f" {self.sequence}-weighted" if self.sequence else ""))
        if modality == "CT" and self.contrast_phase:
            parts.append(f"contrast phase {self.contrast_phase}")
        region = self.effective_region
        if region:
            parts.append(f"region {REGION_PHRASES[region][0]}")
        if self.slice_thickness_mm:
            parts.append(f"slice thickness {self.slice_thickness_mm:g} mm")
        if self.patient_sex:
            parts.append({"M": "male", "F": "female"}[self.patient_sex] + " patient")
        if self.patient_age_years is not None:
            parts.append(f"age {self.patient_age_years:g} years")
        pred = self.predicted
        if pred:
            guess = ", ".join(f"{k} {v}" for k, v in sorted(pred.items()) if k != "probability")
            p = pred.get("probability")
            parts.append(f"context classifier: {guess}" + (f" (p={p:.2f})" if p is not None else ""))
        return "; ".join(parts) if parts else "nothing beyond the target"


def _frozen_prediction(pred: Any) -> tuple[tuple[str, Any], ...] | None:
    if pred is None or pred == ():
        return None
    items = pred.items() if isinstance(pred, Mapping) else pred
    out = []
    try:
        for key, value in items:
            if not isinstance(key, str):
                raise TypeError
            if isinstance(value, bool) or value is None or isinstance(value, str):
                pass
            elif isinstance(value, int | float) or hasattr(value, "item"):   # numpy scalars too
                value = float(value)
            else:
                raise TypeError
            out.append((key, value))
    except (TypeError, ValueError):
        raise ValueError(f"predicted_context must map names to strings or numbers, got {pred!r}") from None
    p = dict(out).get("probability")
    if p is not None and (not isinstance(p, float) or not 0 <= p <= 1):
        raise ValueError(f"predicted_context probability must be a number in [0, 1], got {p!r}")
    return tuple(sorted(out))


def _attr(ds: Any, name: str) -> Any:
    try:
        value = getattr(ds, name, None)
    except Exception:          # pydicom raises on some malformed elements when they are read
        return None
    if value is not None and not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        try:                   # multi-valued element: the first value
            value = value[0] if len(value) else None
        except Exception:
            return None
    return value


def _text(ds: Any, name: str) -> str:
    value = _attr(ds, name)
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()


def _all_text(ds: Any, name: str) -> str:
    try:
        value = getattr(ds, name, None)
    except Exception:
        return ""
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        return " ".join(str(v) for v in value)
    return str(value)


def _positive_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _age_years(text: str) -> float | None:
    """DICOM AS ("045Y", "006M", "012W", "003D"), or a bare number of years; anything else None."""
    m = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", text.upper().replace("YEARS", "Y").replace("YEAR", "Y").strip())
    if not m:
        return None
    value = int(m.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0, "": 1.0}[m.group(2)]
    return round(value, 2) if value <= 130 else None


_T1_HINT = re.compile(r"(?<![A-Z0-9])T1(?![0-9])|VIBE|LAVA|THRIVE|DIXON|IN ?PHASE|OPP(OSED)? ?PHASE|FLASH|SPGR|MPRAGE")
_T2_HINT = re.compile(r"(?<![A-Z0-9])T2(?![0-9*])|HASTE|SS ?FSE|MRCP")
_BALANCED_SSFP = re.compile(r"TRUFI|FIESTA|BFFE|B ?SSFP")


def _mr_sequence(ds: Any) -> str | None:
    """T1 / T2 from the sequence names and descriptions, else from TR and TE; None when unclear."""
    text = " ".join(_all_text(ds, k) for k in ("SequenceName", "ScanningSequence", "SeriesDescription", "ProtocolName"))
    text = re.sub(r"[_\-/]", " ", text.upper())
    t1, t2 = bool(_T1_HINT.search(text)), bool(_T2_HINT.search(text))
    if t1 != t2:
        return "T1" if t1 else "T2"
    if t1 or _BALANCED_SSFP.search(text):
        return None
    tr, te = _positive_float(_attr(ds, "RepetitionTime")), _positive_float(_attr(ds, "EchoTime"))
    if tr is None or te is None:
        return None
    if tr <= 1000 and te <= 30:
        return "T1"
    if tr >= 1500 and te >= 60:
        return "T2"
    return None


_PHASE_WORDS = {
    "unenhanced": re.compile(r"\b(NATIVE?|NON ?CON(TRAST)?|NONCONTRAST|UNENHANCED|PLAIN|PRE ?CONTRAST|W O|NC)\b"),
    "arterial": re.compile(r"\b(ART|ARTERIAL|LATE ART(ERIAL)?|CTA|ANGIO)\b"),
    "portal venous": re.compile(r"\b(PV|PVP|PORTAL|VENOUS|VEN|NEPHRO(GRAPHIC)?)\b"),
    "delayed": re.compile(r"\b(DELAY(ED)?|EQUILIBRIUM|EXCRETORY|URO(GRAPHIC)?|\d+ ?MIN)\b"),
}


def _ct_phase(ds: Any) -> str | None:
    """The CT contrast phase from SeriesDescription words, else 'unenhanced' when ContrastBolusAgent says none.

    A missing ContrastBolusAgent does not prove an unenhanced scan (anonymisers drop it), so it gives None."""
    text = re.sub(r"[^A-Z0-9]+", " ", _text(ds, "SeriesDescription").upper())
    found = [phase for phase, words in _PHASE_WORDS.items() if words.search(text)]
    if len(found) == 2 and "arterial" in found and "delayed" not in found and re.search(r"\bLATE ART", text):
        found = ["arterial"]
    if len(found) == 1:
        return found[0]
    agent = _text(ds, "ContrastBolusAgent").upper()
    if re.fullmatch(r"(NONE|NO|N/?A|NO CONTRAST|NIL)", agent):
        return "unenhanced"
    return None


def _region(body_part: str) -> str | None:
    """'abdomen' / 'head_neck' from BodyPartExamined; None when it names neither or both."""
    part = re.sub(r"[^A-Z]", "", body_part.upper())
    abdomen = any(w in part for w in ("ABD", "LIVER", "KIDNEY", "PANCREAS", "SPLEEN", "STOMACH"))
    head_neck = any(w in part for w in ("HEAD", "NECK", "LARYN", "PHARYN", "TONSIL", "TONGUE", "ORAL"))
    if abdomen == head_neck:
        return None
    return "abdomen" if abdomen else "head_neck"


# ----------------------------------------------------------------------------------------------------------------
# instructions and their guard rails


@dataclass(frozen=True)
class Instruction:
    """One instruction for ``target`` (canonical); ``backend`` wrote the text; ``fallback_reason`` says why the
    configured backend's answer was replaced by the knowledge base's (None: it was not)."""

    target: str
    text: str
    backend: str
    fallback_reason: str | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGET_SYNONYMS:
            raise ValueError(f"target must be a canonical target {tuple(TARGET_SYNONYMS)}, got {self.target!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        validate_prompt(self.text, "instruction")


class InstructionRejected(ValueError):
    """A generated text that fails the guard rails; the message is the reason."""


def _phrase_pattern(phrase: str) -> re.Pattern:
    words = normalise_text(phrase).split(" ")
    return re.compile(r"(?<![a-z0-9])" + r"[\s-]+".join(map(re.escape, words)) + r"(?![a-z0-9])")


_TARGET_PATTERNS: dict[str, tuple[re.Pattern, ...]] = {
    t: tuple(_phrase_pattern(s) for s in synonyms) for t, synonyms in TARGET_SYNONYMS.items()}


def named_targets(text: str) -> set[str]:
    """The canonical targets a text names through any of their synonyms (whole words, case-insensitive)."""
    norm = normalise_text(text)
    return {t for t, patterns in _TARGET_PATTERNS.items() if any(p.search(norm) for p in patterns)}


def resolve_target(target: str) -> str:
    """The canonical target of any synonym ('hepar' -> 'liver'); an unknown name is a ValueError naming it."""
    canonical = canonical_target(target) if isinstance(target, str) else None
    if canonical is None:
        raise ValueError(f"unknown target {target!r}; expected one of {tuple(TARGET_SYNONYMS)} or a synonym")
    return canonical


def check_instruction(text: str, target: str, *, count_tokens: CountTokens | None = None,
                      max_tokens: int = MAX_PROMPT_TOKENS) -> str:
    """``text`` stripped if it is a usable instruction for ``target``, else ``InstructionRejected`` with the reason.

    ``count_tokens`` (the text encoder's tokenizer, e.g. ``Predictor.count_tokens``) adds the served limit of
    ``max_tokens`` tokens, counted on the normalised text as ``duplus.checks.check_prompts`` does."""
    if not isinstance(text, str) or not text.strip():
        raise InstructionRejected("empty text")
    text = text.strip()
    bad = sorted({f"U+{ord(c):04X}" for c in text if not c.isprintable() or c == "\ufffd"})
    if bad:
        raise InstructionRejected(f"non-printable characters {bad[:5]}")
    try:
        text = validate_prompt(text, "instruction")
    except ValueError as e:
        raise InstructionRejected(str(e)) from None
    if count_tokens is not None:
        n_tokens = count_tokens(normalise_text(text))
        if n_tokens > max_tokens:
            raise InstructionRejected(f"{n_tokens} tokens long; at most {max_tokens} are allowed")
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < 0.6 * len(visible):
        raise InstructionRejected("not prose (too few letters)")
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", text)
    if len(words) < MIN_WORDS:
        raise InstructionRejected(f"too short ({len(words)} words)")
    lower = [w.lower() for w in words]
    if any(lower[i] == lower[i + 1] == lower[i + 2] for i in range(len(lower) - 2)) or \
            (len(lower) >= 10 and len(set(lower)) < 0.4 * len(lower)):
        raise InstructionRejected("repetitive text")
    named = named_targets(text)
    others = sorted(named - {target})
    if others:
        raise InstructionRejected(f"names another target: {', '.join(repr(o) for o in others)}")
    if target not in named:
        raise InstructionRejected(f"does not name the target {target!r}")
    side = side_of(target)
    if side is not None and laterality(text) != side:
        raise InstructionRejected(f"does not keep to the {side} side (reads as {laterality(text)!r})")
    return text


_ABBREVIATIONS = frozenset({"e.g", "i.e", "approx", "cf", "vs", "dr", "fig", "incl", "min", "max", "no", "ca"})
_LABEL = re.compile(r"^(?:instruction|answer|description|response|output)\s*:\s*", re.IGNORECASE)


def parse_instruction(raw: Any, target: str, *, truncated: bool = False, count_tokens: CountTokens | None = None,
                      max_tokens: int = MAX_PROMPT_TOKENS) -> str:
    """The first sentence of a language model's answer, checked by ``check_instruction``.

    Drops a reasoning block (``<think>...</think>``), a leading label ("Instruction:"), list markers, quotes and
    markdown emphasis, keeps the first non-empty line and cuts it after the first sentence end (not after
    abbreviations or decimals). An answer cut off by the token limit (``truncated``) with no sentence end is
    rejected: a half sentence is not an instruction.
    """
    if not isinstance(raw, str):
        raise InstructionRejected(f"no text (got {type(raw).__name__})")
    text = re.sub(r"<think>.*?(</think>|$)", " ", raw, flags=re.DOTALL | re.IGNORECASE)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InstructionRejected("empty text")
    line = _LABEL.sub("", lines[0])
    line = re.sub(r"^(?:[-*\u2022]\s+|\d+[.)]\s+)", "", line).replace("**", "").strip().strip("\"'`").strip()
    end = None
    for m in re.finditer(r"[.!?](?=\s|$)", line):
        before = re.search(r"([A-Za-z.]+)$", line[:m.start()])
        if m.group() == "." and before and before.group(1).lower() in _ABBREVIATIONS:
            continue
        end = m.end()
        break
    if end is not None:
        line = line[:end]
    elif truncated and len(lines) == 1:
        raise InstructionRejected("cut off at the token limit before the sentence ended")
    return check_instruction(line.strip("\"'` "), target, count_tokens=count_tokens, max_tokens=max_tokens)


# ----------------------------------------------------------------------------------------------------------------
# the interface


class InstructionGenerator(abc.ABC):
    """``generate(target, context, n, seed)`` -> ``n`` instructions for ``target`` (any synonym).

    Results are cached in an LRU map keyed on (target, context, n, seed), so repeated contexts do not re-run a
    language model; a backend whose failures may be transient (HTTP) does not cache its fallbacks.
    """

    backend: str = ""
    cache_fallbacks = True

    def __init__(self, cache_entries: int = 256, count_tokens: CountTokens | None = None,
                 max_tokens: int = MAX_PROMPT_TOKENS):
        self.cache: LRUCache[tuple[Instruction, ...]] = LRUCache(cache_entries)
        self.count_tokens, self.max_tokens = count_tokens, max_tokens

    def check(self, text: str, target: str) -> str:
        """``check_instruction`` with this generator's token limit."""
        return check_instruction(text, target, count_tokens=self.count_tokens, max_tokens=self.max_tokens)

    def generate(self, target: str, context: ImageContext | None = None, n: int = 1, seed: int = 0) -> list[Instruction]:
        canonical = resolve_target(target)
        context = ImageContext() if context is None else context
        if not isinstance(context, ImageContext):
            raise ValueError(f"context must be an ImageContext, got {type(context).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_INSTRUCTIONS:
            raise ValueError(f"n must be an integer in [1, {MAX_INSTRUCTIONS}], got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        key = (canonical, context, n, seed)
        cached = self.cache.get(key)
        if cached is not None:
            return list(cached)
        out = tuple(self._generate(canonical, context, n, seed))
        if len(out) != n:
            raise RuntimeError(f"{type(self).__name__} returned {len(out)} instructions, {n} were asked for")
        if self.cache_fallbacks or not any(i.fallback_reason for i in out):
            self.cache.put(key, out)
        return list(out)

    @abc.abstractmethod
    def _generate(self, target: str, context: ImageContext, n: int, seed: int) -> list[Instruction]:
        """``n`` instructions for a canonical ``target``."""


# ----------------------------------------------------------------------------------------------------------------
# the knowledge base


_TEMPLATES: tuple[str, ...] = (
    "{Name} on this {mod}: it {app}, and it {fact}.",
    "On this {mod}, {name} {app}; it {fact}.",
    "Segment {name}, which {fact}; on the {mod} it {app}.",
    "{Name} {fact}. On this {mod} it {app}.",
    "In this {mod} of {region}, {name} {app}. It {fact}.",
    "Outline {name} on the {mod}: it {fact} and {app}.",
    "Find {name} in {region}: it {fact}, and on the {mod} it {app}.",
    "Delineate {name}; on this {mod} it {app}, and it {fact}.",
)
_TEMPLATES_NO_MODALITY: tuple[str, ...] = (
    "{Name} {fact}, and it {fact2}.",
    "Segment {name}, which {fact}; it {fact2}.",
    "Find {name} in {region}: it {fact}, and it {fact2}.",
    "Outline {name}: it {fact}. It {fact2}.",
)
_RELATIVE_TO_MUSCLE = {"higher": "brighter than muscle", "slightly higher": "slightly brighter than muscle",
                       "similar": "close to that of muscle", "slightly lower": "slightly darker than muscle",
                       "lower": "darker than muscle"}


def _range(r: tuple[float, float], unit: str) -> str:
    lo, hi = r
    if math.isinf(hi):
        return f"above about {lo:g} {unit}"
    return f"about {lo:g} to {hi:g} {unit}"


def _size_range(r: tuple[float, float]) -> str:
    lo, hi = r
    if lo >= 20 and not math.isinf(hi):
        return _range((lo / 10, hi / 10), "cm")
    return _range(r, "mm")


def modality_phrases(context: ImageContext) -> tuple[str, ...]:
    """How the instruction names the image: 'portal venous phase CT', 'T2-weighted MRI', 'FDG-PET'."""
    modality = context.effective_modality
    if modality == "CT":
        phase = context.contrast_phase
        if phase is None:
            return ("CT", "CT scan")
        if phase == "unenhanced":
            return ("unenhanced CT", "unenhanced CT scan")
        return (f"{phase} phase CT", f"{phase} phase CT scan")
    if modality == "MR":
        if context.sequence:
            return (f"{context.sequence}-weighted MRI", f"{context.sequence}-weighted MR image")
        return ("MRI", "MR image")
    if modality == "PET":
        return ("FDG-PET", "FDG PET scan", "PET")
    return ()


def appearance_phrases(facts: TargetFacts, context: ImageContext) -> tuple[str, ...]:
    """Verb phrases about the target's look on this image only: its modality, MR weighting and CT phase.

    CT phrases say "attenuation", "HU" or "enhanc...", MR phrases "signal", PET phrases "uptake"."""
    modality = context.effective_modality
    if modality == "CT":
        ct, phase = facts.ct, context.contrast_phase
        if phase == "unenhanced":
            out = [ct.unenhanced_phrase]
            if ct.unenhanced_hu:
                out.append(f"measures {_range(ct.unenhanced_hu, 'HU')} without contrast")
            return tuple(out)
        if phase is None:
            out = [ct.any_phase_phrase]
            if ct.unenhanced_hu:
                out.append(f"measures {_range(ct.unenhanced_hu, 'HU')} before contrast and then enhances")
            return tuple(out)
        phrase = ct.phase_phrase[phase]
        if phase in ct.phase_hu:
            return (f"{phrase}, {_range(ct.phase_hu[phase], 'HU')}", phrase)
        return (phrase,)
    if modality == "MR":
        signals = {"T1": facts.mr_t1, "T2": facts.mr_t2}
        if context.sequence is None:
            return (f"shows {facts.mr_t1.level} T1 signal and {facts.mr_t2.level} T2 signal",)
        s = signals[context.sequence]
        level = f"shows {s.level} {context.sequence} signal"
        if s.vs_muscle:
            level += f", {_RELATIVE_TO_MUSCLE[s.vs_muscle]}"
        return (level, s.note) if s.note else (level,)
    if modality == "PET":
        pet = facts.pet
        main = pet.physiological
        if facts.lesion and pet.suv_pathological:
            main += f" ({pet.suv_pathological_kind} often {_range(pet.suv_pathological, '').strip()})"
        elif pet.suv_physiological:
            main += f" ({pet.suv_kind} {_range(pet.suv_physiological, '').strip()})"
        return (main, pet.pathological) if pet.pathological else (main,)
    return ()


def _size_phrase(s: SizeFact, facts: TargetFacts, age: float | None) -> str:
    article = "an" if s.dimension[0] in "aeiou" else "a"
    if facts.lesion:
        return f"has {article} {s.dimension} of {_size_range(s.range_mm)}"
    if age is not None and age < 18 and facts.size.child_phrase:
        return f"{facts.size.child_phrase} (adult {s.dimension} {_size_range(s.range_mm)})"
    who = f"a {age:g}-year-old adult" if age is not None else "an adult"
    return f"has, in {who}, {article} {s.dimension} of {_size_range(s.range_mm)}"


def general_facts(facts: TargetFacts, context: ImageContext) -> tuple[str, ...]:
    """Verb phrases true of the target whatever the image: location, neighbours, shape, size."""
    loc = facts.location
    out = [f"lies in {loc.quadrant}", f"lies {loc.level}", f"is {loc.compartment}", *facts.relations, *facts.shape]
    if loc.laterality_phrase:
        out.append(loc.laterality_phrase)
    for s in facts.size.facts:
        out.append(_size_phrase(s, facts, context.patient_age_years))
        if s.note:
            out.append(s.note)
    return tuple(out)


def context_facts(facts: TargetFacts, context: ImageContext) -> tuple[str, ...]:
    """Verb phrases that depend on this patient and scan: sex, age, slice thickness."""
    out = []
    size = facts.size
    if context.patient_sex in size.sex_phrase:
        out.append(size.sex_phrase[context.patient_sex])
    age = context.patient_age_years
    if age is not None and age >= 65 and size.older_adult_phrase:
        out.append(size.older_adult_phrase)
    if age is not None and size.facts and not facts.lesion:      # the typical size for this age
        out.append(_size_phrase(size.facts[0], facts, age))
    t = context.slice_thickness_mm
    if t:
        if size.craniocaudal_mm:
            lo, hi = size.craniocaudal_mm
            n_lo, n_hi = max(1, round(lo / t)), max(1, round(hi / t))
            few = "only " if n_hi <= 15 else ""
            out.append(f"spans {few}about {n_lo} to {n_hi} slices of {t:g} mm" if n_hi > n_lo
                       else f"spans {few}about {n_lo} slice of {t:g} mm")
        elif t >= 3:
            out.append(f"has edges softened by partial volume on {t:g} mm slices")
    return tuple(out)


class KnowledgeBaseGenerator(InstructionGenerator):
    """Instructions composed from ``duplus.knowledge`` with sentence templates, conditioned on the context.

    One instruction = a template filled with a name of the target (a synonym), the image's modality phrase
    (with the MR weighting or CT phase), one appearance phrase for that modality / weighting / phase only, and
    one fact: about half the time one that depends on this patient or scan (sex, age, slice thickness) when there is
    one, else location, neighbours, shape or size. The choices are drawn from ``random.Random`` seeded with (seed,
    index, attempt), so a seed always gives the same text, and the first instruction of ``n`` is that of ``n=1``.
    Without a modality the appearance is left out and two general facts are used. Every text passes
    ``check_instruction`` (with ``count_tokens``, the token limit too); a draw that does not (none should), that is
    longer than ``soft_max_chars`` (so that it fits the text encoder's 64 tokens) or that repeats an earlier one of the
    same call is drawn again, a bounded number of times.
    """

    backend = "knowledge_base"

    def __init__(self, knowledge: Mapping[str, TargetFacts] | None = None, *, soft_max_chars: int = KB_SOFT_MAX_CHARS,
                 count_tokens: CountTokens | None = None, max_tokens: int = MAX_PROMPT_TOKENS,
                 cache_entries: int = 1024):
        super().__init__(cache_entries, count_tokens, max_tokens)
        self.soft_max_chars = soft_max_chars
        self.knowledge = dict(KNOWLEDGE if knowledge is None else knowledge)
        missing = [t for t in TARGET_SYNONYMS if t not in self.knowledge]
        if missing:
            raise ValueError(f"the knowledge base has no facts for targets {missing}")

    def _generate(self, target: str, context: ImageContext, n: int, seed: int) -> list[Instruction]:
        facts = self.knowledge[target]
        region = context.effective_region
        if region is None or target not in REGION_TARGETS.get(region, ()):
            region = facts.location.region
        parts = (modality_phrases(context), appearance_phrases(facts, context),
                 general_facts(facts, context), context_facts(facts, context), REGION_PHRASES[region][0])
        out: list[Instruction] = []
        seen: set[str] = set()
        for i in range(n):
            text = None
            for attempt in range(60):
                candidate = self._compose(facts, parts, random.Random(f"{seed}:{i}:{attempt}"))
                try:
                    candidate = self.check(candidate, target)
                except InstructionRejected as e:
                    logger.debug("knowledge-base draw rejected (%s): %s", e, candidate)
                    continue
                if (len(candidate) <= self.soft_max_chars or attempt >= 40) and (candidate not in seen or attempt >= 50):
                    text = candidate
                    break
            if text is None:          # a safe minimum: the target and one fact, or the target alone
                text = self._last_resort(facts)
            seen.add(text)
            out.append(Instruction(target=target, text=text, backend=self.backend))
        return out

    def _last_resort(self, facts: TargetFacts) -> str:
        name, fact = facts.names[0], general_facts(facts, ImageContext())[0]
        for text in (f"Segment {name}, which {fact}.", f"Segment {name} on this image."):
            try:
                return self.check(text, facts.target)
            except InstructionRejected:
                continue
        logger.warning("no knowledge-base instruction for %r fits %d tokens; using the shortest", facts.target,
                       self.max_tokens)
        return check_instruction(f"Segment {name} on this image.", facts.target)

    @staticmethod
    def _compose(facts: TargetFacts, parts: tuple, rng: random.Random) -> str:
        mods, apps, general, specific, region = parts
        name = rng.choice(facts.names)
        fact = rng.choice(specific) if specific and rng.random() < 0.5 else rng.choice(general)
        if mods and apps:
            template = rng.choice(_TEMPLATES)
            text = template.format(Name=name[0].upper() + name[1:], name=name, mod=rng.choice(mods),
                                   app=rng.choice(apps), fact=fact, region=region)
        else:
            fact2 = rng.choice([f for f in general if f != fact])
            template = rng.choice(_TEMPLATES_NO_MODALITY)
            text = template.format(Name=name[0].upper() + name[1:], name=name, fact=fact, fact2=fact2, region=region)
        return text[0].upper() + text[1:]


# ----------------------------------------------------------------------------------------------------------------
# language-model backends


def zeus_prompt(target: str, context: ImageContext) -> tuple[str, str]:
    """(system, user) messages in Zeus's style: modality, target, what is known of the image, then the request to
    analyse the image and describe the target."""
    mods = modality_phrases(context)
    mod = mods[0] if mods else "medical image"
    region = context.effective_region
    system = ("You are a radiologist writing one-sentence instructions for a segmentation model. Describe only the "
              "requested structure: where it lies, its shape and size, and how it appears on the given scan. Name "
              "the structure, do not name any other organ or lesion, and answer with one plain sentence of at most "
              "200 characters.")
    user = (f"Modality: {mod}. Region: {REGION_PHRASES[region][0] if region else 'unknown'}. Target: {target}. "
            f"Known about the image: {context.describe()}. Analyse the image and describe the {target} as it "
            f"appears on this {mod}, in one sentence.")
    return system, user


class _LanguageModelGenerator(InstructionGenerator):
    """Shared fallback handling: any failure -> the fallback generator's instruction with the reason."""

    def __init__(self, fallback: InstructionGenerator | None, cache_entries: int, count_tokens: CountTokens | None,
                 max_tokens: int):
        super().__init__(cache_entries, count_tokens, max_tokens)
        self.fallback = KnowledgeBaseGenerator(count_tokens=count_tokens, max_tokens=max_tokens) if fallback is None \
            else fallback

    def _fallback(self, target: str, context: ImageContext, n: int, seed: int, reasons: dict[int, str]
                  ) -> dict[int, Instruction]:
        if not reasons:
            return {}
        replacement = self.fallback.generate(target, context, n=n, seed=seed)
        out = {}
        for i, reason in reasons.items():
            logger.warning("%s instruction %d for %r fell back to %s: %s", self.backend, i, target,
                           replacement[i].backend, reason)
            out[i] = replace(replacement[i], fallback_reason=f"{self.backend}: {reason}")
        return out


class TransformersGenerator(_LanguageModelGenerator):
    """Instructions from a local causal language model: any folder written by ``save_pretrained`` (tokenizer and
    model), loaded with ``local_files_only=True`` (never a download).

    ``n == 1`` decodes greedily; ``n > 1`` samples ``n`` answers seeded by ``seed``. Each answer is cut to its first
    sentence and checked (``parse_instruction``); a rejected or failed one is replaced by the fallback's (the
    knowledge base by default) with ``fallback_reason``. A folder that is missing or holds no causal language model
    is a ValueError here, at construction. Only a tiny random model was available to test this: real output quality
    is unmeasured.
    """

    backend = "transformers"

    def __init__(self, path: str | Path, *, max_new_tokens: int = 48, fallback: InstructionGenerator | None = None,
                 device: str = "cpu", temperature: float = 0.7, count_tokens: CountTokens | None = None,
                 max_tokens: int = MAX_PROMPT_TOKENS, cache_entries: int = 256):
        super().__init__(fallback, cache_entries, count_tokens, max_tokens)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.path, self.max_new_tokens, self.device, self.temperature = Path(path), max_new_tokens, device, temperature
        if not (self.path / "config.json").is_file():
            raise ValueError(f"no language model folder at {self.path} (config.json missing); give a folder written "
                             f"by save_pretrained")
        try:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ValueError(f"the transformers backend needs torch and transformers: {e}") from e
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except Exception as e:
            raise ValueError(f"cannot read the model configuration in {self.path}: {e}") from e
        archs = list(getattr(config, "architectures", None) or [])
        if getattr(config, "is_encoder_decoder", False) or \
                (archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
            raise ValueError(f"{self.path} does not hold a causal language model (architectures {archs}, "
                             f"model_type {getattr(config, 'model_type', None)!r})")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True).to(device).eval()
        except Exception as e:
            raise ValueError(f"cannot load a causal language model and its tokenizer from {self.path}: "
                             f"{type(e).__name__}: {e}") from e
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._torch = torch
        self._lock = threading.Lock()
        logger.info("instruction language model loaded from %s (%s, %d parameters) on %s", self.path,
                    type(self.model).__name__, sum(p.numel() for p in self.model.parameters()), device)

    def prompt_text(self, target: str, context: ImageContext) -> str:
        system, user = zeus_prompt(target, context)
        if getattr(self.tokenizer, "chat_template", None):
            for messages in ([{"role": "system", "content": system}, {"role": "user", "content": user}],
                             [{"role": "user", "content": f"{system}\n\n{user}"}]):   # templates without a system role
                try:
                    return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                except Exception:
                    continue
        return f"{system}\n\n{user}\nInstruction:"

    def _complete(self, prompt: str, n: int, seed: int) -> list[tuple[str, bool]]:
        """(answer, cut off at max_new_tokens) for ``n`` answers."""
        torch = self._torch
        enc = self.tokenizer(prompt, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and ids.shape[1] + self.max_new_tokens > limit:
            raise RuntimeError(f"the prompt ({ids.shape[1]} tokens) and {self.max_new_tokens} new tokens exceed the "
                               f"model's {limit} positions")
        kwargs = dict(max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id, num_return_sequences=n)
        if n > 1:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=0.95)
        else:
            kwargs.update(do_sample=False)
        dev = torch.device(self.device)
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda"
                                                                       else []):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        eos = self.tokenizer.eos_token_id
        answers = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = len(row) >= self.max_new_tokens and eos not in row
            answers.append((self.tokenizer.decode(row, skip_special_tokens=True), cut))
        return answers

    def _generate(self, target: str, context: ImageContext, n: int, seed: int) -> list[Instruction]:
        reasons: dict[int, str] = {}
        out: dict[int, Instruction] = {}
        try:
            answers = self._complete(self.prompt_text(target, context), n, seed)
        except Exception as e:
            answers = []
            reasons = {i: f"generation failed: {type(e).__name__}: {e}" for i in range(n)}
        for i, (answer, cut) in enumerate(answers):
            try:
                text = parse_instruction(answer, target, truncated=cut, count_tokens=self.count_tokens,
                                         max_tokens=self.max_tokens)
                out[i] = Instruction(target, text, self.backend)
            except InstructionRejected as e:
                reasons[i] = f"rejected ({e}): {answer[:80]!r}"
        out.update(self._fallback(target, context, n, seed, reasons))
        return [out[i] for i in range(n)]


class HttpGenerator(_LanguageModelGenerator):
    """Instructions from an OpenAI-compatible endpoint: ``POST {base_url}/v1/chat/completions`` (vLLM, llama.cpp's
    server, Ollama), standard library only.

    One request per instruction, body ``{model, messages: [system, user], max_tokens, temperature, seed}``
    (temperature 0 for ``n == 1``, sampling with seeds ``seed + i`` otherwise). The API key, if any, comes only from
    the environment variable named by ``api_key_env`` and is sent as ``Authorization: Bearer``. A timeout, refused
    connection, HTTP error, malformed JSON, empty choices or an answer that fails the guard rails falls back to the
    knowledge base with the reason; after a transport failure the remaining instructions fall back without further
    requests, so a dead endpoint costs at most one ``timeout_s`` per call (the timeout bounds each socket operation,
    not a server that trickles bytes). Nothing retries. Fallbacks are not cached, so a recovered endpoint is used
    again. Tested against a local fake server only: real output quality is unmeasured.
    """

    backend = "http"
    cache_fallbacks = False

    def __init__(self, base_url: str, *, model: str, timeout_s: float = 10.0, api_key_env: str | None = None,
                 fallback: InstructionGenerator | None = None, max_new_tokens: int = 48, temperature: float = 0.7,
                 count_tokens: CountTokens | None = None, max_tokens: int = MAX_PROMPT_TOKENS,
                 cache_entries: int = 256):
        super().__init__(fallback, cache_entries, count_tokens, max_tokens)
        if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must name the served model, got {model!r}")
        if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        _check_env_name(api_key_env)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        root = base_url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root          # ".../v1" as OpenAI clients write it
        self.url = f"{root}/v1/chat/completions"
        self.model, self.timeout_s, self.api_key_env = model, float(timeout_s), api_key_env
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "").strip()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                logger.warning("environment variable %s (api_key_env) is not set; calling %s without a key",
                               self.api_key_env, self.url)
        return headers

    def _request(self, system: str, user: str, n: int, seed: int) -> tuple[Any, bool]:
        """(answer content, cut off by max_tokens); raises _TransportError or InstructionRejected."""
        body = {"model": self.model,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "max_tokens": self.max_new_tokens, "temperature": 0.0 if n == 1 else self.temperature, "seed": seed}
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = resp.read(1_000_000)
        except urllib.error.HTTPError as e:
            raise _TransportError(f"HTTP {e.code} {e.reason} from {self.url}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _TransportError(f"timed out after {self.timeout_s:g} s ({self.url})") from None
            raise _TransportError(f"connection failed: {e.reason} ({self.url})") from None
        except TimeoutError:
            raise _TransportError(f"timed out after {self.timeout_s:g} s ({self.url})") from None
        except OSError as e:
            raise _TransportError(f"connection failed: {type(e).__name__}: {e} ({self.url})") from None
        try:
            data = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InstructionRejected(f"malformed JSON in the response: {e}") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise InstructionRejected("the response has no choices")
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else choice.get("text")
        if not isinstance(content, str):
            raise InstructionRejected("the response's first choice has no text content")
        return content, choice.get("finish_reason") == "length"

    def _generate(self, target: str, context: ImageContext, n: int, seed: int) -> list[Instruction]:
        system, user = zeus_prompt(target, context)
        reasons: dict[int, str] = {}
        out: dict[int, Instruction] = {}
        for i in range(n):
            try:
                content, cut = self._request(system, user, n, seed + i)
                text = parse_instruction(content, target, truncated=cut, count_tokens=self.count_tokens,
                                         max_tokens=self.max_tokens)
                out[i] = Instruction(target, text, self.backend)
            except _TransportError as e:          # the endpoint is unusable now: no further requests
                reasons.update({j: str(e) for j in range(i, n)})
                break
            except InstructionRejected as e:
                reasons[i] = f"rejected ({e})"
        out.update(self._fallback(target, context, n, seed, reasons))
        return [out[i] for i in range(n)]


class _TransportError(Exception):
    pass


def _check_env_name(name: str | None) -> None:
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)):
        raise ValueError("api_key_env must name an environment variable (letters, digits, underscores), not hold "
                         "the key itself")


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class GeneratorConfig:
    """Which instruction generator to build; ``GeneratorConfig.from_yaml`` reads it from a YAML file.

    ``backend``: knowledge_base | transformers (needs ``path``) | http (needs ``base_url`` and ``model``).
    ``api_key_env`` names the environment variable holding the endpoint's key; the key never goes in a file.
    """

    backend: str = "knowledge_base"
    path: str | None = None
    base_url: str | None = None
    model: str | None = None
    timeout_s: float = 10.0
    api_key_env: str | None = None
    max_new_tokens: int = 48
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "transformers" and not self.path:
            raise ValueError("backend 'transformers' needs path (a save_pretrained folder)")
        if self.backend == "http" and not (self.base_url and self.model):
            raise ValueError(f"backend 'http' needs base_url and model, got base_url={self.base_url!r}, "
                             f"model={self.model!r}")
        if not (isinstance(self.timeout_s, int | float) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check_env_name(self.api_key_env)

    @classmethod
    def from_yaml(cls, yaml_path: str | Path, /, **overrides: Any) -> GeneratorConfig:
        from duplus.config import read_yaml_config

        # read_yaml_config's own first parameter is called path, so this config's path field is overridden here
        path = overrides.pop("path", None)
        raw = read_yaml_config(yaml_path, cls, **overrides)
        if path is not None:
            raw["path"] = path
        return cls(**raw)


def make_generator(cfg: GeneratorConfig, *, count_tokens: CountTokens | None = None) -> InstructionGenerator:
    """The generator ``cfg`` names; ``count_tokens`` (the text encoder's tokenizer) adds the served token limit."""
    if cfg.backend == "transformers":
        return TransformersGenerator(cfg.path, max_new_tokens=cfg.max_new_tokens, device=cfg.device,
                                     count_tokens=count_tokens)
    if cfg.backend == "http":
        return HttpGenerator(cfg.base_url, model=cfg.model, timeout_s=cfg.timeout_s, api_key_env=cfg.api_key_env,
                             max_new_tokens=cfg.max_new_tokens, count_tokens=count_tokens)
    return KnowledgeBaseGenerator(count_tokens=count_tokens)


# ----------------------------------------------------------------------------------------------------------------
# serving: instructions chosen per request


#: how a served request's targets condition the segmenter: by their names (the default) or by instructions that the
#: server's generator writes for the image's context (Zeus's stage, ``INSTRUCTIONS: auto``)
INSTRUCTION_MODES: tuple[str, ...] = ("names", "auto")
#: the fields a request's CONTEXT may give (those ``ImageContext.from_dicom`` reads from a header)
REQUEST_CONTEXT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ImageContext) if f.name != "modality")
MAX_CONTEXT_CHARS = 2048
#: served instructions are the generator's first for each (target, context): deterministic, so cached
SERVING_SEED = 0

_T1_SEQUENCE = re.compile(r"(?<![a-z0-9])t([12])(?:w|[- ]?weighted)?(?![a-z0-9])")


def instruction_mode(value: str | None) -> str:
    """A request's INSTRUCTIONS value ('names' when absent or empty); anything else is an InvalidRequest."""
    from duplus.contract import InvalidRequest

    mode = "names" if value is None or not str(value).strip() else str(value).strip().lower()
    if mode not in INSTRUCTION_MODES:
        raise InvalidRequest(f"INSTRUCTIONS must be one of {INSTRUCTION_MODES} (or absent), got {str(value)[:80]!r}")
    return mode


def _t1_region(t1: str) -> str | None:
    norm = normalise_text(t1)
    found = {r for r, phrases in REGION_PHRASES.items() for p in phrases if normalise_text(p) in norm}
    found |= {"head_neck" for w in ("neck", "head", "oropharyn", "larynx") if w in norm}
    found |= {"abdomen" for w in ("abdom", "liver", "pancrea", "kidney", "renal") if w in norm}
    return found.pop() if len(found) == 1 else None


def request_context(modality: str, t1: str, affine: Any = None, context: str | Mapping[str, Any] | None = None
                    ) -> ImageContext:
    """The image context instructions are written for, from one segment_volume request.

    ``modality`` is the stem's (the T1's modality, else the declared one). ``context`` (a mapping or its JSON, e.g.
    ``ImageContext.from_dicom(ds).to_dict()`` by a DICOM node) gives the header's fields; the MR sequence and region
    otherwise come from the T1 words ("T2-weighted MRI of the abdomen"), and the slice thickness from the spacing of
    the volume's third axis in ``affine``. A malformed or unknown field is an ``InvalidRequest`` naming it.
    """
    import numpy as np

    fields_ = context_fields(context)
    if modality == "MR" and fields_.get("sequence") is None:
        m = _T1_SEQUENCE.search(normalise_text(t1))
        fields_["sequence"] = f"T{m.group(1)}" if m else None
    if fields_.get("region") is None:
        fields_["region"] = _t1_region(t1)
    if fields_.get("slice_thickness_mm") is None and affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        if a.shape == (4, 4) and np.isfinite(a).all() and float(np.linalg.norm(a[:3, 2])) > 0:
            fields_["slice_thickness_mm"] = round(float(np.linalg.norm(a[:3, 2])), 2)
    return image_context(modality=modality, **fields_)


def context_fields(context: str | Mapping[str, Any] | None,
                   allowed: tuple[str, ...] = REQUEST_CONTEXT_FIELDS) -> dict[str, Any]:
    """A CONTEXT (a mapping, its JSON, or None / empty for nothing known) as a dict of ``allowed`` fields; too long,
    not JSON, not an object or an unknown field is an ``InvalidRequest`` naming it. Values are checked by
    ``image_context``."""
    from duplus.contract import InvalidRequest

    if context is None or (isinstance(context, str) and not context.strip()):
        return {}
    if isinstance(context, str):
        if len(context) > MAX_CONTEXT_CHARS:
            raise InvalidRequest(f"CONTEXT is {len(context)} characters; at most {MAX_CONTEXT_CHARS}")
        try:
            given = json.loads(context)
        except json.JSONDecodeError as e:
            raise InvalidRequest(f"CONTEXT is not valid JSON ({e.msg} at character {e.pos})") from None
    else:
        given = dict(context)
    if not isinstance(given, dict):
        raise InvalidRequest(f"CONTEXT must be a JSON object of {list(allowed)}, got {type(given).__name__}")
    unknown = sorted(set(map(str, given)) - set(allowed))
    if unknown:
        raise InvalidRequest(f"CONTEXT has unknown fields {unknown}; known: {list(allowed)}")
    return given


def image_context(**fields_: Any) -> ImageContext:
    """``ImageContext(**fields_)`` with a bad value as an ``InvalidRequest`` ('CONTEXT: ...')."""
    from duplus.contract import InvalidRequest

    try:
        return ImageContext(**fields_)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"CONTEXT: {e}") from None


def served_instructions(generator: InstructionGenerator, targets: list[str], context: ImageContext) -> list[str]:
    """The instruction that conditions each target of a served request (the generator's LRU caches them per
    (target, context)); the one definition shared by the Triton ``instructions`` model and the in-process
    ``Predictor``."""
    return [generator.generate(t, context, n=1, seed=SERVING_SEED)[0].text for t in targets]


# ----------------------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m duplus.instructions",
                                 description="Write Zeus-style segmentation instructions for one target from what is "
                                             "known about the image.")
    ap.add_argument("--target", required=True, help="target or synonym, e.g. liver, 'left kidney', GTVp")
    ap.add_argument("--modality", choices=MODALITIES)
    ap.add_argument("--sequence", choices=SEQUENCES, help="MR weighting")
    ap.add_argument("--region", choices=REGIONS)
    ap.add_argument("--phase", choices=CONTRAST_PHASES, help="CT contrast phase")
    ap.add_argument("--slice-thickness", type=float, metavar="MM")
    ap.add_argument("--sex", choices=SEXES)
    ap.add_argument("--age", type=float, metavar="YEARS")
    ap.add_argument("--n", type=int, default=1, help="how many instructions (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="GeneratorConfig YAML; the backend options below override it")
    ap.add_argument("--backend", choices=BACKENDS)
    ap.add_argument("--path", help="transformers: a save_pretrained folder")
    ap.add_argument("--base-url", help="http: the endpoint, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", help="http: the served model's name")
    ap.add_argument("--timeout-s", type=float)
    ap.add_argument("--api-key-env", help="http: the environment variable that holds the API key")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--device", help="transformers: torch device (default cpu)")
    ap.add_argument("--json", action="store_true", help="print a JSON list of instructions")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    overrides = {"backend": args.backend, "path": args.path, "base_url": args.base_url, "model": args.model,
                 "timeout_s": args.timeout_s, "api_key_env": args.api_key_env, "max_new_tokens": args.max_new_tokens,
                 "device": args.device}
    try:
        if args.config:
            cfg = GeneratorConfig.from_yaml(args.config, **overrides)
        else:
            known = {f.name for f in fields(GeneratorConfig)}
            cfg = GeneratorConfig(**{k: v for k, v in overrides.items() if v is not None and k in known})
        context = ImageContext(modality=args.modality, sequence=args.sequence, region=args.region,
                               contrast_phase=args.phase, slice_thickness_mm=args.slice_thickness,
                               patient_sex=args.sex, patient_age_years=args.age)
        generator = make_generator(cfg)
        instructions = generator.generate(args.target, context, n=args.n, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if args.json:
        print(json.dumps([asdict(i) for i in instructions], indent=2))
    else:
        for ins in instructions:
            note = f"  [{ins.backend}; fallback: {ins.fallback_reason}]" if ins.fallback_reason else ""
            print(ins.text + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
