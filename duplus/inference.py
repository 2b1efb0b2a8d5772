"""Layered inference, from files down to logits (nnU-Net style):

    predict_file(path)                 NIfTI in -> labels (+ probabilities) on the input grid
    predict_array(image, affine, ...)  array + geometry -> labels on the input grid
    predict_preprocessed(x, ...)       one model-space volume -> per-target probabilities (sliding window)
    patch_logits(patch, ...)           one batch of patches -> logits

Prompts are encoded once per call through the embedding cache, and conditioning (FiLM and
head parameters) is computed once per call, never per sliding-window patch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from duplus.models.duplus import DuPLUS, DuPLUSConfig
from duplus.preprocessing import fuse_labels, keep_largest_components, to_input_grid, to_model_space
from duplus.text_encoder import EmbeddingCache, TextEncoder
from duplus.vocabulary import PromptVocabulary, normalise_text, stem_modality, t1_modality, validate_prompt

log = logging.getLogger(__name__)


class UnknownPromptError(ValueError):
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    for key in ("model_config", "state_dict", "vocabulary"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a DuPLUS checkpoint (missing {key!r})")
    return ckpt


def trained_contexts(ckpt: dict) -> dict[tuple[str, str], list[str]]:
    """(modality, region) -> targets the checkpoint was trained on, from its stored training config."""
    out: dict[tuple[str, str], list[str]] = {}
    for key, targets in ckpt.get("trained_contexts", {}).items():
        modality, region = key.split("|")
        out[(modality, region)] = list(targets)
    return out


class Predictor:
    """A trained DuPLUS model with its frozen text encoder and prompt cache."""

    def __init__(self, model: DuPLUS, vocabulary: PromptVocabulary, text_encoder: TextEncoder | None = None, *,
                 device: str | torch.device = "cpu", overlap: float = 0.25, sw_batch_size: int = 2,
                 target_similarity: float = 0.6, ambiguity_margin: float = 0.05, bf16: bool = False,
                 largest_component: bool = True):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.cfg: DuPLUSConfig = model.cfg
        self.vocabulary = vocabulary
        self.text_encoder = text_encoder or TextEncoder(self.cfg.text_encoder)
        self.cache = EmbeddingCache(self.text_encoder)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.target_similarity = target_similarity
        # MiniLM puts a bare "kidney" 0.04 closer to "right kidney" than to "left kidney": a match
        # that wins by less than this margin is refused as ambiguous rather than guessed
        self.ambiguity_margin = ambiguity_margin
        self.bf16 = bf16  # bfloat16 autocast for the sliding window (validation during training)
        self.largest_component = largest_component  # keep_largest_components on single-structure targets
        self._known_t2: list[tuple[str, str]] = [(t, p) for t, ps in vocabulary.all_t2().items() for p in ps]
        self._known_t2_emb: torch.Tensor | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> Predictor:
        ckpt = load_checkpoint(path)
        model = DuPLUS(DuPLUSConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
        return cls(model, PromptVocabulary.from_dict(ckpt["vocabulary"]), device=device, **kwargs)

    # ---- prompts -------------------------------------------------------------------------
    def known_target_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """Every phrasing of every known target, and its embedding (computed once)."""
        if self._known_t2_emb is None:
            self._known_t2_emb = self.cache.encode([p for _, p in self._known_t2])
        return [n for n, _ in self._known_t2], self._known_t2_emb

    def resolve_targets(self, targets: list[str] | tuple[str, ...]) -> tuple[list[str], list[float]]:
        """Match each target prompt to the nearest known target; unknown prompts raise."""
        if not targets:
            raise ValueError("no target prompts given")
        names, known = self.known_target_embeddings()
        emb = self.cache.encode([validate_prompt(t, "target (T2)") for t in targets])
        return match_targets(targets, emb.numpy(), names, known.numpy(), self.vocabulary,
                             threshold=self.target_similarity, margin=self.ambiguity_margin)

    @torch.no_grad()
    def condition(self, t1: str, targets: list[str] | tuple[str, ...]) -> Conditioning:
        t1 = validate_prompt(t1, "context (T1)")
        named = t1_modality(t1)
        if named is not None:
            stem_modality(t1, named, self.cfg.modalities)   # a T1 naming a modality without a stem is an error
        resolved, scores = self.resolve_targets(list(targets))
        t1_emb = self.cache.encode([t1]).to(self.device)
        t2_emb = self.cache.encode(list(targets)).to(self.device)
        film, head = self.model.conditioning(t1_emb, t2_emb)
        return Conditioning(t1, tuple(targets), tuple(resolved), tuple(scores), film, head, named)

    # ---- layers ----------------------------------------------------------------------------
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
        mod_index = self.model.modality_index(cond.stem(modality)).to(self.device)

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            b = patch.shape[0]
            return self.model.segmenter(patch.to(self.device), mod_index.expand(b), cond.film.expand(b, -1),
                                        cond.head_params)

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return sliding_window_probabilities(torch.as_tensor(image), self.cfg.patch_size, self.sw_batch_size,
                                                self.overlap, predictor)

    def predict_array(self, image: np.ndarray, affine: np.ndarray, modality: str, t1: str,
                      targets: list[str] | tuple[str, ...], *, return_probabilities: bool = False) -> Prediction:
        t0 = time.perf_counter()
        if modality not in self.cfg.modalities:
            raise ValueError(f"unknown modality {modality!r}; this model has stems for {self.cfg.modalities}")
        cond = self.condition(t1, targets)
        if cond.stem(modality) != modality:
            log.warning("the T1 prompt %r names %s but the volume is declared %s: intensities are normalised as %s, "
                        "the stem and FiLM follow the prompt (%s)", t1, cond.stem(modality), modality, modality,
                        cond.stem(modality))
        x, _ = to_model_space(image, affine, modality, self.cfg.spacing)
        probs = self.predict_preprocessed(x, modality, cond)
        probs_in = to_input_grid(probs, x.affine, affine, tuple(image.shape))
        labels = fuse_labels(probs_in).numpy()
        if self.largest_component:
            labels = keep_largest_components(labels, cond.resolved)
        return Prediction(labels=labels, affine=np.asarray(affine, dtype=np.float64), targets=tuple(targets),
                          resolved=cond.resolved, probabilities=probs_in.numpy() if return_probabilities else None,
                          seconds=time.perf_counter() - t0, stem=cond.stem(modality))

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


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, truth).sum() / denom)


def match_targets(targets, embeddings: np.ndarray, known_names: list[str], known_embeddings: np.ndarray,
                  vocabulary: PromptVocabulary, *, threshold: float = 0.6, margin: float = 0.05
                  ) -> tuple[list[str], list[float]]:
    """Match each target prompt (with its normalised embedding) to the nearest known target.

    A phrasing the vocabulary holds matches exactly; otherwise the best cosine similarity over all
    phrasings of a target must reach ``threshold`` and beat the runner-up target by ``margin``.
    Shared by in-process inference and the Triton ``segment_volume`` model.
    """
    sim = np.asarray(embeddings, dtype=np.float64) @ np.asarray(known_embeddings, dtype=np.float64).T
    phrasings = {n: {normalise_text(p) for p in ps} for n, ps in vocabulary.all_t2().items()}
    resolved, scores = [], []
    for text, row in zip(targets, sim):
        per_target: dict[str, float] = {}
        for n, s in zip(known_names, row.tolist()):
            per_target[n] = max(per_target.get(n, -1.0), s)
        exact = [n for n, ps in phrasings.items() if normalise_text(text) in ps]
        ranked = sorted(per_target.items(), key=lambda kv: -kv[1])
        (name, s), (second, s2) = ranked[0], ranked[1] if len(ranked) > 1 else ("", -1.0)
        if exact:
            name, s = exact[0], 1.0
        elif s < threshold:
            raise UnknownPromptError(f"unknown target prompt {text!r}: the closest known target is {name!r} "
                                     f"(similarity {s:.2f} < {threshold})")
        elif s - s2 < margin:
            raise UnknownPromptError(f"ambiguous target prompt {text!r}: it matches {name!r} ({s:.2f}) and "
                                     f"{second!r} ({s2:.2f}) almost equally; be more specific")
        resolved.append(name)
        scores.append(float(s))
    return resolved, scores
