"""PEMMA's prognosis ablation (training/evaluate_pemma_prognosis.py): the design matrices and the Cox scoring.

The radiomics here are the cohort's true lesion factors with noise (a sharper measurement for "ct+pet" than for
"ct"); the segmentation that produces them in the real command is tested elsewhere (test_segment_petct.py,
test_pemma.py).  What is checked: the columns each ablation row uses, that a better measurement and the EHR
variables each raise the held-out C-index, and that a risk score points the right way (higher = earlier event).
"""

from __future__ import annotations

import numpy as np

from duplus.models.prognosis import RADIOMICS, c_index
from duplus.synth.cohort import EHR_COVARIATES, CohortSpec, generate_cohort
from training.evaluate_pemma_prognosis import ABLATION, ablation_scores, design


def _measured(patients, noise: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for p in patients:
        c = p.clinical
        truth = {"log_tumour_volume": np.log(c["tumour_volume_ml"] + 0.1), "suv_max": c["suv_max"],
                 "suv_mean": 0.6 * c["suv_max"], "node_count": float(c["node_count"]),
                 "log_node_volume": np.log(c["node_volume_ml"] + 0.1)}
        scale = {"log_tumour_volume": 0.6, "suv_max": 4.0, "suv_mean": 2.5, "node_count": 1.5, "log_node_volume": 1.0}
        out.append({k: float(v + noise * scale[k] * rng.standard_normal()) for k, v in truth.items()})
    return out


def test_ablation_rows_and_their_order():
    train = generate_cohort(CohortSpec(100, 2001))
    test = generate_cohort(CohortSpec(100, 9002))
    hazard = CohortSpec(1, 2001).hazard

    def rads(patients, seed):
        return [{"ct": a, "ct+pet": b} for a, b in zip(_measured(patients, 1.0, seed), _measured(patients, 0.1, seed + 1))]

    r_train, r_test = rads(train, 1), rads(test, 3)
    x, names = design(train, r_train, "ct", False, hazard)
    assert x.shape == (100, len(RADIOMICS)) and names == [f"ct:{k}" for k in RADIOMICS]
    x, names = design(train, r_train, "ct+pet", True, hazard)
    assert x.shape == (100, len(RADIOMICS) + len(EHR_COVARIATES)) and names[len(RADIOMICS):] == list(EHR_COVARIATES)
    t = np.array([p.time for p in test])
    e = np.array([p.event for p in test])
    scores = {name: c_index(t, risk, e) for name, risk in ablation_scores(train, test, r_train, r_test, hazard).items()}
    assert list(scores) == list(ABLATION)
    assert scores["CT"] > 0.55, scores                        # risk points the right way
    assert scores["CT+PET"] > scores["CT"] + 0.02, scores       # a sharper measurement of the lesions helps
    assert scores["CT+PET+EHR"] > scores["CT+PET"] + 0.02, scores
