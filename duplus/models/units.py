"""The exported units and their tensor contract.

Each deployable part of DuPLUS is one exported unit with named inputs/outputs, dtypes and
dynamic axes. The contract below is the single source of truth: the ONNX export, the parity
check, the engine builders and the Triton configurations all read it, and tests check the
exported files against it.
"""

from __future__ import annotations

import torch
from torch import nn

from duplus.models.duplus import Conditioning, DuPLUS, DuPLUSConfig
from duplus.text_encoder import TextEncoder


class SegmenterUnit(nn.Module):
    def __init__(self, model: DuPLUS):
        super().__init__()
        self.segmenter = model.segmenter

    def forward(self, image, modality, film, head_params):
        logits = self.segmenter(image, modality, film, head_params)
        return logits, torch.sigmoid(logits)


class ConditioningUnit(nn.Module):
    def __init__(self, model: DuPLUS | Conditioning):
        """From the whole model, or from its ``Conditioning`` alone (no segmenter built, so no MONAI import)."""
        super().__init__()
        self.conditioning = model if isinstance(model, Conditioning) else model.conditioning

    def forward(self, t1_embedding, t2_embedding):
        return self.conditioning(t1_embedding, t2_embedding)


class TextEncoderUnit(nn.Module):
    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask)


def example_inputs(name: str, cfg: DuPLUSConfig, *, batch: int = 2, k: int = 3, spatial=None, tokens: int = 12,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh random inputs that satisfy a unit's contract (for export tracing and parity checks)."""
    g = torch.Generator().manual_seed(seed)
    if name == "text_encoder":
        ids = torch.randint(1000, 20000, (batch, tokens), generator=g)
        ids[:, 0] = 101  # [CLS]
        mask = torch.ones(batch, tokens, dtype=torch.int64)
        mask[-1, tokens // 2:] = 0  # one padded prompt exercises the pooling mask
        return {"input_ids": ids, "attention_mask": mask}
    if name == "conditioning":
        t1 = torch.nn.functional.normalize(torch.randn(batch, cfg.text_dim, generator=g), dim=1)
        t2 = torch.nn.functional.normalize(torch.randn(k, cfg.text_dim, generator=g), dim=1)
        return {"t1_embedding": t1, "t2_embedding": t2}
    if name == "segmenter":
        spatial = tuple(spatial or cfg.patch_size)
        return {"image": torch.randn(batch, 1, *spatial, generator=g),
                "modality": torch.randint(0, len(cfg.modalities), (batch,), generator=g),
                "film": torch.randn(batch, cfg.film_size, generator=g) * 0.1,
                "head_params": torch.randn(k, cfg.head_params, generator=g) * 0.3}
    raise ValueError(f"unknown unit {name!r}")


# ---- prognosis (issue: LoRA text encoder + frozen image features -> risk) -------------------

class PrognosisHeadUnit(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, image_features, ehr_embedding):
        return self.head(image_features, ehr_embedding)


def prognosis_example_inputs(name: str, cfg: DuPLUSConfig, image_dim: int, text_dim: int, *, n: int = 2,
                             tokens: int = 40, spatial=(48, 48, 32), seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "image_features":
        return {"image": torch.rand(1, 1, *spatial, generator=g) * 2.0,
                "modality": torch.tensor([len(cfg.modalities) - 1]),
                "film": torch.randn(1, cfg.film_size, generator=g) * 0.1,
                "head_params": torch.randn(2, cfg.head_params, generator=g) * 0.3}
    if name == "text_encoder_ehr":
        return example_inputs("text_encoder", cfg, batch=n, tokens=tokens, seed=seed)
    if name == "prognosis":
        return {"image_features": torch.randn(n, image_dim, generator=g),
                "ehr_embedding": torch.nn.functional.normalize(torch.randn(n, text_dim, generator=g), dim=1)}
    raise ValueError(f"unknown prognosis unit {name!r}")


# ---- PEMMA (issue 20: one graph for CT-only, PET-only and CT+PET) ---------------------------

class PemmaSegmenterUnit(nn.Module):
    """The merged PEMMA UNETR as one unit: windows [b, 2, c, c, c] (CT, PET; zeros where absent) + mode [1]
    (index into ``duplus.models.pemma.INPUT_MODES``) -> logits and softmax probabilities [b, 3, c, c, c]."""

    def __init__(self, model):
        super().__init__()
        if getattr(model, "adapter", None) is not None:
            raise ValueError("merge the adapters first (duplus.models.pemma.merged_for_export)")
        self.model = model

    def forward(self, image, mode):
        logits = self.model.forward_mode(image, mode)
        return logits, torch.softmax(logits, dim=1)


def pemma_example_inputs(crop: int, *, batch: int = 1, mode: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random windows (the absent modality's channel zero, as the pipeline sends it) and a mode index."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 2, crop, crop, crop, generator=g)
    if mode == 1:
        image[:, 1] = 0
    elif mode == 2:
        image[:, 0] = 0
    return {"image": image, "mode": torch.tensor([mode], dtype=torch.int64)}


# ---- context classifier (issue 21: Biomed-DPT) -------------------------------------------------------------
# ``duplus.context.model.ContextClassifier`` is itself the unit (views -> probabilities; the prompt-tuned text
# features are a buffer, the visual prompts run without dropout in eval mode): no wrapper is needed.

def context_example_inputs(size: int, *, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random views in [0, 1] (what ``duplus.context.views.context_views`` gives), some pixels 0 as outside a
    field of view."""
    g = torch.Generator().manual_seed(seed)
    views = torch.rand(batch, 3, size, size, generator=g)
    views[..., : size // 8, :] = 0
    return {"views": views}
