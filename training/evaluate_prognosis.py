"""Evaluate a prognosis checkpoint on a held-out synthetic cohort, with the same run's baselines.

    python -m training.evaluate_prognosis --checkpoint checkpoints/duplus_prognosis.pt --patients 200 --seed 9001 --json

Draws a cohort from a seed the checkpoint was not trained or validated on, extracts the frozen
image features (PyTorch, or the exported ``image_features`` unit on ONNX Runtime with
``--repository``), scores every patient, and compares Harrell's C-index with two Cox
proportional-hazards baselines (lifelines) fitted on the checkpoint's own training cohort:

* ``c_index_ehr_only``: the structured EHR variables (age, sex, HPV, smoking, ECOG, TNM, treatment);
* ``c_index_oracle``: the hazard's true latent factors (true tumour volume, SUVmax, node count and the
  EHR factors): an upper bound for any model.

Each C-index carries a paired-bootstrap 95% interval.  Writes a Kaplan-Meier plot of the model's
risk groups (tertiles of the training cohort's risk) with the log-rank p-value.  Prints one JSON
object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from duplus.files import file_sha256
from duplus.models.prognosis import bootstrap_c_index, c_index, load_prognosis_checkpoint
from duplus.synth.cohort import EHR_COVARIATES, LATENT_COVARIATES, CohortSpec, HazardModel, covariates, generate_cohort

log = logging.getLogger("training.evaluate_prognosis")


def cox_baseline(train_patients, test_patients, names, hazard: HazardModel, penalizer: float = 0.01) -> np.ndarray:
    """lifelines CoxPHFitter on ``names`` fitted on the training cohort -> log partial hazards of the test cohort."""
    import pandas as pd
    from lifelines import CoxPHFitter

    def frame(ps):
        d = pd.DataFrame([covariates(p.clinical, names, hazard) for p in ps], columns=list(names))
        d["T"] = [p.time for p in ps]
        d["E"] = [p.event for p in ps]
        return d

    train = frame(train_patients)
    keep = [c for c in names if train[c].std() > 0]  # a constant column (e.g. no M1 patient) cannot be fitted
    cph = CoxPHFitter(penalizer=penalizer).fit(train[keep + ["T", "E"]], "T", "E")
    return np.asarray(cph.predict_log_partial_hazard(frame(test_patients)[keep]), dtype=float)


class OnnxFeatureExtractor:
    """The exported image_features unit of a built repository on ONNX Runtime (what the server runs)."""

    def __init__(self, repository: Path, segmentation_checkpoint: Path, modality: str, t1: str):
        from duplus.models.prognosis import PROGNOSIS_TARGETS, ImageFeatureExtractor
        from duplus.ort import ort_session

        manifest = json.loads((repository / "manifest.json").read_text())
        if manifest["checkpoint_sha256"] != file_sha256(segmentation_checkpoint):
            raise ValueError(f"{repository} was built from another segmentation checkpoint than "
                             f"{segmentation_checkpoint}")
        entry = manifest["units"].get("image_features", {})
        if "onnx" not in entry:
            raise ValueError(f"{repository} has no ONNX image_features unit (built with --engine "
                             f"{manifest.get('engine')} or without prognosis); build it with --engine onnxruntime")
        self.base = ImageFeatureExtractor(segmentation_checkpoint, modality, t1)  # prompts + preprocessing
        self.session = ort_session(repository / entry["onnx"])
        self.targets = PROGNOSIS_TARGETS

    def unit_fn(self, padded: np.ndarray):
        cond = self.base.cond
        mod = self.base.predictor.model.modality_index(self.base.modality).numpy()
        return tuple(self.session.run(["probabilities", "pooled"], {
            "image": padded.astype(np.float32), "modality": mod, "film": cond.film.numpy(),
            "head_params": cond.head_params.numpy()}))

    def __call__(self, volume, affine):
        from duplus.models.prognosis import image_features_from_model_space
        from duplus.preprocessing import to_model_space

        x, _ = to_model_space(volume, affine, self.base.modality, self.base.cfg.spacing)
        return image_features_from_model_space(x.as_tensor()[0].numpy(), self.base.modality, self.base.cfg.spacing,
                                               self.unit_fn, self.base.level_factor)


def plot_km(time, event, groups: np.ndarray, labels: list[str], p_value: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    fig, ax = plt.subplots(figsize=(7, 5))
    for g, label in enumerate(labels):
        sel = groups == g
        if sel.any():
            KaplanMeierFitter(label=f"{label} (n={int(sel.sum())})").fit(time[sel], event[sel]).plot_survival_function(
                ax=ax, ci_show=True)
    ax.set_title(f"{title}\nlog-rank p = {p_value:.2g}", fontsize=9)
    ax.set(xlabel="months", ylabel="survival probability", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(checkpoint: Path, patients: int, seed: int, *, repository: Path | None = None, cache: str | None = None,
             bootstrap: int = 1000, plot: Path | None = None) -> dict:
    from lifelines.statistics import multivariate_logrank_test

    from training.train_prognosis import cohort_features

    model, meta = load_prognosis_checkpoint(checkpoint)
    train_spec = CohortSpec(**meta["train_cohort"])
    used = {train_spec.seed, meta["val_cohort"]["seed"]} | ({meta["reader_cohort"]["seed"]}
                                                           if meta.get("reader_cohort") else set())
    if seed in used:
        raise ValueError(f"seed {seed} was used to train or validate this checkpoint ({sorted(used)}): pick another")
    hazard = train_spec.hazard
    test = generate_cohort(CohortSpec(patients, seed, hazard))
    train = generate_cohort(train_spec)  # clinical data only: no images are drawn for the baselines
    seg = Path(meta["segmentation_checkpoint"])
    if file_sha256(seg) != meta["segmentation_sha256"]:
        raise ValueError(f"{seg} is not the segmentation checkpoint {checkpoint} was trained with")
    extractor = (OnnxFeatureExtractor(repository, seg, model.cfg.modality, model.cfg.t1) if repository else None)
    if extractor is None:
        from duplus.models.prognosis import ImageFeatureExtractor

        extractor = ImageFeatureExtractor(seg, model.cfg.modality, model.cfg.t1)
    cache_dir = cache or os.path.join("runs", "prognosis_features_eval" if repository is None else "prognosis_features_onnx")
    x = cohort_features(test, extractor, cache_dir, meta["segmentation_sha256"], "held-out image features")
    risk = model.risk(x, [p.note for p in test])
    t = np.array([p.time for p in test])
    e = np.array([p.event for p in test])
    ehr = cox_baseline(train, test, EHR_COVARIATES, hazard)
    oracle = cox_baseline(train, test, LATENT_COVARIATES, hazard)
    scores = {"model": risk, "ehr_only": ehr, "oracle": oracle, "true_risk": np.array([p.clinical["true_risk"]
                                                                                       for p in test])}
    ci = bootstrap_c_index(t, scores, e, n=bootstrap, seed=seed)
    diff = []
    rng = np.random.default_rng(seed + 1)
    for _ in range(bootstrap):  # paired bootstrap of model - EHR-only
        idx = rng.integers(0, len(t), len(t))
        diff.append(c_index(t[idx], risk[idx], e[idx]) - c_index(t[idx], ehr[idx], e[idx]))
    # risk groups: tertiles of the model's risk on its training cohort, saved in the checkpoint (no test information)
    cut = np.asarray(meta["risk_tertiles"]) if "risk_tertiles" in meta else np.quantile(risk, [1 / 3, 2 / 3])
    groups = np.digitize(risk, cut)
    lr = multivariate_logrank_test(t, groups, e)
    out = {
        "checkpoint": str(checkpoint), "patients": patients, "seed": seed, "events": int(e.sum()),
        "c_index": round(c_index(t, risk, e), 4), "c_index_ci95": ci["model"]["ci95"],
        "c_index_half_width": ci["model"]["half_width"],
        "c_index_ehr_only": round(c_index(t, ehr, e), 4), "c_index_ehr_only_ci95": ci["ehr_only"]["ci95"],
        "c_index_ehr_only_half_width": ci["ehr_only"]["half_width"],
        "c_index_oracle": round(c_index(t, oracle, e), 4), "c_index_oracle_ci95": ci["oracle"]["ci95"],
        "c_index_true_risk": round(c_index(t, scores["true_risk"], e), 4),
        "delta_vs_ehr_only": round(float(np.mean(diff)), 4),
        "delta_vs_ehr_only_ci95": [round(float(v), 4) for v in np.percentile(diff, [2.5, 97.5])],
        "logrank_p": float(lr.p_value), "risk_group_cutpoints": [round(float(c), 4) for c in cut],
        "features": "onnxruntime (exported image_features unit)" if repository else "pytorch",
        "trainable_fraction": meta.get("parameter_counts", {}).get("trainable_fraction"),
    }
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_km(t, e, groups, ["low risk", "intermediate risk", "high risk"], lr.p_value, plot,
                f"Held-out synthetic cohort (seed {seed}, n={patients}): model risk tertiles, C-index {out['c_index']:.3f}")
        out["km_plot"] = str(plot)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_prognosis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/duplus_prognosis.pt", help="prognosis checkpoint")
    ap.add_argument("--patients", type=int, default=200, help="held-out cohort size")
    ap.add_argument("--seed", type=int, default=9001, help="held-out cohort seed (not the training/validation seeds)")
    ap.add_argument("--repository", type=Path, default=None,
                    help="a built model repository: extract image features with its exported image_features unit "
                         "on ONNX Runtime (the served graph) instead of PyTorch")
    ap.add_argument("--cache", default=None, help="image-feature cache folder (default under runs/)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ap.add_argument("--plot", type=Path, default=None, help="write the Kaplan-Meier PNG here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (otherwise a readable summary)")
    ap.add_argument("--log-level", default="WARNING", help="logging level")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.patients < 20:
        ap.error("--patients must be >= 20 for a meaningful C-index")
    out = evaluate(args.checkpoint if isinstance(args.checkpoint, Path) else Path(args.checkpoint), args.patients,
                   args.seed, repository=args.repository, cache=args.cache, bootstrap=args.bootstrap, plot=args.plot)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
