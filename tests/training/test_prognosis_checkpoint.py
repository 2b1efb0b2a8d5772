"""The shipped prognosis checkpoint on a held-out synthetic cohort (a seed never used for training or
validation), scored on image features of the exported image_features unit on ONNX Runtime: the graph the
server runs.

The 100 patients' features are stored (``fixtures/prognosis_heldout_features``, the feature cache of
``python -m training.evaluate_prognosis``, written by ``make prognosis-fixture``): extracting them is 100
whole-volume passes of the unit, about 3 minutes of the CI's 2 cores, while the statistics below need a second.
What keeps the stored features honest: every 50th patient (2) is extracted again through the exported unit of
this session's build and must equal its stored vector (a changed export, preprocessing or phantom moves every
patient's features, see RTOL below), and the stored set must cover this seed's cohort exactly;
otherwise every test of this module errors with the command that regenerates them. The risk, the baselines,
the bootstrap and the log-rank test run on the live checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PROGNOSIS_CHECKPOINT, ROOT
from training.evaluate_prognosis import evaluate

pytestmark = pytest.mark.slow

HELD_OUT_SEED = 9002
# The first 100 patients of the README's 240-patient held-out cohort (a cohort's patients do not depend on its
# size): a regression guard of the shipped checkpoint. The statistical claim (the paired bootstrap interval of
# model - EHR-only above zero: +0.039 to +0.114) is the README's 240-patient figure; 100 patients do not have the
# power for it (paired interval +0.001 to +0.122). Measured on these 100 with the stored features (2026-12-04,
# exported unit on ONNX Runtime, 500 resamples): C-index 0.767 (0.701 to 0.826), EHR-only 0.703, paired
# difference +0.065, oracle 0.774, log-rank p 3e-13, 70 events (PyTorch features, 2026-12-03: 0.765, +0.063).
PATIENTS = 100
STORED = Path(__file__).parent / "fixtures" / "prognosis_heldout_features"
SPOT_CHECK = range(0, PATIENTS, 50)   # re-extracted through the exported unit in every run (about 3 s a patient)
# the Makefile's prognosis-fixture target runs (kept in step with PATIENTS and HELD_OUT_SEED there):
# python export/build_engines.py --checkpoint checkpoints/duplus_demo.pt --output model_repository
#   --prognosis-checkpoint checkpoints/duplus_prognosis.pt; rm -rf the fixture; python -m training.evaluate_prognosis
#   --patients 100 --seed 9002 --repository model_repository --cache tests/training/fixtures/prognosis_heldout_features
REGENERATE = "make prognosis-fixture"
# fp32 ONNX Runtime on another CPU (AVX2 against AVX-512 kernels) can move a probability in its last bits and tip
# a voxel over the radiomics' 0.5 threshold (not measured: the features were stored and re-extracted bit-identical
# on one machine); a changed export, preprocessing or phantom moves features by far more (a 0.01 shift of one
# tumour volume, relative 3e-3, fails)
RTOL, ATOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def stored_features(triton_repository, tmp_path_factory):
    """A copy of the stored feature cache, checked against this session's exported unit."""
    from duplus.models.prognosis import load_prognosis_checkpoint
    from duplus.synth.cohort import CohortSpec, generate_cohort, pet_volume
    from training.evaluate_prognosis import OnnxFeatureExtractor

    model, meta = load_prognosis_checkpoint(PROGNOSIS_CHECKPOINT)
    folder = STORED / meta["segmentation_sha256"][:12]
    patients = generate_cohort(CohortSpec(PATIENTS, HELD_OUT_SEED, meta["train_cohort"]["hazard"]))
    names = {f"{p.patient_id}_{p.image_seed}.npy" for p in patients}
    stored = {f.name for f in folder.glob("*.npy")} if folder.is_dir() else set()
    if stored != names:
        pytest.fail(f"the stored held-out features ({folder.relative_to(ROOT)}: {len(stored & names)} of "
                    f"{PATIENTS} patients, {len(stored - names)} others) do not match this segmentation checkpoint "
                    f"and cohort; regenerate them: {REGENERATE}")
    extractor = OnnxFeatureExtractor(triton_repository, ROOT / meta["segmentation_checkpoint"], model.cfg.modality,
                                     model.cfg.t1)
    for i in SPOT_CHECK:
        p = patients[i]
        ph = pet_volume(p)
        fresh = extractor(ph.image, ph.affine).vector
        kept = np.load(folder / f"{p.patient_id}_{p.image_seed}.npy")
        if not np.allclose(fresh, kept, rtol=RTOL, atol=ATOL):
            worst = int(np.argmax(np.abs(fresh - kept) / (ATOL + RTOL * np.abs(kept))))
            pytest.fail(f"patient {p.patient_id}: the exported unit's features differ from the stored ones "
                        f"({meta['feature_names'][worst]}: {fresh[worst]:.6g} now, {kept[worst]:.6g} stored); if "
                        f"the change is meant, regenerate them: {REGENERATE}")
    copy = tmp_path_factory.mktemp("prognosis") / "features"
    shutil.copytree(STORED, copy)
    return copy


@pytest.fixture(scope="module")
def report(triton_repository, stored_features):
    result = evaluate(PROGNOSIS_CHECKPOINT, PATIENTS, HELD_OUT_SEED, repository=triton_repository,
                      cache=str(stored_features), bootstrap=500, plot=stored_features.parent / "km.png")
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
    # a regression margin (measured +0.064 and paired +0.065 on these patients), not a significance test
    assert report["c_index"] - report["c_index_ehr_only"] >= 0.03, report
    assert report["delta_vs_ehr_only"] >= 0.03, report


def test_within_005_of_the_oracle(report):
    assert report["c_index_oracle"] - report["c_index"] <= 0.05, report


def test_risk_groups_separate(report):
    assert report["logrank_p"] < 0.01
    assert Path(report["km_plot"]).stat().st_size > 10_000
