"""A CLIP checkpoint in Hugging Face format (``transformers.CLIPModel``) as the backbone of Biomed-DPT.

The prompt-tuning code (:class:`duplus.context.model.PromptLearner`, :class:`~duplus.context.model.DPTLoss`,
``training.train_context.prompt_tune``) talks to a backbone through two objects:

* a text tower with the four methods of :class:`~duplus.context.model.TextTower` (``tokenize``,
  ``embed_tokens``, ``encode_embeds``, ``encode_text``): here :class:`HFClipTextTower`, CLIP's causal text
  transformer with its own end-of-text pooling and ``text_projection``;
* an image tower ``forward(views, prompts=None)`` with ``depth`` and ``width`` (the size of its deep visual
  prompts): here :class:`HFClipImageTower`, CLIP's ViT with the prompts inserted after the CLS token before every
  encoder layer, then ``post_layernorm`` on CLS and ``visual_projection``.

Both run the library's own forward (``CLIPTextTransformer``, ``CLIPVisionTransformer``); the learnable context
and the visual prompts enter through forward hooks (on the token embedding and on each encoder layer), so the
position embeddings, the causal mask, the padding mask and the pooling stay transformers' code.

A user with CLIP weights on disk in this format (``config.json``, the weights, the tokenizer's files, optionally
``preprocessor_config.json`` for the pixel mean and std) runs the method with
``python -m training.train_context --hf-clip PATH``; nothing is downloaded (``local_files_only``).

BiomedCLIP itself is an open_clip model (a timm ViT and PubMedBERT): open_clip and timm import torchvision,
and the only torchvision build for this stack's torch (0.28.0 for torch 2.13) on the package index is the CUDA
one, whose extension needs ``libtorch_cuda.so``: ``import torchvision`` fails on the CPU torch ("operator
torchvision::nms does not exist"), so open_clip cannot be imported here and has no adapter yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duplus.context.model import FrozenTextTower

#: the pixel mean and std of OpenAI's CLIP (``CLIPImageProcessor``'s defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFClipTextTower(FrozenTextTower):
    """The frozen text side of a ``transformers.CLIPModel`` as a :class:`~duplus.context.model.TextTower`."""

    def __init__(self, clip_model, tokenizer, max_tokens: int | None = None):
        super().__init__()
        self.text_model = clip_model.text_model
        self.projection = clip_model.text_projection
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens or clip_model.config.text_config.max_position_embeddings
        self.dim = clip_model.config.projection_dim
        for p in [*self.text_model.parameters(), *self.projection.parameters()]:
            p.requires_grad_(False)
        self.text_model.eval()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embeddings.token_embedding(ids)

    def encode_embeds(self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Features of ``ids`` whose token embeddings are replaced by ``embeds`` (same shape): CLIP pools at the
        end-of-text token, which it finds in ``ids``; the learned context only replaces placeholders in front."""
        if embeds.shape[:2] != ids.shape:
            raise ValueError(f"embeddings {tuple(embeds.shape)} do not match token ids {tuple(ids.shape)}")
        handle = self.text_model.embeddings.token_embedding.register_forward_hook(lambda _m, _i, _o: embeds)
        try:
            pooled = self.text_model(input_ids=ids, attention_mask=mask).pooler_output
        finally:
            handle.remove()
        return F.normalize(self.projection(pooled), dim=-1)


class HFClipImageTower(nn.Module):
    """The frozen image side of a ``transformers.CLIPModel``: views [B, 3, H, W] in [0, 1] -> [B, D] features.

    The three orthogonal views (:func:`duplus.context.views.context_views`) stand for the RGB channels; they are
    resized to the model's input size and normalised with its pixel mean and std."""

    def __init__(self, clip_model, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.vision = clip_model.vision_model
        self.projection = clip_model.visual_projection
        cfg = clip_model.config.vision_config
        self.image_size = int(cfg.image_size)
        self.depth = len(self.vision.encoder.layers)
        self.width = int(cfg.hidden_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        for p in [*self.vision.parameters(), *self.projection.parameters()]:
            p.requires_grad_(False)
        self.vision.eval()

    def train(self, mode: bool = True) -> HFClipImageTower:  # frozen: dropout stays off
        return super().train(False)

    def pixels(self, views: torch.Tensor) -> torch.Tensor:
        if views.ndim != 4 or views.shape[1] != 3:
            raise ValueError(f"expected views [B, 3, H, W], got {tuple(views.shape)}")
        if views.shape[-2:] != (self.image_size, self.image_size):
            views = F.interpolate(views, size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False)
        return (views - self.mean) / self.std

    def forward(self, views: torch.Tensor, prompts=None) -> torch.Tensor:
        """L2-normalised image features; ``prompts`` (a :class:`~duplus.context.model.VisualPrompts` of this
        tower's ``depth`` and ``width``) are inserted before every encoder layer."""
        handles = []
        if prompts is not None:
            if prompts.tokens.shape[0] != self.depth or prompts.tokens.shape[-1] != self.width:
                raise ValueError(f"visual prompts {tuple(prompts.tokens.shape)} do not fit a tower of depth "
                                 f"{self.depth} and width {self.width}")
            for i, layer in enumerate(self.vision.encoder.layers):
                handles.append(layer.register_forward_pre_hook(_insert_hook(prompts, i), with_kwargs=True))
        try:
            pooled = self.vision(pixel_values=self.pixels(views)).pooler_output
        finally:
            for h in handles:
                h.remove()
        return F.normalize(self.projection(pooled), dim=-1)


def _insert_hook(prompts, layer: int):
    def hook(_module, args, kwargs):
        if args:
            return (prompts.insert(args[0], layer), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": prompts.insert(kwargs["hidden_states"], layer)}
    return hook


def load_hf_clip(path: str | Path) -> tuple[HFClipImageTower, HFClipTextTower, float]:
    """(image tower, text tower, logit scale) of a CLIP checkpoint folder in Hugging Face format, from disk only."""
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face CLIP folder (no config.json)")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    mean, std = CLIP_MEAN, CLIP_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        conf = json.loads(pre.read_text())
        mean, std = tuple(conf.get("image_mean", mean)), tuple(conf.get("image_std", std))
    return HFClipImageTower(model, mean, std), HFClipTextTower(model, tokenizer), float(model.logit_scale.detach().exp())
