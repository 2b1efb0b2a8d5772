"""The shipped prognosis checkpoint on a held-out synthetic cohort (a seed never used for training or
validation), scored with the exported image_features unit on ONNX Runtime: the graph the server runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PROGNOSIS_CHECKPOINT
from training.evaluate_prognosis import evaluate

pytestmark = pytest.mark.slow

HELD_OUT_SEED = 9002
# The first 100 patients of the README's 240-patient held-out cohort (a cohort's patients do not depend on its
# size): a regression guard of the shipped checkpoint through the exported unit. The statistical claim (the
# paired bootstrap interval of model - EHR-only above zero: +0.039 to +0.114) is the README's 240-patient figure;
# 100 patients do not have the power for it (paired interval +0.001 to +0.122), and 160, as before, cost about
# 100 s more of CI than the scale-out tests of issue 23 could be paid with otherwise. Measured on these 100
# (2026-12-03, PyTorch features, 500 resamples): C-index 0.765, EHR-only 0.703, paired difference +0.063,
# oracle 0.774, log-rank p 3e-13, 70 events; about 1.6 s of feature extraction per patient on 2 cores.
PATIENTS = 100


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


def test_beats_the_ehr_only_baseline(report):
    # a regression margin (measured +0.062 and paired +0.063 on these patients), not a significance test
    assert report["c_index"] - report["c_index_ehr_only"] >= 0.03, report
    assert report["delta_vs_ehr_only"] >= 0.03, report


def test_within_005_of_the_oracle(report):
    assert report["c_index_oracle"] - report["c_index"] <= 0.05, report


def test_risk_groups_separate(report):
    from pathlib import Path

    assert report["logrank_p"] < 0.01
    assert Path(report["km_plot"]).stat().st_size > 10_000
