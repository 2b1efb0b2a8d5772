"""The BLS pipelines of the Triton python-backend models, as plain Python (no Triton import), so they are tested
directly and the model.py files under ``model_repository/`` stay thin.

- ``VolumeSegmenter``: the ``segment_volume`` model: ``duplus.inference.SegmentationPipeline`` (the same code
  path as the in-process ``Predictor``) configured from the repository's manifest, with ``encode`` and ``segment``
  callables that are BLS calls in the server.
- ``Prognoser``: the ``prognose`` model.
- ``PetCtSegmenter``: the ``segment_petct`` model (PEMMA: CT, PET or both).
- ``VolumeContextClassifier``: the ``classify_context`` model (Biomed-DPT: what a volume looks like, and whether a
  T1 prompt agrees), also segment_volume's T1 guard (``ContextGuard``).

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
from duplus.checks import check_request_volume, check_volume
from duplus.contract import EncodedPrompts, InvalidRequest, ServingLimits, level_factor
from duplus.inference import EncodeFn, EncodeInstructionsFn, Prediction, SegmentationPipeline, SegmentFn
from duplus.vocabulary import PromptVocabulary, normalise_text, validate_prompt
from serving.requests import EHRTokenizer, short

log = logging.getLogger(__name__)


class VolumeSegmenter(SegmentationPipeline):
    """The ``segment_volume`` model: the one pipeline, configured from a built repository's manifest, and the T1
    guard (``guarded``)."""

    def __init__(self, manifest: dict, known_targets: dict[str, np.ndarray], encode: EncodeFn, segment: SegmentFn,
                 limits: ServingLimits = ServingLimits(), cache_entries: int = 256,
                 count_tokens: Callable[[str], int] | None = None,
                 encode_instructions: EncodeInstructionsFn | None = None, guard: ContextGuard | None = None):
        self.guard = guard or ContextGuard(None)
        cfg = manifest["model_config"]
        spacing = cfg["spacing"]
        super().__init__(modalities=cfg["modalities"],
                         spacing=(float(spacing),) * 3 if np.isscalar(spacing) else spacing,
                         patch_size=manifest["patch_size"], vocabulary=PromptVocabulary.from_dict(manifest["vocabulary"]),
                         known_names=known_targets["names"], known_embeddings=known_targets["embeddings"],
                         encode=encode, segment=segment, limits=limits, count_tokens=count_tokens,
                         cache_entries=cache_entries, encode_instructions=encode_instructions)

    def guarded(self, volume, affine, modality: str, t1: str, targets, *, strict_context: bool = False,
                **kwargs) -> tuple[Prediction, dict]:
        """(the prediction, CONTEXT_VERDICT): the request's checks first (a bad request is refused as without the
        guard), then the T1 against the image (``strict_context``: a contradiction is refused before any
        segmentation), then the segmentation."""
        verdict: dict = {}

        def guard(volume, affine):             # the checks run once, in the pipeline, before this
            verdict.update(self.guard(volume, affine, t1, strict=strict_context))

        return self(volume, affine, modality, t1, targets, on_checked=guard, **kwargs), verdict

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


@dataclass(frozen=True)
class PetCtOutput:
    labels: np.ndarray               # uint8 on the CT's grid (the PET's without a CT); value i = label_names[i]
    mode: str                        # "ct+pet", "ct" or "pet": what the request held
    label_names: tuple[str, ...]


class PetCtSegmenter:
    """CT and/or PET of one patient, each with its own affine and grid -> PEMMA labels (the ``segment_petct`` model).

    The same recipe as the in-process ``duplus.models.pemma.segment_petct``: the PET resampled into the CT's frame
    at model spacing (``duplus.preprocessing.petct_to_model_space``), MONAI's sliding window of the unit's crop
    with Gaussian blending, probabilities back on the reference grid, argmax.  ``segment`` (windows [b, 2, c, c, c]
    float32, mode index [1] int64 -> logits [b, 3, c, c, c]) is a BLS call to ``pemma_segmenter`` in the server.
    """

    def __init__(self, manifest: dict, segment: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 limits: ServingLimits = ServingLimits()):
        pemma = manifest["pemma"]
        self.crop = int(pemma["crop"])
        self.spacing = tuple(float(s) for s in pemma["spacing"])
        self.modes = tuple(pemma["modes"])
        self.label_names = tuple(pemma["labels"])
        self.segment, self.limits = segment, limits

    def _image(self, name: str, volume, affine) -> tuple[np.ndarray | None, np.ndarray | None]:
        if volume is None and affine is None:
            return None, None
        if volume is None:
            raise InvalidRequest(f"{name}_AFFINE was given without {name}: send the image with its affine")
        if affine is None:
            raise InvalidRequest(f"{name} was given without {name}_AFFINE (its 4x4 voxel-to-world matrix, RAS mm)")
        volume, affine = np.asarray(volume), np.asarray(affine, dtype=np.float64)
        try:
            check_volume(volume, affine, max_voxels=self.limits.max_voxels)
        except ValueError as exc:
            raise InvalidRequest(f"{name}: {exc}") from None
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        model_voxels = int(np.prod(np.ceil(np.asarray(volume.shape) * spacing / np.asarray(self.spacing))))
        if model_voxels > self.limits.max_model_voxels:
            raise InvalidRequest(f"{name}: {model_voxels} voxels at the model spacing {list(self.spacing)} mm; the "
                                 f"limit is {self.limits.max_model_voxels}")
        return volume.astype(np.float32, copy=False), affine

    def __call__(self, ct=None, ct_affine=None, pet=None, pet_affine=None) -> PetCtOutput:
        import torch

        from duplus.models.pemma import probabilities_to_labels, window_probabilities
        from duplus.preprocessing import petct_to_model_space

        ct, ct_affine = self._image("CT", ct, ct_affine)
        pet, pet_affine = self._image("PET", pet, pet_affine)
        if ct is None and pet is None:
            raise InvalidRequest("the request holds neither a CT (CT + CT_AFFINE) nor a PET (PET + PET_AFFINE): "
                                 "give one of them or both")
        try:
            image, (has_ct, has_pet), model_affine, ref_shape, _ = petct_to_model_space(
                ct, ct_affine, pet, pet_affine, self.spacing, check=False)
        except ValueError as exc:     # the two do not overlap in world space
            raise InvalidRequest(str(exc)) from None
        mode = "ct+pet" if has_ct and has_pet else "ct" if has_ct else "pet"
        mode_index = np.array([self.modes.index(mode)], dtype=np.int64)

        def windows(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(self.segment(np.ascontiguousarray(x.numpy(), dtype=np.float32),
                                                            mode_index), dtype=np.float32))

        probs = window_probabilities(windows, image, self.crop, overlap=self.limits.overlap,
                                     sw_batch_size=self.limits.sw_batch_size, ct_body=has_ct)
        labels = probabilities_to_labels(probs, model_affine, ct_affine if has_ct else pet_affine, ref_shape)
        return PetCtOutput(labels, mode, self.label_names)


# ---- context classifier (Biomed-DPT) and segment_volume's T1 guard ----------------------------------------------

#: segment_volume's CONTEXT_VERDICT when the repository was built without a context checkpoint
NO_CONTEXT_CLASSIFIER = "no context classifier in this model repository"


def no_verdict(reason: str = NO_CONTEXT_CLASSIFIER) -> dict:
    """A CONTEXT_VERDICT that checked nothing (the keys of ``duplus.context.guard.ContextVerdict.to_dict``)."""
    return {"looks_like": None, "probability": None, "t1": None, "agrees": None, "reason": reason}


@dataclass(frozen=True)
class ContextOutput:
    probabilities: np.ndarray      # [C] float32, in the order of ``keys``
    keys: tuple[str, ...]          # 'CT|abdomen', 'MR:T1|head_neck', ...
    verdict: object                # duplus.context.guard.ContextVerdict: the best key, its T1 prompt, agrees/reason


class VolumeContextClassifier:
    """Volume + affine [+ T1] -> what the image looks like, and whether the T1 prompt agrees (``classify_context``).

    The views are ``duplus.context.views.context_views`` here in process (three world-space slabs through the
    volume's centre, not the whole volume resampled); ``classify`` (views [1, 3, s, s] float32 -> probabilities
    [1, C]) is a BLS call to ``context_classifier`` in the server; the verdict is ``duplus.context.guard.verdict``
    with the build's alpha. ``manifest["context"]`` (written by ``export/build_engines.py``) holds the classes, the
    view sampling and alpha.
    """

    def __init__(self, manifest: dict, classify: Callable[[np.ndarray], np.ndarray],
                 limits: ServingLimits = ServingLimits()):
        ctx = manifest["context"]
        self.keys = tuple(ctx["keys"])
        self.alpha = float(ctx["alpha"])
        views = ctx["views"]
        self.size, self.spacing, self.slab = int(views["size"]), float(views["spacing_mm"]), int(views["slab"])
        self.classify, self.limits = classify, limits

    def check_t1(self, t1: str | None) -> str | None:
        if t1 is None:
            return None
        try:
            return validate_prompt(t1, "T1 (context)", self.limits.max_prompt_chars)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    def check(self, volume, affine) -> tuple[np.ndarray, np.ndarray]:
        volume, affine = np.asarray(volume), np.asarray(affine, dtype=np.float64)
        try:
            check_volume(volume, affine, max_voxels=self.limits.max_voxels)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return volume, affine

    def views(self, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """[1, 3, s, s] float32 views of a checked volume."""
        from duplus.context.views import context_views

        return context_views(volume, affine, size=self.size, spacing=self.spacing, slab=self.slab,
                             check=False).numpy()[None].astype(np.float32, copy=False)

    def probabilities(self, views: np.ndarray) -> np.ndarray:
        probs = np.asarray(self.classify(np.ascontiguousarray(views, dtype=np.float32)), dtype=np.float32).reshape(-1)
        if probs.shape != (len(self.keys),) or not np.isfinite(probs).all():
            raise RuntimeError(f"context_classifier returned {probs.shape} values (finite: "
                               f"{bool(np.isfinite(probs).all())}); expected {len(self.keys)} probabilities")
        return probs

    def __call__(self, volume, affine, t1: str | None = None) -> ContextOutput:
        from duplus.context.guard import verdict

        t1 = self.check_t1(t1)
        volume, affine = self.check(volume, affine)
        probs = self.probabilities(self.views(volume, affine))
        return ContextOutput(probs, self.keys, verdict(list(self.keys), probs, t1, self.alpha))


class ClassifierNotLoaded(RuntimeError):
    """The repository has a context classifier that this server did not load (a model subset of an object-store
    repository): the guard says so instead of failing the request."""


class ContextContradiction(InvalidRequest):
    """STRICT_CONTEXT: the request's T1 prompt contradicts what the image looks like."""


class ContextGuard:
    """segment_volume's T1 guard: the request's T1 against the image (one view computation and one classifier call
    per request), as the JSON of CONTEXT_VERDICT; ``strict`` refuses a contradicting T1 (``ContextContradiction``,
    INVALID_ARGUMENT naming both). Without a classifier (``classifier`` None) every verdict says so."""

    def __init__(self, classifier: VolumeContextClassifier | None):
        self.classifier = classifier

    def __call__(self, volume: np.ndarray, affine: np.ndarray, t1: str, *, strict: bool = False) -> dict:
        """The verdict of a request whose volume, affine and T1 segment_volume's checks passed."""
        from duplus.context.guard import verdict

        if self.classifier is None:
            return no_verdict()
        c = self.classifier
        try:
            probs = c.probabilities(c.views(np.asarray(volume), np.asarray(affine, dtype=np.float64)))
        except ClassifierNotLoaded as exc:
            return no_verdict(str(exc))
        v = verdict(list(c.keys), probs, t1, c.alpha)
        if strict and v.agrees is False:
            raise ContextContradiction(
                f"context (T1) prompt {short(t1)!r} contradicts the image, which looks like {v.t1} "
                f"(p={v.probability:.2f}): {v.reason}; send a T1 prompt for what the image shows (e.g. {v.t1!r}) "
                "or leave STRICT_CONTEXT off")
        return v.to_dict()
