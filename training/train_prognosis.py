"""Train the prognosis model: frozen DuPLUS image features + LoRA text encoder on EHR notes, Cox loss.

    python -m training.train_prognosis --config configs/prognosis.yaml

Steps: draw the synthetic training and validation cohorts (or read a HECKTOR-style data set),
extract the frozen backbone's image features once per patient (cached on disk, keyed by the
segmentation checkpoint's sha256, so an interrupted run resumes where it stopped), then train the
LoRA adapters and the head with the Cox partial likelihood on mini-batches, each epoch with a
fresh phrasing of every note (text augmentation), plus an auxiliary loss that reads the structured
clinical variables back from the note embedding (``model.aux_weight``; training only).  The checkpoint with the best validation
partial likelihood (Cox loss) is kept; it holds only the LoRA weights and the head (the base text encoder and the
segmentation checkpoint are referenced by name and sha256).  Writes curves.png beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from duplus.config import read_yaml_config
from duplus.files import file_sha256
from duplus.models.prognosis import (
    ImageFeatureExtractor,
    PrognosisConfig,
    PrognosisModel,
    c_index,
    cox_loss,
    feature_names,
    save_prognosis_checkpoint,
)
from duplus.synth.cohort import (
    EHR_COVARIATES,
    CohortSpec,
    Patient,
    covariates,
    generate_cohort,
    note_variant,
    pet_volume,
)

log = logging.getLogger("training.train_prognosis")


@dataclass(frozen=True)
class PrognosisOptim:
    epochs: int = 30
    batch_size: int = 96
    lr_lora: float = 1e-3
    lr_head: float = 3e-3
    weight_decay: float = 1e-2
    note_variants: int = 8           # phrasings per patient drawn across epochs (0 = the original note only)
    patience: int = 8                # epochs without a better validation partial likelihood before stopping
    reader_epochs: int = 3           # epochs of note-reading pretraining on reader_cohort (auxiliary loss only)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 8:
            raise ValueError(f"optim.batch_size must be >= 8 (Cox risk sets need several patients), "
                             f"got {self.batch_size}")
        if self.note_variants < 0:
            raise ValueError(f"optim.note_variants must be >= 0, got {self.note_variants}")


@dataclass(frozen=True)
class TrainPrognosisConfig:
    output: str
    train_cohort: CohortSpec
    val_cohort: CohortSpec
    model: PrognosisConfig = field(default_factory=PrognosisConfig)
    optim: PrognosisOptim = field(default_factory=PrognosisOptim)
    reader_cohort: CohortSpec | None = None   # notes + structured fields only (no images): reader pretraining
    feature_cache: str = "runs/prognosis_features"
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        for name, cls in (("train_cohort", CohortSpec), ("val_cohort", CohortSpec), ("reader_cohort", CohortSpec),
                          ("model", PrognosisConfig), ("optim", PrognosisOptim)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls(**getattr(self, name)))
        if self.train_cohort.seed == self.val_cohort.seed:
            raise ValueError("train_cohort and val_cohort need different seeds")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainPrognosisConfig:
        return cls(**read_yaml_config(path, cls, **overrides))


def cohort_features(patients: list[Patient], extractor: ImageFeatureExtractor, cache_dir: str | Path,
                    seg_sha: str, desc: str = "image features") -> np.ndarray:
    """[N, D] frozen image features, one file per patient under ``cache_dir/<checkpoint sha[:12]>/``."""
    folder = Path(cache_dir) / seg_sha[:12]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in tqdm(patients, desc=desc, unit="patient"):
        f = folder / f"{p.patient_id}_{p.image_seed}.npy"
        if f.is_file():
            vec = np.load(f)
        else:
            ph = pet_volume(p)
            vec = extractor(ph.image, ph.affine).vector
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, vec)
            os.replace(tmp, f)
        out.append(vec)
    return np.stack(out).astype(np.float32)


def _pretrain_reader(model: PrognosisModel, patients: list[Patient], targets: torch.Tensor,
                     cfg: TrainPrognosisConfig, opt_lr: float) -> None:
    """Note-reading pretraining: LoRA + the head's read-out learn to state the structured variables of notes of
    patients without images (a fresh phrasing of each note every epoch); no survival signal is used."""
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": opt_lr},
                             {"params": list(model.head.read.parameters()), "lr": cfg.optim.lr_head}],
                            weight_decay=cfg.optim.weight_decay)
    rng = np.random.default_rng(cfg.seed + 17)
    model.train()
    for epoch in range(1, cfg.optim.reader_epochs + 1):
        order = rng.permutation(len(patients))
        losses = []
        bar = tqdm(range(0, len(order), cfg.optim.batch_size), desc=f"reader epoch {epoch}", unit="batch")
        for i in bar:
            idx = order[i:i + cfg.optim.batch_size]
            notes = [note_variant(patients[j], int(rng.integers(0, cfg.optim.note_variants + 1)), cfg.seed)
                     for j in idx]
            tok = model.ehr.tokenize(notes)
            loss = nn.functional.mse_loss(model.head.read_out(model.ehr(tok["input_ids"], tok["attention_mask"])),
                                          targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            bar.set_postfix(mse=f"{losses[-1]:.3f}")
        log.info("reader epoch %d: read-out MSE %.4f (standardised variables)", epoch, float(np.mean(losses)))


def plot_curves(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ep = [h["epoch"] for h in history]
    axes[0].plot(ep, [h["loss"] for h in history], marker="o")
    axes[0].set(title="training loss (Cox partial likelihood + auxiliary read-out)", xlabel="epoch")
    axes[1].plot(ep, [h["val_c_index"] for h in history], marker="o", label="validation")
    axes[1].plot(ep, [h["train_c_index"] for h in history], marker=".", alpha=0.6, label="training")
    axes[1].set(title="C-index", xlabel="epoch", ylim=(0.5, 1.0))
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg: TrainPrognosisConfig, features_only: bool = False) -> Path:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    seg_ckpt = Path(cfg.model.segmentation_checkpoint)
    seg_sha = file_sha256(seg_ckpt)
    train_pat, val_pat = generate_cohort(cfg.train_cohort), generate_cohort(cfg.val_cohort)
    extractor = ImageFeatureExtractor(seg_ckpt, cfg.model.modality, cfg.model.t1)
    x_train = cohort_features(train_pat, extractor, cfg.feature_cache, seg_sha, "training image features")
    x_val = cohort_features(val_pat, extractor, cfg.feature_cache, seg_sha, "validation image features")
    if features_only:
        log.info("image features cached under %s", cfg.feature_cache)
        return out
    backbone_params = sum(p.numel() for p in extractor.unit.parameters())
    del extractor

    # the structured variables each note states, standardised: targets of the auxiliary read-out
    reader_pat = generate_cohort(cfg.reader_cohort) if cfg.reader_cohort is not None and cfg.model.aux_weight else []
    aux_all = np.array([covariates(p.clinical, EHR_COVARIATES) for p in (reader_pat or train_pat)], np.float32)
    aux_mean, aux_std = aux_all.mean(0), aux_all.std(0) + 1e-6

    def aux_targets(patients) -> torch.Tensor:
        raw = np.array([covariates(p.clinical, EHR_COVARIATES) for p in patients], np.float32)
        return torch.from_numpy((raw - aux_mean) / aux_std)

    aux_train = aux_targets(train_pat)
    if cfg.model.aux_weight and cfg.model.text_hidden != aux_train.shape[1]:
        raise ValueError(f"model.text_hidden must be {aux_train.shape[1]} (the structured variables read from the "
                         f"note) when model.aux_weight > 0, got {cfg.model.text_hidden}")
    model = PrognosisModel(cfg.model, x_train.shape[1])
    model.head.set_image_statistics(torch.from_numpy(x_train))
    counts = model.parameter_counts(backbone_params)
    log.info("prognosis model: %d trainable of %d parameters (%.3f%%, LoRA rank %d on %s + head; frozen backbone "
             "and text encoder)", counts["trainable"], counts["total"], 100 * counts["trainable_fraction"],
             cfg.model.lora_rank, list(cfg.model.lora_targets))
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.optim.lr_lora}, {"params": head, "lr": cfg.optim.lr_head}],
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.optim.epochs, eta_min=1e-5)
    if reader_pat:
        _pretrain_reader(model, reader_pat, aux_targets(reader_pat), cfg, opt_lr=cfg.optim.lr_lora)
    t_train = torch.tensor([p.time for p in train_pat])
    e_train = torch.tensor([p.event for p in train_pat])
    val_notes = [p.note for p in val_pat]
    t_val = torch.tensor([p.time for p in val_pat], dtype=torch.float64)
    e_val = torch.tensor([p.event for p in val_pat])
    rng = np.random.default_rng(cfg.seed)
    history, best, stale, best_path = [], -float("inf"), 0, out / "best.pt"
    t0 = time.time()
    for epoch in range(1, cfg.optim.epochs + 1):
        model.train()
        order = rng.permutation(len(train_pat))
        losses = []
        bar = tqdm(range(0, len(order), cfg.optim.batch_size), desc=f"epoch {epoch}", unit="batch", leave=False)
        for i in bar:
            idx = order[i:i + cfg.optim.batch_size]
            if len(idx) < 8 or int(e_train[idx].sum()) == 0:
                continue
            notes = [note_variant(train_pat[j], int(rng.integers(0, cfg.optim.note_variants + 1)), cfg.seed)
                     for j in idx]
            tok = model.ehr.tokenize(notes)
            emb = model.ehr(tok["input_ids"], tok["attention_mask"])
            risk = model.head(torch.from_numpy(x_train[idx]), emb)
            loss = cox_loss(risk, t_train[idx], e_train[idx])
            if cfg.model.aux_weight:
                loss = loss + cfg.model.aux_weight * nn.functional.mse_loss(model.head.read_out(emb), aux_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        sched.step()
        val_risk = model.risk(x_val, val_notes)
        train_risk = model.risk(x_train, [p.note for p in train_pat])
        rec = {"epoch": epoch, "loss": float(np.mean(losses)),
               "val_c_index": c_index([p.time for p in val_pat], val_risk, [p.event for p in val_pat]),
               "val_cox": float(cox_loss(torch.from_numpy(val_risk), t_val, e_val)),
               "train_c_index": c_index(t_train.numpy(), train_risk, e_train.numpy())}
        history.append(rec)
        log.info("epoch %d: loss %.4f, C-index train %.3f val %.3f, val Cox loss %.4f (%.0f s)", epoch, rec["loss"],
                 rec["train_c_index"], rec["val_c_index"], rec["val_cox"], time.time() - t0)
        # model selection on the validation partial likelihood: smoother than the C-index of 100 patients
        if -rec["val_cox"] > best:
            best, stale = -rec["val_cox"], 0
            save_prognosis_checkpoint(best_path, model, {
                "segmentation_checkpoint": str(seg_ckpt), "segmentation_sha256": seg_sha,
                "feature_names": feature_names((x_train.shape[1] - 5) // 3), "train_cohort": asdict(cfg.train_cohort),
                "val_cohort": asdict(cfg.val_cohort), "epoch": epoch,
                "reader_cohort": asdict(cfg.reader_cohort) if reader_pat else None, "val_c_index": rec["val_c_index"],
                "risk_tertiles": np.quantile(train_risk, [1 / 3, 2 / 3]).tolist(),
                "parameter_counts": counts, "history": history, "format": "duplus-prognosis/1"})
        else:
            stale += 1
        plot_curves(history, out / "curves.png")
        if stale >= cfg.optim.patience:
            log.info("no better validation partial likelihood for %d epochs: stopping", stale)
            break
    log.info("best validation Cox loss %.4f; checkpoint %s (%.0f s)", -best, best_path, time.time() - t0)
    return best_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.train_prognosis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML configuration (see configs/prognosis.yaml)")
    ap.add_argument("--output", help="override the output folder of the configuration")
    ap.add_argument("--epochs", type=int, help="override optim.epochs")
    ap.add_argument("--features-only", action="store_true",
                    help="only extract and cache the image features of both cohorts, then stop")
    ap.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainPrognosisConfig.from_yaml(args.config, output=args.output)
    if args.epochs:
        cfg = replace(cfg, optim=replace(cfg.optim, epochs=args.epochs))
    train(cfg, features_only=args.features_only)


if __name__ == "__main__":
    main()
