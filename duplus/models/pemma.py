"""PEMMA: a CT-pretrained UNETR adapted to PET/CT with LoRA or DoRA (arXiv 2504.13645).

The segmenter is MONAI's UNETR (a ViT encoder whose hidden states at blocks 3, 6, 9 and 12 feed a
convolutional decoder, plus a convolutional skip from the raw image).  It is first trained on CT
alone.  The PEMMA adaptation then adds PET **without retraining the CT backbone**:

* every CT weight (patch embedding, transformer, skip and decoder) is frozen;
* PET gets its own patch embedding (initialised from the CT's) and its own skip block
  (``pet_encoder1``, initialised from the CT's), whose output is added to the CT skip with a
  learnable weight (``pet_skip_weight``);
* CT and PET tokens go **side by side in one sequence** (2N tokens; a token of either modality keeps the
  position embedding of its place), so self-attention carries PET information into the CT tokens;
  the decoder reads the CT tokens (the PET tokens when there is no CT);
* LoRA or DoRA adapters (peft) on the attention projections (``attn.qkv``, ``attn.out_proj``) let
  the frozen transformer learn to mix the two.

Because the pathways are separate the one model runs **CT-only, PET-only or CT+PET**: with one
modality the sequence holds only its N tokens and the skip only its block.  Modality dropout
during adaptation (:func:`modality_dropout`) trains all three.  Before export the adapters are
merged (peft ``merge_and_unload``, :meth:`PemmaUNETR.merge_adapters`), leaving plain weights.

Early fusion, the baseline PEMMA is measured against, is a plain UNETR with two input channels.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from duplus.contract import PETCT_LABELS, PETCT_MODES

log = logging.getLogger(__name__)

#: what the output channels mean (HECKTOR: 1 GTVp, 2 GTVn); channel 0 is background
PEMMA_TARGETS = PETCT_LABELS[1:]
#: the three ways the one adapted model can be run
INPUT_MODES = PETCT_MODES
#: the attention projections of MONAI's ViT blocks (``vit.blocks.N.attn.qkv`` / ``attn.out_proj``)
ATTENTION_MODULES = ("qkv", "out_proj")


@dataclass(frozen=True)
class UnetrConfig:
    """Size of the UNETR.  MONAI's UNETR uses 16³ patches and 12 blocks; ``crop`` must be a multiple of 16."""

    crop: int = 64
    hidden_size: int = 192
    mlp_dim: int = 768
    num_heads: int = 4
    feature_size: int = 16
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)

    def __post_init__(self) -> None:
        if self.crop % 16 or self.crop < 32:
            raise ValueError(f"crop must be a multiple of 16 (UNETR's patch) and >= 32, got {self.crop}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))


@dataclass(frozen=True)
class AdapterConfig:
    """The PEMMA adaptation: ``kind`` "lora" or "dora", rank and scaling on the attention projections."""

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_MODULES

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "dora"):
            raise ValueError(f"adapter kind must be 'lora' or 'dora', got {self.kind!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"adapter rank must be a positive integer, got {self.rank!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


def build_unetr(cfg: UnetrConfig, in_channels: int = 1):
    from monai.networks.nets import UNETR

    from duplus.models.fastpaths import use_cpu_fast_paths

    unetr = UNETR(in_channels=in_channels, out_channels=len(PEMMA_TARGETS) + 1, img_size=cfg.crop,
                  feature_size=cfg.feature_size, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim,
                  num_heads=cfg.num_heads, norm_name="instance", res_block=True, qkv_bias=False)
    use_cpu_fast_paths(unetr)    # eager CPU inference: the same functions, faster kernels
    return unetr


class PemmaUNETR(nn.Module):
    """A UNETR that takes CT, PET or both (``forward(ct, pet)``, [B, 1, D, H, W] each, either may be None).

    Built plain (CT only: what CT pretraining trains), then :meth:`add_pet_pathway` and
    :meth:`add_adapters` turn it into the PEMMA model; :meth:`freeze_for_adaptation` leaves only the
    PEMMA parameters trainable (or, ``full=True``, everything: the full fine-tuning baseline).
    """

    def __init__(self, cfg: UnetrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unetr = build_unetr(cfg, in_channels=1)
        self.pet_embedding: nn.Module | None = None
        self.pet_encoder1: nn.Module | None = None
        self.pet_skip_weight: nn.Parameter | None = None
        self.pet_deep_skips: nn.ModuleList | None = None
        self.pet_deep_weights: nn.Parameter | None = None
        self.pet_embedding_rank: int | None = None
        self.adapter: AdapterConfig | None = None

    # construction -------------------------------------------------------------------
    @property
    def has_pet(self) -> bool:
        return self.pet_embedding is not None

    @property
    def pet_pathway(self) -> dict | None:
        """How the PET pathway is built (what :func:`model_state` stores): None without one."""
        if not self.has_pet:
            return None
        return {"deep_skips": self.pet_deep_skips is not None, "embedding_rank": self.pet_embedding_rank}

    def add_pet_pathway(self, deep_skips: bool = False, embedding_rank: int | None = None) -> PemmaUNETR:
        """The PET patch embedding and skip block, initialised from the CT's (so PET starts as 'another CT').

        ``deep_skips``: PET also gets its own copies of the three skip blocks that read the transformer (UNETR's
        ``encoder2..4``, fed the PET tokens of blocks 3, 6 and 9), each added to the CT's with a learnable weight
        as the image skip is; the frozen decoder then reads PET at every resolution, not only at the image's.
        ``embedding_rank``: the PET patch embedding is the CT's, frozen, plus a trainable LoRA of that rank on its
        convolution (peft), and its own position embeddings: the full copy is 786,432 weights, most of PEMMA's
        trainable share, which the deep skips need to stay under 10 %."""
        if self.has_pet:
            return self
        self.pet_embedding = copy.deepcopy(self._vit().patch_embedding)
        if embedding_rank is not None:
            from peft import LoraConfig, get_peft_model

            self.pet_embedding = get_peft_model(self.pet_embedding, LoraConfig(
                r=embedding_rank, lora_alpha=float(embedding_rank), target_modules=["patch_embeddings"], bias="none"))
            self.pet_embedding_rank = int(embedding_rank)
        self.pet_encoder1 = copy.deepcopy(self.unetr.encoder1)
        # 1.0: the PET skip joins at full strength (with 0.1 it stayed at 0.10 through 600 steps and CT+PET used
        # the PET little: validation node Dice 0.31 for CT+PET against 0.44 for PET alone)
        self.pet_skip_weight = nn.Parameter(torch.tensor(1.0))
        if deep_skips:
            u = self.unetr
            self.pet_deep_skips = nn.ModuleList(copy.deepcopy(m) for m in (u.encoder2, u.encoder3, u.encoder4))
            self.pet_deep_weights = nn.Parameter(torch.ones(3))
        return self

    def add_adapters(self, adapter: AdapterConfig) -> PemmaUNETR:
        """LoRA / DoRA (peft) on the transformer's attention projections; freezes the transformer's base weights."""
        from peft import LoraConfig, get_peft_model

        if self.adapter is not None:
            raise RuntimeError(f"adapters are already attached ({self.adapter.kind})")
        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                            target_modules=list(adapter.target_modules), use_dora=adapter.kind == "dora",
                            bias="none")
        self.unetr.vit = get_peft_model(self.unetr.vit, config)
        self.adapter = adapter
        return self

    def merge_adapters(self) -> PemmaUNETR:
        """Fold the adapters into plain weights (peft ``merge_and_unload``); the module is then a plain UNETR+PET."""
        from peft import PeftModel

        if isinstance(self.unetr.vit, PeftModel):
            self.unetr.vit = self.unetr.vit.merge_and_unload()
        if isinstance(self.pet_embedding, PeftModel):
            self.pet_embedding = self.pet_embedding.merge_and_unload()
            self.pet_embedding_rank = None       # a plain embedding now
        self.adapter = None
        return self

    def freeze_for_adaptation(self, full: bool = False) -> PemmaUNETR:
        """PEMMA: only the adapters, the PET embedding (its LoRA and position embeddings when low-rank), the PET skip
        blocks and their weights train; ``full``: all."""
        for name, param in self.named_parameters():
            # "lora_" covers LoRA's A/B and DoRA's magnitude vectors; "pet_" the PET embedding, skips and weights,
            # but for the frozen CT convolution under a low-rank PET embedding ("base_layer")
            param.requires_grad = full or "lora_" in name or (name.startswith("pet_") and "base_layer" not in name)
        return self

    def _vit(self) -> nn.Module:
        from peft import PeftModel

        return self.unetr.vit.get_base_model() if isinstance(self.unetr.vit, PeftModel) else self.unetr.vit

    # forward ------------------------------------------------------------------------
    def transformer(self, ct: torch.Tensor | None, pet: torch.Tensor | None
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ViT part (what the adapters change): CT and/or PET tokens side by side through every block ->
        (each block's output, the normed last output), of the first modality's tokens (CT's when present): what
        the decoder reads."""
        hidden, x, n = self._sequence(ct, pet)
        return [h[:, :n] for h in hidden], x[:, :n]

    def _sequence(self, ct: torch.Tensor | None, pet: torch.Tensor | None
                  ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """Every block's output and the normed last one, of the whole sequence (CT tokens first), and the number of
        tokens of one modality."""
        vit = self._vit()
        tokens = []
        if ct is not None:
            tokens.append(vit.patch_embedding(ct))
        if pet is not None:
            tokens.append(self.pet_embedding(pet))
        n = tokens[0].shape[1]
        x = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        hidden = []
        for block in vit.blocks:
            x = block(x)
            hidden.append(x)
        return hidden, vit.norm(x), n

    def forward(self, ct: torch.Tensor | None = None, pet: torch.Tensor | None = None) -> torch.Tensor:
        if ct is None and pet is None:
            raise ValueError("PemmaUNETR needs a CT, a PET or both")
        if pet is not None and not self.has_pet:
            raise ValueError("this model has no PET pathway (CT-pretrained only); add_pet_pathway() first")
        u = self.unetr
        sequence, x, n = self._sequence(ct, pet)
        hidden, x = [h[:, :n] for h in sequence], x[:, :n]
        if ct is None:   # PET alone: its own skips take the CT skips' places
            deep = self._pet_deep(hidden)
            return self._decode(self.pet_encoder1(pet), *(deep if deep is not None else self._ct_deep(hidden)), x)
        enc = [u.encoder1(ct), *self._ct_deep(hidden)]
        if pet is not None:
            enc[0] = enc[0] + self.pet_skip_weight * self.pet_encoder1(pet)
            deep = self._pet_deep([h[:, n:] for h in sequence])
            if deep is not None:
                enc[1:] = [e + w * d for e, w, d in zip(enc[1:], self.pet_deep_weights, deep)]
        return self._decode(*enc, x)

    #: the blocks whose tokens UNETR's encoder2, 3 and 4 read
    DEEP_BLOCKS = (3, 6, 9)

    def _deep_skips(self, blocks, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """``blocks`` (three skip encoders) on the tokens of blocks 3, 6, 9 of ``hidden``."""
        return [enc(self.unetr.proj_feat(hidden[i])) for enc, i in zip(blocks, self.DEEP_BLOCKS)]

    def _ct_deep(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        u = self.unetr
        return self._deep_skips((u.encoder2, u.encoder3, u.encoder4), hidden)

    def _pet_deep(self, pet_hidden: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return None if self.pet_deep_skips is None else self._deep_skips(self.pet_deep_skips, pet_hidden)

    def _decode(self, enc1: torch.Tensor, enc2: torch.Tensor, enc3: torch.Tensor, enc4: torch.Tensor,
                x: torch.Tensor) -> torch.Tensor:
        """UNETR's decoder: the image skip, the skips of blocks 3, 6, 9 and the normed last tokens (``x``)."""
        u = self.unetr
        dec3 = u.decoder5(u.proj_feat(x), enc4)
        dec2 = u.decoder4(dec3, enc3)
        dec1 = u.decoder3(dec2, enc2)
        return u.out(u.decoder2(dec1, enc1))

    def forward_mode(self, image: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """One graph for the three input modes (what is exported): ``image`` [B, 2, D, H, W] (channel 0 CT,
        channel 1 PET, zeros where absent), ``mode`` an int64 index into INPUT_MODES ([1]).

        Both pathways run; the absent modality's tokens are masked out of every attention as keys (the same
        softmax as leaving them out of the sequence), the decoder reads the CT tokens when there is a CT and
        the PET tokens otherwise, and the skip is the CT's, the PET's or their weighted sum.  Equal to
        ``forward(ct, pet)`` of the same mode up to float rounding (``tests/duplus/models/test_pemma.py``).
        """
        if not self.has_pet:
            raise ValueError("forward_mode needs the PET pathway (a PEMMA model); add_pet_pathway() first")
        u, vit = self.unetr, self._vit()
        m = mode.reshape(-1)[:1]
        has_ct = (m != INPUT_MODES.index("pet")).to(image.dtype)     # [1]
        has_pet = (m != INPUT_MODES.index("ct")).to(image.dtype)
        ct, pet = image[:, 0:1], image[:, 1:2]
        ct_tokens, pet_tokens = vit.patch_embedding(ct), self.pet_embedding(pet)
        n = ct_tokens.shape[1]
        x = torch.cat([ct_tokens, pet_tokens], dim=1)
        keys = torch.cat([has_ct.expand(n), has_pet.expand(n)])[None].expand(x.shape[0], 2 * n)
        hidden, pet_hidden = [], []
        for block in vit.blocks:
            x = block(x, attn_mask=keys)
            hidden.append(has_ct * x[:, :n] + (1 - has_ct) * x[:, n:])
            pet_hidden.append(x[:, n:])
        x = vit.norm(x)
        x = has_ct * x[:, :n] + (1 - has_ct) * x[:, n:]
        pet_weight = has_ct * self.pet_skip_weight + (1 - has_ct)     # PET alone: its skip at full strength
        enc1 = has_ct * u.encoder1(ct) + has_pet * pet_weight * self.pet_encoder1(pet)
        deep = self._ct_deep(hidden)
        pet_deep = self._pet_deep(pet_hidden)
        if pet_deep is not None:   # PET alone: the PET's deep skips replace the CT's (read on the PET tokens)
            weights = has_ct * self.pet_deep_weights + (1 - has_ct)
            deep = [has_ct * e + has_pet * w * d for e, w, d in zip(deep, weights, pet_deep)]
        return self._decode(enc1, *deep, x)

    def forward_channels(self, image: torch.Tensor, mode: str = "ct+pet") -> torch.Tensor:
        """``image`` [B, 2, D, H, W] (channel 0 CT, channel 1 PET) run in ``mode`` (one of INPUT_MODES).

        Without a PET pathway the model has one input: mode "ct" feeds it the CT, "pet" the PET (the
        CT-pretrained model run on PET, or a model trained on PET alone).
        """
        if mode not in INPUT_MODES:
            raise ValueError(f"mode must be one of {INPUT_MODES}, got {mode!r}")
        if not self.has_pet:  # a single-pathway model (CT-pretrained, or trained on PET alone): one input
            if mode == "ct+pet":
                raise ValueError("this model has one input pathway; run it with mode 'ct' or 'pet'")
            return self(image[:, 0:1] if mode == "ct" else image[:, 1:2])
        ct = image[:, 0:1] if mode in ("ct+pet", "ct") else None
        pet = image[:, 1:2] if mode in ("ct+pet", "pet") else None
        return self(ct, pet)


class EarlyFusionUNETR(nn.Module):
    """The early-fusion baseline: one UNETR whose input is CT and PET as two channels (all weights train).

    :meth:`from_ct` starts it from the CT-pretrained weights (the PET input channel of the patch embedding
    and of the skip starts at zero), so it gets the same start and budget as PEMMA.
    """

    def __init__(self, cfg: UnetrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unetr = build_unetr(cfg, in_channels=2)

    @classmethod
    def from_ct(cls, ct_model: PemmaUNETR) -> EarlyFusionUNETR:
        model = cls(ct_model.cfg)
        source = ct_model.unetr.state_dict()
        target = model.unetr.state_dict()
        for key, value in source.items():
            if target[key].shape == value.shape:
                target[key] = value.clone()
            elif target[key].shape[1] == 2 and value.shape[1] == 1:   # first conv of a pathway: CT channel copied
                widened = torch.zeros_like(target[key])
                widened[:, 0:1] = value
                target[key] = widened
            else:
                raise RuntimeError(f"cannot widen {key}: {tuple(value.shape)} -> {tuple(target[key].shape)}")
        model.unetr.load_state_dict(target)
        return model

    def forward_channels(self, image: torch.Tensor, mode: str = "ct+pet") -> torch.Tensor:
        if mode not in INPUT_MODES:
            raise ValueError(f"mode must be one of {INPUT_MODES}, got {mode!r}")
        x = image.clone() if mode != "ct+pet" else image
        if mode == "ct":
            x[:, 1] = 0
        elif mode == "pet":
            x[:, 0] = 0
        return self.unetr(x)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (exact)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def modality_dropout(rng, p_ct_only: float, p_pet_only: float) -> str:
    """Draw the input mode of one adaptation batch: "ct" with p_ct_only, "pet" with p_pet_only, else "ct+pet"."""
    r = rng.random()
    return "ct" if r < p_ct_only else "pet" if r < p_ct_only + p_pet_only else "ct+pet"


def model_state(model: nn.Module) -> dict:
    """What a checkpoint stores to rebuild ``model``: its kind, its configs and its weights."""
    if isinstance(model, PemmaUNETR):
        kind = "pemma"
        adapter = asdict(model.adapter) if model.adapter is not None else None
        state = {"kind": kind, "unetr": asdict(model.cfg), "pet": model.has_pet, "adapter": adapter,
                 "state_dict": model.state_dict()}
        if model.pet_pathway is not None and any(model.pet_pathway.values()):   # the variant; the default stays as it was
            state["pet_pathway"] = model.pet_pathway
        return state
    if isinstance(model, EarlyFusionUNETR):
        return {"kind": "early_fusion", "unetr": asdict(model.cfg), "state_dict": model.state_dict()}
    raise TypeError(f"not a PEMMA-family model: {type(model).__name__}")


def model_from_state(state: dict) -> nn.Module:
    cfg = UnetrConfig(**state["unetr"])
    if state["kind"] == "early_fusion":
        model = EarlyFusionUNETR(cfg)
    elif state["kind"] == "pemma":
        model = PemmaUNETR(cfg)
        if state.get("pet"):
            model.add_pet_pathway(**state.get("pet_pathway", {}))
        if state.get("adapter"):
            model.add_adapters(AdapterConfig(**state["adapter"]))
    else:
        raise ValueError(f"unknown PEMMA-family model kind {state['kind']!r}")
    model.load_state_dict(state["state_dict"])
    return model.eval()


@torch.no_grad()
def merged_for_export(model: PemmaUNETR, *, tolerance: float = 1e-5, seed: int = 0, check: bool = True
                      ) -> tuple[PemmaUNETR, dict[str, float]]:
    """A float32 copy of ``model`` with its LoRA / DoRA adapters merged (peft ``merge_and_unload``, done in float64
    and rounded once), checked numerically on one random CT+PET window.

    Returns ``(merged, {"max_abs": ..., "max_abs_float32": ...})``: ``max_abs`` is the largest |merged - adapted|
    difference of the transformer's outputs (every block's, the tokens the decoder reads) with both models in
    float64: the merge's own error (the merged modules are the attention projections; the CT+PET sequence passes
    both pathways through all of them); over ``tolerance`` raises ``ValueError``.  ``max_abs_float32`` is the
    largest logit difference of the whole float32 models, where the two graphs round differently (DoRA at the
    shipped size: about 1e-5 on logits of about 10): reported, not gated.  Every mode's logits are compared in
    ``tests/duplus/models/test_pemma.py``.  A model without adapters returns zeros; ``check=False`` skips the check
    (NaNs returned: a server loading a repository whose build already checked it).
    """
    model = model.eval()
    merged64 = copy.deepcopy(model).double().merge_adapters().eval()
    merged = copy.deepcopy(merged64).float().eval()
    if model.adapter is None:
        return merged, {"max_abs": 0.0, "max_abs_float32": 0.0}
    if not check:
        return merged, {"max_abs": float("nan"), "max_abs_float32": float("nan")}
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 2, *(model.cfg.crop,) * 3, generator=g)
    ct, pet = image[:, 0:1], image[:, 1:2]
    adapted64 = copy.deepcopy(model).double().eval()
    (h_a, x_a), (h_m, x_m) = (m.transformer(ct.double(), pet.double()) for m in (adapted64, merged64))
    d64 = max(float((a - b).abs().max()) for a, b in zip([*h_a, x_a], [*h_m, x_m]))
    mode = supported_modes(model)[0]
    d32 = float((model.forward_channels(image, mode) - merged.forward_channels(image, mode)).abs().max())
    if d64 > tolerance:
        raise ValueError(f"merging the {model.adapter.kind} adapters changed the transformer's outputs by "
                         f"{d64:.2e} (> {tolerance:.0e}, float64)")
    return merged, {"max_abs": d64, "max_abs_float32": d32}


#: what ``training/train_pemma.py`` writes
CHECKPOINT_FORMAT = "pemma-checkpoint/1"


def load_pemma_checkpoint(path) -> tuple[PemmaUNETR, dict]:
    """A PEMMA checkpoint (``python -m training.train_pemma``; float16 weights of a shipped one are cast back to
    float32) -> (the model in eval mode, the checkpoint's record without the weights).  Refuses a checkpoint of
    another format, or one without the PET pathway (CT pretraining, the early-fusion baseline): those cannot run
    the three input modes the served model offers."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a PEMMA checkpoint ({CHECKPOINT_FORMAT}); train one with "
                         "python -m training.train_pemma")
    model = model_from_state(state["model"])
    if not (isinstance(model, PemmaUNETR) and model.has_pet):
        raise ValueError(f"{path} (stage {state.get('stage')}) has no PET pathway: serve a PEMMA stage "
                         "(pemma_lora, pemma_dora, pemma_lora_ms, full_finetune, continual_*)")
    record = {k: v for k, v in state.items() if k != "model"}
    record["model"] = {k: v for k, v in state["model"].items() if k != "state_dict"}
    return model.float().eval(), record


def supported_modes(model: nn.Module) -> tuple[str, ...]:
    """The input modes ``model`` can run: all three with a PET pathway or two channels, else one at a time."""
    if isinstance(model, PemmaUNETR) and not model.has_pet:
        return ("ct", "pet")
    return INPUT_MODES


#: windows [b, 2, crop, crop, crop] -> logits [b, 1 + len(PEMMA_TARGETS), crop, crop, crop]: the model in
#: process, or the served ``pemma_segmenter`` unit over BLS
WindowFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def window_probabilities(windows: WindowFn, image: torch.Tensor, crop: int, *, overlap: float = 0.25,
                         sw_batch_size: int = 2, ct_body: bool = False) -> torch.Tensor:
    """Model-space ``image`` [2, X, Y, Z] -> softmax probabilities [1 + len(PEMMA_TARGETS), X, Y, Z]: MONAI's
    sliding window of ``crop``, Gaussian-weighted blending of the logits; a volume smaller than one crop is
    padded with zeros (what a normalised image has outside the body).

    ``ct_body``: the windows cover only the box of the body in the CT channel (``duplus.preprocessing.body_box``)
    and everything outside it is background, as in ``segment_volume``: with 40 mm of air added around a held-out
    CT, the CT-only nodes' Dice fell from 0.47 to 0.27 without it (2026-12-04)."""
    from monai.inferers import sliding_window_inference

    from duplus.preprocessing import body_box

    box = body_box(image[0:1], "CT") if ct_body else None
    inner = image if box is None else image[(slice(None), *box)]
    logits = sliding_window_inference(inner[None].float().contiguous(), (crop,) * 3, sw_batch_size, windows,
                                      overlap=overlap, mode="gaussian", padding_mode="constant", cval=0.0)
    probs = torch.softmax(logits[0].float(), dim=0)
    if box is None:
        return probs
    out = torch.zeros((probs.shape[0], *image.shape[1:]), dtype=probs.dtype)
    out[0] = 1.0                                    # background outside the body
    out[(slice(None), *box)] = probs
    return out


def sliding_window_probabilities(model: nn.Module, image: torch.Tensor, mode: str, *, overlap: float = 0.25,
                                 sw_batch_size: int | None = None, ct_body: bool = False) -> torch.Tensor:
    """:func:`window_probabilities` of ``model`` run in ``mode``; by default one window per forward pass for a model
    on CPU and two on a GPU (``duplus.models.fastpaths.windows_per_pass``)."""
    if sw_batch_size is None:
        from duplus.models.fastpaths import windows_per_pass

        sw_batch_size = windows_per_pass(next(model.parameters()).device.type, 2)
    return window_probabilities(lambda x: model.forward_channels(x, mode), image, model.cfg.crop, overlap=overlap,
                                sw_batch_size=sw_batch_size, ct_body=ct_body)


def segment_petct(model: nn.Module, ct=None, ct_affine=None, pet=None, pet_affine=None, *,
                  reference: tuple[np.ndarray, tuple[int, int, int]] | None = None,
                  overlap: float = 0.25) -> tuple[np.ndarray, str]:
    """CT and/or PET of one patient -> uint8 labels (1 GTVp, 2 GTVn) on the CT's grid (the PET's without a CT).

    The PET is resampled into the CT's frame (:func:`duplus.preprocessing.petct_to_model_space`); the mode
    follows from what is given.  ``reference`` = (affine, shape) returns the labels on another grid instead
    (e.g. the CT's for a PET-only run, to score every mode against one label map).  Returns ``(labels, mode)``.
    """
    from duplus.preprocessing import petct_to_model_space

    image, (has_ct, has_pet), model_affine, ref_shape, _ = petct_to_model_space(
        ct, ct_affine, pet, pet_affine, model.cfg.spacing)
    mode = "ct+pet" if has_ct and has_pet else "ct" if has_ct else "pet"
    if mode not in supported_modes(model):
        raise ValueError(f"this model runs {supported_modes(model)}, not {mode!r}")
    ref_affine = ct_affine if has_ct else pet_affine
    if reference is not None:
        ref_affine, ref_shape = reference
    return labels_on_grid(model, image, mode, model_affine, ref_affine, ref_shape, overlap=overlap), mode


def labels_on_grid(model: nn.Module, image: torch.Tensor, mode: str, model_affine: np.ndarray,
                   affine: np.ndarray, shape, *, overlap: float = 0.25) -> np.ndarray:
    """Model-space ``image`` [2, X, Y, Z] -> uint8 labels on the grid (``affine``, ``shape``): probabilities are
    resampled there (trilinear) and fused by argmax, so masks come back in the geometry asked for. With a CT
    (modes ct+pet and ct) the windows cover the CT's body only, as the served ``segment_petct`` does."""
    probs = sliding_window_probabilities(model, image, mode, overlap=overlap, ct_body=mode != "pet")
    return probabilities_to_labels(probs, model_affine, affine, shape)


def probabilities_to_labels(probs: torch.Tensor, model_affine: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """Model-space probabilities -> uint8 labels on the grid (``affine``, ``shape``): trilinear, then argmax."""
    from duplus.preprocessing import to_input_grid

    on_grid = to_input_grid(probs, model_affine, affine, tuple(int(v) for v in shape))
    return on_grid.argmax(dim=0).to(torch.uint8).numpy()
