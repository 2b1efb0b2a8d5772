"""Free-text target prompts never fail silently: laterality from words, structures the model does not segment
refused, refusals naming the nearest targets, and an accepted paraphrase conditioning the head exactly as its
canonical name does. (The held-out paraphrase set is scored in tests/training/test_prompt_heldout.py.)"""

import pytest
import torch

from duplus.inference import UnknownPromptError
from duplus.vocabulary import NON_TARGETS, REGION_TARGETS, counterpart, laterality, side_of

T1 = "CT of the abdomen"


@pytest.mark.parametrize("text, side", [
    ("left kidney", "left"), ("the patient's right kidney", "right"), ("kidney (left)", "left"),
    ("Kidney, RIGHT", "right"), ("right-sided kidney", "right"), ("sinistral kidney", "left"),
    ("dextral kidney", "right"), ("l kidney", "left"), ("kidney_right", "right"), ("both kidneys", "both"),
    ("bilateral kidneys", "both"), ("left and right kidney", "both"), ("liver", None), ("hepar", None),
    ("the lower lip", None), ("the brightest organ", None),
])
def test_laterality_from_words(text, side):
    assert laterality(text) == side


def test_sides_of_targets():
    assert side_of("left kidney") == "left" and side_of("liver") is None and side_of("left") is None
    assert counterpart("right kidney") == "left kidney" and counterpart("spleen") is None


def test_non_targets_are_not_targets():
    targets = {t for ts in REGION_TARGETS.values() for t in ts}
    assert not targets & set(NON_TARGETS)


@pytest.mark.parametrize("text, expected", [
    ("kidney on the left side", "left kidney"), ("the kidney of the left side of the patient", "left kidney"),
    ("kidney, dextral", "right kidney"), ("renal organ on the right", "right kidney"),
])
def test_laterality_phrasings_resolve_to_their_side(demo_predictor, text, expected):
    resolved, _ = demo_predictor.resolve_targets([text])
    assert resolved == [expected]


@pytest.mark.parametrize("text, message", [
    ("kidney", r"ambiguous .* 'left kidney' .* 'right kidney'.*say which side|ambiguous .* 'right kidney' .* 'left kidney'.*say which side"),
    ("kidneys on both sides", "names both sides: ask for"),
    ("left kidney cyst", "closest to 'left kidney cyst'.*does not segment; the nearest targets are 'left kidney'"),
    ("splenic vein", "closest to 'portal vein and splenic vein'.*does not segment; the nearest targets are 'spleen'"),
    ("the inferior vena cava", "unknown target prompt .* the nearest targets are"),
    ("banana", "unknown target prompt 'banana'.*the nearest targets are"),
])
def test_refusals_name_the_problem_and_the_nearest_targets(demo_predictor, text, message):
    with pytest.raises(UnknownPromptError, match=message):
        demo_predictor.resolve_targets([text])


def test_accepted_paraphrase_conditions_as_its_canonical_name(demo_predictor):
    para = demo_predictor.condition(T1, ["the hepatic organ", "kidney on the left side"])
    canon = demo_predictor.condition(T1, ["liver", "left kidney"])
    assert para.resolved == ("liver", "left kidney") and para.targets == ("the hepatic organ", "kidney on the left side")
    torch.testing.assert_close(para.head_params, canon.head_params, rtol=0, atol=0)
    torch.testing.assert_close(para.film, canon.film, rtol=0, atol=0)


def test_prompt_conditioning_is_still_available(demo_predictor):
    from duplus.inference import Predictor

    own = Predictor(demo_predictor.model, demo_predictor.vocabulary, demo_predictor.text_encoder,
                    target_conditioning="prompt")
    para = own.condition(T1, ["the hepatic organ"])
    canon = own.condition(T1, ["liver"])
    assert para.resolved == ("liver",) and not torch.equal(para.head_params, canon.head_params)
    with pytest.raises(ValueError, match="target_conditioning must be one of"):
        Predictor(demo_predictor.model, demo_predictor.vocabulary, demo_predictor.text_encoder,
                  target_conditioning="blend")


def test_condition_texts_for_known_targets(demo_predictor):
    """Instructions for targets the caller knows condition their heads directly, without matching."""
    by_name = demo_predictor.condition(T1, ["liver", "spleen"])
    same = demo_predictor.condition_texts(T1, ["liver", "spleen"], ["liver", "the spleen"])
    torch.testing.assert_close(same.head_params, by_name.head_params, rtol=0, atol=0)
    assert same.resolved == ("liver", "spleen") and same.similarity == pytest.approx((1.0, 1.0), abs=1e-5)
    text = "On this CT the liver is a large homogeneous organ under the right hemidiaphragm"   # below 0.6: no match
    instr = demo_predictor.condition_texts(T1, [text], ["liver"])
    assert instr.resolved == ("liver",) and instr.targets == (text,) and instr.similarity[0] < 1.0
    assert not torch.equal(instr.head_params, by_name.head_params[:1])
    with pytest.raises(UnknownPromptError, match="unknown target 'gallbladder'"):
        demo_predictor.condition_texts(T1, ["x"], ["gallbladder"])
    with pytest.raises(ValueError, match="1 texts for 2 targets"):
        demo_predictor.condition_texts(T1, ["x"], ["liver", "spleen"])
