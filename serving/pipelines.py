"""What the Triton python-backend models do, as plain Python (no Triton import), so it is tested
directly and the model.py files under ``model_repository/`` stay thin.

- ``PromptTokenizer``: modality + T1 + target prompts -> stem index and token tensors, with the
  checks a server needs (UTF-8, empty, too long, too many targets, unknown modality). The stem is
  the modality the T1 prompt names (the model follows its context prompt, as in DuPLUS), else the
  declared modality; the declared modality always picks the intensity normalisation.
- ``check_unit_feed``: shape/dtype/consistency checks for direct calls of the exported units.
- ``VolumeSegmenter``: the ``segment_volume`` pipeline: training preprocessing, prompt conditioning
  once per request (LRU-cached across requests), Gaussian-blended sliding window over batched
  windows through any ``segment`` callable (Triton BLS in the server), inverse to the input grid,
  uint8 labels. It is the same code path as ``duplus.inference.Predictor``.

Every problem with a request raises ``InvalidRequest``; the model.py files turn it into
INVALID_ARGUMENT and the server stays up.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duplus.contract import KNOWN_TARGETS, MANIFEST, ServingLimits  # noqa: F401 - KNOWN_TARGETS re-exported
from duplus.vocabulary import PromptVocabulary, normalise_text, stem_modality

log = logging.getLogger(__name__)



class InvalidRequest(ValueError):
    """A request the server refuses (INVALID_ARGUMENT), naming the problem."""


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

    def _prompts(self, texts: list[str], what: str) -> list[str]:
        out = []
        for i, text in enumerate(texts):
            label = f"{what}[{i}]" if len(texts) > 1 else what
            if not text.strip():
                raise InvalidRequest(f"{label} prompt is empty")
            if len(text.strip()) > self.limits.max_prompt_chars:
                raise InvalidRequest(f"{label} prompt is {len(text.strip())} characters long; at most "
                                     f"{self.limits.max_prompt_chars} are allowed")
            norm = normalise_text(text)
            n_tokens = len(self.tokenizer(norm)["input_ids"])
            if n_tokens > self.limits.max_prompt_tokens:
                raise InvalidRequest(f"{label} prompt is {n_tokens} tokens long; at most "
                                     f"{self.limits.max_prompt_tokens} are allowed")
            out.append(norm)
        return out

    def modality_index(self, modality: str) -> int:
        if modality not in self.modalities:
            raise InvalidRequest(f"unknown modality {modality!r}; this model has stems for {list(self.modalities)}")
        return self.modalities.index(modality)

    def stem(self, modality: str, t1: str) -> str:
        """The stem for a request: the modality the T1 names, else the declared one (checked)."""
        self.modality_index(modality)
        try:
            return stem_modality(t1, modality, self.modalities)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    def __call__(self, modality: str, t1: str, targets: list[str]) -> dict[str, np.ndarray]:
        self.modality_index(modality)
        if not targets:
            raise InvalidRequest("TARGETS is empty: give at least one target prompt")
        if len(targets) > self.limits.max_targets:
            raise InvalidRequest(f"{len(targets)} target prompts; at most {self.limits.max_targets} per request")
        t1_tok = self.tokenizer(self._prompts([t1], "T1 (context)"), padding=True, return_tensors="np")
        t2_tok = self.tokenizer(self._prompts(targets, "TARGETS"), padding=True, return_tensors="np")
        index = self.modalities.index(self.stem(modality, t1))
        return {"modality": np.array([index], dtype=np.int64),
                "t1_input_ids": t1_tok["input_ids"].astype(np.int64),
                "t1_attention_mask": t1_tok["attention_mask"].astype(np.int64),
                "t2_input_ids": t2_tok["input_ids"].astype(np.int64),
                "t2_attention_mask": t2_tok["attention_mask"].astype(np.int64)}


def check_unit_feed(unit: str, feed: dict[str, np.ndarray], *, n_modalities: int, level_factor: int) -> None:
    """Checks the ONNX graph would otherwise fail on with an opaque message."""
    if unit in ("segmenter", "image_features"):
        image, modality, film = feed["image"], feed["modality"], feed["film"]
        b = image.shape[0]
        if modality.shape[0] != b or film.shape[0] != b:
            raise InvalidRequest(f"batch sizes differ: image {b}, modality {modality.shape[0]}, film {film.shape[0]}")
        if any(s % level_factor for s in image.shape[2:]):
            raise InvalidRequest(f"image spatial size {tuple(image.shape[2:])} must be multiples of {level_factor}")
        if (modality < 0).any() or (modality >= n_modalities).any():
            raise InvalidRequest(f"modality index {modality.tolist()} out of range [0, {n_modalities})")
        if not np.isfinite(image).all():
            raise InvalidRequest("image contains NaN or Inf values")
    elif unit in ("text_encoder", "text_encoder_ehr"):
        if feed["input_ids"].shape != feed["attention_mask"].shape:
            raise InvalidRequest(f"input_ids {feed['input_ids'].shape} and attention_mask "
                                 f"{feed['attention_mask'].shape} differ in shape")
    elif unit in ("conditioning", "prognosis"):
        for name, x in feed.items():
            if not np.isfinite(x).all():
                raise InvalidRequest(f"{name} contains NaN or Inf values")


@dataclass(frozen=True)
class EncodedPrompts:
    modality_index: int         # the stem: the modality the T1 names, else the declared one
    film: np.ndarray            # [1, F]
    head_params: np.ndarray     # [K, P]
    target_embedding: np.ndarray  # [K, E]


class PromptCache:
    """Thread-safe LRU of encoded prompts keyed by (modality, normalised T1, normalised targets).

    Repeated prompt sets (the common case: one protocol, many studies) skip the text encoder and
    conditioning calls; ``segment_volume`` and ``prognose`` each hold one.
    """

    def __init__(self, encode: Callable[[str, str, list[str]], EncodedPrompts], entries: int):
        self.encode, self.entries = encode, entries
        self._cache: OrderedDict[tuple, EncodedPrompts] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, modality: str, t1: str, targets: list[str]) -> EncodedPrompts:
        key = (modality, normalise_text(t1), tuple(normalise_text(t) for t in targets))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        enc = self.encode(modality, t1, targets)
        with self._lock:
            self._cache[key] = enc
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return enc


def check_request_volume(volume, affine, modality: str, modalities: tuple[str, ...], limits: ServingLimits
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checks every volume request shares: known modality, valid array and affine, size limit.

    Returns (volume, float64 affine, voxel spacing in mm); a failure is InvalidRequest naming the problem.
    """
    from duplus.preprocessing import check_volume

    if modality not in modalities:
        raise InvalidRequest(f"unknown modality {modality!r}; this model has stems for {list(modalities)}")
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=np.float64)
    try:
        check_volume(volume, affine, max_voxels=limits.max_voxels)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return volume, affine, np.linalg.norm(affine[:3, :3], axis=0)


class VolumeSegmenter:
    """Whole volume in its own geometry -> uint8 labels on the same grid (the segment_volume model)."""

    def __init__(self, manifest: dict, known_targets: dict[str, np.ndarray],
                 encode: Callable[[str, str, list[str]], EncodedPrompts],
                 segment: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                 limits: ServingLimits = ServingLimits(), cache_entries: int = 256):
        cfg = manifest["model_config"]
        self.modalities = tuple(cfg["modalities"])
        self.spacing = (float(cfg["spacing"]),) * 3 if np.isscalar(cfg["spacing"]) else tuple(cfg["spacing"])
        self.patch_size = tuple(manifest["patch_size"])
        self.vocabulary = PromptVocabulary.from_dict(manifest["vocabulary"])
        self.known_names = [str(n) for n in known_targets["names"]]
        self.known_embeddings = np.asarray(known_targets["embeddings"], dtype=np.float32)
        self.encode, self.segment, self.limits = encode, segment, limits
        self.prompts = PromptCache(encode, cache_entries)

    @staticmethod
    def load_known_targets(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            return {"names": z["names"], "embeddings": z["embeddings"]}

    def __call__(self, volume: np.ndarray, affine: np.ndarray, modality: str, t1: str, targets: list[str]
                 ) -> tuple[np.ndarray, list[str], list[float], str]:
        """-> (uint8 labels on the input grid, canonical target per prompt, match similarity, stem used)."""
        import torch

        from duplus.inference import UnknownPromptError, match_targets, sliding_window_probabilities
        from duplus.preprocessing import fuse_labels, keep_largest_components, to_input_grid, to_model_space

        volume, affine, spacing = check_request_volume(volume, affine, modality, self.modalities, self.limits)
        model_voxels = int(np.prod(np.asarray(volume.shape) * spacing / np.asarray(self.spacing)))
        if model_voxels > self.limits.max_model_voxels:
            raise InvalidRequest(f"volume covers {model_voxels} voxels at the model spacing {self.spacing} mm; "
                                 f"the limit is {self.limits.max_model_voxels}")
        enc = self.prompts(modality, t1, targets)   # raises InvalidRequest for bad prompts (tokenizer)
        try:
            resolved, sims = match_targets(targets, enc.target_embedding, self.known_names, self.known_embeddings,
                                           self.vocabulary, threshold=self.limits.target_similarity,
                                           margin=self.limits.ambiguity_margin)
        except UnknownPromptError as exc:
            raise InvalidRequest(str(exc)) from None
        x, _ = to_model_space(volume, affine, modality, self.spacing, check=False)
        film, head = enc.film, enc.head_params
        index = enc.modality_index
        stem = self.modalities[index]
        if stem != modality:
            log.warning("T1 %r names %s but the volume is declared %s: normalised as %s, stem and FiLM follow the "
                        "prompt", t1, stem, modality, modality)

        def logits_fn(patch: torch.Tensor) -> torch.Tensor:
            b = patch.shape[0]
            out = self.segment(patch.numpy().astype(np.float32, copy=False), np.full((b,), index, dtype=np.int64),
                               np.repeat(film, b, axis=0), head)
            return torch.from_numpy(np.asarray(out))

        probs = sliding_window_probabilities(torch.as_tensor(x), self.patch_size, self.limits.sw_batch_size,
                                             self.limits.overlap, logits_fn)
        probs_in = to_input_grid(probs, x.affine, affine, tuple(volume.shape))
        labels = keep_largest_components(fuse_labels(probs_in).numpy().astype(np.uint8), resolved)
        return labels, resolved, sims, stem


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


@dataclass(frozen=True)
class PrognosisOutput:
    risk: float
    image_features: np.ndarray     # [D] float32, in the order of ``feature_names``
    feature_names: list[str]


class Prognoser:
    """Volume + modality/T1 + EHR note -> risk and the image features it used (the ``prognose`` model).

    The same recipe as training (``duplus.models.prognosis.image_features_from_model_space``): preprocessing to
    the model grid, one frozen segmenter pass conditioned on T1 and (primary tumour, lymph node), radiomics
    and pooled features; the EHR note through the merged LoRA encoder; the Cox head.  The four callables are
    Triton BLS calls in the server and ONNX Runtime / PyTorch in tests.
    """

    def __init__(self, manifest: dict, ehr_tokenizer: EHRTokenizer,
                 encode: Callable[[str, str, list[str]], EncodedPrompts],
                 features: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                 encode_ehr: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 head: Callable[[np.ndarray, np.ndarray], np.ndarray], limits: ServingLimits = ServingLimits()):
        cfg = manifest["model_config"]
        prog = manifest["prognosis"]
        self.modalities = tuple(cfg["modalities"])
        self.spacing = tuple(float(s) for s in cfg["spacing"])
        self.level_factor = 2 ** (len(cfg["channels"]) - 1)
        self.targets = list(prog["targets"])
        self.feature_names = list(prog["feature_names"])
        self.tokenizer, self.limits = ehr_tokenizer, limits
        self.encode, self.features, self.encode_ehr, self.head = encode, features, encode_ehr, head
        self.prompts = PromptCache(encode, 64)

    def __call__(self, volume: np.ndarray, affine: np.ndarray, modality: str, t1: str, ehr: list) -> PrognosisOutput:
        from duplus.models.prognosis import check_feature_grid, image_features_from_model_space
        from duplus.preprocessing import to_model_space

        tokens = self.tokenizer(ehr)                     # a bad note fails before any image work
        if tokens["input_ids"].shape[0] != 1:
            raise InvalidRequest(f"EHR must hold exactly one note, got {tokens['input_ids'].shape[0]}")
        volume, affine, spacing = check_request_volume(volume, affine, modality, self.modalities, self.limits)
        try:
            check_feature_grid(np.ceil(np.asarray(volume.shape) * spacing / np.asarray(self.spacing)).astype(int))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        enc = self.prompts(modality, t1, self.targets)
        x, _ = to_model_space(volume, affine, modality, self.spacing, check=False)

        def unit_fn(padded: np.ndarray):
            return self.features(padded, np.array([enc.modality_index], np.int64), enc.film, enc.head_params)

        feats = image_features_from_model_space(x.as_tensor()[0].numpy(), modality, self.spacing, unit_fn,
                                                self.level_factor)
        emb = self.encode_ehr(tokens["input_ids"], tokens["attention_mask"])
        risk = self.head(feats.vector[None].astype(np.float32), np.asarray(emb, np.float32))
        return PrognosisOutput(float(np.asarray(risk).reshape(-1)[0]), feats.vector, self.feature_names)
