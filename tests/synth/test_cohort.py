"""The synthetic head-and-neck cohort: determinism, notes, survival under the known hazard, loaders."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from duplus.models.prognosis import (
    c_index,
)
from duplus.synth.cohort import (
    EHR_COVARIATES,
    LATENT_COVARIATES,
    CohortSpec,
    HazardModel,
    covariates,
    generate_cohort,
    load_clinical_csv,
    load_cohort_dataset,
    note_variant,
    write_cohort,
)


@pytest.fixture(scope="module")
def cohort():
    return generate_cohort(CohortSpec(200, 4242))


def test_cohort_is_deterministic_by_seed():
    a, b = generate_cohort(CohortSpec(6, 11)), generate_cohort(CohortSpec(6, 11))
    c = generate_cohort(CohortSpec(6, 12))
    assert [(p.note, p.clinical) for p in a] == [(p.note, p.clinical) for p in b]
    assert [p.clinical["time_months"] for p in a] != [p.clinical["time_months"] for p in c]


def test_notes_state_the_variables(cohort):
    for p in cohort[:60]:
        c, note = p.clinical, p.note
        assert str(c["age"]) in note
        assert f"T{c['t_stage']}" in note and f"N{c['n_stage']}" in note and f"M{c['m_stage']}" in note
        hpv_words = ("positive", "HPV+", "associated", "detected") if c["hpv"] == "positive" else \
            ("negative", "HPV-", "unrelated", "no HPV")
        assert any(w in note for w in hpv_words), note
        if c["hpv"] == "positive":
            assert "negative" not in note and "no HPV" not in note
    # phrasing varies: many distinct openings, and a variant is another text with the same facts
    assert len({p.note.split(" ")[0] for p in cohort}) > 10
    v = note_variant(cohort[0], 3)
    assert v != cohort[0].note and str(cohort[0].clinical["age"]) in v


def test_survival_follows_the_known_hazard(cohort):
    t = np.array([p.time for p in cohort])
    e = np.array([p.event for p in cohort])
    assert (t > 0).all() and t.max() <= HazardModel().study_months + 1e-6
    assert 0.4 < e.mean() < 0.9                                    # administrative + random censoring
    true = np.array([p.clinical["true_risk"] for p in cohort])
    assert c_index(t, true, e) > 0.75                              # the hazard drives the times
    assert c_index(t, -true, e) < 0.25
    # the latent design matrix reproduces eta exactly
    h = HazardModel()
    rec = cohort[0].clinical
    assert math.isclose(sum(getattr(h, n) * v for n, v in zip(LATENT_COVARIATES, covariates(rec, LATENT_COVARIATES))),
                        rec["true_risk"], abs_tol=1e-5)
    assert len(covariates(rec, EHR_COVARIATES)) == len(EHR_COVARIATES)


def test_cohort_spec_validation():
    with pytest.raises(ValueError, match="n_patients"):
        CohortSpec(0, 1)
    with pytest.raises(ValueError, match="seed"):
        CohortSpec(5, -1)


def test_write_and_load_cohort_csv(tmp_path):
    task = write_cohort(tmp_path, "HN", CohortSpec(5, 7), images=False, progress=False)
    rows = load_clinical_csv(task / "clinical.csv")
    patients = generate_cohort(CohortSpec(5, 7))
    assert [r.patient_id for r in rows] == [p.patient_id for p in patients]
    assert [r.note for r in rows] == [p.note for p in patients]
    assert [r.event for r in rows] == [p.event for p in patients]
    assert np.allclose([r.time for r in rows], [p.time for p in patients])


def test_load_hecktor_style_csv(tmp_path):
    path = tmp_path / "hecktor.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["PatientID", "Age", "Gender", "HPV status (0=-, 1=+)", "Relapse", "RFS"])
        w.writerow(["CHUM-001", "61", "M", "1", "0", "1520"])
        w.writerow(["CHUM-002", "70", "F", "0", "1", "388"])
    rows = load_clinical_csv(path, event_column="Relapse", time_column="RFS", note_column=None)
    assert [(r.patient_id, r.event, r.time) for r in rows] == [("CHUM-001", 0, 1520.0), ("CHUM-002", 1, 388.0)]
    assert "Age: 61" in rows[0].note and "Gender: M" in rows[0].note
    with pytest.raises(ValueError, match="no column 'Event'"):
        load_clinical_csv(path)
    with open(path, "a", newline="") as fh:
        csv.writer(fh).writerow(["CHUM-003", "55", "M", "1", "2", "100"])
    with pytest.raises(ValueError, match="line 4"):
        load_clinical_csv(path, event_column="Relapse", time_column="RFS", note_column=None)


def test_cohort_dataset_on_disk_pairs_images_and_clinical_rows(tmp_path):
    import nibabel as nib

    task = write_cohort(tmp_path, "HNCohort", CohortSpec(3, 21), progress=False)
    cases = load_cohort_dataset(task)
    patients = generate_cohort(CohortSpec(3, 21))
    assert [c.patient_id for c in cases] == [p.patient_id for p in patients]
    img = nib.load(str(cases[0].image))
    assert img.shape == nib.load(str(cases[0].label)).shape and np.asarray(img.dataobj).max() > 3.0  # SUV
    # HECKTOR layout: images named <PatientID>__PT.nii.gz, events in Relapse / RFS, no dataset.json
    hk = tmp_path / "hecktor"
    (hk / "imagesTr").mkdir(parents=True)
    for pid in ("CHUM-001", "CHUM-010"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(hk / "imagesTr" / f"{pid}__PT.nii.gz"))
    (hk / "hecktor2022_clinical.csv").write_text("PatientID,Age,Relapse,RFS\nCHUM-001,61,0,1520\nCHUM-010,70,1,388\n")
    cases = load_cohort_dataset(hk, event_column="Relapse", time_column="RFS", note_column=None)
    assert [(c.patient_id, c.clinical.event) for c in cases] == [("CHUM-001", 0), ("CHUM-010", 1)]
    (hk / "hecktor2022_clinical.csv").write_text("PatientID,Age,Relapse,RFS\nCHUM-001,61,0,1520\n")
    with pytest.raises(ValueError, match="without a clinical row"):
        load_cohort_dataset(hk, event_column="Relapse", time_column="RFS", note_column=None)
