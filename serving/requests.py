"""Request checks of the served models (torch-free: every python-backend stub imports this module cheaply).

- ``check_feed``: a unit's inputs checked against its tensor contract (below).
- ``PromptTokenizer``: modality + T1 + target prompts -> stem index and token tensors (the ``tokenizer`` model),
  with the prompt rules of ``duplus.checks.check_prompts``. The stem is the modality the T1 prompt names (the
  model follows its context prompt, as in DuPLUS), else the declared modality; the declared modality always
  picks the intensity normalisation.
- ``EHRTokenizer``: EHR notes checked and tokenised as the prognosis model was trained.

``check_feed`` reads a unit's ``UnitContract`` (``duplus.contract``): every input present, its dtype and rank,
fixed sizes, one size per named axis across all inputs (``b``, ``k``, ``n``, ``tokens``, ``x``...: a batch of 1
image features with 3 EHR embeddings is refused, not broadcast), axes that must be multiples of the U-Net's
levels, axes within their largest size (token positions, batch caps), integer values inside their bounds (stem index, token ids, attention mask) and finite floats. Every
problem is an ``InvalidRequest`` naming it, which the Triton models turn into INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from duplus.checks import check_prompts, request_stem
from duplus.contract import MANIFEST, InvalidRequest, ServingLimits, UnitContract

#: an error message never echoes more than this much of what a client sent
ECHO_CHARS = 64


def short(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters for an error message (gRPC's trailing metadata is small)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def decode_strings(array: np.ndarray | None, name: str) -> list[str]:
    """A TYPE_STRING tensor -> str list; non-UTF-8 bytes are an error that names the tensor."""
    if array is None:
        raise InvalidRequest(f"input {name} is missing")
    out = []
    for i, item in enumerate(np.asarray(array, dtype=object).reshape(-1)):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequest(f"{name}[{i}] is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        out.append(str(item))
    return out


def check_feed(contract: UnitContract, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` checked against ``contract`` (see the module docstring); returns the arrays in contract order."""
    sizes: dict[str, tuple[int, str]] = {}   # axis name -> (size, the tensor that set it)
    out = {}
    for spec in contract.inputs:
        if spec.name not in feed or feed[spec.name] is None:
            raise InvalidRequest(f"{contract.name}: input {spec.name} is missing")
        x = np.asarray(feed[spec.name])
        if x.dtype != np.dtype(spec.dtype):
            raise InvalidRequest(f"{contract.name}: input {spec.name} is {x.dtype}, expected {spec.dtype}")
        if x.ndim != len(spec.shape):
            raise InvalidRequest(f"{contract.name}: input {spec.name} has shape {list(x.shape)}, expected "
                                 f"{len(spec.shape)} dimensions {list(spec.shape)}")
        for size, axis in zip(x.shape, spec.shape):
            if isinstance(axis, int):
                if size != axis:
                    raise InvalidRequest(f"{contract.name}: input {spec.name} has shape {list(x.shape)}, expected "
                                         f"{list(spec.shape)}")
                continue
            if size < 1:
                raise InvalidRequest(f"{contract.name}: input {spec.name} is empty along axis {axis!r}")
            if axis in sizes and sizes[axis][0] != size:
                seen, where = sizes[axis]
                raise InvalidRequest(f"{contract.name}: axis {axis!r} is {seen} in {where} but {size} in {spec.name}; "
                                     "the inputs must agree")
            sizes.setdefault(axis, (size, spec.name))
        if spec.bounds is not None and x.size:
            lo, hi = spec.bounds
            if int(x.min()) < lo or int(x.max()) >= hi:
                raise InvalidRequest(f"{contract.name}: input {spec.name} has values in [{int(x.min())}, "
                                     f"{int(x.max())}]; allowed are {lo}..{hi - 1}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InvalidRequest(f"{contract.name}: input {spec.name} contains NaN or Inf values")
        out[spec.name] = x
    for axis, largest in contract.max_sizes:
        if axis in sizes and sizes[axis][0] > largest:
            raise InvalidRequest(f"{contract.name}: axis {axis!r} of {sizes[axis][1]} is {sizes[axis][0]}; at most "
                                 f"{largest}")
    for axis, multiple in contract.multiple_of:
        if axis in sizes and sizes[axis][0] % multiple:
            raise InvalidRequest(f"{contract.name}: {sizes[axis][1]} sizes along {[a for a, _ in contract.multiple_of]} "
                                 f"must be multiples of {multiple}; axis {axis!r} is {sizes[axis][0]}")
    return out


def read_manifest(repository: Path) -> dict:
    path = Path(repository) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the repository with `python export/build_engines.py`")
    return json.loads(path.read_text())


class PromptTokenizer:
    """Validates and tokenises one request's prompts exactly as in-process inference encodes them."""

    def __init__(self, tokenizer_dir: str | Path, modalities: Sequence[str], limits: ServingLimits = ServingLimits()):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.modalities = tuple(modalities)
        self.limits = limits

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def modality_index(self, modality: str) -> int:
        if modality not in self.modalities:
            raise InvalidRequest(f"unknown modality {short(modality)!r}; this model has stems for "
                                 f"{list(self.modalities)}")
        return self.modalities.index(modality)

    def stem(self, modality: str, t1: str) -> str:
        """The stem for a request: the modality the T1 names, else the declared one (checked)."""
        self.modality_index(modality)
        return request_stem(t1, modality, self.modalities)

    def __call__(self, modality: str, t1: str, targets: list[str]) -> dict[str, np.ndarray]:
        self.modality_index(modality)
        t1_norm, targets_norm = check_prompts(t1, targets, self.limits, self.count_tokens)
        t1_tok = self.tokenizer([t1_norm], padding=True, return_tensors="np")
        t2_tok = self.tokenizer(targets_norm, padding=True, return_tensors="np")
        index = self.modalities.index(self.stem(modality, t1))
        return {"modality": np.array([index], dtype=np.int64),
                "t1_input_ids": t1_tok["input_ids"].astype(np.int64),
                "t1_attention_mask": t1_tok["attention_mask"].astype(np.int64),
                "t2_input_ids": t2_tok["input_ids"].astype(np.int64),
                "t2_attention_mask": t2_tok["attention_mask"].astype(np.int64)}


class EHRTokenizer:
    """Validates and tokenises EHR notes as the prognosis model was trained (UTF-8, non-empty, length limits)."""

    def __init__(self, tokenizer_dir: str | Path, max_tokens: int, max_chars: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.max_tokens, self.max_chars = int(max_tokens), int(max_chars)

    def __call__(self, notes: list) -> dict[str, np.ndarray]:
        from duplus.models.prognosis import validate_ehr

        if not notes:
            raise InvalidRequest("EHR is empty: give one note")
        texts = []
        for i, note in enumerate(notes):
            try:
                texts.append(validate_ehr(note, self.max_chars))
            except ValueError as exc:
                raise InvalidRequest(f"EHR[{i}]: {exc}" if len(notes) > 1 else str(exc)) from None
        tok = self.tokenizer(texts, padding=True, truncation=False, return_tensors="np")
        if tok["input_ids"].shape[1] > self.max_tokens:
            raise InvalidRequest(f"EHR note has {int(tok['attention_mask'].sum(1).max())} tokens "
                                 f"(limit {self.max_tokens}); shorten it")
        return {"input_ids": tok["input_ids"].astype(np.int64), "attention_mask": tok["attention_mask"].astype(np.int64)}
