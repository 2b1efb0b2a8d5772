import pytest

from training.prompts import (
    REGION_TARGETS,
    PromptVocabulary,
    canonical_t1,
    canonical_target,
    t1_paraphrases,
    t2_paraphrases,
    validate_prompt,
)


@pytest.mark.parametrize("name,expected", [
    ("liver", "liver"), ("Liver", "liver"), ("GTVp", "primary tumour"), ("GTVn", "lymph node"),
    ("kidney_left", "left kidney"), ("primary tumor", "primary tumour"), ("cancer", None), ("background", None)])
def test_label_names_map_to_canonical_targets(name, expected):
    assert canonical_target(name) == expected


@pytest.mark.parametrize("modality,region,sequence,expected", [
    ("CT", "abdomen", None, "CT of the abdomen"),
    ("MR", "abdomen", "T1", "T1-weighted MRI of the abdomen"),
    ("PET", "head_neck", None, "PET of the head and neck"),
])
def test_canonical_t1(modality, region, sequence, expected):
    assert canonical_t1(modality, region, sequence) == expected


def test_paraphrases_are_many_and_distinct():
    t1 = t1_paraphrases("CT", "abdomen")
    assert len(set(t1)) >= 50
    for targets in REGION_TARGETS.values():
        for t in targets:
            assert len(set(t2_paraphrases(t))) >= 4


@pytest.mark.parametrize("bad,message", [("", "empty"), ("   ", "empty"), ("x" * 300, "300 characters"),
                                         (None, "must be a string")])
def test_validate_prompt(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_prompt(bad, "target")


@pytest.mark.parametrize("modality,region,sequence,message", [
    ("US", "abdomen", None, "unknown modality"), ("CT", "thorax", None, "unknown region"),
    ("MR", "abdomen", "FLAIR", "unknown MR sequence")])
def test_t1_ill(modality, region, sequence, message):
    with pytest.raises(ValueError, match=message):
        canonical_t1(modality, region, sequence)


def test_vocabulary_round_trip():
    v = PromptVocabulary()
    assert PromptVocabulary.from_dict(v.to_dict()) == v
    assert "CT|abdomen" in v.all_t1()
