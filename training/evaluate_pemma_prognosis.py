"""PEMMA's prognosis ablation on the synthetic head-and-neck cohort: CT -> CT+PET -> CT+PET+EHR.

Each patient of the cohort (``duplus.synth.cohort``: anatomy, EHR, survival from a known hazard) is imaged on
centre E's PET/CT (``generate_petct`` with the patient's anatomy: the centre PEMMA was adapted on).  The shipped
PEMMA model segments the primary tumour and the nodes twice, from the CT alone and from CT+PET; lesion radiomics
of each (``duplus.models.prognosis.radiomics``: tumour volume, intensity max and mean inside the tumour, node
count and volume; intensities in HU from the CT, in SUV from the PET) feed lifelines Cox models fitted on the
training cohort and scored on the held-out one:

* ``CT``          radiomics of the CT-only segmentation, CT intensities;
* ``CT+PET``      radiomics of the CT+PET segmentation, PET intensities (SUV);
* ``CT+PET+EHR``  the CT+PET radiomics and the structured EHR variables;
* references on the same held-out patients: ``EHR only`` (Cox on the EHR variables), the shipped DuPLUS prognosis
  model (``checkpoints/duplus_prognosis.pt``: PET image features + the EHR note through LoRA; its image features
  cached per patient) and the oracle (Cox on the hazard's true factors).

C-index with 95 % bootstrap intervals and paired bootstrap differences (CT+PET - CT, CT+PET+EHR - CT+PET,
CT+PET+EHR - DuPLUS).  The held-out cohort is the first ``--heldout`` patients of seed 9002, the same patients the
README's prognosis figures use; the training cohort the first ``--train`` of seed 2001 (the prognosis training
cohort).  PEMMA features are cached per patient under ``--cache``.

    python -m training.evaluate_pemma_prognosis --train 120 --heldout 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from duplus.models.prognosis import RADIOMICS, bootstrap_c_index, c_index, radiomics  # noqa: E402
from duplus.synth.cohort import EHR_COVARIATES, LATENT_COVARIATES, CohortSpec, covariates, generate_cohort  # noqa: E402

log = logging.getLogger("training.evaluate_pemma_prognosis")

#: the prognosis study's cohorts (configs/prognosis.yaml's training cohort, the README's held-out cohort)
TRAIN_SEED, HELDOUT_SEED = 2001, 9002
#: the centre whose scanner images the cohort (the one PEMMA was adapted on)
CENTRE = "E"
#: the Cox models of the ablation: name -> (radiomics source, with the EHR variables)
ABLATION = {"CT": ("ct", False), "CT+PET": ("ct+pet", False), "CT+PET+EHR": ("ct+pet", True)}


def pemma_radiomics(model, patient) -> dict[str, dict[str, float]]:
    """The patient imaged on centre E's PET/CT, segmented by ``model`` from the CT alone and from CT+PET ->
    {"ct": radiomics with CT intensities, "ct+pet": radiomics with PET (SUV) intensities}."""
    from duplus.models.pemma import sliding_window_probabilities
    from duplus.preprocessing import petct_to_model_space
    from duplus.synth.phantoms import generate_petct

    pair = generate_petct(CENTRE, patient.image_seed, anatomy_seed=patient.anatomy_seed)
    image, _, _, _, _ = petct_to_model_space(pair.ct.image, pair.ct.affine, pair.pet.image, pair.pet.affine,
                                             model.cfg.spacing)
    out = {}
    for mode, channel, modality in (("ct", 0, "CT"), ("ct+pet", 1, "PET")):
        probs = sliding_window_probabilities(model, image, mode).numpy()
        out[mode] = radiomics(probs[1:], image[channel].numpy(), modality, model.cfg.spacing)
    return out


def cohort_radiomics(model, patients, cache: Path, checkpoint_sha: str, desc: str) -> list[dict]:
    """:func:`pemma_radiomics` of every patient, cached as JSON under ``cache/<checkpoint sha[:12]>/``."""
    from tqdm.auto import tqdm

    folder = cache / checkpoint_sha[:12]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in tqdm(patients, desc=desc, unit="patient"):
        f = folder / f"{p.patient_id}_{p.image_seed}.json"
        if f.is_file():
            out.append(json.loads(f.read_text()))
            continue
        rad = pemma_radiomics(model, p)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(rad))
        os.replace(tmp, f)
        out.append(rad)
    return out


def design(patients, rads: list[dict], source: str, ehr: bool, hazard) -> tuple[np.ndarray, list[str]]:
    names = [f"{source}:{k}" for k in RADIOMICS]
    rows = [[r[source][k] for k in RADIOMICS] for r in rads]
    if ehr:
        names += list(EHR_COVARIATES)
        rows = [row + covariates(p.clinical, EHR_COVARIATES, hazard) for row, p in zip(rows, patients)]
    return np.asarray(rows, dtype=float), names


def cox_scores(x_train, x_test, names, train, penalizer: float = 0.01) -> np.ndarray:
    """lifelines CoxPHFitter on the training rows (standardised on the training cohort) -> test log partial hazards."""
    import pandas as pd
    from lifelines import CoxPHFitter

    mean, sd = x_train.mean(axis=0), x_train.std(axis=0)
    keep = sd > 0
    cols = [n for n, k in zip(names, keep) if k]
    frame = pd.DataFrame((x_train[:, keep] - mean[keep]) / sd[keep], columns=cols)
    frame["T"] = [p.time for p in train]
    frame["E"] = [p.event for p in train]
    cph = CoxPHFitter(penalizer=penalizer).fit(frame, "T", "E")
    test = pd.DataFrame((x_test[:, keep] - mean[keep]) / sd[keep], columns=cols)
    return np.asarray(cph.predict_log_partial_hazard(test), dtype=float)


def ablation_scores(train, heldout, rad_train: list[dict], rad_test: list[dict], hazard) -> dict[str, np.ndarray]:
    """The held-out log partial hazards of each ABLATION row (Cox fitted on the training cohort)."""
    scores = {}
    for name, (source, ehr) in ABLATION.items():
        x_train, names = design(train, rad_train, source, ehr, hazard)
        x_test, _ = design(heldout, rad_test, source, ehr, hazard)
        scores[name] = cox_scores(x_train, x_test, names, train)
    return scores


def duplus_risk(heldout, cache: Path | None) -> np.ndarray | None:
    """The shipped DuPLUS prognosis model's risk on ``heldout`` (PET image features + EHR note), or None when its
    checkpoints are absent."""
    from duplus.files import file_sha256
    from duplus.models.prognosis import ImageFeatureExtractor, load_prognosis_checkpoint
    from training.train_prognosis import cohort_features

    path = Path("checkpoints/duplus_prognosis.pt")
    if not path.is_file():
        return None
    model, meta = load_prognosis_checkpoint(path)
    seg = Path(meta["segmentation_checkpoint"])
    extractor = ImageFeatureExtractor(seg, model.cfg.modality, model.cfg.t1)
    x = cohort_features(heldout, extractor, cache or Path("runs/prognosis_features_eval"), file_sha256(seg),
                        "DuPLUS image features")
    return model.risk(x, [p.note for p in heldout])


def paired(t, e, a, b, n: int, seed: int) -> tuple[float, list[float]]:
    rng = np.random.default_rng(seed)
    diff = []
    for _ in range(n):
        idx = rng.integers(0, len(t), len(t))
        diff.append(c_index(t[idx], a[idx], e[idx]) - c_index(t[idx], b[idx], e[idx]))
    return float(np.mean(diff)), [float(v) for v in np.percentile(diff, [2.5, 97.5])]


def evaluate(checkpoint: Path, n_train: int, n_heldout: int, *, cache: Path, bootstrap: int = 1000,
             duplus_cache: Path | None = None) -> dict:
    from duplus.files import file_sha256
    from duplus.models.pemma import load_pemma_checkpoint

    t0 = time.perf_counter()
    model, record = load_pemma_checkpoint(checkpoint)
    sha = file_sha256(checkpoint)
    train = generate_cohort(CohortSpec(n_train, TRAIN_SEED))
    heldout = generate_cohort(CohortSpec(n_heldout, HELDOUT_SEED))
    hazard = CohortSpec(1, TRAIN_SEED).hazard
    rad_train = cohort_radiomics(model, train, cache, sha, "PEMMA radiomics, training cohort")
    rad_test = cohort_radiomics(model, heldout, cache, sha, "PEMMA radiomics, held-out cohort")
    t = np.array([p.time for p in heldout])
    e = np.array([p.event for p in heldout])
    scores = ablation_scores(train, heldout, rad_train, rad_test, hazard)
    ehr_train = np.asarray([covariates(p.clinical, EHR_COVARIATES, hazard) for p in train], float)
    ehr_test = np.asarray([covariates(p.clinical, EHR_COVARIATES, hazard) for p in heldout], float)
    scores["EHR only"] = cox_scores(ehr_train, ehr_test, list(EHR_COVARIATES), train)
    risk = duplus_risk(heldout, duplus_cache)
    if risk is not None:
        scores["DuPLUS PET+EHR note"] = np.asarray(risk, float)
    lat_train = np.asarray([covariates(p.clinical, LATENT_COVARIATES, hazard) for p in train], float)
    lat_test = np.asarray([covariates(p.clinical, LATENT_COVARIATES, hazard) for p in heldout], float)
    scores["oracle"] = cox_scores(lat_train, lat_test, list(LATENT_COVARIATES), train)
    ci = bootstrap_c_index(t, scores, e, n=bootstrap, seed=HELDOUT_SEED)
    rows = {name: {"c_index": round(c_index(t, s, e), 4), "ci95": ci[name]["ci95"]} for name, s in scores.items()}
    comparisons = [("CT+PET", "CT"), ("CT+PET+EHR", "CT+PET"), ("CT+PET+EHR", "EHR only")]
    if "DuPLUS PET+EHR note" in scores:
        comparisons.append(("CT+PET+EHR", "DuPLUS PET+EHR note"))
    diffs = []
    for i, (a, b) in enumerate(comparisons):
        mean, interval = paired(t, e, scores[a], scores[b], bootstrap, HELDOUT_SEED + 1 + i)
        diffs.append({"a": a, "b": b, "mean": round(mean, 4), "ci95": [round(v, 4) for v in interval]})
    # what the image side measures: Pearson r of each radiomic with the phantom's truth (training cohort)
    truth = {"log_tumour_volume": [np.log(p.clinical["tumour_volume_ml"] + 0.1) for p in train],
             "suv_max": [p.clinical["suv_max"] for p in train], "node_count": [p.clinical["node_count"] for p in train]}
    measured = {source: {k: round(float(np.corrcoef([r[source][k] for r in rad_train], v)[0, 1]), 3)
                         for k, v in truth.items()} for source in ("ct", "ct+pet")}
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "stage": record.get("stage"),
            "centre": CENTRE, "train": {"seed": TRAIN_SEED, "patients": n_train, "events": int(sum(p.event for p in train))},
            "heldout": {"seed": HELDOUT_SEED, "patients": n_heldout, "events": int(e.sum())},
            "c_index": rows, "paired_differences": diffs, "bootstrap": bootstrap,
            "radiomics_r_train": measured, "seconds": round(time.perf_counter() - t0, 1)}


def table(result: dict) -> str:
    lines = ["| image features (Cox, lifelines) | C-index | 95 % interval |", "|---|---|---|"]
    for name, row in result["c_index"].items():
        lo, hi = row["ci95"]
        lines.append(f"| {name} | {row['c_index']:.3f} | {lo:.3f}–{hi:.3f} |")
    lines += ["", "| paired difference | mean | 95 % interval |", "|---|---|---|"]
    for d in result["paired_differences"]:
        lines.append(f"| {d['a']} − {d['b']} | {d['mean']:+.3f} | {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_pemma_prognosis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/pemma_lora.pt"), help="PEMMA checkpoint")
    ap.add_argument("--train", type=int, default=120, help="training-cohort patients (seed 2001)")
    ap.add_argument("--heldout", type=int, default=100, help="held-out patients (seed 9002)")
    ap.add_argument("--cache", type=Path, default=Path("runs/pemma/prognosis_features"),
                    help="per-patient PEMMA radiomics cache")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--output", type=Path, default=Path("runs/pemma/prognosis_ablation.json"),
                    help="JSON result (a Markdown table beside it)")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.train < 40 or args.heldout < 20:
        ap.error("--train must be >= 40 and --heldout >= 20 for a meaningful C-index")
    result = evaluate(args.checkpoint, args.train, args.heldout, cache=args.cache, bootstrap=args.bootstrap)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    args.output.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
