"""Score the PEMMA study's checkpoints on a held-out centre set: Dice per target, input mode and model.

Every model is run on the held-out cases (never trained or tuned on; their seeds are fixed in
``configs/pemma.yaml``) in each input mode it supports (CT+PET, CT alone, PET alone); the labels come
back on the CT's own grid (for PET alone too, so every mode is scored against the same label map) and
are compared with the reference there.  The path is ``segment_petct``'s (``petct_to_model_space``, then
``labels_on_grid``), the preprocessing done once per case and mode for all models.  Writes ``OUTPUT/eval_<set>.json``, a Markdown table
``OUTPUT/eval_<set>.md`` and a bar chart ``OUTPUT/eval_<set>.png``, and counts how many times each
held-out set has been looked at (``OUTPUT/heldout_looks.json``).

Paired differences (e.g. PEMMA minus early fusion, same cases) carry a bootstrap 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from duplus.metrics import bootstrap_mean_interval, dice
from duplus.models.pemma import INPUT_MODES, PEMMA_TARGETS, UnetrConfig, labels_on_grid, supported_modes
from duplus.preprocessing import petct_to_model_space
from training.config import PemmaConfig
from training.data import load_hecktor, read_petct
from training.train_pemma import STAGES, ensure_centre_set, load_stage_model

log = logging.getLogger(__name__)

#: what each stage's model is called in the tables
MODEL_NAMES = {
    "pretrain": "CT-pretrained UNETR",
    "pemma_lora": "PEMMA (LoRA)",
    "pemma_dora": "PEMMA (DoRA)",
    "pemma_lora_ms": "PEMMA (LoRA), PET skips at every resolution",
    "early_fusion": "early fusion",
    "full_finetune": "full fine-tuning",
    "pet_only": "PET-only UNETR",
    "continual_adapters": "PEMMA (LoRA) + centre F, adapters only",
    "continual_full": "PEMMA (LoRA) + centre F, full fine-tuning",
    "continual_early_fusion": "early fusion + centre F, full fine-tuning",
    "continual_adapters_ms": "PEMMA (LoRA), PET skips at every resolution + centre F, adapters only",
}


def evaluate(cfg: PemmaConfig, heldout: str, stages: list[str]) -> dict:
    """Per-case Dice of every (stage, mode, target) on the held-out set ``heldout``."""
    from tqdm.auto import tqdm

    if heldout not in cfg.heldout:
        raise ValueError(f"unknown held-out set {heldout!r}; configs has {sorted(cfg.heldout)}")
    spec = cfg.heldout[heldout]
    folder = ensure_centre_set(cfg, "heldout", heldout, spec)
    records = [r for r in load_hecktor(folder) if r.centre in spec.centres]
    models = {s: load_stage_model(cfg, s) for s in stages}
    spacing = UnetrConfig(**cfg.model).spacing
    if any(tuple(m.cfg.spacing) != tuple(spacing) for m in models.values()):
        raise ValueError(f"every checkpoint must use the study's spacing {spacing}")
    scores: dict = {s: {} for s in stages}
    t0 = time.perf_counter()
    for record in tqdm(records, desc=f"held-out {heldout}", unit="case"):
        ct, ct_affine, pet, pet_affine, label = read_petct(record)
        for mode in INPUT_MODES:
            users = {s: m for s, m in models.items() if mode in supported_modes(m)}
            if not users:
                continue
            use_ct, use_pet = mode in ("ct+pet", "ct"), mode in ("ct+pet", "pet")
            # one preprocessing per case and mode, shared by the models (their spacing is the study's)
            image, _, model_affine, _, _ = petct_to_model_space(
                ct if use_ct else None, ct_affine if use_ct else None, pet if use_pet else None,
                pet_affine if use_pet else None, spacing)
            for stage, model in users.items():
                labels = labels_on_grid(model, image, mode, model_affine, ct_affine, ct.shape)
                for k, target in enumerate(PEMMA_TARGETS, start=1):
                    if (label == k).any():
                        scores[stage].setdefault(mode, {}).setdefault(target, []).append(
                            dice(labels == k, label == k))
    return {"heldout": heldout, "cases": [r.case_id for r in records], "seconds": round(time.perf_counter() - t0, 1),
            "scores": scores}


def summary_table(result: dict) -> str:
    lines = ["| model | input | " + " | ".join(f"{t} Dice (95 % CI)" for t in PEMMA_TARGETS) + " |",
             "|---|---|" + "---|" * len(PEMMA_TARGETS)]
    for stage, by_mode in result["scores"].items():
        for mode, by_target in by_mode.items():
            cells = []
            for target in PEMMA_TARGETS:
                v = np.asarray(by_target.get(target, []))
                if not len(v):
                    cells.append("–")
                    continue
                lo, hi = bootstrap_mean_interval(v)
                cells.append(f"{v.mean():.3f} ({lo:.3f}–{hi:.3f})")
            lines.append(f"| {MODEL_NAMES.get(stage, stage)} | {mode.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(result: dict, comparisons: list[tuple[str, str, str, str]]) -> list[dict]:
    """Mean paired Dice difference (a - b) per target with a bootstrap interval, for (stage_a, mode_a, stage_b,
    mode_b) pairs both of which were scored."""
    out = []
    s = result["scores"]
    for a, ma, b, mb in comparisons:
        if ma not in s.get(a, {}) or mb not in s.get(b, {}):
            continue
        for target in PEMMA_TARGETS:
            va, vb = np.asarray(s[a][ma].get(target, [])), np.asarray(s[b][mb].get(target, []))
            if len(va) and len(va) == len(vb):
                lo, hi = bootstrap_mean_interval(va - vb)
                out.append({"a": f"{a} {ma}", "b": f"{b} {mb}", "target": target,
                            "difference": float((va - vb).mean()), "ci95": [lo, hi]})
    return out


COMPARISONS = [
    ("pemma_lora", "ct+pet", "early_fusion", "ct+pet"),
    ("pemma_dora", "ct+pet", "early_fusion", "ct+pet"),
    ("pemma_dora", "ct+pet", "pemma_lora", "ct+pet"),
    ("pemma_dora", "pet", "pemma_lora", "pet"),
    ("pemma_lora_ms", "ct+pet", "pemma_lora", "ct+pet"),
    ("pemma_lora_ms", "pet", "pemma_lora", "pet"),
    ("pemma_lora_ms", "ct", "pemma_lora", "ct"),
    ("pemma_lora_ms", "ct+pet", "early_fusion", "ct+pet"),
    ("pemma_lora", "ct+pet", "full_finetune", "ct+pet"),
    ("pemma_lora", "pet", "pretrain", "pet"),
    ("pemma_lora", "pet", "pet_only", "pet"),
    ("pemma_lora", "ct", "pretrain", "ct"),
    ("pemma_lora", "ct+pet", "pretrain", "ct"),
    # forgetting after the centre-F update (negative: Dice lost on the old centre)
    ("continual_adapters", "ct+pet", "pemma_lora", "ct+pet"),
    ("continual_full", "ct+pet", "pemma_lora", "ct+pet"),
    ("continual_adapters", "pet", "pemma_lora", "pet"),
    ("continual_full", "pet", "pemma_lora", "pet"),
    ("continual_adapters", "ct", "pemma_lora", "ct"),
    ("continual_full", "ct", "pemma_lora", "ct"),
    ("continual_early_fusion", "ct+pet", "early_fusion", "ct+pet"),
    ("continual_early_fusion", "pet", "early_fusion", "pet"),
    ("continual_early_fusion", "ct", "early_fusion", "ct"),
    ("continual_adapters_ms", "ct+pet", "pemma_lora_ms", "ct+pet"),
    ("continual_adapters_ms", "pet", "pemma_lora_ms", "pet"),
    ("continual_adapters_ms", "ct", "pemma_lora_ms", "ct"),
]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(stage, mode) for stage, by_mode in result["scores"].items() for mode in by_mode]
    fig, axes = plt.subplots(1, len(PEMMA_TARGETS), figsize=(6 * len(PEMMA_TARGETS), 0.45 * len(rows) + 1.5),
                             sharey=True)
    for ax, target in zip(np.atleast_1d(axes), PEMMA_TARGETS):
        means, errs, names = [], [], []
        for stage, mode in rows:
            v = np.asarray(result["scores"][stage][mode].get(target, [np.nan]))
            means.append(np.nanmean(v))
            errs.append(np.nanstd(v))
            names.append(f"{MODEL_NAMES.get(stage, stage)}, {mode.upper()}")
        y = np.arange(len(rows))
        ax.barh(y, means, xerr=errs, color=["tab:orange" if s.startswith("pemma") else "tab:gray" for s, _ in rows])
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="Dice (mean ± sd over cases)", title=f"{target}, held-out {result['heldout']}")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def count_look(out: Path, heldout: str) -> int:
    path = out / "heldout_looks.json"
    looks = json.loads(path.read_text()) if path.is_file() else {}
    looks[heldout] = looks.get(heldout, 0) + 1
    path.write_text(json.dumps(looks, indent=1))
    return looks[heldout]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_pemma", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/pemma.yaml", help="YAML study configuration (default: %(default)s)")
    ap.add_argument("--heldout", default="centre_e", help="held-out set of the configuration (default: %(default)s)")
    ap.add_argument("--stage", action="append", choices=STAGES,
                    help="checkpoint to score (repeat; default: every stage whose checkpoint exists)")
    ap.add_argument("--output", help="override the output folder of the configuration")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    ap.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PemmaConfig.from_yaml(args.config, output=args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(cfg.output)
    stages = args.stage or [s for s in STAGES if (out / f"{s}.pt").is_file()]
    if not stages:
        raise SystemExit(f"no checkpoints in {out}: train a stage first (python -m training.train_pemma --help)")
    result = evaluate(cfg, args.heldout, stages)
    result["looks"] = count_look(out, args.heldout)
    result["differences"] = paired_differences(result, COMPARISONS)
    (out / f"eval_{args.heldout}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# PEMMA on held-out {args.heldout} ({len(result['cases'])} cases; look {result['looks']} at this set)",
             "", summary_table(result), "", "Paired differences (same cases), Dice, bootstrap 95 % interval:", ""]
    lines += [f"- {d['a']} − {d['b']}, {d['target']}: {d['difference']:+.3f} "
              f"({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" for d in result["differences"]]
    (out / f"eval_{args.heldout}.md").write_text("\n".join(lines) + "\n")
    plot(result, out / f"eval_{args.heldout}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
