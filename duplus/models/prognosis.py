"""Prognosis: frozen DuPLUS image features + a LoRA-adapted text encoder on the EHR note -> risk.

As in DuPLUS / PEMMA, the segmentation backbone is frozen and reused: one pass of the
segmenter over the (PET) volume at model spacing, conditioned on its T1 prompt and on the
targets "primary tumour" and "lymph node", gives

* the per-target probabilities -> **radiomic descriptors** of the predicted lesions (tumour
  volume, SUVmax / SUVmean inside the tumour, node count and volume), and
* the shared decoder features **pooled** over the predicted tumour, over the predicted nodes
  and globally (probability-weighted means).

The EHR note goes through the sentence encoder with **LoRA** adapters (peft; rank and target
modules configurable), and a small head maps both to a log-risk score (late fusion: the sum of
an image and a text contribution, the form of a Cox model).  The loss is the negative Cox
partial log-likelihood (Breslow ties).  Units exported for serving:

    image_features   : image [1, 1, X, Y, Z], modality [1], film [1, F], head_params [2, P]
                       -> probabilities [1, 2, X, Y, Z], pooled [1, 3 * C]
    text_encoder_ehr : input_ids, attention_mask -> embedding [N, E]   (LoRA merged)
    prognosis        : image_features [N, D], ehr_embedding [N, E] -> risk [N]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from duplus.models.duplus import Segmenter
from duplus.text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder, pooled_embedding

log = logging.getLogger("duplus.models.prognosis")

PROGNOSIS_TARGETS = ("primary tumour", "lymph node")
RADIOMICS = ("log_tumour_volume", "suv_max", "suv_mean", "node_count", "log_node_volume")
#: largest model-space grid (voxels per axis) the single-pass feature extractor accepts
MAX_FEATURE_GRID = 192
MAX_EHR_TOKENS = 256
MAX_EHR_CHARS = 4096
MIN_NODE_ML = 1.0


@dataclass(frozen=True)
class PrognosisConfig:
    """The prognosis model: which backbone, which text encoder, LoRA and head sizes."""

    segmentation_checkpoint: str = "checkpoints/duplus_demo.pt"
    modality: str = "PET"
    t1: str = "PET of the head and neck"
    text_encoder: str = DEFAULT_TEXT_ENCODER
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")
    text_hidden: int = 13          # width of the note read-out (= the number of structured variables when aux_weight > 0)
    dropout: float = 0.1
    max_ehr_tokens: int = MAX_EHR_TOKENS
    aux_weight: float = 1.0        # training only: weight of the auxiliary "read the note" loss (0 = Cox only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"dropouts must be in [0, 1), got lora_dropout={self.lora_dropout}, "
                             f"dropout={self.dropout}")
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module (e.g. query, value)")
        if self.text_hidden < 1:
            raise ValueError(f"text_hidden must be >= 1, got {self.text_hidden}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if not 8 <= self.max_ehr_tokens <= 512:
            raise ValueError(f"max_ehr_tokens must be in 8..512, got {self.max_ehr_tokens}")


# --------------------------------------------------------------------------------------
# Image side: one frozen backbone pass -> pooled features + radiomics
# --------------------------------------------------------------------------------------


class ImageFeatureUnit(nn.Module):
    """Frozen segmenter -> per-target probabilities and decoder features pooled per target and globally."""

    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, image, modality, film, head_params):
        from duplus.models.duplus import apply_dynamic_head

        feats = self.segmenter.features(image, modality, film)            # [1, C, X, Y, Z]
        probs = torch.sigmoid(apply_dynamic_head(feats, head_params, self.segmenter.cfg.head_shapes))  # [1, K, ...]
        b, c = feats.shape[0], feats.shape[1]
        flat = feats.reshape(b, c, -1)                                     # [1, C, N]
        weights = probs.reshape(b, probs.shape[1], -1)                     # [1, K, N]
        region = torch.matmul(weights, flat.transpose(1, 2)) / (weights.sum(-1, keepdim=True) + 1.0)  # [1, K, C]
        pooled = torch.cat([region.reshape(b, -1), flat.mean(-1)], dim=1)  # [1, (K + 1) * C]
        return probs, pooled


def pad_to_multiple(image: np.ndarray, factor: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[X, Y, Z] -> edge-padded to multiples of ``factor``; returns the padded array and the original shape."""
    shape = tuple(int(s) for s in image.shape)
    pads = [(0, (-s) % factor) for s in shape]
    return np.pad(image, pads, mode="edge"), shape


def check_feature_grid(shape: Sequence[int]) -> None:
    if any(s > MAX_FEATURE_GRID for s in shape):
        mm = MAX_FEATURE_GRID * 1.5
        raise ValueError(f"field of view too large for prognosis: {tuple(shape)} voxels at model spacing "
                         f"(limit {MAX_FEATURE_GRID} per axis, about {mm:.0f} mm); crop the volume to the head and neck")


def radiomics(probabilities: np.ndarray, image_norm: np.ndarray, modality: str,
              spacing: Sequence[float]) -> dict[str, float]:
    """Lesion descriptors from [2, X, Y, Z] (tumour, node) probabilities and the normalised image.

    The hard masks (probability >= 0.5, the larger target wins) only pick the regions: the primary is
    the largest tumour component (dilated by 2 voxels), a node is a node component of at least
    ``MIN_NODE_ML``.  Inside them the values are soft (probability-weighted volume and SUV mean, SUVmax
    over voxels weighted by a ramp of the probability), so that float-level differences between
    PyTorch and an exported engine move them by float-level amounts instead of whole voxels.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    p_t, p_n = probabilities[0], probabilities[1]
    label = np.where(probabilities.max(0) >= 0.5, probabilities.argmax(0) + 1, 0)
    comps, n = ndimage.label(label == 1)
    region = np.zeros(label.shape, bool)
    if n:
        sizes = ndimage.sum(np.ones_like(comps), comps, index=range(1, n + 1))
        region = ndimage.binary_dilation(comps == (int(np.argmax(sizes)) + 1), iterations=2)
    from duplus.preprocessing import INTENSITY_POLICIES  # MONAI: only where images are handled

    policy = INTENSITY_POLICIES[modality]
    if policy.kind == "window":  # back to the modality's own units (SUV for PET)
        value = (image_norm - policy.out_low) / (policy.out_high - policy.out_low) * (policy.high - policy.low) + policy.low
    else:
        value = image_norm
    w = p_t[region]
    tumour_ml = float(w.sum()) * voxel_ml
    ramp = np.clip((w - 0.25) / 0.5, 0.0, 1.0)
    nodes, n_nodes = ndimage.label(label == 2)
    node_ml = ndimage.sum(p_n, nodes, index=range(1, n_nodes + 1)) * voxel_ml if n_nodes else np.zeros(0)
    kept = [float(v) for v in np.atleast_1d(node_ml) if v >= MIN_NODE_ML]
    return {
        "log_tumour_volume": math.log(tumour_ml + 0.1),
        "suv_max": float((value[region] * ramp).max()) if region.any() else 0.0,
        "suv_mean": float((value[region] * w).sum() / max(float(w.sum()), 1e-6)) if region.any() else 0.0,
        "node_count": float(len(kept)),
        "log_node_volume": math.log(sum(kept) + 0.1),
    }


@dataclass(frozen=True)
class ImageFeatures:
    vector: np.ndarray             # [D] float32: radiomics then pooled backbone features
    radiomics: dict
    tumour_ml: float
    seconds: float = 0.0


def feature_names(channels: int) -> list[str]:
    names = list(RADIOMICS)
    for region in ("tumour", "node", "global"):
        names += [f"pooled_{region}_{i}" for i in range(channels)]
    return names


def image_features_from_model_space(image_norm: np.ndarray, modality: str, spacing: Sequence[float],
                                    unit_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                                    level_factor: int) -> ImageFeatures:
    """The shared recipe of in-process and served prognosis: pad, one unit pass, radiomics + pooled features.

    ``image_norm``: [X, Y, Z] normalised model-space image; ``unit_fn``: padded [1, 1, X', Y', Z'] float32 ->
    (probabilities [1, 2, X', Y', Z'], pooled [1, 3C]).
    """
    import time

    t0 = time.perf_counter()
    check_feature_grid(image_norm.shape)
    padded, shape = pad_to_multiple(np.asarray(image_norm, dtype=np.float32), level_factor)
    probs, pooled = unit_fn(padded[None, None])
    probs = np.asarray(probs)[0, :, :shape[0], :shape[1], :shape[2]]
    rad = radiomics(probs, image_norm, modality, spacing)
    vector = np.concatenate([np.array([rad[k] for k in RADIOMICS], np.float32),
                             np.asarray(pooled, np.float32).reshape(-1)])
    return ImageFeatures(vector, rad, math.exp(rad["log_tumour_volume"]) - 0.1, time.perf_counter() - t0)


class ImageFeatureExtractor:
    """In-process (PyTorch) image features from a DuPLUS segmentation checkpoint; frozen."""

    def __init__(self, checkpoint: str | Path, modality: str = "PET", t1: str = "PET of the head and neck",
                 device: str = "cpu"):
        from duplus.inference import Predictor

        self.predictor = Predictor.from_checkpoint(checkpoint, device=device)
        self.modality, self.t1 = modality, t1
        self.cfg = self.predictor.cfg
        self.unit = ImageFeatureUnit(self.predictor.model.segmenter).eval()
        for p in self.unit.parameters():
            p.requires_grad_(False)
        self.cond = self.predictor.condition(t1, list(PROGNOSIS_TARGETS))
        self.level_factor = self.cfg.level_factor
        self.dim = len(RADIOMICS) + 3 * self.cfg.head_in_channels

    @torch.no_grad()
    def unit_fn(self, padded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mod = self.predictor.model.modality_index(self.modality)
        probs, pooled = self.unit(torch.from_numpy(padded), mod, self.cond.film, self.cond.head_params)
        return probs.numpy(), pooled.numpy()

    def __call__(self, volume: np.ndarray, affine: np.ndarray) -> ImageFeatures:
        from duplus.preprocessing import to_model_space

        x, _ = to_model_space(volume, affine, self.modality, self.cfg.spacing)
        return image_features_from_model_space(x.as_tensor()[0].numpy(), self.modality, self.cfg.spacing,
                                               self.unit_fn, self.level_factor)


# --------------------------------------------------------------------------------------
# Text side: the sentence encoder with LoRA adapters
# --------------------------------------------------------------------------------------


def validate_ehr(text, max_chars: int = MAX_EHR_CHARS) -> str:
    """An EHR note must be non-empty UTF-8 text of at most ``max_chars`` characters."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"EHR note is not valid UTF-8 (byte {exc.start})") from exc
    if not isinstance(text, str):
        raise ValueError(f"EHR note must be text, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise ValueError("EHR note is empty")
    if len(text) > max_chars:
        raise ValueError(f"EHR note has {len(text)} characters (limit {max_chars})")
    return text


class EHREncoder(nn.Module):
    """The sentence encoder with LoRA adapters (peft) on the chosen attention projections."""

    def __init__(self, cfg: PrognosisConfig):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        base = TextEncoder(cfg.text_encoder, max_tokens=cfg.max_ehr_tokens)
        self.tokenizer = base.tokenizer
        self.max_tokens = cfg.max_ehr_tokens
        self.dim = base.dim
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), bias="none")
        self.model = get_peft_model(base.model, lora)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(self.model, input_ids, attention_mask)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [validate_ehr(t) for t in texts]
        tokens = self.tokenizer(texts, padding=True, truncation=False, return_tensors="pt")
        if tokens["input_ids"].shape[1] > self.max_tokens:
            lengths = tokens["attention_mask"].sum(1).tolist()
            raise ValueError(f"EHR note has {max(lengths)} tokens (limit {self.max_tokens})")
        return tokens

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        return self(tokens["input_ids"], tokens["attention_mask"])

    def merged(self) -> TextEncoderMerged:
        """A plain encoder with the LoRA weights merged in (peft merge_and_unload), for export."""
        import copy

        return TextEncoderMerged(copy.deepcopy(self.model).merge_and_unload())


class TextEncoderMerged(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(self.model, input_ids, attention_mask)


# --------------------------------------------------------------------------------------
# Head, loss, metrics
# --------------------------------------------------------------------------------------


class PrognosisHead(nn.Module):
    """risk = w . standardised image features + v . read(EHR embedding): late fusion in log-hazard space.

    ``read`` is a linear read-out of ``text_hidden`` clinical quantities from the note embedding (a
    concept bottleneck): trained with the auxiliary loss it holds the structured variables the note states
    (HPV/p16, smoking, ECOG, TNM, treatment, age ...), so that the survival signal only has to fit a few
    Cox-like coefficients ``v``.  ``read_out`` exposes it.
    """

    def __init__(self, image_dim: int, text_dim: int, text_hidden: int = 13, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.image = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_dim, 1))
        self.read = nn.Linear(text_dim, text_hidden)
        self.text = nn.Linear(text_hidden, 1)
        # the embedding is L2-normalised (entries ~ 1 / sqrt(dim)): rescale to unit-size entries so that the
        # read-out's weights are O(1) and train at the head's learning rate
        self.text_scale = math.sqrt(text_dim)
        nn.init.zeros_(self.image[1].weight)
        nn.init.zeros_(self.image[1].bias)

    def set_image_statistics(self, features: torch.Tensor) -> None:
        self.image_mean.copy_(features.mean(0))
        self.image_std.copy_(features.std(0).clamp_min(1e-3))

    def read_out(self, ehr_embedding: torch.Tensor) -> torch.Tensor:
        return self.read(ehr_embedding * self.text_scale)

    def forward(self, image_features: torch.Tensor, ehr_embedding: torch.Tensor) -> torch.Tensor:
        z = (image_features - self.image_mean) / self.image_std
        return (self.image(z) + self.text(self.read_out(ehr_embedding))).reshape(-1)


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood, Breslow's handling of ties, averaged over events.

    For each event i: risk_i - log sum_{j: t_j >= t_i} exp(risk_j).  Tied times share one risk set.
    """
    if risk.ndim != 1 or risk.shape != time.shape or risk.shape != event.shape:
        raise ValueError(f"risk, time, event must be 1-D of one length, got {tuple(risk.shape)}, "
                         f"{tuple(time.shape)}, {tuple(event.shape)}")
    event = event.to(risk.dtype)
    n_events = event.sum()
    if float(n_events) == 0:
        return risk.sum() * 0.0
    at_risk = (time.reshape(1, -1) >= time.reshape(-1, 1)).to(risk.dtype)  # [i, j]: j in the risk set of i
    log_denominator = torch.logsumexp(risk.reshape(1, -1) + torch.log(at_risk.clamp_min(1e-45)), dim=1)
    return -((risk - log_denominator) * event).sum() / n_events


def c_index(time: Sequence[float], risk: Sequence[float], event: Sequence[int]) -> float:
    """Harrell's C-index of a risk score (higher risk = earlier event), via lifelines."""
    from lifelines.utils import concordance_index

    return float(concordance_index(np.asarray(time, float), -np.asarray(risk, float), np.asarray(event, int)))


def bootstrap_c_index(time, scores: dict[str, np.ndarray], event, n: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap: 95% intervals of each score's C-index (same resamples for all scores)."""
    time, event = np.asarray(time, float), np.asarray(event, int)
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in scores}
    for _ in range(n):
        idx = rng.integers(0, len(time), len(time))
        if event[idx].sum() < 2:
            continue
        for k, s in scores.items():
            draws[k].append(c_index(time[idx], np.asarray(s)[idx], event[idx]))
    out = {}
    for k, d in draws.items():
        lo, hi = np.percentile(d, [2.5, 97.5])
        out[k] = {"ci95": [round(float(lo), 4), round(float(hi), 4)], "half_width": round(float(hi - lo) / 2, 4)}
    return out


class PrognosisModel(nn.Module):
    """EHR encoder (LoRA) + head; the image features come precomputed from the frozen backbone.

    In training, an auxiliary loss (``cfg.aux_weight``) asks the head's note read-out to equal the
    standardised structured variables of the patient: it teaches the adapters to *read* the note from
    far more signal than the survival times alone carry.
    """

    def __init__(self, cfg: PrognosisConfig, image_dim: int):
        super().__init__()
        self.cfg = cfg
        self.image_dim = image_dim
        self.ehr = EHREncoder(cfg)
        self.head = PrognosisHead(image_dim, self.ehr.dim, cfg.text_hidden, cfg.dropout)

    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.head(image_features, self.ehr(input_ids, attention_mask))

    def risk(self, image_features: np.ndarray, notes: Sequence[str], batch_size: int = 64) -> np.ndarray:
        self.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(notes), batch_size):
                tok = self.ehr.tokenize(notes[i:i + batch_size])
                feats = torch.as_tensor(np.asarray(image_features[i:i + batch_size], np.float32))
                out.append(self(feats, tok["input_ids"], tok["attention_mask"]).numpy())
        return np.concatenate(out)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the LoRA weights and the head (the encoder's base weights are packaged)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if "lora_" in k or k.startswith("head.")}

    def parameter_counts(self, backbone_params: int = 0) -> dict:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters()) + backbone_params
        return {"trainable": trainable, "total": total, "trainable_fraction": trainable / total}


def save_prognosis_checkpoint(path: Path, model: PrognosisModel, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"prognosis_config": asdict(model.cfg), "image_dim": model.image_dim,
                "state": model.trainable_state(), **meta}, path)


def load_prognosis_checkpoint(path: str | Path) -> tuple[PrognosisModel, dict]:
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    for key in ("prognosis_config", "image_dim", "state"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a DuPLUS prognosis checkpoint (missing {key!r})")
    model = PrognosisModel(PrognosisConfig(**ckpt["prognosis_config"]), int(ckpt["image_dim"]))
    missing, unexpected = model.load_state_dict(ckpt["state"], strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected weights {unexpected[:5]}")
    not_loaded = [k for k in missing if "lora_" in k or k.startswith("head.")]
    if not_loaded:
        raise ValueError(f"{path}: missing trained weights {not_loaded[:5]}")
    return model.eval(), ckpt


__all__ = ["PrognosisConfig", "ImageFeatureUnit", "ImageFeatureExtractor", "ImageFeatures", "EHREncoder",
           "PrognosisHead", "PrognosisModel", "cox_loss", "c_index", "bootstrap_c_index", "radiomics",
           "image_features_from_model_space", "validate_ehr", "feature_names", "field", "PROGNOSIS_TARGETS"]
