"""A synthetic head-and-neck cancer cohort for prognosis: PET phantoms, EHR notes, survival.

Each patient is one head-and-neck anatomy from :mod:`duplus.synth.phantoms` (primary tumour and
lymph nodes, imaged by PET; the CT of the same ``anatomy_seed`` is co-registered), a set of
structured clinical variables drawn to be plausible for the tumour, a free-text **EHR note**
written from those variables in varied phrasings, and a survival time drawn from a **known
hazard** that mixes image factors (tumour volume, tumour SUVmax, node count) with EHR factors
(HPV/p16 status, smoking, age, performance status, M stage, treatment):

    h(t | x) = h0(t) * exp(eta),   eta = sum_j beta_j * x_j   (Weibull baseline)

with administrative censoring (staggered accrual, fixed study end) and random loss to
follow-up.  ``eta`` is kept as ``true_risk``: it is the oracle against which a model is judged.

The cohort is written as a Decathlon-style data set (PET images + tumour/node labels) plus a
clinical CSV (HECKTOR-like: ``PatientID, Age, Gender, HPV status, ... , Event, Time``), and
:func:`load_clinical_csv` reads real HECKTOR-style CSVs (event/time column names configurable)
with the same code.  Command line: ``python -m duplus.synth.cohort --help``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from duplus.synth.phantoms import HeadNeckAnatomy, anatomy_rng, case_seed, generate_phantom, save_nifti

log = logging.getLogger("duplus.synth.cohort")

TREATMENTS = ("surgery", "radiotherapy", "chemoradiotherapy", "surgery with adjuvant chemoradiotherapy",
              "palliative chemotherapy")
SMOKING = ("never", "former", "current")
#: structured EHR variables, as model covariates (the EHR-only baseline's design matrix)
EHR_COVARIATES = ("age", "male", "hpv_negative", "smoking_former", "smoking_current", "ecog", "t_stage", "n_stage",
                  "m_stage", "treatment_radiotherapy", "treatment_chemoradiotherapy", "treatment_surgery_crt",
                  "treatment_palliative")
#: the true latent factors of the hazard (the oracle's design matrix)
LATENT_COVARIATES = ("log_tumour_volume", "suv_max", "node_count", "age", "hpv_negative", "smoking_former",
                     "smoking_current", "ecog", "m_stage", "treatment_radiotherapy", "treatment_palliative")


@dataclass(frozen=True)
class HazardModel:
    """The known log-hazard ratio of the synthetic cohort and its censoring process (months)."""

    log_tumour_volume: float = 2.4     # per unit of log(ml) centred at log(14 ml)
    suv_max: float = 0.35              # per SUV unit, centred at 10
    node_count: float = 0.35           # per node, centred at 2
    age: float = 0.03                  # per year, centred at 62
    hpv_negative: float = 1.0
    smoking_former: float = 0.25
    smoking_current: float = 0.5
    ecog: float = 0.35                 # per ECOG grade
    m_stage: float = 1.2
    treatment_radiotherapy: float = 0.35   # vs curative surgery / chemoradiotherapy
    treatment_palliative: float = 1.0
    weibull_shape: float = 1.3
    median_months: float = 60.0        # median survival at eta = 0
    accrual_months: float = 24.0       # patients enter uniformly over this period ...
    study_months: float = 72.0         # ... and the study closes here: administrative censoring
    dropout_per_month: float = 0.006   # random loss to follow-up (exponential)

    def latent(self, rec: dict) -> dict[str, float]:
        """The hazard's covariates for one patient (centred as the coefficients expect)."""
        return {
            "log_tumour_volume": math.log(max(rec["tumour_volume_ml"], 0.1)) - math.log(14.0),
            "suv_max": rec["suv_max"] - 10.0,
            "node_count": rec["node_count"] - 2.0,
            "age": rec["age"] - 62.0,
            "hpv_negative": float(rec["hpv"] == "negative"),
            "smoking_former": float(rec["smoking"] == "former"),
            "smoking_current": float(rec["smoking"] == "current"),
            "ecog": float(rec["ecog"]),
            "m_stage": float(rec["m_stage"]),
            "treatment_radiotherapy": float(rec["treatment"] == "radiotherapy"),
            "treatment_palliative": float(rec["treatment"] == "palliative chemotherapy"),
        }

    def eta(self, rec: dict) -> float:
        return float(sum(getattr(self, k) * v for k, v in self.latent(rec).items()))


@dataclass(frozen=True)
class CohortSpec:
    n_patients: int
    seed: int
    hazard: HazardModel = field(default_factory=HazardModel)

    def __post_init__(self) -> None:
        if isinstance(self.hazard, dict):
            object.__setattr__(self, "hazard", HazardModel(**self.hazard))
        if isinstance(self.n_patients, bool) or not isinstance(self.n_patients, int) or self.n_patients < 1:
            raise ValueError(f"cohort n_patients must be a positive integer, got {self.n_patients!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"cohort seed must be a non-negative integer, got {self.seed!r}")


# --------------------------------------------------------------------------------------
# Clinical variables and survival
# --------------------------------------------------------------------------------------


def _t_stage(volume_ml: float, rng: np.random.Generator) -> int:
    stage = 1 + int(volume_ml > 8.0) + int(volume_ml > 18.0) + int(volume_ml > 32.0)
    if rng.random() < 0.15:  # clinical staging is not volumetry
        stage += int(rng.choice([-1, 1]))
    return int(np.clip(stage, 1, 4))


def _n_stage(factors: dict) -> int:
    if factors["node_volume_ml"] > 30.0:
        return 3
    if factors["node_count"] >= 2 or factors["node_sides"] == "bilateral":
        return 2
    return 1


def clinical_record(patient_index: int, seed: int, factors: dict, hazard: HazardModel) -> dict:
    """Structured variables + survival for one patient, drawn from its image factors and ``seed``."""
    rng = np.random.default_rng([seed, patient_index, 7])
    oropharynx = factors["tumour_site"] == "oropharynx"
    hpv = "positive" if rng.random() < (0.65 if oropharynx else 0.1) else "negative"
    smoking = str(rng.choice(SMOKING, p=[0.5, 0.35, 0.15] if hpv == "positive" else [0.15, 0.35, 0.5]))
    rec = {
        "age": int(np.clip(round(rng.normal(63.0 if hpv == "negative" else 58.0, 9.0)), 35, 88)),
        "sex": "male" if rng.random() < 0.78 else "female",
        "hpv": hpv,
        "smoking": smoking,
        "pack_years": 0 if smoking == "never" else int(np.clip(round(rng.gamma(4.0, 8.0)), 5, 120)),
        "ecog": int(rng.choice([0, 1, 2], p=[0.55, 0.35, 0.10])),
        "t_stage": _t_stage(factors["tumour_volume_ml"], rng),
        "n_stage": _n_stage(factors),
        "m_stage": int(rng.random() < 0.06),
        "tumour_site": factors["tumour_site"],
        "tumour_side": factors["tumour_side"],
        "tumour_volume_ml": float(factors["tumour_volume_ml"]),
        "suv_max": float(factors["suv_max"]),
        "node_count": int(factors["node_count"]),
        "node_volume_ml": float(factors["node_volume_ml"]),
    }
    early = rec["t_stage"] <= 2 and rec["n_stage"] <= 1
    if rec["m_stage"]:
        rec["treatment"] = "palliative chemotherapy"
    elif early:
        rec["treatment"] = "surgery" if rng.random() < 0.4 else "radiotherapy"
    else:
        rec["treatment"] = ("chemoradiotherapy" if rng.random() < 0.7 else "surgery with adjuvant chemoradiotherapy")
    if rec["ecog"] == 2 and rec["treatment"] == "chemoradiotherapy" and rng.random() < 0.5:
        rec["treatment"] = "radiotherapy"  # not fit for concurrent chemotherapy

    eta = hazard.eta(rec)
    # Weibull proportional hazards: S(t) = exp(-(t / scale)^k * exp(eta)), median at eta = 0 given
    scale = hazard.median_months / math.log(2.0) ** (1.0 / hazard.weibull_shape)
    u = rng.random()
    t_event = scale * (-math.log(max(u, 1e-12)) * math.exp(-eta)) ** (1.0 / hazard.weibull_shape)
    t_admin = hazard.study_months - rng.uniform(0.0, hazard.accrual_months)
    t_drop = rng.exponential(1.0 / hazard.dropout_per_month) if hazard.dropout_per_month > 0 else math.inf
    t_obs = min(t_event, t_admin, t_drop)
    rec.update(time_months=round(max(t_obs, 0.1), 2), event=int(t_event <= min(t_admin, t_drop)),
               true_risk=round(eta, 6))
    return rec


def covariates(rec: dict, names: Sequence[str], hazard: HazardModel | None = None) -> list[float]:
    """One row of a Cox design matrix: structured EHR covariates and/or the hazard's latent factors."""
    latent = (hazard or HazardModel()).latent(rec)
    ehr = {
        "age": float(rec["age"]), "male": float(rec["sex"] == "male"), "hpv_negative": float(rec["hpv"] == "negative"),
        "smoking_former": float(rec["smoking"] == "former"), "smoking_current": float(rec["smoking"] == "current"),
        "ecog": float(rec["ecog"]), "t_stage": float(rec["t_stage"]), "n_stage": float(rec["n_stage"]),
        "m_stage": float(rec["m_stage"]),
        "treatment_radiotherapy": float(rec["treatment"] == "radiotherapy"),
        "treatment_chemoradiotherapy": float(rec["treatment"] == "chemoradiotherapy"),
        "treatment_surgery_crt": float(rec["treatment"] == "surgery with adjuvant chemoradiotherapy"),
        "treatment_palliative": float(rec["treatment"] == "palliative chemotherapy"),
    }
    out = []
    for n in names:
        if n in latent:  # centred as the hazard uses it (a shift changes no Cox model)
            out.append(float(latent[n]))
        elif n in ehr:
            out.append(ehr[n])
        else:
            raise ValueError(f"unknown covariate {n!r}")
    return out


# --------------------------------------------------------------------------------------
# EHR notes in varied phrasings
# --------------------------------------------------------------------------------------

_ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV"}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def ehr_note(rec: dict, rng: np.random.Generator) -> str:
    """A free-text clinical note stating the patient's variables, phrased at random.

    Every variable the hazard or the EHR baseline uses is stated (HPV/p16, smoking, age,
    sex, ECOG, TNM, treatment); wording, order, abbreviations and format (narrative or
    key: value) vary with ``rng``.
    """
    age, male = rec["age"], rec["sex"] == "male"
    sex_word = _pick(rng, ["male", "man", "M"] if male else ["female", "woman", "F"])
    site = rec["tumour_site"]
    site_txt = _pick(rng, {"oropharynx": ["oropharyngeal", "oropharynx", "tonsillar", "base of tongue"],
                           "larynx": ["laryngeal", "larynx", "glottic", "supraglottic"]}[site])
    hpv_pos = rec["hpv"] == "positive"
    hpv = _pick(rng, ["HPV-positive", "p16-positive", "HPV+", "p16 IHC positive", "HPV-associated",
                      "high-risk HPV detected"] if hpv_pos else
                ["HPV-negative", "p16-negative", "HPV-", "p16 IHC negative", "HPV-unrelated", "no HPV detected"])
    py = rec["pack_years"]
    smoking = {
        "never": ["never smoker", "lifelong non-smoker", "no tobacco use", "has never smoked"],
        "former": [f"former smoker ({py} pack-years)", f"ex-smoker, {py} pack-years", f"quit smoking, {py} pack-years",
                   f"previous tobacco use of {py} pack-years, stopped"],
        "current": [f"current smoker, {py} pack-years", f"active smoker ({py} pack-years)",
                    f"still smokes, {py} pack-years", f"ongoing tobacco use, {py} pack-years"],
    }[rec["smoking"]]
    smoke = _pick(rng, smoking)
    t, n, m = rec["t_stage"], rec["n_stage"], rec["m_stage"]
    tnm = _pick(rng, [f"cT{t}N{n}M{m}", f"T{t} N{n} M{m}", f"stage T{t}, N{n}, M{m}", f"T{t}N{n}M{m}"])
    ecog = _pick(rng, [f"ECOG {rec['ecog']}", f"ECOG performance status {rec['ecog']}", f"PS {rec['ecog']}",
                       f"performance status ECOG {rec['ecog']}"])
    tx = {
        "surgery": ["transoral surgery alone", "primary surgical resection", "treated with surgery only"],
        "radiotherapy": ["radiotherapy alone", "definitive radiotherapy without chemotherapy", "RT only"],
        "chemoradiotherapy": ["concurrent chemoradiotherapy", "definitive chemoradiation with cisplatin",
                              "CRT with weekly cisplatin"],
        "surgery with adjuvant chemoradiotherapy": ["surgery followed by adjuvant chemoradiotherapy",
                                                    "resection and postoperative CRT", "surgery plus adjuvant CRT"],
        "palliative chemotherapy": ["palliative systemic chemotherapy", "palliative chemotherapy",
                                    "best supportive care with palliative chemotherapy"],
    }[rec["treatment"]]
    treatment = _pick(rng, tx)
    age_txt = _pick(rng, [f"{age}-year-old", f"{age} yo", f"{age} years old"])

    if rng.random() < 0.35:  # structured "key: value" note
        lines = [f"Age: {age}", f"Sex: {sex_word}", f"Primary: {site_txt} SCC, {rec['tumour_side']}",
                 f"HPV/p16: {hpv}", f"Smoking: {smoke}", f"Staging: {tnm}", f"Performance: {ecog}",
                 f"Plan: {treatment}"]
        head, rest = lines[:1], lines[1:]
        order = rng.permutation(len(rest))
        return "; ".join(head + [rest[i] for i in order]) + "."
    opening = _pick(rng, [f"{age_txt.capitalize()} {sex_word} with {hpv} {site_txt} squamous cell carcinoma.",
                          f"Patient is a {age_txt} {sex_word}; {site_txt} SCC, {hpv}.",
                          f"{age_txt.capitalize()} {sex_word} presenting with a {rec['tumour_side']} {site_txt} "
                          f"carcinoma, {hpv}."])
    sentences = [f"{smoke.capitalize()}.", f"Staged {tnm}.", f"{ecog}.", f"Planned {treatment}."]
    order = rng.permutation(len(sentences))
    return " ".join([opening] + [sentences[i] for i in order])


# --------------------------------------------------------------------------------------
# Cohort generation, writing and loading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patient:
    patient_id: str
    anatomy_seed: int
    image_seed: int
    clinical: dict
    note: str

    @property
    def time(self) -> float:
        return float(self.clinical["time_months"])

    @property
    def event(self) -> int:
        return int(self.clinical["event"])


def generate_cohort(spec: CohortSpec, *, prefix: str = "HN") -> list[Patient]:
    """Draw the patients of a cohort (clinical data and notes; the PET is drawn by :func:`pet_volume`)."""
    patients = []
    for i in range(spec.n_patients):
        anatomy_seed = case_seed(spec.seed, i)
        anatomy = HeadNeckAnatomy(anatomy_rng(anatomy_seed, "head_neck"))
        factors = anatomy.factors(None)  # lesion volumes come from a fixed 1 mm world grid
        rec = clinical_record(i, spec.seed, factors, spec.hazard)
        note = ehr_note(rec, np.random.default_rng([spec.seed, i, 11]))
        patients.append(Patient(f"{prefix}-{spec.seed}-{i:04d}", anatomy_seed, case_seed(spec.seed + 1, i), rec, note))
    events = sum(p.event for p in patients)
    log.info("cohort seed %d: %d patients, %d events (%.0f%%), median follow-up %.1f months", spec.seed,
             len(patients), events, 100.0 * events / len(patients), float(np.median([p.time for p in patients])))
    return patients


def note_variant(patient: Patient, variant: int, seed: int = 0) -> str:
    """Another phrasing of the same patient's note (text augmentation during training)."""
    if variant == 0:
        return patient.note
    return ehr_note(patient.clinical, np.random.default_rng([seed, patient.anatomy_seed % (2**32), variant, 13]))


def pet_volume(patient: Patient):
    """The patient's PET phantom (random PET acquisition: 2-4 mm, any axis order and flips)."""
    return generate_phantom("head_neck", "PET", patient.image_seed, anatomy_seed=patient.anatomy_seed)


CSV_COLUMNS = ("PatientID", "Age", "Gender", "HPV status", "Smoking", "Pack-years", "ECOG", "T-stage", "N-stage",
               "M-stage", "Treatment", "Tumour site", "EHR note", "Event", "Time", "TrueRisk", "TumourVolume_ml",
               "SUVmax", "NodeCount", "NodeVolume_ml")


def write_cohort(root, task_name: str, spec: CohortSpec, *, images: bool = True, progress: bool = True) -> Path:
    """Write the cohort: ``<root>/<task>/dataset.json`` + PET/label NIfTI + ``clinical.csv``."""
    from tqdm.auto import tqdm

    task = Path(root) / task_name
    patients = generate_cohort(spec)
    training = []
    if images:
        (task / "imagesTr").mkdir(parents=True, exist_ok=True)
        (task / "labelsTr").mkdir(parents=True, exist_ok=True)
        for p in tqdm(patients, desc=f"{task_name} PET", unit="patient", disable=not progress):
            ph = pet_volume(p)
            name = f"{p.patient_id}.nii.gz"
            save_nifti(ph, task / "imagesTr" / name, task / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "patient": p.patient_id,
                             "seed": p.image_seed, "anatomy_seed": p.anatomy_seed})
    task.mkdir(parents=True, exist_ok=True)
    dataset = {"name": task_name, "description": "Synthetic head and neck cancer cohort (duplus/synth/cohort.py): "
               "PET phantoms, EHR notes and survival from a known hazard", "reference": f"seed {spec.seed}",
               "licence": "CC0", "tensorImageSize": "3D", "modality": {"0": "PET"},
               "labels": {"0": "background", "1": "primary tumour", "2": "lymph node"}, "region": "head_neck",
               "numTraining": len(training), "training": training, "clinical": "clinical.csv",
               "hazard": asdict(spec.hazard)}
    (task / "dataset.json").write_text(json.dumps(dataset, indent=2))
    with open(task / "clinical.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for p in patients:
            c = p.clinical
            w.writerow([p.patient_id, c["age"], "M" if c["sex"] == "male" else "F", c["hpv"], c["smoking"],
                        c["pack_years"], c["ecog"], c["t_stage"], c["n_stage"], c["m_stage"], c["treatment"],
                        c["tumour_site"], p.note, c["event"], c["time_months"], c["true_risk"],
                        c["tumour_volume_ml"], c["suv_max"], c["node_count"], c["node_volume_ml"]])
    log.info("wrote %d patients to %s", len(patients), task)
    return task


@dataclass(frozen=True)
class ClinicalRow:
    patient_id: str
    time: float
    event: int
    note: str
    values: dict


def load_clinical_csv(path, *, id_column: str = "PatientID", event_column: str = "Event", time_column: str = "Time",
                      note_column: str | None = "EHR note") -> list[ClinicalRow]:
    """Read a HECKTOR-style clinical CSV (one row per patient, an event flag and a time).

    HECKTOR 2022 names them ``Relapse`` and ``RFS``; pass ``event_column``/``time_column``.
    Without a free-text column, a note is written from the row's other columns ("Age: 63; ...").
    Rows with a missing or negative time, or an event flag other than 0/1, raise with the row.
    """
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty CSV")
        for col in (id_column, event_column, time_column):
            if col not in reader.fieldnames:
                raise ValueError(f"{path}: no column {col!r} (columns: {reader.fieldnames})")
        rows = []
        for n, row in enumerate(reader, start=2):
            try:
                time = float(row[time_column])
                event = int(float(row[event_column]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path} line {n}: bad {time_column}/{event_column} "
                                 f"({row[time_column]!r}, {row[event_column]!r})") from exc
            if not math.isfinite(time) or time < 0 or event not in (0, 1):
                raise ValueError(f"{path} line {n}: need {time_column} >= 0 and {event_column} in {{0, 1}}, "
                                 f"got {time}, {event}")
            others = {k: v for k, v in row.items() if k not in (id_column, event_column, time_column, note_column)}
            note = row.get(note_column) if note_column else None
            if not note:
                note = "; ".join(f"{k}: {v}" for k, v in others.items() if v not in (None, ""))
            rows.append(ClinicalRow(str(row[id_column]), time, event, note, others))
    if not rows:
        raise ValueError(f"{path}: no patients")
    return rows


@dataclass(frozen=True)
class CohortCase:
    """One patient of a prognosis data set on disk: image (+ label) paths and the clinical row."""

    patient_id: str
    image: Path
    label: Path | None
    clinical: ClinicalRow


def load_cohort_dataset(path, *, csv_name: str | None = None, id_column: str = "PatientID",
                        event_column: str = "Event", time_column: str = "Time",
                        note_column: str | None = "EHR note") -> list[CohortCase]:
    """A Decathlon-style image folder + a clinical CSV, paired by patient id (synthetic or HECKTOR-style).

    The CSV is ``dataset.json``'s ``"clinical"`` entry, else ``csv_name``, else the only ``*.csv`` in the folder.
    An image belongs to a patient when its ``training`` entry has ``"patient"`` or its file name starts with the
    patient id (HECKTOR: ``CHUM-001__PT.nii.gz``).  Patients without an image and images without a clinical
    row raise, naming them: a silently dropped patient would bias the C-index.
    """
    root = Path(path)
    meta = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    name = meta.get("clinical") or csv_name
    if name is None:
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise ValueError(f"{root}: name the clinical CSV (found {[f.name for f in found]})")
        name = found[0].name
    rows = {r.patient_id: r for r in load_clinical_csv(root / name, id_column=id_column, event_column=event_column,
                                                        time_column=time_column, note_column=note_column)}
    entries = meta.get("training") or [{"image": str(p.relative_to(root))}
                                       for p in sorted((root / "imagesTr").glob("*.nii*"))]
    cases, unmatched = [], []
    for e in entries:
        image = (root / e["image"]).resolve()
        pid = e.get("patient") or next((r for r in sorted(rows, key=len, reverse=True)
                                        if image.name.startswith(r)), None)
        if pid is None or pid not in rows:
            unmatched.append(image.name)
            continue
        label = (root / e["label"]).resolve() if e.get("label") else None
        cases.append(CohortCase(pid, image, label, rows[pid]))
    if unmatched:
        raise ValueError(f"{root}: images without a clinical row: {unmatched[:5]}")
    missing = sorted(set(rows) - {c.patient_id for c in cases})
    if missing:
        raise ValueError(f"{root}: patients without an image: {missing[:5]}")
    return cases


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m duplus.synth.cohort", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the task folder into")
    p.add_argument("--task", default="HNCohort", help="task folder name")
    p.add_argument("--patients", type=int, default=100, help="number of patients")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (anatomy, clinical data, notes, survival)")
    p.add_argument("--no-images", action="store_true", help="write only dataset.json and clinical.csv")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_cohort(args.out, args.task, CohortSpec(args.patients, args.seed), images=not args.no_images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
