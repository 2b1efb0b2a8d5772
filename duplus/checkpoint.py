"""DuPLUS checkpoints: load and describe one (torch only, no MONAI: a command can refuse a bad request before the
model and its libraries load)."""

from __future__ import annotations

from pathlib import Path

import torch


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
