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


class WordTokenizer:
    """The text encoder's tokenizer as the served models run it: a batch of texts -> ``input_ids`` and
    ``attention_mask`` [n, longest] int64 (padded on the right, never truncated), the ids that
    ``transformers.AutoTokenizer`` gives with ``padding=True``.

    Where the folder holds ``tokenizer.json`` (every fast tokenizer's ``save_pretrained``) it runs on the
    ``tokenizers`` library alone: a stub that only tokenises (``tokenizer``, ``instructions``) starts without
    importing transformers and torch (one process loading and tokenising, 2026-12-05: 0.25 s and 41 MB against
    2.6 s and 272 MB through transformers). The padding and truncation stored in that file (the encoder's fixed
    128) are switched off, as transformers does per call. A folder without it (a slow, Python-only tokenizer) goes
    through ``AutoTokenizer``.
    """

    def __init__(self, tokenizer_dir: str | Path):
        folder = Path(tokenizer_dir)
        self.fast = None
        self.slow = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            config_file = folder / "tokenizer_config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            if config.get("padding_side", "right") != "right":
                raise ValueError(f"{folder}: padding side {config['padding_side']!r}; the served models pad on the "
                                 "right")
            self.fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.fast.no_truncation()
            self.fast.no_padding()
            pad = config.get("pad_token") or "[PAD]"
            pad = pad.get("content", pad) if isinstance(pad, dict) else pad
            self.pad_id = self.fast.token_to_id(pad)
            if self.pad_id is None:
                raise ValueError(f"{folder}: the padding token {pad!r} is not in the vocabulary")
        else:
            from transformers import AutoTokenizer

            self.slow = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def count(self, text: str) -> int:
        """Tokens of one text, special tokens included."""
        if self.fast is not None:
            return len(self.fast.encode(text).ids)
        return len(self.slow(text)["input_ids"])

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self.slow is not None:
            tok = self.slow(list(texts), padding=True, truncation=False, return_tensors="np")
            return {"input_ids": tok["input_ids"].astype(np.int64),
                    "attention_mask": tok["attention_mask"].astype(np.int64)}
        ids = [e.ids for e in self.fast.encode_batch(list(texts))]
        longest = max((len(i) for i in ids), default=0)
        input_ids = np.full((len(ids), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), longest), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


class PromptTokenizer:
    """Validates and tokenises one request's prompts exactly as in-process inference encodes them."""

    def __init__(self, tokenizer_dir: str | Path, modalities: Sequence[str], limits: ServingLimits = ServingLimits()):
        self.tokenizer = WordTokenizer(tokenizer_dir)
        self.modalities = tuple(modalities)
        self.limits = limits

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text)

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
        t1_tok = self.tokenizer([t1_norm])
        t2_tok = self.tokenizer(targets_norm)
        index = self.modalities.index(self.stem(modality, t1))
        return {"modality": np.array([index], dtype=np.int64),
                "t1_input_ids": t1_tok["input_ids"].astype(np.int64),
                "t1_attention_mask": t1_tok["attention_mask"].astype(np.int64),
                "t2_input_ids": t2_tok["input_ids"].astype(np.int64),
                "t2_attention_mask": t2_tok["attention_mask"].astype(np.int64)}


class EHRTokenizer:
    """Validates and tokenises EHR notes as the prognosis model was trained (UTF-8, non-empty, length limits)."""

    def __init__(self, tokenizer_dir: str | Path, max_tokens: int, max_chars: int):
        self.tokenizer = WordTokenizer(tokenizer_dir)
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
        tok = self.tokenizer(texts)
        if tok["input_ids"].shape[1] > self.max_tokens:
            raise InvalidRequest(f"EHR note has {int(tok['attention_mask'].sum(1).max())} tokens "
                                 f"(limit {self.max_tokens}); shorten it")
        return {"input_ids": tok["input_ids"].astype(np.int64), "attention_mask": tok["attention_mask"].astype(np.int64)}
