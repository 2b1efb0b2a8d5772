"""Faster CPU kernels for the image models' eager inference, the same functions as the layers they replace.

Two swaps, both for eager CPU inference only (no gradients, not traced, not exported):

- **instance norm as group norm.** MONAI's blocks (DynUNet's, UNETR's) build ``nn.InstanceNorm3d`` without running
  statistics: every sample and channel normalised by its own mean and variance. ``F.group_norm`` with as many
  groups as channels is the same function (the same statistics, eps and optional affine), and PyTorch's CPU kernel
  for it is about twice as fast as ``F.instance_norm``'s, which reshapes the batch into channels and runs batch
  norm (2-core Xeon, 2026-12-05: 40.8 -> 20.6 ms on [1, 16, 96, 96, 64], 7.5 -> 2.2 ms on [1, 32, 48, 48, 32],
  outputs equal to 2e-6); DuPLUS's instance norms were 11 % of a whole-volume pass on CPU.
- **3D convolutions through oneDNN.** PyTorch sends a float32 CPU convolution to oneDNN only when
  ``N * C * D * H`` of its input exceeds 20480 (a 2D heuristic: "for some case, native is faster"), so a 3D U-Net's
  single-channel stem and its deeper levels on one patch (e.g. [1, 32, 24, 24, 16]) run PyTorch's native
  ``slow_conv3d`` (im2col + GEMM). oneDNN is faster on every shape of DuPLUS's segmenter measured (2-core Xeon,
  2026-12-05): the stem 1 -> 8 on 96 x 96 x 64 42.8 -> 29.7 ms, 32 -> 32 on 24 x 24 x 16 10.2 -> 1.8 ms,
  128 -> 64 on 12 x 12 x 8 6.4 -> 1.7 ms; the shapes PyTorch already sends to oneDNN take the same kernel.

A third, in ``duplus.models.duplus.apply_dynamic_head``: without gradients on CPU the dynamic head runs chunk by
chunk (its intermediates stay in the cache). ``with pytorch_kernels():`` turns all three off, for a benchmark's
side-by-side run (``python -m perf.bench``: ``pytorch_eager_stock``) or to rule them out when numbers look odd.

Training keeps PyTorch's own kernels (its numerics, which the two-rank DDP test compares to 2e-6, stay those the
shipped checkpoints were trained with); a traced or exported graph keeps ``InstanceNormalization`` and ``Conv``
(the ONNX units do not change); CUDA tensors keep cuDNN. The modules keep their class's parameters and buffers, so
checkpoints load as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_enabled = True


@contextlib.contextmanager
def pytorch_kernels() -> Iterator[None]:
    """Within it the eager paths run PyTorch's own kernels: ``F.instance_norm``, PyTorch's choice of convolution
    kernel and one ``baddbmm`` per head layer over the whole patch (process-wide, not thread-local)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def eager_cpu_inference(x: torch.Tensor) -> bool:
    """Whether the fast paths apply to ``x``: eager CPU inference (no gradients, no autocast, not traced, scripted,
    exported or compiled) outside :func:`pytorch_kernels`."""
    return _enabled and not (torch.is_grad_enabled() or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")
                             or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                             or torch.compiler.is_compiling())


class GroupwiseInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` whose eager CPU forward without gradients is ``F.group_norm``, one group per channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or x.dim() != 5 or not eager_cpu_inference(x):
            return super().forward(x)
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose eager CPU float32 forward without gradients always runs oneDNN's convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 5 or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled
                or not eager_cpu_inference(x)):
            return super().forward(x)
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), self.weight.contiguous(), self.bias,
                                                 list(self.padding), list(self.stride), list(self.dilation),
                                                 self.groups)


def windows_per_pass(device_type: str, elsewhere: int) -> int:
    """The default sliding-window batch: one window per forward pass on CPU, ``elsewhere`` on a GPU. With these fast
    paths a batch of one is the fastest on CPU (2-core Xeon, 2026-12-05: DuPLUS, an MR abdomen 16.4-16.8 s against
    19.7-20.6 s with two windows per pass, the same labels; PEMMA 408-442 against 506-542 ms per 64³ window; PyTorch
    units served through segment_volume, ``ct_256``, 9.20 s against 11.75 s with four and 11.01 s on ONNX Runtime
    units, which are batch-insensitive on CPU); a GPU wants batches."""
    return 1 if device_type == "cpu" else elsewhere


def use_cpu_fast_paths(module: nn.Module) -> dict[str, int]:
    """Swap, in place, every plain ``nn.InstanceNorm3d`` without running statistics inside ``module`` for a
    :class:`GroupwiseInstanceNorm3d` and every plain ``nn.Conv3d`` for a :class:`OneDNNConv3d` (parameters and
    buffers untouched); returns how many of each."""
    counts = {"instance_norm": 0, "conv3d": 0}
    for m in module.modules():
        if type(m) is nn.InstanceNorm3d and not m.track_running_stats:
            m.__class__ = GroupwiseInstanceNorm3d
            counts["instance_norm"] += 1
        elif type(m) is nn.Conv3d:
            m.__class__ = OneDNNConv3d
            counts["conv3d"] += 1
    return counts
