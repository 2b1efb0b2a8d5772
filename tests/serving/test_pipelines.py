"""What runs inside Triton, tested without a server: request checks derived from the tensor contract, the one
segmentation pipeline behind ``segment_volume`` (vs the in-process Predictor), the prompt tokenizer, the prompt
cache and the prognose orchestration."""

import numpy as np
import pytest
import torch

from duplus.contract import EncodedPrompts, InvalidRequest, ServingLimits, contracts, prognosis_contracts
from duplus.inference import Predictor
from duplus.models.duplus import DuPLUS, DuPLUSConfig
from duplus.vocabulary import PromptVocabulary
from serving.pipelines import Prognoser, VolumeSegmenter
from serving.requests import EHRTokenizer, PromptTokenizer, check_feed, short

SMALL = DuPLUSConfig(channels=(4, 8, 16), patch_size=(32, 32, 16), film_hidden=32, controller_hidden=32,
                     head_channels=4, head_levels=2)
UNITS = contracts(SMALL, vocab_size=30522)
PROG = prognosis_contracts(SMALL, image_dim=17, text_dim=384, vocab_size=30522)


def _seg_feed(b=2, k=3, spatial=(32, 32, 16), modality=None):
    return {"image": np.zeros((b, 1, *spatial), np.float32),
            "modality": np.zeros(b, np.int64) if modality is None else np.asarray(modality, np.int64),
            "film": np.zeros((b, SMALL.film_size), np.float32),
            "head_params": np.zeros((k, SMALL.head_params), np.float32)}


def _with(feed, **changes):
    return {**feed, **changes}


ILL_FEEDS = [  # (unit, feed, words the message must hold)
    ("segmenter", _with(_seg_feed(), modality=np.zeros(3, np.int64)), "axis 'b' is 2 in image but 3 in modality"),
    ("segmenter", _seg_feed(modality=[0, 3]), "allowed are 0..2"),
    ("segmenter", _seg_feed(modality=[-1, 0]), "allowed are 0..2"),
    ("segmenter", _seg_feed(spatial=(30, 32, 16)), "multiples of 4"),
    ("segmenter", _with(_seg_feed(), image=np.full((2, 1, 32, 32, 16), np.nan, np.float32)), "NaN or Inf"),
    ("segmenter", _with(_seg_feed(), image=np.zeros((2, 1, 32, 32, 16), np.float64)), "is float64, expected float32"),
    ("segmenter", _with(_seg_feed(), image=np.zeros((2, 32, 32, 16), np.float32)), "expected 5 dimensions"),
    ("segmenter", _with(_seg_feed(), film=np.zeros((2, SMALL.film_size + 1), np.float32)), "has shape"),
    ("segmenter", {k: v for k, v in _seg_feed().items() if k != "film"}, "input film is missing"),
    ("text_encoder", {"input_ids": np.zeros((2, 5), np.int64), "attention_mask": np.ones((2, 6), np.int64)},
     "axis 'tokens' is 5 in input_ids but 6 in attention_mask"),
    ("text_encoder", {"input_ids": np.full((1, 5), 40000, np.int64), "attention_mask": np.ones((1, 5), np.int64)},
     "allowed are 0..30521"),
    ("text_encoder", {"input_ids": np.zeros((1, 5), np.int64), "attention_mask": np.full((1, 5), 2, np.int64)},
     "attention_mask has values in [2, 2]"),
    ("text_encoder", {"input_ids": np.zeros((0, 5), np.int64), "attention_mask": np.ones((0, 5), np.int64)},
     "empty along axis 'n'"),
    # the prognosis head once broadcast 1 image row against 3 EHR rows into 3 risks
    ("prognosis", {"image_features": np.zeros((1, 17), np.float32), "ehr_embedding": np.zeros((3, 384), np.float32)},
     "axis 'n' is 1 in image_features but 3 in ehr_embedding"),
    ("prognosis", {"image_features": np.zeros((1, 77), np.float32), "ehr_embedding": np.zeros((1, 384), np.float32)},
     "expected ['n', 17]"),
]


@pytest.mark.parametrize("unit, feed, words", ILL_FEEDS, ids=[f"{u}-{i}" for i, (u, _, _) in enumerate(ILL_FEEDS)])
def test_ill_unit_feeds_are_refused_by_the_contract(unit, feed, words):
    contract = {**UNITS, **PROG}[unit]
    with pytest.raises(InvalidRequest) as err:
        check_feed(contract, feed)
    assert words in str(err.value), str(err.value)
    assert str(err.value).startswith(unit)


def test_good_feeds_pass_in_contract_order():
    out = check_feed(UNITS["segmenter"], dict(reversed(list(_seg_feed(b=3, k=1, spatial=(36, 32, 16)).items()))))
    assert list(out) == ["image", "modality", "film", "head_params"]
    ids = {"input_ids": np.array([[101, 2000, 102]]), "attention_mask": np.ones((1, 3), np.int64)}
    assert check_feed(UNITS["text_encoder"], ids)["input_ids"].shape == (1, 3)


def test_contract_round_trips_through_the_manifest():
    from duplus.contract import UnitContract

    for name, c in {**UNITS, **PROG}.items():
        back = UnitContract.from_manifest(name, c.to_manifest())
        assert (back.inputs, back.outputs, back.multiple_of) == (c.inputs, c.outputs, c.multiple_of)


def test_short_never_echoes_long_text():
    assert short("liver") == "liver"
    s = short("x" * 10_000)
    assert len(s) < 100 and "10000 characters" in s


# ---- the one segmentation pipeline ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_predictor(text_encoder):
    torch.manual_seed(3)
    model = DuPLUS(SMALL)
    torch.nn.init.normal_(model.conditioning.film[-1].weight, std=0.05)
    return Predictor(model, PromptVocabulary(), text_encoder, sw_batch_size=2)


def _volume(seed=0, shape=(40, 36, 20)):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 200, shape).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])


def test_served_pipeline_equals_in_process_predictor(small_predictor):
    """segment_volume's VolumeSegmenter with in-process callables gives the Predictor's labels exactly, encodes
    a repeated prompt set once (the user's words to match them, then their canonical names, which condition the
    heads), and sends windows in batches of at most sw_batch_size."""
    p = small_predictor
    names, known = p.known_target_embeddings()
    encodes, batches = [], []

    def encode(modality, t1, targets):
        encodes.append((modality, t1, tuple(targets)))
        return p.encode(modality, t1, targets)

    def segment(image, modality, film, head):
        batches.append(image.shape[0])
        assert image.dtype == np.float32 and modality.dtype == np.int64 and film.shape[0] == image.shape[0]
        return p.segment(image, modality, film, head).numpy()

    manifest = {"model_config": SMALL.to_dict(), "patch_size": list(SMALL.patch_size),
                "vocabulary": PromptVocabulary().to_dict()}
    served = VolumeSegmenter(manifest, {"names": np.array(names), "embeddings": known.numpy()}, encode, segment,
                             ServingLimits(sw_batch_size=2), count_tokens=p.count_tokens)
    vol, aff = _volume()
    targets = ["liver", "the spleen"]
    ref = p.predict_array(vol, aff, "CT", "CT of the abdomen", targets, return_probabilities=True)
    out = served(vol, aff, "CT", "CT of the abdomen", targets)
    served(vol, aff, "CT", "ct of the  abdomen", ["Liver", "the spleen"])   # the same prompt set, normalised
    np.testing.assert_array_equal(out.labels, ref.labels)
    assert out.labels.dtype == np.uint8 and out.labels.shape == vol.shape
    assert out.resolved == ref.resolved == ("liver", "spleen") and out.stem == "CT"
    assert ref.probabilities.shape == (2, *vol.shape)
    assert [e[2] for e in encodes] == [("liver", "the spleen"), ("liver", "spleen")], encodes
    assert batches and max(batches) <= 2


def test_instructions_auto_served_as_in_process(small_predictor):
    """INSTRUCTIONS auto: the targets are matched by the user's words, then each head is conditioned by the
    generator's instruction for the image's context (one encode_instructions call per prompt set and context, as
    the served ensemble runs it), with the same labels as in process and the instructions in the result."""
    from duplus.instructions import KnowledgeBaseGenerator, request_context, served_instructions

    p = small_predictor
    names, known = p.known_target_embeddings()
    calls = []

    def encode_instructions(modality, t1, targets, context):
        calls.append((modality, tuple(targets), context))
        return p.encode_instructions(modality, t1, targets, context)

    def segment(image, modality, film, head):
        return p.segment(image, modality, film, head).numpy()

    manifest = {"model_config": SMALL.to_dict(), "patch_size": list(SMALL.patch_size),
                "vocabulary": PromptVocabulary().to_dict()}
    served = VolumeSegmenter(manifest, {"names": np.array(names), "embeddings": known.numpy()}, p.encode, segment,
                             ServingLimits(sw_batch_size=2), count_tokens=p.count_tokens,
                             encode_instructions=encode_instructions)
    vol, aff = _volume()
    t1, targets, header = "T2-weighted MRI of the abdomen", ["hepar", "the spleen"], {"patient_sex": "M"}
    ref = p.predict_array(vol, aff, "MR", t1, targets, instructions="auto", context=header,
                          return_probabilities=True)
    out = served(vol, aff, "MR", t1, targets, instructions="auto", context=header)
    served(vol, aff, "MR", t1, targets, instructions="auto", context=header)       # cached: no second call
    np.testing.assert_array_equal(out.labels, ref.labels)
    context = request_context("MR", t1, aff, header)
    assert context.sequence == "T2" and context.slice_thickness_mm == 3.0 and context.patient_sex == "M"
    texts = served_instructions(KnowledgeBaseGenerator(), ["liver", "spleen"], context)
    assert out.conditioned_by == ref.conditioned_by == tuple(texts) and out.resolved == ("liver", "spleen")
    assert calls == [("MR", ("liver", "spleen"), context)]
    # the instructions condition the heads: not the names' probabilities
    names_only = p.predict_array(vol, aff, "MR", t1, targets, return_probabilities=True)
    assert names_only.conditioned_by == ("liver", "spleen")
    assert np.abs(names_only.probabilities - ref.probabilities).max() > 1e-3
    with pytest.raises(InvalidRequest, match="INSTRUCTIONS must be one of"):
        served(vol, aff, "MR", t1, targets, instructions="sometimes")
    with pytest.raises(InvalidRequest, match="CONTEXT is not valid JSON"):
        served(vol, aff, "MR", t1, targets, instructions="auto", context="{")


@pytest.mark.parametrize("t1, targets, modality, words", [
    ("CT of the abdomen", ["banana"], "CT", "unknown target prompt 'banana'"),
    ("CT of the abdomen", ["kidney"], "CT", "ambiguous target prompt 'kidney'"),
    ("CT of the abdomen", [], "CT", "TARGETS is empty"),
    ("CT of the abdomen", ["liver"] * 17, "CT", "at most 16 per request"),
    ("  ", ["liver"], "CT", "T1 (context) prompt is empty"),
    ("CT of the abdomen", ["liver", "a-b-c-d " * 20], "CT", "TARGETS[1] prompt is"),
    ("CT of the abdomen", ["liver"], "XR", "unknown modality 'XR'"),
    ("ultrasound of the abdomen", ["liver"], "CT", None),   # names no modality: the declared stem
])
def test_pipeline_refuses_bad_prompts_before_any_model_work(small_predictor, t1, targets, modality, words):
    vol, aff = _volume(1, (24, 24, 12))
    if words is None:
        assert small_predictor.predict_array(vol, aff, modality, t1, targets).stem == "CT"
        return
    with pytest.raises(InvalidRequest) as err:
        small_predictor.predict_array(vol, aff, modality, t1, targets)
    assert words in str(err.value)


def test_prompt_tokenizer_applies_the_same_rules(text_encoder, tmp_path):
    text_encoder.tokenizer.save_pretrained(str(tmp_path / "tok"))
    tok = PromptTokenizer(tmp_path / "tok", SMALL.modalities, ServingLimits())
    out = tok("CT", "T2-weighted MRI of the abdomen", ["liver", "left kidney"])
    assert out["modality"].tolist() == [SMALL.modalities.index("MR")]     # the stem follows the T1
    assert out["t2_input_ids"].shape[0] == 2 and out["t2_input_ids"].dtype == np.int64
    assert out["t1_input_ids"].shape == out["t1_attention_mask"].shape
    for bad, words in ((["x" * 300], "characters long"), (["a-b-c-d " * 20], "tokens long"), ([], "TARGETS is empty")):
        with pytest.raises(InvalidRequest, match=words):
            tok("CT", "CT of the abdomen", bad)
    with pytest.raises(InvalidRequest, match="no stem|stems for"):
        PromptTokenizer(tmp_path / "tok", ("CT", "MR"))("CT", "PET of the neck", ["lymph node"])


# ---- prognose --------------------------------------------------------------------------------------------------

def test_prognoser_orchestrates_units_and_refuses_bad_notes_first(text_encoder, tmp_path):
    text_encoder.tokenizer.save_pretrained(str(tmp_path / "tok"))
    calls = {"encode": 0, "features": 0, "ehr": 0}
    names = [f"f{i}" for i in range(8)]

    def encode(modality, t1, targets):
        calls["encode"] += 1
        assert targets == ["primary tumour", "lymph node"]
        return EncodedPrompts(2, np.zeros((1, SMALL.film_size), np.float32),
                              np.zeros((2, SMALL.head_params), np.float32), np.zeros((2, 384), np.float32))

    def features(padded, modality, film, head):
        calls["features"] += 1
        assert all(s % SMALL.level_factor == 0 for s in padded.shape[2:]) and modality.tolist() == [2]
        probs = np.zeros((1, 2, *padded.shape[2:]), np.float32)
        probs[:, 0, 4:8, 4:8, 2:4] = 0.9
        return probs, np.ones((1, len(names) - 5), np.float32)

    def encode_ehr(ids, mask):
        calls["ehr"] += 1
        assert ids.shape == mask.shape and ids.shape[0] == 1
        return np.ones((1, 384), np.float32) / np.sqrt(384)

    def head(image_features, ehr):
        assert image_features.shape == (1, len(names)) and ehr.shape == (1, 384)
        return np.array([float(image_features.sum() + ehr.sum())], np.float32)

    manifest = {"model_config": SMALL.to_dict(),
                "prognosis": {"targets": ["primary tumour", "lymph node"], "feature_names": names}}
    prog = Prognoser(manifest, EHRTokenizer(tmp_path / "tok", max_tokens=64, max_chars=500), encode, features,
                     encode_ehr, head)
    vol, aff = _volume(2, (32, 32, 16))
    vol = np.abs(vol) / 100.0
    a = prog(vol, aff, "PET", "FDG PET of the head and neck", ["T2N1 oropharyngeal carcinoma, smoker"])
    b = prog(vol, aff, "PET", "FDG PET of the head and neck", ["T2N1 oropharyngeal carcinoma, smoker"])
    assert a.risk == pytest.approx(float(a.image_features.sum() + np.sqrt(384)), rel=1e-5)
    assert a.risk == b.risk and a.feature_names == names and a.image_features.shape == (len(names),)
    assert calls == {"encode": 1, "features": 2, "ehr": 2}          # prompts encoded once (cached)
    for notes, words in (([""], "empty"), (["note " * 200], "characters"), (["one", "two"], "exactly one"),
                         ([b"\xff\xfe"], "UTF-8")):
        with pytest.raises(InvalidRequest, match=words):
            prog(vol, aff, "PET", "FDG PET of the head and neck", notes)
    assert calls["features"] == 2                                    # refused before any image work


# ---- the served tokenizer ----------------------------------------------------------------------------------------

TOKENIZER_TEXTS = ["CT of the abdomen", "T2-weighted MRI of the abdomen", "PET/CT of the head and neck", "left kidney",
                   "   Spaced   OUT  ", "Ünïcødé façade — 肝臓 ✓", "a-b-c-d " * 80, "x"]


def test_word_tokenizer_gives_transformers_ids_without_importing_it(text_encoder, tmp_path):
    """The tokenizer stubs run tokenizer.json on the tokenizers library: the ids, masks and counts that
    transformers' AutoTokenizer gives (padding=True, no truncation, although the file stores the encoder's fixed
    128), for every vocabulary prompt and odd texts, in batches of mixed lengths; a process that tokenises imports
    neither transformers nor torch. A folder without tokenizer.json goes through AutoTokenizer, with the same ids."""
    import subprocess
    import sys

    from serving.requests import WordTokenizer

    folder = tmp_path / "tok"
    text_encoder.tokenizer.save_pretrained(str(folder))
    reference = text_encoder.tokenizer
    fast = WordTokenizer(folder)
    assert fast.fast is not None
    vocab = PromptVocabulary()
    vocabulary = sorted({text for texts in (*vocab.all_t1().values(), *vocab.all_t2().values()) for text in texts})
    assert len(vocabulary) > 50
    batches = [TOKENIZER_TEXTS, TOKENIZER_TEXTS[:1], TOKENIZER_TEXTS[3:5], TOKENIZER_TEXTS[6:7]]
    batches += [vocabulary[i:i + 16] for i in range(0, len(vocabulary), 16)]
    for batch in batches:
        want = reference(batch, padding=True, truncation=False, return_tensors="np")
        got = fast(batch)
        assert got["input_ids"].dtype == np.int64 and got["input_ids"].shape == want["input_ids"].shape, batch
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    assert fast(TOKENIZER_TEXTS)["input_ids"].shape[1] > 128                   # the stored truncation is off
    for text in TOKENIZER_TEXTS:
        assert fast.count(text) == len(reference(text)["input_ids"])
    probe = ("import sys; from serving.requests import PromptTokenizer; "
             f"out = PromptTokenizer({str(folder)!r}, ('CT', 'MR', 'PET'))('CT', 'CT of the abdomen', ['liver']); "
             "assert out['t2_input_ids'].shape[0] == 1; "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:] + res.stdout
    # a tokenizer saved without tokenizer.json (vocab.txt only): transformers builds it, same ids
    slow_folder = tmp_path / "slow"
    slow_folder.mkdir()
    (slow_folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
    vocab = sorted(reference.get_vocab().items(), key=lambda kv: kv[1])
    (slow_folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    slow = WordTokenizer(slow_folder)
    assert slow.fast is None
    for batch in batches[:4]:
        np.testing.assert_array_equal(slow(batch)["input_ids"], fast(batch)["input_ids"])


def test_bls_stubs_import_monai_without_transformers():
    """What every BLS stub imports, after ``import_monai_without_transformers`` (as their ``initialize`` does):
    no transformers loaded (MONAI's TransChex finds it missing), MONAI's sliding window and resampling work, and
    transformers is importable again afterwards. The served pipelines' numbers are the server tests' (the served
    labels equal in-process PyTorch's, tests/serving/test_triton_server.py)."""
    import subprocess
    import sys

    probe = ("import sys; from serving.triton_models import import_monai_without_transformers; "
             "import_monai_without_transformers(); "
             "import serving.pipelines, duplus.models.prognosis, duplus.models.pemma, duplus.context.views; "
             "loaded = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.')); "
             "import torch; from monai.inferers import sliding_window_inference; from monai.transforms import Spacing; "
             "out = sliding_window_inference(torch.ones(1, 1, 20, 20, 12), (8, 8, 8), 2, lambda x: 2.0 * x); "
             "img = Spacing(pixdim=(2.0, 2.0, 2.0))(torch.ones(1, 8, 8, 8)); "
             "import transformers; "
             "print(loaded, float(out.mean()), tuple(img.shape), transformers.__name__)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[] 2.0 (1, 4, 4, 4) transformers", res.stdout
