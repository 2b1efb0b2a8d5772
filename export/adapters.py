"""Merge LoRA / DoRA adapters into plain weights before export (peft ``merge_and_unload``).

The merge is checked numerically: the merged module must give the adapted module's outputs
on the same inputs, and no adapter layer may remain.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


class MergeError(RuntimeError):
    pass


def has_adapters(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def merge_adapters(module: nn.Module, run: Callable[[nn.Module], torch.Tensor], *, atol: float = 1e-4,
                   rtol: float = 1e-4) -> nn.Module:
    """Return ``module`` with every peft adapter merged, after checking outputs are unchanged.

    ``run(m)`` evaluates a module on fixed inputs; it is called on the adapted and the merged
    module. ``module`` may be a ``PeftModel`` or any module that contains one.
    """
    if not has_adapters(module):
        return module
    from peft import PeftModel

    module = module.eval()
    with torch.no_grad():
        before = run(module)
    merged = copy.deepcopy(module)
    if isinstance(merged, PeftModel):
        merged = merged.merge_and_unload()
    else:
        for name, child in list(merged.named_modules()):
            if isinstance(child, PeftModel):
                parent = merged.get_submodule(name.rsplit(".", 1)[0]) if "." in name else merged
                setattr(parent, name.rsplit(".", 1)[-1], child.merge_and_unload())
    if has_adapters(merged):
        raise MergeError("adapter layers remain after merge_and_unload")
    with torch.no_grad():
        after = run(merged.eval())
    err = float((before - after).abs().max())
    if not torch.allclose(before, after, atol=atol, rtol=rtol):
        raise MergeError(f"merged outputs differ from the adapted model: max abs {err:.2e} > {atol:.0e}")
    log.info("merged adapters: max abs difference %.2e", err)
    return merged
