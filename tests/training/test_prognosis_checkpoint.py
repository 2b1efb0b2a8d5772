"""The shipped prognosis checkpoint on a held-out synthetic cohort (a seed never used for training or
validation), scored with the exported image_features unit on ONNX Runtime: the graph the server runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PROGNOSIS_CHECKPOINT
from training.evaluate_prognosis import evaluate

pytestmark = pytest.mark.slow

HELD_OUT_SEED = 9002
# The first 160 patients of the README's 240-patient held-out cohort (a cohort's patients do not depend
# on its size). Measured with the shipped checkpoint (2026-12-02, ONNX Runtime features, 500 resamples):
# C-index 0.775, EHR-only 0.700 (half-width 0.048), oracle 0.785, log-rank p 4e-21, 115 events; about
# 1.6 s of feature extraction per patient on 2 cores, the largest single item of `make test`.
PATIENTS = 160


@pytest.fixture(scope="module")
def report(triton_repository, tmp_path_factory):
    out = tmp_path_factory.mktemp("prognosis")
    result = evaluate(PROGNOSIS_CHECKPOINT, PATIENTS, HELD_OUT_SEED, repository=triton_repository,
                      cache=str(out / "features"), bootstrap=500, plot=out / "km.png")
    print(json.dumps(result, indent=2))
    return result


def test_json_carries_the_required_fields(report):
    for key in ("c_index", "c_index_ehr_only", "c_index_oracle", "c_index_ci95", "c_index_ehr_only_half_width",
                "logrank_p"):
        assert key in report
    lo, hi = report["c_index_ci95"]
    assert lo <= report["c_index"] <= hi
    assert report["events"] >= 60


def test_c_index_reaches_the_bar(report):
    assert report["c_index"] >= 0.70


def test_beats_the_ehr_only_baseline_by_more_than_its_interval(report):
    assert report["c_index"] - report["c_index_ehr_only"] > report["c_index_ehr_only_half_width"], report


def test_within_005_of_the_oracle(report):
    assert report["c_index_oracle"] - report["c_index"] <= 0.05, report


def test_risk_groups_separate(report):
    from pathlib import Path

    assert report["logrank_p"] < 0.01
    assert Path(report["km_plot"]).stat().st_size > 10_000
