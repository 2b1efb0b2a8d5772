"""The BLS pipelines of the Triton python-backend models, as plain Python (no Triton import), so they are tested
directly and the model.py files under ``model_repository/`` stay thin.

- ``VolumeSegmenter``: the ``segment_volume`` model: ``duplus.inference.SegmentationPipeline`` (the same code
  path as the in-process ``Predictor``) configured from the repository's manifest, with ``encode`` and ``segment``
  callables that are BLS calls in the server.
- ``Prognoser``: the ``prognose`` model.

The torch-free parts (the tokenizer model, the unit checks) are in ``serving.requests``.

Every problem with a request raises ``InvalidRequest``; the model.py files turn it into INVALID_ARGUMENT and the
server stays up. """

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duplus.cache import LRUCache
from duplus.checks import check_request_volume
from duplus.contract import EncodedPrompts, InvalidRequest, ServingLimits, level_factor
from duplus.inference import EncodeFn, EncodeInstructionsFn, SegmentationPipeline, SegmentFn
from duplus.vocabulary import PromptVocabulary, normalise_text
from serving.requests import EHRTokenizer

log = logging.getLogger(__name__)


class VolumeSegmenter(SegmentationPipeline):
    """The ``segment_volume`` model: the one pipeline, configured from a built repository's manifest."""

    def __init__(self, manifest: dict, known_targets: dict[str, np.ndarray], encode: EncodeFn, segment: SegmentFn,
                 limits: ServingLimits = ServingLimits(), cache_entries: int = 256,
                 count_tokens: Callable[[str], int] | None = None,
                 encode_instructions: EncodeInstructionsFn | None = None):
        cfg = manifest["model_config"]
        spacing = cfg["spacing"]
        super().__init__(modalities=cfg["modalities"],
                         spacing=(float(spacing),) * 3 if np.isscalar(spacing) else spacing,
                         patch_size=manifest["patch_size"], vocabulary=PromptVocabulary.from_dict(manifest["vocabulary"]),
                         known_names=known_targets["names"], known_embeddings=known_targets["embeddings"],
                         encode=encode, segment=segment, limits=limits, count_tokens=count_tokens,
                         cache_entries=cache_entries, encode_instructions=encode_instructions)

    @staticmethod
    def load_known_targets(path: Path) -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            return {"names": z["names"], "embeddings": z["embeddings"]}


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
        self.level_factor = level_factor(cfg["channels"])
        self.targets = list(prog["targets"])
        self.feature_names = list(prog["feature_names"])
        self.tokenizer, self.limits = ehr_tokenizer, limits
        self.encode, self.features, self.encode_ehr, self.head = encode, features, encode_ehr, head
        self.prompt_cache: LRUCache[EncodedPrompts] = LRUCache(64)

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
        key = (modality, normalise_text(t1))
        enc = self.prompt_cache.get_or_compute(key, lambda: self.encode(modality, t1, self.targets))
        x, _ = to_model_space(volume, affine, modality, self.spacing, check=False)

        def unit_fn(padded: np.ndarray):
            return self.features(padded, np.array([enc.modality_index], np.int64), enc.film, enc.head_params)

        feats = image_features_from_model_space(x.as_tensor()[0].numpy(), modality, self.spacing, unit_fn,
                                                self.level_factor)
        emb = self.encode_ehr(tokens["input_ids"], tokens["attention_mask"])
        risk = self.head(feats.vector[None].astype(np.float32), np.asarray(emb, np.float32))
        return PrognosisOutput(float(np.asarray(risk).reshape(-1)[0]), feats.vector, self.feature_names)
