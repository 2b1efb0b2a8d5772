"""A small CLIP-style vision-language model for the context of a volume, and Biomed-DPT prompt tuning on it.

* :class:`ImageTower`: a ViT over the three views (:mod:`duplus.context.views`), 8 x 8 patches, a CLS token
  projected into the text tower's embedding space; optional **visual prompts** (:class:`VisualPrompts`):
  zero-initialised tokens with dropout inserted at the input and replaced before every block (deep VPT, as
  in Biomed-DPT).
* :class:`HFTextTower`: the stack's frozen text encoder (MiniLM from its package) read through
  ``inputs_embeds``, so that learnable context vectors can stand in front of a class name.
* :class:`PromptLearner`: CoOp's learnable context, initialised from a clinical template's word embeddings.
* :class:`ContextCLIP`: image tower + text tower + temperature; :func:`clip_soft_loss` aligns them.

The prompt-tuning code (:class:`PromptLearner`, :class:`DPTLoss`, training/train_context.py) talks to the
towers only through :class:`TextTower` (``tokenize``, ``embed_tokens``, ``encode_embeds``, ``encode_text``)
and an image tower's ``forward(views, prompts)``, ``depth`` and ``width``, so another backbone with the same
methods can be used: :mod:`duplus.context.hf_clip` reads a CLIP checkpoint in Hugging Face format that way.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ContextConfig:
    image_size: int = 64
    patch: int = 8
    channels: int = 3
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    embed_dim: int = 384            # the text tower's sentence-embedding size
    n_ctx: int = 4                  # learnable text context vectors
    ctx_init: str = "a medical image of"
    n_visual_prompts: int = 4
    visual_prompt_dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm transformer block; keeps the last attention map when asked (for attention maps)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.keep_attention = False
        self.attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        out, weights = self.attn(h, h, h, need_weights=self.keep_attention, average_attn_weights=True)
        if self.keep_attention:
            self.attention = weights
        x = x + out
        return x + self.mlp(self.norm2(x))


class VisualPrompts(nn.Module):
    """Deep visual prompts: ``n`` zero vectors per block with dropout, inserted after the CLS token at the input
    and replaced by the next block's own vectors before every later block."""

    def __init__(self, depth: int, n: int, dim: int, dropout: float):
        super().__init__()
        self.n = n
        self.tokens = nn.Parameter(torch.zeros(depth, n, dim))
        self.dropout = nn.Dropout(dropout)

    def insert(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        p = self.dropout(self.tokens[layer]).unsqueeze(0).expand(x.shape[0], -1, -1)
        rest = x[:, 1:] if layer == 0 else x[:, 1 + self.n:]
        return torch.cat([x[:, :1], p, rest], dim=1)


class ImageTower(nn.Module):
    def __init__(self, cfg: ContextConfig):
        super().__init__()
        if cfg.image_size % cfg.patch:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch {cfg.patch}")
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch, cfg.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.embed_dim, bias=False)

    @property
    def depth(self) -> int:
        """Transformer blocks (one set of deep visual prompts each)."""
        return len(self.blocks)

    @property
    def width(self) -> int:
        """Token width (the visual prompts' size)."""
        return self.cfg.dim

    def forward(self, views: torch.Tensor, prompts: VisualPrompts | None = None) -> torch.Tensor:
        """[B, 3, H, W] views -> [B, embed_dim] L2-normalised image features."""
        x = self.patch_embed(views).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for i, block in enumerate(self.blocks):
            if prompts is not None:
                x = prompts.insert(x, i)
            x = block(x)
        return F.normalize(self.proj(self.norm(x[:, 0])), dim=-1)


class TextTower(Protocol):
    """What prompt tuning needs from a text tower (the stack's MiniLM, or BiomedCLIP's PubMedBERT read the same
    way): token ids, their input embeddings, and features from (possibly edited) embeddings."""

    dim: int

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...

    def encode_embeds(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...


class FrozenTextTower(nn.Module, ABC):
    """What every frozen :class:`TextTower` shares: no training mode (dropout stays off), a Hugging Face tokenizer
    (``self.tokenizer``, ``self.max_tokens``) and batched ``encode_text``; subclasses give ``embed_tokens`` and
    ``encode_embeds``."""

    tokenizer = None
    max_tokens: int = 64

    def train(self, mode: bool = True) -> FrozenTextTower:  # frozen: dropout stays off
        return super().train(False)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                           return_tensors="pt")
        return b["input_ids"], b["attention_mask"]

    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, E] input embeddings."""

    @abstractmethod
    def encode_embeds(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, T, E] (possibly edited) input embeddings of ``ids`` -> [B, D] L2-normalised text features."""

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(texts[i:i + batch_size])
            out.append(self.encode_embeds(self.embed_tokens(ids), ids, mask))
        return torch.cat(out)


class HFTextTower(FrozenTextTower):
    """A frozen Hugging Face encoder (BERT family) as a :class:`TextTower`: mean-pooled, L2-normalised last
    hidden state, the same sentence embedding as :class:`duplus.text_encoder.TextEncoder`."""

    def __init__(self, encoder):  # a duplus.text_encoder.TextEncoder
        super().__init__()
        self.tokenizer = encoder.tokenizer
        self.model = encoder.model
        self.max_tokens = encoder.max_tokens
        self.dim = encoder.dim
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def encode_embeds(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


class PromptLearner(nn.Module):
    """CoOp: ``n_ctx`` learnable vectors stand in front of each class name ("[ctx]... CT of the abdomen").

    Initialised from the word embeddings of ``init`` (one token per word, e.g. 'a medical image of'), so that
    before training the prompt reads as that template. The class names' token ids are fixed at construction;
    :meth:`forward` returns their L2-normalised text features [C, dim].
    """

    def __init__(self, tower: TextTower, names: list[str], n_ctx: int = 4, init: str | None = "a medical image of"):
        super().__init__()
        self.tower = tower
        self.names = list(names)
        self.n_ctx = n_ctx
        placeholder = " ".join(["x"] * n_ctx)
        ids, mask = tower.tokenize([f"{placeholder} {n}." for n in self.names])
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        with torch.no_grad():
            base = tower.embed_tokens(ids)
            ctx = torch.randn(n_ctx, base.shape[-1]) * 0.02
            if init:
                init_ids, _ = tower.tokenize([init])
                words = init_ids[0, 1:1 + n_ctx]  # after [CLS]
                if len(words) == n_ctx:
                    ctx = tower.embed_tokens(words[None])[0].clone()
        self.register_buffer("token_embeds", base.detach(), persistent=False)
        self.ctx = nn.Parameter(ctx)

    def forward(self) -> torch.Tensor:
        e = self.token_embeds.clone()
        e[:, 1:1 + self.n_ctx] = self.ctx.unsqueeze(0).expand(e.shape[0], -1, -1)
        return self.tower.encode_embeds(e, self.ids, self.mask)


class ContextCLIP(nn.Module):
    """Image tower + frozen text tower + a learned temperature (CLIP)."""

    def __init__(self, cfg: ContextConfig, tower: TextTower):
        super().__init__()
        if tower.dim != cfg.embed_dim:
            raise ValueError(f"text tower gives {tower.dim}-d features; the config expects {cfg.embed_dim}")
        self.cfg = cfg
        self.image = ImageTower(cfg)
        self.text = tower
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def clip_soft_loss(image_features: torch.Tensor, text_features: torch.Tensor, match: torch.Tensor,
                   scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss with several positives: ``match[i, j]`` is 1 where caption j truly describes
    image i (a batch holds several images of one context, and 'an MRI' describes T1 and T2 images alike)."""
    logits = scale * image_features @ text_features.T
    m = match.float()
    img_to_txt = -(F.log_softmax(logits, 1) * m / m.sum(1, keepdim=True).clamp_min(1)).sum(1).mean()
    txt_to_img = -(F.log_softmax(logits.T, 1) * m.T / m.T.sum(1, keepdim=True).clamp_min(1)).sum(1).mean()
    return (img_to_txt + txt_to_img) / 2


@dataclass(frozen=True)
class DPTWeights:
    """Which Biomed-DPT parts are on, and their weights: CoOp is all off; DPT all on."""

    l1: float = 0.0            # lambda_1: L1 between student text features and the teacher's mean description
    kl: float = 0.0            # lambda_2: KL(zero-shot logits || student logits)
    visual_prompts: bool = False


class DPTLoss(nn.Module):
    """loss = CE(student logits) + l1 * L1(student text, teacher text) + kl * KL(zero-shot || student)."""

    def __init__(self, weights: DPTWeights, teacher: torch.Tensor | None, zero_shot_text: torch.Tensor):
        super().__init__()
        self.w = weights
        self.register_buffer("teacher", teacher if teacher is not None else torch.zeros(0))
        self.register_buffer("zs_text", zero_shot_text)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
                frozen_image: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce = F.cross_entropy(logits, labels)
        parts = {"ce": float(ce.detach())}
        loss = ce
        if self.w.l1 > 0:
            l1 = F.l1_loss(text, self.teacher, reduction="sum") / text.shape[0]
            loss = loss + self.w.l1 * l1
            parts["l1"] = float(l1.detach())
        if self.w.kl > 0:
            zs = scale * frozen_image @ self.zs_text.T
            kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs, 1), log_target=True, reduction="batchmean")
            loss = loss + self.w.kl * kl
            parts["kl"] = float(kl.detach())
        return loss, parts


class ContextClassifier(nn.Module):
    """The served classifier: views [B, 3, H, W] -> class probabilities [B, C].

    The prompt-tuned text features of the fixed classes are constants at inference, so they are stored as a
    buffer and the text tower is not needed to serve; the visual prompts (if any) run in eval mode (no
    dropout)."""

    def __init__(self, cfg: ContextConfig, keys: list[str], text_features: torch.Tensor, scale: float,
                 visual_state: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.keys = list(keys)
        self.image = ImageTower(cfg)
        self.visual = None
        if visual_state is not None:
            self.visual = VisualPrompts(cfg.depth, cfg.n_visual_prompts, cfg.dim, cfg.visual_prompt_dropout)
            self.visual.load_state_dict(visual_state)
        self.register_buffer("text_features", F.normalize(text_features.float(), dim=-1))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.eval()

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.scale * self.image(views, self.visual) @ self.text_features.T, dim=-1)


def load_classifier(path, map_location: str = "cpu") -> tuple[ContextClassifier, dict]:
    """A checkpoint written by ``python -m training.train_context`` -> (classifier, its metadata)."""
    state = torch.load(path, map_location=map_location)
    if not isinstance(state, dict) or state.get("kind") != "context_classifier":
        raise ValueError(f"{path}: not a context classifier checkpoint")
    cfg = ContextConfig(**state["config"])
    model = ContextClassifier(cfg, state["keys"], state["text_features"], state["logit_scale"],
                              state.get("visual_prompts"))
    model.image.load_state_dict(state["image"])
    model.eval()
    return model, state.get("meta", {})
