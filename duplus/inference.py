"""The one inference pipeline, layered from files down to logits (nnU-Net style):

    Predictor.predict_file(path)           NIfTI in -> labels on the input grid
    Predictor.predict_array(image, ...)    array + geometry -> labels   (= SegmentationPipeline in-process)
    Predictor.predict_preprocessed(x, ...) one model-space volume -> per-target probabilities (sliding window)
    Predictor.patch_logits(patch, ...)     one batch of patches -> logits

``SegmentationPipeline`` is the whole-volume path, written once: request checks (modality, array, affine, size
and prompt limits), prompt encoding through an ``encode`` callable (cached per prompt set, never per patch),
target matching, resampling to the model grid, Gaussian-blended sliding window over batched windows through a
``segment`` callable (the segmenter unit's contract), the inverse to the input grid, uint8 labels and the
largest-component post-processing. In-process the two callables are the PyTorch model (``Predictor``); inside
Triton they are BLS calls to the ``encode_prompts`` and ``segmenter`` models (``serving.pipelines``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from duplus.cache import LRUCache
from duplus.checkpoint import load_checkpoint
from duplus.checks import CountTokensFn, check_prompts, check_request_volume, request_stem
from duplus.contract import EncodedPrompts, InvalidRequest, ServingLimits
from duplus.models.duplus import DuPLUS, DuPLUSConfig
from duplus.models.fastpaths import windows_per_pass
from duplus.preprocessing import body_box, fuse_labels, keep_largest_components, to_input_grid, to_model_space
from duplus.text_encoder import EmbeddingCache, TextEncoder
from duplus.vocabulary import (
    AMBIGUITY_MARGIN,
    NON_TARGETS,
    NOT_A_TARGET,
    TARGET_SIMILARITY,
    PromptVocabulary,
    canonical_target,
    counterpart,
    laterality,
    normalise_text,
    side_of,
    t1_modality,
    validate_prompt,
)

if TYPE_CHECKING:
    from duplus.instructions import ImageContext

#: how an accepted target prompt conditions the segmenter: "canonical" (the matched target's canonical name, so that
#: an accepted paraphrase segments exactly as the name does) or "prompt" (the user's own words, as before issue 22)
TARGET_CONDITIONING = ("canonical", "prompt")

log = logging.getLogger(__name__)


class UnknownPromptError(InvalidRequest):
    """A prompt that is not close to anything the model was trained on."""


@dataclass(frozen=True)
class Conditioning:
    t1: str
    targets: tuple[str, ...]         # the user's target prompts
    resolved: tuple[str, ...]        # canonical target each prompt was matched to
    similarity: tuple[float, ...]    # cosine similarity of that match
    film: torch.Tensor               # [1, F]
    head_params: torch.Tensor        # [K, P]
    t1_modality: str | None = None   # the modality the T1 prompt names (None: it names none)

    def stem(self, modality: str) -> str:
        """The stem a volume declared as ``modality`` runs through: the T1's modality, else the declared one."""
        return self.t1_modality or modality


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray                    # uint8 on the input grid, value i = targets[i-1]
    affine: np.ndarray                    # the input's affine
    targets: tuple[str, ...]
    resolved: tuple[str, ...]
    probabilities: np.ndarray | None      # float32 [K, ...] on the input grid, only on request
    seconds: float
    stem: str = ""                        # the stem it ran through (the T1's modality, else the declared one)
    similarity: tuple[float, ...] = ()    # cosine similarity of each target's match
    conditioned_by: tuple[str, ...] = ()  # the text that conditioned each target's head (name or instruction)


#: (modality, T1, targets) -> EncodedPrompts
EncodeFn = Callable[[str, str, list[str]], EncodedPrompts]
#: the segmenter unit: image [b, 1, x, y, z], modality [b], film [b, F], head_params [K, P] -> logits [b, K, x, y, z]
SegmentFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], "np.ndarray | torch.Tensor"]
#: (modality, T1, canonical targets, image context) -> (EncodedPrompts of their instructions, the instructions)
EncodeInstructionsFn = Callable[[str, str, list[str], "ImageContext"], tuple[EncodedPrompts, list[str]]]


class SegmentationPipeline:
    """Whole volume in its own geometry -> uint8 labels on the same grid; see the module docstring."""

    def __init__(self, *, modalities: Sequence[str], spacing: Sequence[float], patch_size: Sequence[int],
                 vocabulary: PromptVocabulary, known_names: Sequence[str], known_embeddings: np.ndarray,
                 encode: EncodeFn, segment: SegmentFn, limits: ServingLimits = ServingLimits(),
                 count_tokens: CountTokensFn | None = None, largest_component: bool = True,
                 cache_entries: int = 256, target_conditioning: str = "canonical",
                 encode_instructions: EncodeInstructionsFn | None = None,
                 resample_device: str | torch.device = "cpu"):
        """``resample_device``: where the volume is resampled to the model grid and the probabilities back to the
        input grid and fused to labels (the predictor's GPU: on an H200 the inverse resampling alone was 0.7-1.0 s
        of a 1.1-2.0 s CT on the host's CPU, perf/results/nvidia-h200)."""
        if target_conditioning not in TARGET_CONDITIONING:
            raise ValueError(f"target_conditioning must be one of {TARGET_CONDITIONING}, got {target_conditioning!r}")
        self.target_conditioning = target_conditioning
        self.modalities = tuple(modalities)
        self.spacing = tuple(float(s) for s in spacing)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.vocabulary = vocabulary
        self.known_names = [str(n) for n in known_names]
        self.known_embeddings = np.asarray(known_embeddings, dtype=np.float32)
        self.encode, self.segment, self.limits = encode, segment, limits
        self.count_tokens = count_tokens
        self.largest_component = largest_component
        # repeated prompt sets (one protocol, many studies) skip the text encoder and conditioning
        self.prompt_cache: LRUCache[EncodedPrompts] = LRUCache(cache_entries)
        # INSTRUCTIONS auto: the generator (a model before the tokenizer when served) and its encodings, per context
        self.encode_instructions = encode_instructions
        self.resample_device = torch.device(resample_device)
        self.instruction_cache: LRUCache[tuple[EncodedPrompts, list[str]]] = LRUCache(cache_entries)

    def encode_prompts(self, modality: str, t1: str, targets: list[str]) -> EncodedPrompts:
        key = (modality, normalise_text(t1), tuple(normalise_text(t) for t in targets))
        return self.prompt_cache.get_or_compute(key, lambda: self.encode(modality, t1, targets))

    def resolve(self, targets: Sequence[str], target_embedding: np.ndarray) -> tuple[list[str], list[float]]:
        return match_targets(targets, target_embedding, self.known_names, self.known_embeddings, self.vocabulary,
                             threshold=self.limits.target_similarity, margin=self.limits.ambiguity_margin)

    def check(self, volume, affine, modality: str, t1: str, targets: Sequence[str]
              ) -> tuple[np.ndarray, np.ndarray]:
        """Every check that needs no model: volume, geometry, sizes, modality, prompts, stem."""
        volume, affine, spacing = check_request_volume(volume, affine, modality, self.modalities, self.limits)
        model_voxels = int(np.prod(np.asarray(volume.shape) * spacing / np.asarray(self.spacing)))
        if model_voxels > self.limits.max_model_voxels:
            raise InvalidRequest(f"volume covers {model_voxels} voxels at the model spacing {self.spacing} mm; "
                                 f"the limit is {self.limits.max_model_voxels}")
        check_prompts(t1, targets, self.limits, self.count_tokens)
        request_stem(t1, modality, self.modalities)
        return volume, affine

    def __call__(self, volume, affine, modality: str, t1: str, targets: Sequence[str], *,
                 return_probabilities: bool = False, instructions: str | None = None,
                 context: str | dict | None = None,
                 on_checked: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Prediction:
        """``instructions``: 'names' (default) or 'auto' (each resolved target's head is conditioned by the
        instruction the generator writes for it and this image's ``context``, see ``request_context``).
        ``on_checked(volume, affine)`` runs once the request passed its checks, before any model call (the
        server's T1 guard)."""
        from duplus.instructions import instruction_mode, request_context

        t0 = time.perf_counter()
        targets = list(targets)
        mode = instruction_mode(instructions)
        volume, affine = self.check(volume, affine, modality, t1, targets)
        if on_checked is not None:
            on_checked(volume, affine)
        image_context = None
        if mode == "auto":
            if self.encode_instructions is None:
                raise InvalidRequest("INSTRUCTIONS auto: this pipeline has no instruction generator")
            image_context = request_context(request_stem(t1, modality, self.modalities), t1, affine, context)
        enc = self.encode_prompts(modality, t1, targets)
        resolved, sims = self.resolve(targets, enc.target_embedding)
        conditioned_by = list(targets)
        if image_context is not None:
            key = (modality, normalise_text(t1), tuple(resolved), image_context)
            enc, conditioned_by = self.instruction_cache.get_or_compute(
                key, lambda: self.encode_instructions(modality, t1, list(resolved), image_context))
        elif self.target_conditioning == "canonical" and list(resolved) != targets:
            # the user's words chose the target; the target's canonical name conditions the head (a paraphrase far
            # from anything trained on would otherwise condition it with an embedding the controller never saw)
            enc = self.encode_prompts(modality, t1, list(resolved))
            conditioned_by = list(resolved)
        stem = self.modalities[enc.modality_index]
        if stem != modality:
            log.warning("the T1 prompt %r names %s but the volume is declared %s: intensities are normalised as %s, "
                        "the stem and FiLM follow the prompt (%s)", t1, stem, modality, modality, stem)
        x, _ = to_model_space(volume, affine, modality, self.spacing, check=False, device=self.resample_device)
        probs = self.probabilities_in_body(x, modality, enc)
        probs_in = to_input_grid(probs.to(self.resample_device), x.affine, affine, tuple(volume.shape))
        labels = fuse_labels(probs_in).cpu().numpy().astype(np.uint8, copy=False)
        if self.largest_component:
            labels = keep_largest_components(labels, resolved)
        return Prediction(labels=labels, affine=affine, targets=tuple(targets), resolved=tuple(resolved),
                          probabilities=probs_in.cpu().numpy() if return_probabilities else None,
                          seconds=time.perf_counter() - t0, stem=stem, similarity=tuple(sims),
                          conditioned_by=tuple(conditioned_by))

    def probabilities_in_body(self, x: torch.Tensor, modality: str, enc: EncodedPrompts) -> torch.Tensor:
        """``probabilities`` over the body's box of a CT (``duplus.preprocessing.body_box``), zero outside it;
        over the whole volume where there is no box (MR, PET, a body filling the field of view)."""
        box = body_box(x, modality)
        if box is None:
            return self.probabilities(torch.as_tensor(x).cpu(), enc)
        inner = self.probabilities(torch.as_tensor(x)[(slice(None), *box)].contiguous().cpu(), enc)
        probs = torch.zeros((inner.shape[0], *x.shape[1:]), dtype=inner.dtype)
        probs[(slice(None), *box)] = inner
        return probs

    def probabilities(self, x: torch.Tensor, enc: EncodedPrompts) -> torch.Tensor:
        """[1, X, Y, Z] model-space volume -> [K, X, Y, Z] probabilities through ``segment``."""
        film, head, index = enc.film, enc.head_params, enc.modality_index

        def logits_fn(patch: torch.Tensor) -> torch.Tensor:
            b = patch.shape[0]
            out = self.segment(patch.numpy().astype(np.float32, copy=False), np.full((b,), index, dtype=np.int64),
                               np.repeat(film, b, axis=0), head)
            return torch.as_tensor(out)

        return sliding_window_probabilities(torch.as_tensor(x), self.patch_size, self.limits.sw_batch_size,
                                            self.limits.overlap, logits_fn)


class Predictor:
    """A trained DuPLUS model with its frozen text encoder: the in-process ``SegmentationPipeline``.

    ``predict_array`` caches the FiLM and head parameters per prompt set, so it is for fixed weights; training's
    validation conditions afresh through ``condition`` + ``predict_preprocessed``, which cache nothing but the
    (frozen) text embeddings.
    """

    def __init__(self, model: DuPLUS, vocabulary: PromptVocabulary, text_encoder: TextEncoder | None = None, *,
                 device: str | torch.device = "cpu", overlap: float = 0.25, sw_batch_size: int | None = None,
                 limits: ServingLimits | None = None, bf16: bool = False, largest_component: bool = True,
                 target_conditioning: str = "canonical", instruction_generator=None):
        """``instruction_generator``: a ``duplus.instructions.InstructionGenerator`` for ``instructions='auto'``
        (default: the offline knowledge base, built on first use). ``sw_batch_size``: sliding windows per forward
        pass; by default one on CPU and the served default (``ServingLimits``) on a GPU
        (``duplus.models.fastpaths.windows_per_pass``)."""
        if target_conditioning not in TARGET_CONDITIONING:
            raise ValueError(f"target_conditioning must be one of {TARGET_CONDITIONING}, got {target_conditioning!r}")
        self.target_conditioning = target_conditioning
        self.device = torch.device(device)
        if sw_batch_size is None:
            sw_batch_size = windows_per_pass(self.device.type, ServingLimits().sw_batch_size)
        self.model = model.to(self.device).eval()
        self.cfg: DuPLUSConfig = model.cfg
        self.vocabulary = vocabulary
        self.text_encoder = text_encoder or TextEncoder(self.cfg.text_encoder)
        self.cache = EmbeddingCache(self.text_encoder)
        # the served defaults (prompt limits, match thresholds), with this predictor's sliding window
        self.limits = limits or ServingLimits(overlap=overlap, sw_batch_size=sw_batch_size)
        self.bf16 = bf16  # bfloat16 autocast for the sliding window (validation during training)
        # every phrasing of every target, then the structures the model does not segment (refused when nearest)
        self._known_t2: list[tuple[str, str]] = [(t, p) for t, ps in vocabulary.all_t2().items() for p in ps] + \
            [(NOT_A_TARGET + n, n) for n in NON_TARGETS]
        self._known_t2_emb: torch.Tensor | None = None
        self._largest_component = largest_component
        self._pipeline: SegmentationPipeline | None = None
        self.instruction_generator = instruction_generator

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> Predictor:
        ckpt = load_checkpoint(path)
        model = DuPLUS(DuPLUSConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
        return cls(model, PromptVocabulary.from_dict(ckpt["vocabulary"]), device=device, **kwargs)

    @property
    def overlap(self) -> float:
        return self.limits.overlap

    @property
    def sw_batch_size(self) -> int:
        return self.limits.sw_batch_size

    @property
    def pipeline(self) -> SegmentationPipeline:
        """The whole-volume pipeline over this model (built on first use: it encodes the known targets)."""
        if self._pipeline is None:
            names, known = self.known_target_embeddings()
            self._pipeline = SegmentationPipeline(
                modalities=self.cfg.modalities, spacing=self.cfg.spacing, patch_size=self.cfg.patch_size,
                vocabulary=self.vocabulary, known_names=names, known_embeddings=known.numpy(), encode=self.encode,
                segment=self.segment, limits=self.limits, count_tokens=self.count_tokens,
                largest_component=self._largest_component, target_conditioning=self.target_conditioning,
                encode_instructions=self.encode_instructions, resample_device=self.device)
        return self._pipeline

    def encode_instructions(self, modality: str, t1: str, targets: list[str], context) -> tuple[EncodedPrompts,
                                                                                              list[str]]:
        """The in-process ``encode_instructions`` (the served ensemble of that name): each target's instruction
        for ``context`` from the generator, encoded as its head's prompt."""
        from duplus.instructions import KnowledgeBaseGenerator, served_instructions

        if self.instruction_generator is None:
            self.instruction_generator = KnowledgeBaseGenerator(count_tokens=self.count_tokens)
        texts = served_instructions(self.instruction_generator, list(targets), context)
        return self.encode(modality, t1, texts), texts

    # ---- prompts -------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.text_encoder.tokenizer(text)["input_ids"])

    def known_target_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """Every phrasing of every known target, and its embedding (computed once)."""
        if self._known_t2_emb is None:
            self._known_t2_emb = self.cache.encode([p for _, p in self._known_t2])
        return [n for n, _ in self._known_t2], self._known_t2_emb

    def resolve_targets(self, targets: list[str] | tuple[str, ...]) -> tuple[list[str], list[float]]:
        """Match each target prompt to the nearest known target; unknown prompts raise."""
        if not targets:
            raise InvalidRequest("no target prompts given")
        emb = self.cache.encode([validate_prompt(t, "target (T2)", self.limits.max_prompt_chars) for t in targets])
        return self.pipeline.resolve(targets, emb.numpy())

    @torch.no_grad()
    def condition(self, t1: str, targets: list[str] | tuple[str, ...]) -> Conditioning:
        t1 = validate_prompt(t1, "context (T1)", self.limits.max_prompt_chars)
        named = t1_modality(t1)
        if named is not None:
            request_stem(t1, named, self.cfg.modalities)   # a T1 naming a modality without a stem is an error
        resolved, scores = self.resolve_targets(list(targets))
        words = list(resolved) if self.target_conditioning == "canonical" else list(targets)
        t1_emb = self.cache.encode([t1]).to(self.device)
        t2_emb = self.cache.encode(words).to(self.device)
        film, head = self.model.conditioning(t1_emb, t2_emb)
        return Conditioning(t1, tuple(targets), tuple(resolved), tuple(scores), film, head, named)

    @torch.no_grad()
    def condition_texts(self, t1: str, texts: list[str] | tuple[str, ...], targets: list[str] | tuple[str, ...]
                        ) -> Conditioning:
        """Condition each head with a text chosen for a target the caller already knows (a generated instruction,
        Zeus's stage): ``texts[i]`` conditions the head of ``targets[i]`` (canonical names or synonyms), with no
        matching of the text; the similarity reported is the text's to its target's nearest phrasing."""
        t1 = validate_prompt(t1, "context (T1)", self.limits.max_prompt_chars)
        if len(texts) != len(targets) or not texts:
            raise InvalidRequest(f"{len(texts)} texts for {len(targets)} targets: give one text per target")
        known = [canonical_target(t) or (t if t in self.vocabulary.targets else None) for t in targets]
        if None in known:
            raise UnknownPromptError(f"unknown target {targets[known.index(None)]!r}: the known targets are "
                                     f"{list(self.vocabulary.targets)}")
        texts = [validate_prompt(x, f"text for {t}", self.limits.max_prompt_chars) for x, t in zip(texts, known)]
        named = t1_modality(t1)
        if named is not None:
            request_stem(t1, named, self.cfg.modalities)
        names, emb = self.known_target_embeddings()
        t2_emb = self.cache.encode(list(texts)).to(self.device)
        sims = (t2_emb.float().cpu() @ emb.float().T).numpy()
        scores = tuple(float(max((v for n, v in zip(names, row) if n == t), default=-1.0)) for t, row in zip(known, sims))
        film, head = self.model.conditioning(self.cache.encode([t1]).to(self.device), t2_emb)
        return Conditioning(t1, tuple(texts), tuple(known), scores, film, head, named)

    @torch.no_grad()
    def encode(self, modality: str, t1: str, targets: list[str]) -> EncodedPrompts:
        """The in-process ``encode_prompts``: stem, FiLM and head parameters, target embeddings."""
        stem = request_stem(t1, modality, self.cfg.modalities)
        t1_emb = self.cache.encode([t1]).to(self.device)
        t2_emb = self.cache.encode(list(targets)).to(self.device)
        film, head = self.model.conditioning(t1_emb, t2_emb)
        return EncodedPrompts(self.cfg.modalities.index(stem), film.float().cpu().numpy(),
                              head.float().cpu().numpy(), t2_emb.float().cpu().numpy())

    # ---- layers ----------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, image, modality, film, head_params) -> torch.Tensor:
        """The in-process segmenter unit (bfloat16 autocast when asked for)."""
        dev = self.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model.segmenter(torch.as_tensor(image).to(dev), torch.as_tensor(modality).to(dev),
                                       torch.as_tensor(film).to(dev), torch.as_tensor(head_params).to(dev))
        return out.float().cpu()

    @torch.no_grad()
    def patch_logits(self, patch: torch.Tensor, modality: str, cond: Conditioning) -> torch.Tensor:
        b = patch.shape[0]
        mod = self.model.modality_index([cond.stem(modality)] * b).to(self.device)
        return self.model.segmenter(patch.to(self.device), mod, cond.film.expand(b, -1), cond.head_params)

    @torch.no_grad()
    def predict_preprocessed(self, image: torch.Tensor, modality: str, cond: Conditioning) -> torch.Tensor:
        """[1, X, Y, Z] model-space volume -> [K, X, Y, Z] probabilities (Gaussian-blended sliding window).

        ``modality`` is what the volume was declared as; the stem is the one the T1 prompt names
        (``cond.stem``), falling back to ``modality`` when the prompt names none.
        """
        enc = EncodedPrompts(self.cfg.modalities.index(cond.stem(modality)), cond.film.float().cpu().numpy(),
                             cond.head_params.float().cpu().numpy(), np.zeros((0, 0), np.float32))
        return self.pipeline.probabilities(torch.as_tensor(image), enc)

    def predict_array(self, image: np.ndarray, affine: np.ndarray, modality: str, t1: str,
                      targets: list[str] | tuple[str, ...], *, return_probabilities: bool = False,
                      instructions: str | None = None, context: str | dict | None = None) -> Prediction:
        return self.pipeline(image, affine, modality, t1, targets, return_probabilities=return_probabilities,
                             instructions=instructions, context=context)

    def predict_file(self, path: str | Path, modality: str, t1: str, targets: list[str], *,
                     out: str | Path | None = None) -> Prediction:
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        pred = self.predict_array(data, img.affine, modality, t1, targets)
        if out is not None:
            nib.save(nib.Nifti1Image(pred.labels, img.affine), str(out))
        return pred


@torch.no_grad()
def sliding_window_probabilities(image: torch.Tensor, patch_size, sw_batch_size: int, overlap: float,
                                 logits_fn) -> torch.Tensor:
    """[1, X, Y, Z] model-space volume -> [K, X, Y, Z] probabilities.

    MONAI's sliding window with Gaussian blending of the logits over ``sw_batch_size`` windows per
    call of ``logits_fn`` ([b, 1, x, y, z] -> [b, K, x, y, z]); the one implementation behind both
    in-process inference and the Triton ``segment_volume`` model.
    """
    x = torch.as_tensor(image)[None].float()
    logits = sliding_window_inference(x, tuple(patch_size), sw_batch_size, logits_fn, overlap=overlap,
                                      mode="gaussian", padding_mode="replicate")
    return torch.sigmoid(torch.as_tensor(logits)[0].float()).cpu()


def match_targets(targets, embeddings: np.ndarray, known_names: list[str], known_embeddings: np.ndarray,
                  vocabulary: PromptVocabulary, *, threshold: float = TARGET_SIMILARITY,
                  margin: float = AMBIGUITY_MARGIN
                  ) -> tuple[list[str], list[float]]:
    """Match each target prompt (with its normalised embedding) to the nearest known target, or refuse it.

    In this order:
    1. a phrasing the vocabulary holds matches its target exactly;
    2. below ``threshold`` (best cosine similarity over all phrasings of a target) the prompt is unknown;
    3. a prompt whose embedding is at least as near to a structure the model does not segment (``NON_TARGETS``,
       names prefixed ``NOT_A_TARGET`` among ``known_names``) as to every target is refused as not a target;
    4. laterality comes from the prompt's words (``laterality``), not from the embedding: when the nearest target
       is one of a left/right pair, a prompt naming a side gets that side's target, one naming both sides is
       refused, and one naming no side must beat the other side by ``margin`` like any runner-up;
    5. the best target must beat the runner-up (another target, the pair counting as one when a side is named)
       by ``margin``, else the prompt is ambiguous.
    Every refusal names the nearest targets. Shared by in-process inference and the Triton ``segment_volume`` model.
    """
    sim = np.asarray(embeddings, dtype=np.float64) @ np.asarray(known_embeddings, dtype=np.float64).T
    phrasings = {n: {normalise_text(p) for p in ps} for n, ps in vocabulary.all_t2().items()}
    resolved, scores = [], []
    for text, row in zip(targets, sim):
        per_target: dict[str, float] = {}
        per_other: dict[str, float] = {}
        for n, s in zip(known_names, row.tolist()):
            bucket, key = (per_other, n[len(NOT_A_TARGET):]) if n.startswith(NOT_A_TARGET) else (per_target, n)
            bucket[key] = max(bucket.get(key, -1.0), s)
        exact = [n for n, ps in phrasings.items() if normalise_text(text) in ps]
        if exact:
            resolved.append(exact[0])
            scores.append(1.0)
            continue
        ranked = sorted(per_target.items(), key=lambda kv: -kv[1])
        nearest = ", ".join(f"{n!r} ({v:.2f})" for n, v in ranked[:3])
        name, s = ranked[0]
        side, pair = laterality(text), counterpart(name)
        if pair is not None and pair in per_target:
            s = max(s, per_target[pair])               # the pair's evidence; the side comes from the words
        other, s_other = max(per_other.items(), key=lambda kv: kv[1]) if per_other else ("", -1.0)
        if s < threshold:
            raise UnknownPromptError(f"unknown target prompt {text!r}: the closest known target is {name!r} "
                                     f"(similarity {s:.2f} < {threshold}); the nearest targets are {nearest}")
        if s_other >= s:
            raise UnknownPromptError(f"target prompt {text!r} is closest to {other!r} ({s_other:.2f}), which this "
                                     f"model does not segment; the nearest targets are {nearest}")
        if pair is not None and pair in per_target:
            if side == "both":
                raise UnknownPromptError(f"target prompt {text!r} names both sides: ask for {name!r} and {pair!r} "
                                         "as two targets")
            if side is not None:
                pair_names = (name, pair)
                name = name if side_of(name) == side else pair
                rest = [(n, v) for n, v in ranked if n not in pair_names]
            else:
                rest = [(n, v) for n, v in ranked if n != name]
        else:
            rest = [(n, v) for n, v in ranked if n != name]
        second, s2 = rest[0] if rest else ("", -1.0)
        if s - s2 < margin:
            hint = " (say which side)" if second == pair else ""
            raise UnknownPromptError(f"ambiguous target prompt {text!r}: it matches {name!r} ({s:.2f}) and "
                                     f"{second!r} ({s2:.2f}) almost equally; be more specific{hint}")
        resolved.append(name)
        scores.append(float(s))
    return resolved, scores
