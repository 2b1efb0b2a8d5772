"""The T1 guard: what a volume looks like (the context classifier) against what its context (T1) prompt says.

A T1 prompt that names a modality (or a body region) the classifier gives less than ``alpha`` of its
probability to contradicts the image: DuPLUS follows the prompt, so a CT segmented as an MR loses most of its
Dice. Only modality and region are checked (the segmenter's stems and contexts); an MR sequence that disagrees
is reported in the verdict, not flagged. A T1 that names neither is never flagged. ``alpha`` was chosen on the
validation split for at most 1 % false alarms there (training.evaluate_context --guard).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from duplus.context.classes import parse_key
from duplus.vocabulary import normalise_text, t1_modality

DEFAULT_ALPHA = 0.02

_REGION_PATTERNS = {
    "abdomen": (r"abdom\w*", r"liver", r"pancrea\w*", r"kidneys?", r"renal"),
    "head_neck": (r"head", r"neck", r"oropharyn\w*", r"cervical", r"larynx", r"throat", r"brain"),
}


def t1_region(text: str) -> str | None:
    """The body region a T1 prompt names ('abdomen', 'head_neck'), or None when it names none or both."""
    norm = normalise_text(text)
    named = [r for r, pats in _REGION_PATTERNS.items() if any(re.search(rf"\b{p}\b", norm) for p in pats)]
    return named[0] if len(named) == 1 else None


@dataclass(frozen=True)
class ContextVerdict:
    """What the image looks like, and whether a T1 prompt agrees."""

    key: str                        # the most probable context, e.g. 'CT|abdomen'
    probability: float
    t1: str                         # that context as a T1 prompt: 'CT of the abdomen'
    probabilities: dict[str, float]
    t1_modality: str | None = None  # what the checked T1 prompt names (None: not named, or no prompt)
    t1_region: str | None = None
    agrees: bool | None = None      # None: no T1 was checked, or it names neither modality nor region
    reason: str = ""
    alpha: float | None = None      # the mass under which a named modality or region contradicts the image

    def to_dict(self) -> dict:
        out = {"looks_like": self.key, "probability": round(self.probability, 4), "t1": self.t1,
               "agrees": self.agrees, "reason": self.reason}
        if self.alpha is not None:  # a client filling a T1 in applies the same threshold (fill_t1)
            out["alpha"] = self.alpha
        return out


def _mass(probs: dict[str, float], *, modality: str | None = None, region: str | None = None) -> float:
    return float(sum(p for k, p in probs.items()
                     if (modality is None or parse_key(k).modality == modality)
                     and (region is None or parse_key(k).region == region)))


def verdict(keys: list[str], probabilities: np.ndarray, t1: str | None = None,
            alpha: float = DEFAULT_ALPHA) -> ContextVerdict:
    """The classifier's [C] probabilities (over ``keys``) -> the verdict, checking ``t1`` when given."""
    probs = {k: float(p) for k, p in zip(keys, np.asarray(probabilities, dtype=np.float64).reshape(-1))}
    best = max(probs, key=probs.get)
    top = parse_key(best)
    base = dict(key=best, probability=probs[best], t1=top.name, probabilities=probs, alpha=float(alpha))
    if t1 is None:
        return ContextVerdict(**base)
    mod, region = t1_modality(t1), t1_region(t1)
    problems = []
    if mod is not None and _mass(probs, modality=mod) < alpha:
        problems.append(f"the prompt names {mod} but the image looks like {top.modality} "
                        f"(p({mod}) = {_mass(probs, modality=mod):.3f})")
    if region is not None and _mass(probs, region=region) < alpha:
        problems.append(f"the prompt names the {region.replace('_', ' and ')} region but the image looks like "
                        f"the {top.region.replace('_', ' and ')} (p = {_mass(probs, region=region):.3f})")
    agrees = None if mod is None and region is None else not problems
    reason = "; ".join(problems)
    return ContextVerdict(**base, t1_modality=mod, t1_region=region, agrees=agrees, reason=reason)


class ImageContradictsHeader(ValueError):
    """The context classifier gives the header's modality less than alpha: its region for that modality would be a
    guess about an image it does not recognise, so no T1 prompt is filled in from it."""


def fill_t1(modality: str, keys: list[str], probabilities: np.ndarray,
            sequence: str | None = None, alpha: float | None = None,
            source: str = "the header") -> tuple[str, str, float]:
    """The T1 prompt for a volume whose header names its ``modality`` (DICOM Modality is always there) but not
    its region: the most probable context of that modality (and MR ``sequence``, when the header gives one).
    Returns (T1 prompt, context key, the probability of that context among the allowed ones).

    With ``alpha`` (the guard's, as the server's verdict carries it): raises :class:`ImageContradictsHeader` when
    the image gets less than ``alpha`` of its probability for the header's modality, the case in which the guard
    would flag a T1 naming that modality. The renormalised probability alone would hide it (a CT-looking MR image
    gets p = 1.00 "among the MR contexts"): nilearn's real MNI152 T1 head, which the phantom-trained classifier reads
    as CT (p(MR) = 0.045 against the shipped alpha 0.1), is refused, not filled in with a region guessed from 4.5 %.
    ``source`` names where ``modality`` came from, for that message ("the header"; "--modality" for a NIfTI)."""
    probs = {k: float(p) for k, p in zip(keys, np.asarray(probabilities, dtype=np.float64).reshape(-1))}
    allowed = {k: p for k, p in probs.items() if parse_key(k).modality == modality
               and (sequence is None or parse_key(k).sequence == sequence)}
    if not allowed:
        raise ValueError(f"the context classifier has no class of modality {modality!r}"
                         + (f" and sequence {sequence!r}" if sequence else ""))
    if alpha is not None and _mass(probs, modality=modality) < alpha:
        top = max(probs, key=probs.get)
        raise ImageContradictsHeader(
            f"{source} says {modality} but the image does not look like {modality} to the context classifier "
            f"(p({modality}) = {_mass(probs, modality=modality):.3f}, under the guard's alpha {alpha:g}; it looks like "
            f"{parse_key(top).name}, p = {probs[top]:.2f}), so it cannot choose the region")
    best = max(allowed, key=allowed.get)
    total = sum(allowed.values())
    return parse_key(best).name, best, allowed[best] / total if total > 0 else 0.0
