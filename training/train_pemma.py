"""Train the PEMMA study (arXiv 2504.13645) on simulated head-and-neck PET/CT centres, one stage at a time.

Stages (``configs/pemma.yaml``), each a run of its own that writes ``OUTPUT/<stage>.pt`` and a curve PNG:

* ``pretrain``      a UNETR on CT only, centres A-D: the backbone every other stage starts from;
* ``pemma_lora`` / ``pemma_dora``: PEMMA on centre E: CT weights frozen; PET patch embedding, PET skip
  block and LoRA / DoRA adapters on the attention projections train, with modality dropout;
* ``pemma_lora_ms`` the variant with PET skips at every resolution (PET's own copies of the three skip blocks
  that read the transformer) and a low-rank PET patch embedding (the CT's, frozen, plus LoRA), which pays for
  them (``PemmaUNETR.add_pet_pathway``; ``pet_pathway`` in the stage's configuration);
* ``early_fusion``  baseline: CT and PET as two input channels, every weight trains;
* ``full_finetune`` baseline: the PEMMA architecture with every weight training, no adapters;
* ``pet_only``      baseline: the CT-pretrained UNETR fine-tuned on PET alone;
* ``continual_adapters``: continual learning: the PEMMA (LoRA) model of centre E updated on centre F with
  CT only, only the adapters training (the PET pathway and every CT weight stay as they are);
* ``continual_full``: the same update with every weight training (the PEMMA architecture's forgetting
  baseline: its PET pathway gets no gradient from CT-only data);
* ``continual_early_fusion``: the early-fusion model of centre E updated on centre F with CT only (the PET
  channel zeroed), every weight training: what a single multi-channel model does when a new centre has one
  modality;
* ``continual_adapters_ms``: ``continual_adapters`` for ``pemma_lora_ms``.

All baselines start from the ``pretrain`` checkpoint and get the same data and steps as PEMMA.  The
validation curve uses the last ``val_cases`` cases of the stage's own training data; the held-out
sets are read only by ``python -m training.evaluate_pemma``.  Data are generated on first use in
HECKTOR layout under ``data_root/<train|heldout>/<set>``; their model-space arrays are cached.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from duplus.metrics import dice
from duplus.models.pemma import (
    PEMMA_TARGETS,
    AdapterConfig,
    EarlyFusionUNETR,
    PemmaUNETR,
    UnetrConfig,
    modality_dropout,
    model_from_state,
    model_state,
    parameter_counts,
    sliding_window_probabilities,
    supported_modes,
)
from duplus.preprocessing import petct_to_model_space
from training.config import CentreSet, PemmaConfig
from training.data import load_hecktor, read_petct
from training.train_segmentation import native_bf16

log = logging.getLogger(__name__)

STAGES = ("pretrain", "pemma_lora", "pemma_dora", "pemma_lora_ms", "early_fusion", "full_finetune", "pet_only",
          "continual_adapters", "continual_full", "continual_early_fusion", "continual_adapters_ms")


# --------------------------------------------------------------------------------------
# Data: HECKTOR folders generated on first use, model-space arrays cached
# --------------------------------------------------------------------------------------


@dataclass
class PreparedPair:
    case_id: str
    centre: str
    image: torch.Tensor          # [2, X, Y, Z] float16: normalised CT, PET on the CT's model grid
    label: np.ndarray            # [X, Y, Z] uint8
    foreground: np.ndarray       # [N, 3] voxel indices of labelled voxels (subsampled)


def centre_set_folder(cfg: PemmaConfig, split: str, name: str) -> Path:
    return Path(cfg.data_root) / split / name


def ensure_centre_set(cfg: PemmaConfig, split: str, name: str, spec: CentreSet) -> Path:
    """Write the set's HECKTOR folder (idempotent); centre k of the set draws from ``case_seed(seed, 10000 + k)``."""
    from duplus.synth.phantoms.decathlon import case_seed
    from duplus.synth.phantoms.petct import write_hecktor_dataset

    folder = centre_set_folder(cfg, split, name)
    for k, centre in enumerate(spec.centres):
        write_hecktor_dataset(folder, centre, spec.cases, case_seed(spec.seed, 10_000 + k))
    return folder


def prepare_pairs(cfg: PemmaConfig, split: str, name: str, spec: CentreSet, *, cache: bool = True
                  ) -> list[PreparedPair]:
    """The set's cases in model space (CT grid, ``model.spacing``), from the cache when it matches."""
    folder = ensure_centre_set(cfg, split, name, spec)
    spacing = UnetrConfig(**cfg.model).spacing
    cache_dir = Path(cfg.output) / "cache" / split / name
    records = [r for r in load_hecktor(folder) if r.centre in spec.centres]
    rng = np.random.default_rng(0)
    out = []
    from tqdm.auto import tqdm

    for record in tqdm(records, desc=f"{split}/{name}", unit="case", leave=False):
        path = cache_dir / f"{record.case_id}.pt"
        state = torch.load(path, weights_only=False) if cache and path.is_file() else None
        if state is None or tuple(state["spacing"]) != tuple(spacing) or state["seed"] != record.seed:
            ct, ct_affine, pet, pet_affine, label = read_petct(record)
            image, _, _, _, lab = petct_to_model_space(ct, ct_affine, pet, pet_affine, spacing, label=label)
            state = {"image": image.half(), "label": lab.numpy().astype(np.uint8), "spacing": tuple(spacing),
                     "seed": record.seed}
            if cache:
                cache_dir.mkdir(parents=True, exist_ok=True)
                torch.save(state, path)
        fg = np.argwhere(state["label"] > 0)
        if len(fg) > 4000:
            fg = fg[rng.choice(len(fg), 4000, replace=False)]
        out.append(PreparedPair(record.case_id, record.centre, state["image"], state["label"], fg))
    return out


class PairSampler:
    """Random crops (a labelled voxel at the centre with ``foreground_prob``), random left-right flips."""

    def __init__(self, cases: list[PreparedPair], crop: int, foreground_prob: float, seed: int) -> None:
        self.cases, self.crop, self.fg = cases, crop, foreground_prob
        self.rng = np.random.default_rng(seed)

    def _one(self, case: PreparedPair) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.crop
        image, label = case.image.float(), torch.as_tensor(case.label)
        pads = [max(0, c - n) for n in label.shape]
        if any(pads):
            spec = [v for p in reversed(pads) for v in (p // 2, p - p // 2)]
            lows = image.flatten(1).min(dim=1).values
            image = torch.stack([torch.nn.functional.pad(image[k], spec, value=float(lows[k])) for k in range(2)])
            label = torch.nn.functional.pad(label, spec, value=0)
            offset = np.array([p // 2 for p in pads])
        else:
            offset = np.zeros(3, int)
        shape = np.array(label.shape)
        if len(case.foreground) and self.rng.random() < self.fg:
            centre = case.foreground[self.rng.integers(len(case.foreground))] + offset
        else:
            centre = self.rng.integers(0, shape)
        start = np.clip(centre - c // 2 + self.rng.integers(-c // 4, c // 4 + 1, 3), 0, shape - c)
        sl = tuple(slice(int(s), int(s) + c) for s in start)
        x, y = image[(slice(None), *sl)], label[sl]
        if self.rng.random() < 0.5:   # left-right flip: GTVp / GTVn have no side
            x, y = x.flip(1), y.flip(0)
        return x, y

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = [self._one(self.cases[self.rng.integers(len(self.cases))]) for _ in range(batch_size)]
        return torch.stack([p[0] for p in picks]), torch.stack([p[1] for p in picks])[:, None].long()


# --------------------------------------------------------------------------------------
# Models of each stage
# --------------------------------------------------------------------------------------


def load_stage_model(cfg: PemmaConfig, stage: str) -> torch.nn.Module:
    path = Path(cfg.output) / f"{stage}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run --stage {stage} first")
    return model_from_state(torch.load(path, weights_only=False)["model"])


def build_stage_model(cfg: PemmaConfig, stage: str) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The model a stage trains, with its trainable parameters set, and the input modes it trains on."""
    if stage == "pretrain":
        return PemmaUNETR(UnetrConfig(**cfg.model)), ("ct",)
    if stage in ("continual_adapters", "continual_full", "continual_adapters_ms"):
        model = load_stage_model(cfg, "pemma_lora_ms" if stage.endswith("_ms") else "pemma_lora")
        for name, p in model.named_parameters():
            p.requires_grad = stage == "continual_full" or "lora_" in name
        return model, ("ct",)
    if stage == "continual_early_fusion":
        model = load_stage_model(cfg, "early_fusion")
        for p in model.parameters():
            p.requires_grad = True
        return model, ("ct",)
    base = load_stage_model(cfg, "pretrain")
    assert isinstance(base, PemmaUNETR)
    if stage in ("pemma_lora", "pemma_dora", "pemma_lora_ms"):
        adapter = AdapterConfig(**{**cfg.adapter, "kind": stage.split("_")[1]})
        pathway = cfg.stages[stage].pet_pathway if stage in cfg.stages else {}
        return base.add_pet_pathway(**pathway).add_adapters(adapter).freeze_for_adaptation(), ()
    if stage == "full_finetune":
        return base.add_pet_pathway().freeze_for_adaptation(full=True), ()
    if stage == "early_fusion":
        return EarlyFusionUNETR.from_ct(base), ()
    if stage == "pet_only":
        for p in base.parameters():
            p.requires_grad = True
        return base, ("pet",)
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def validate(model: torch.nn.Module, cases: list[PreparedPair], modes: tuple[str, ...]) -> dict[str, float]:
    """Mean Dice per (mode, target) in model space on the validation cases (not the held-out sets)."""
    model.eval()
    scores: dict[str, list[float]] = {}
    for case in cases:
        for mode in modes:
            labels = sliding_window_probabilities(model, case.image.float(), mode).argmax(0).numpy()
            for k, target in enumerate(PEMMA_TARGETS, start=1):
                if (case.label == k).any():
                    scores.setdefault(f"{mode} {target}", []).append(dice(labels == k, case.label == k))
    model.train()
    return {k: float(np.mean(v)) for k, v in scores.items()}


def plot_curves(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if history["loss"]:
        steps, losses = zip(*history["loss"])
        k = max(1, len(losses) // 40)
        axes[0].plot(steps, losses, alpha=0.25, color="tab:blue")
        axes[0].plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode="valid"), color="tab:blue")
    axes[0].set(title=f"{title}: training loss (Dice + CE)", xlabel="step")
    for key in sorted({k for _, d in history["val"] for k in d}):
        pts = [(s, d[key]) for s, d in history["val"] if key in d]
        axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set(title="validation Dice (training centre's last cases)", xlabel="step", ylim=(0, 1))
    axes[1].legend(fontsize=7, loc="lower right")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_stage(cfg: PemmaConfig, stage_name: str) -> Path:
    """Run one stage; returns the checkpoint path (``OUTPUT/<stage>.pt``)."""
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    if stage_name not in cfg.stages:
        raise ValueError(f"stage {stage_name!r} is not in the configuration (has {sorted(cfg.stages)})")
    stage = cfg.stages[stage_name]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    cases = prepare_pairs(cfg, "train", stage.data, cfg.data[stage.data])
    if len(cases) <= stage.val_cases:
        raise ValueError(f"{stage.data} has {len(cases)} cases, not more than val_cases={stage.val_cases}")
    train_cases, val_cases = cases[:len(cases) - stage.val_cases], cases[len(cases) - stage.val_cases:]
    model, fixed_modes = build_stage_model(cfg, stage_name)
    modes = fixed_modes or supported_modes(model)
    counts = parameter_counts(model)
    log.info("%s: %d training / %d validation cases of %s; parameters %d trainable of %d (%.2f %%); modes %s",
             stage_name, len(train_cases), len(val_cases), stage.data, counts["trainable"], counts["total"],
             100.0 * counts["trainable"] / counts["total"], modes)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / stage.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / stage.steps))))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5)
    sampler = PairSampler(train_cases, model.cfg.crop, stage.foreground_prob, seed=cfg.seed + 1)
    mode_rng = np.random.default_rng(cfg.seed + 2)
    bf16 = native_bf16(torch.device("cpu"))
    history: dict = {"loss": [], "val": [], "modes": {m: 0 for m in modes}}
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(stage.steps), desc=stage_name, unit="step")
    for step in bar:
        if fixed_modes:
            mode = fixed_modes[0]
        else:
            mode = modality_dropout(mode_rng, stage.ct_only_prob, stage.pet_only_prob)
        history["modes"][mode] += 1
        x, y = sampler.sample(stage.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model.forward_channels(x, mode)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history["loss"].append((step + 1, float(loss)))
        bar.set_postfix(loss=f"{float(loss):.3f}", mode=mode)
        if (step + 1) % stage.val_every == 0 or step + 1 == stage.steps:
            val = validate(model, val_cases, modes)
            history["val"].append((step + 1, val))
            log.info("%s step %d: validation %s", stage_name, step + 1,
                     ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
    seconds = time.perf_counter() - t0
    model.eval()
    path = out / f"{stage_name}.pt"
    state = {"format": "pemma-checkpoint/1", "stage": stage_name, "model": model_state(model),
             "parameters": counts, "modes": list(modes), "history": history, "seconds": round(seconds, 1),
             "config": {"stage": asdict(stage), "data": asdict(cfg.data[stage.data]), "model": cfg.model,
                        "adapter": cfg.adapter},
             "training_cases": [c.case_id for c in train_cases], "validation_cases": [c.case_id for c in val_cases],
             "threads": torch.get_num_threads(), "bf16": bf16}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    plot_curves(history, out / f"{stage_name}_curves.png", stage_name)
    log.info("%s: %d steps in %.1f min -> %s", stage_name, stage.steps, seconds / 60, path)
    return path


def ship(cfg: PemmaConfig, stage: str, path: Path) -> Path:
    """Copy a stage's checkpoint for shipping: weights in float16 (half the size; loading casts them back to
    float32), the training record kept.  The parity checks of export and serving hold for what is shipped."""
    state = torch.load(Path(cfg.output) / f"{stage}.pt", weights_only=False)
    model = dict(state["model"])
    model["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in model["state_dict"].items()}
    shipped = {**state, "model": model, "weights_dtype": "float16"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(shipped, tmp)
    os.replace(tmp, path)
    log.info("shipped %s -> %s (%.1f MB)", stage, path, path.stat().st_size / 1e6)
    return path


def backbone_from(cfg: PemmaConfig, shipped: Path) -> Path:
    """Write ``OUTPUT/pretrain.pt`` from a PEMMA checkpoint's frozen CT backbone (its adapters unloaded, not
    merged, and its PET pathway dropped) instead of training it: PEMMA never changes those weights, so this is the
    pretrained UNETR the checkpoint was adapted from (in the checkpoint's precision: float16 for a shipped one)."""
    from peft import PeftModel

    state = torch.load(shipped, weights_only=False)
    if state.get("stage") not in ("pemma_lora", "pemma_dora", "pemma_lora_ms"):
        raise ValueError(f"{shipped} is not a PEMMA checkpoint (stage {state.get('stage')!r})")
    adapted = model_from_state(state["model"])
    if isinstance(adapted.unetr.vit, PeftModel):
        adapted.unetr.vit = adapted.unetr.vit.unload()
    ct = PemmaUNETR(adapted.cfg)
    ct.unetr.load_state_dict(adapted.unetr.state_dict())
    out = Path(cfg.output) / "pretrain.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "pemma-checkpoint/1", "stage": "pretrain", "model": model_state(ct),
                "parameters": parameter_counts(ct), "modes": ["ct"], "extracted_from": str(shipped),
                "history": {"loss": [], "val": []}}, out)
    log.info("wrote %s: the CT backbone of %s", out, shipped)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.train_pemma", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pemma.yaml", help="YAML study configuration (default: %(default)s)")
    ap.add_argument("--stage", required=True, action="append", choices=STAGES,
                    help="stage to train (repeat for several, run in order)")
    ap.add_argument("--ship", metavar="PATH", help="instead of training, write the (single) --stage's checkpoint "
                    "to PATH with float16 weights, e.g. checkpoints/pemma_lora.pt")
    ap.add_argument("--output", help="override the output folder of the configuration")
    ap.add_argument("--steps", type=int, help="override the stage's steps (e.g. a quick smoke run)")
    ap.add_argument("--backbone-from", metavar="PEMMA_CHECKPOINT", type=Path,
                    help="before the stages, write OUTPUT/pretrain.pt from this PEMMA checkpoint's frozen CT backbone "
                         "(e.g. the shipped checkpoints/pemma_lora.pt) instead of training the pretrain stage")
    ap.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PemmaConfig.from_yaml(args.config, output=args.output)
    if args.steps:
        cfg = dataclasses.replace(cfg, stages={k: dataclasses.replace(v, steps=args.steps, val_every=args.steps)
                                               for k, v in cfg.stages.items()})
    if args.ship:
        if len(args.stage) != 1:
            ap.error("--ship takes exactly one --stage")
        ship(cfg, args.stage[0], Path(args.ship))
        return
    if args.backbone_from:
        backbone_from(cfg, args.backbone_from)
    for stage in args.stage:
        train_stage(cfg, stage)


if __name__ == "__main__":
    main()
