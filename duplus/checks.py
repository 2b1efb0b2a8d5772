"""The request rules, torch-free (the python-backend stubs import them cheaply): volume and geometry, modality and
stem, prompts. Used by the one inference pipeline (``duplus.inference``) and by the served models alike; every
problem is an ``InvalidRequest`` (a ``ValueError``) that names it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from duplus.contract import InvalidRequest, ServingLimits
from duplus.vocabulary import normalise_text, stem_modality, validate_prompt

#: text -> number of tokens (the prompt length check)
CountTokensFn = Callable[[str], int]


def check_volume(image: np.ndarray, affine: np.ndarray, *, min_spacing: float = 0.2, max_spacing: float = 10.0,
                 max_voxels: int = 512 * 512 * 1024) -> None:
    """Reject inputs that cannot be segmented, naming the problem."""
    if image.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {tuple(image.shape)}")
    if min(image.shape) < 1:
        raise ValueError(f"volume has an empty axis: shape {tuple(image.shape)}")
    if image.size > max_voxels:
        raise ValueError(f"volume has {image.size} voxels; the limit is {max_voxels}")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise ValueError(f"volume dtype must be real numeric, got {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError("volume contains NaN or Inf values")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if (spacing < min_spacing).any() or (spacing > max_spacing).any():
        raise ValueError(f"voxel spacing {np.round(spacing, 3).tolist()} mm is outside "
                         f"[{min_spacing}, {max_spacing}] mm")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ValueError("affine is singular")



def check_prompts(t1: str, targets: Sequence[str], limits: ServingLimits, count_tokens: CountTokensFn | None = None
                  ) -> tuple[str, list[str]]:
    """The prompt rules of every request: non-empty text, at most ``max_prompt_chars`` characters and
    ``max_prompt_tokens`` tokens each, 1..``max_targets`` targets. Returns the normalised prompts."""
    if not targets:
        raise InvalidRequest("TARGETS is empty: give at least one target prompt")
    if len(targets) > limits.max_targets:
        raise InvalidRequest(f"{len(targets)} target prompts; at most {limits.max_targets} per request")

    def one(text, label: str) -> str:
        try:
            text = validate_prompt(text, label, limits.max_prompt_chars)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        norm = normalise_text(text)
        if count_tokens is not None:
            n = count_tokens(norm)
            if n > limits.max_prompt_tokens:
                raise InvalidRequest(f"{label} prompt is {n} tokens long; at most {limits.max_prompt_tokens} "
                                     "are allowed")
        return norm

    return one(t1, "T1 (context)"), [one(t, f"TARGETS[{i}]" if len(targets) > 1 else "TARGETS")
                                     for i, t in enumerate(targets)]


def check_request_volume(volume, affine, modality: str, modalities: Sequence[str], limits: ServingLimits
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checks every volume request shares: known modality, valid array and affine, size limit.

    Returns (volume, float64 affine, voxel spacing in mm); a failure is InvalidRequest naming the problem.
    """
    if modality not in modalities:
        shown = modality if len(modality) <= 64 else f"{modality[:64]}... ({len(modality)} characters)"
        raise InvalidRequest(f"unknown modality {shown!r}; this model has stems for {list(modalities)}")
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    try:
        check_volume(volume, affine, max_voxels=limits.max_voxels)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return volume, affine, np.linalg.norm(affine[:3, :3], axis=0)


def request_stem(t1: str, modality: str, modalities: Sequence[str]) -> str:
    """The stem of a request: the modality the T1 names, else the declared one; InvalidRequest when the T1 names
    a modality without a stem."""
    try:
        return stem_modality(t1, modality, tuple(modalities))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
