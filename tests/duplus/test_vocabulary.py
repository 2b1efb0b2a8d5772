import pytest

from duplus.vocabulary import (
    REGION_TARGETS,
    PromptVocabulary,
    canonical_t1,
    canonical_target,
    stem_modality,
    t1_modality,
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


@pytest.mark.parametrize("t1,expected", [
    ("CT of the abdomen", "CT"), ("abdominal CT scan", "CT"), ("computed tomography of the neck", "CT"),
    ("T2-weighted MRI of the abdomen", "MR"), ("T1w MRI", "MR"), ("MR scan of the neck", "MR"),
    ("a T1 weighted magnetic resonance image of the abdomen", "MR"), ("FDG-PET of the neck", "PET"),
    ("18F-FDG PET showing the head and neck", "PET"), ("positron emission tomography of the neck", "PET"),
    # names none, or two: the declared modality decides
    ("scan of the abdomen", None), ("PET/CT of the head and neck", None), ("octreotide study", None),
    ("impetigo", None), ("mrs smith's abdomen", None),
])
def test_t1_names_the_stem(t1, expected):
    assert t1_modality(t1) == expected


def test_every_vocabulary_t1_names_its_own_modality():
    """Training draws T1 from these phrasings with the volume's stem, so routing by T1 changes nothing there."""
    wrong = [(key, t) for key, phrasings in PromptVocabulary().all_t1().items() for t in phrasings
             if t1_modality(t) != key.split("|")[0].split(":")[0]]
    assert len(PromptVocabulary().all_t1()) == 10 and wrong == []


@pytest.mark.parametrize("t1,declared,modalities,expected", [
    ("T2-weighted MRI of the abdomen", "CT", ("CT", "MR", "PET"), "MR"),   # the prompt wins
    ("scan of the abdomen", "CT", ("CT", "MR", "PET"), "CT"),              # no modality named: declared
    ("PET/CT of the neck", "PET", ("CT", "MR", "PET"), "PET"),
])
def test_stem_modality(t1, declared, modalities, expected):
    assert stem_modality(t1, declared, modalities) == expected


def test_stem_modality_names_a_missing_stem():
    with pytest.raises(ValueError, match="names modality 'PET'; this model has stems for \\['CT', 'MR'\\]"):
        stem_modality("PET of the head and neck", "CT", ("CT", "MR"))
