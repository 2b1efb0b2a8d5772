"""Zeus-style instruction generation: the knowledge base, the guard rails, a real (tiny, random) transformers model
and a real local HTTP endpoint. No real language-model weights exist here: the transformers test shows only that
garbage is caught and replaced, not that a real model writes good instructions."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from duplus.instructions import (
    GeneratorConfig,
    HttpGenerator,
    ImageContext,
    Instruction,
    InstructionRejected,
    KnowledgeBaseGenerator,
    TransformersGenerator,
    check_instruction,
    main,
    make_generator,
    named_targets,
    parse_instruction,
)
from duplus.knowledge import KNOWLEDGE
from duplus.vocabulary import MAX_PROMPT_CHARS, REGION_TARGETS, TARGET_SYNONYMS, canonical_target

TARGETS = [t for region in REGION_TARGETS.values() for t in region]
CONTEXTS = {   # name -> (context, words the text must contain (any of each tuple), words it must not contain)
    "CT": (ImageContext("CT"), [("HU", "attenuation", "enhanc")], ["uptake", "signal"]),
    "CT unenhanced": (ImageContext("CT", contrast_phase="unenhanced"), [("HU", "attenuation"), ("unenhanced",)],
                      ["uptake", "signal"]),
    "CT arterial": (ImageContext("CT", contrast_phase="arterial"), [("enhanc",), ("arterial",)], ["uptake", "signal"]),
    "CT portal venous": (ImageContext("CT", contrast_phase="portal venous"), [("enhanc",), ("portal venous",)],
                         ["uptake", "signal"]),
    "CT delayed": (ImageContext("CT", contrast_phase="delayed"), [("enhanc",), ("delayed",)], ["uptake", "signal"]),
    "MR": (ImageContext("MR"), [("signal",), ("MR",)], ["uptake", " HU"]),
    "MR T1": (ImageContext("MR", "T1"), [("signal",), ("T1",)], ["uptake", " HU", "T2 signal", "T2-weighted"]),
    "MR T2": (ImageContext("MR", "T2"), [("signal",), ("T2",)], ["uptake", " HU", "T1 signal", "T1-weighted"]),
    "PET": (ImageContext("PET"), [("uptake",), ("PET",)], ["signal", " HU", "enhanc"]),
}


# ---------------------------------------------------------------------------------------------- knowledge base


def test_knowledge_covers_every_target_and_its_names_are_synonyms():
    assert set(KNOWLEDGE) == set(TARGET_SYNONYMS) == set(TARGETS)
    for target, facts in KNOWLEDGE.items():
        assert facts.target == target and facts.location.region in REGION_TARGETS
        assert target in REGION_TARGETS[facts.location.region]
        for name in facts.names:
            assert named_targets(name) == {target}, name


@pytest.mark.parametrize("target", TARGETS)
def test_knowledge_base_instructions_follow_the_modality(target):
    kb = KnowledgeBaseGenerator()
    for label, (context, must, must_not) in CONTEXTS.items():
        texts = [kb.generate(target, context, seed=seed)[0] for seed in range(20)]
        for ins in texts:
            assert ins.target == target and ins.backend == "knowledge_base" and ins.fallback_reason is None
            assert named_targets(ins.text) == {target}, (label, ins.text)
            assert check_instruction(ins.text, target) == ins.text
            assert len(ins.text) <= MAX_PROMPT_CHARS
            for words in must:
                assert any(w in ins.text for w in words), (label, words, ins.text)
            for word in must_not:
                assert word not in ins.text, (label, word, ins.text)
        distinct = len({i.text for i in texts})
        assert distinct >= 8, f"{target} / {label}: only {distinct} distinct texts of 20 seeds"


def test_knowledge_base_fits_the_text_encoders_token_limit():
    """Without a token counter the knowledge base keeps to a character budget; checked here with the served text
    encoder's own tokenizer (all-MiniLM-L6-v2, shipped as a package: only its tokenizer is loaded)."""
    from transformers import AutoTokenizer

    from duplus.text_encoder import DEFAULT_TEXT_ENCODER, resolve_text_encoder_path
    from duplus.vocabulary import MAX_PROMPT_TOKENS, normalise_text

    tok = AutoTokenizer.from_pretrained(resolve_text_encoder_path(DEFAULT_TEXT_ENCODER))
    kb = KnowledgeBaseGenerator()
    older_man = ImageContext("PET", None, "head_neck", slice_thickness_mm=3, patient_sex="M", patient_age_years=70)
    contexts = [c for c, _, _ in CONTEXTS.values()] + [older_man, ImageContext()]
    texts = [i.text for t in TARGETS for c in contexts for i in kb.generate(t, c, n=4, seed=11)]
    counts = [len(tok(normalise_text(x))["input_ids"]) for x in texts]
    assert max(counts) <= MAX_PROMPT_TOKENS, max(zip(counts, texts))
    words = KnowledgeBaseGenerator(count_tokens=lambda x: len(x.split()), max_tokens=22)
    short = [i.text for t in TARGETS for i in words.generate(t, ImageContext("CT", contrast_phase="arterial"), n=4)]
    assert all(len(x.split()) <= 22 for x in short)


def test_knowledge_base_is_deterministic_per_seed():
    ctx = ImageContext("MR", "T2", "abdomen", patient_sex="F", patient_age_years=50)
    a = KnowledgeBaseGenerator().generate("pancreas", ctx, n=4, seed=7)
    b = KnowledgeBaseGenerator().generate("pancreas", ctx, n=4, seed=7)
    assert a == b and len({i.text for i in a}) == 4
    assert KnowledgeBaseGenerator().generate("pancreas", ctx, n=1, seed=7) == a[:1]
    assert KnowledgeBaseGenerator().generate("pancreas", ctx, n=1, seed=8) != a[:1]


def test_knowledge_base_uses_the_patient_and_the_slices():
    kb = KnowledgeBaseGenerator()

    def texts(target, ctx):
        return " | ".join(i.text for i in kb.generate(target, ctx, n=12, seed=3))

    assert "slices of 3 mm" in texts("lymph node", ImageContext("PET", slice_thickness_mm=3))
    assert "wider in men" in texts("aorta", ImageContext("CT", patient_sex="M"))
    assert "in women" in texts("liver", ImageContext("PET", patient_sex="F"))
    assert "child" in texts("spleen", ImageContext("CT", patient_age_years=8))
    assert "older adults" in texts("pancreas", ImageContext("CT", patient_age_years=72))
    assert "67-year-old adult" in texts("liver", ImageContext("MR", "T1", patient_age_years=67))
    without = texts("lymph node", ImageContext("PET")) + texts("aorta", ImageContext("CT"))
    assert not any(w in without for w in ("slices of", "mm slices", "child", "in men", "in women", "year-old"))


def test_predicted_context_fills_a_missing_modality_only_when_confident():
    kb = KnowledgeBaseGenerator()
    sure = ImageContext(predicted_context={"modality": "PET", "region": "head_neck", "probability": 0.9})
    unsure = ImageContext(predicted_context={"modality": "PET", "probability": 0.2})
    header_wins = ImageContext("CT", predicted_context={"modality": "PET", "probability": 0.99})
    assert (sure.effective_modality, sure.effective_region, unsure.effective_modality) == ("PET", "head_neck", None)
    assert "uptake" in kb.generate("lymph node", sure)[0].text
    assert "uptake" not in kb.generate("lymph node", unsure)[0].text
    assert header_wins.effective_modality == "CT" and hash(sure) == hash(ImageContext(predicted_context=sure.predicted))


@pytest.mark.parametrize("name,expected", [("hepar", "liver"), ("GTVn", "lymph node"), ("kidney_left", "left kidney"),
                                           ("Primary Tumor", "primary tumour"), ("lien", "spleen")])
def test_synonyms_are_accepted(name, expected):
    ins = KnowledgeBaseGenerator().generate(name, ImageContext("CT"))[0]
    assert ins.target == expected and named_targets(ins.text) == {expected}


@pytest.mark.parametrize("bad", ["gallbladder", "kidney", ""])
def test_unknown_target_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=f"unknown target '{bad}'"):
        KnowledgeBaseGenerator().generate(bad, ImageContext("CT"))


@pytest.mark.parametrize("kwargs,field", [
    ({"modality": "MRI"}, "modality"), ({"modality": "CT", "sequence": "T2"}, "sequence"),
    ({"sequence": "FLAIR"}, "sequence"), ({"region": "thorax"}, "region"), ({"contrast_phase": "venous"}, "contrast_phase"),
    ({"slice_thickness_mm": 0}, "slice_thickness_mm"), ({"patient_sex": "O"}, "patient_sex"),
    ({"patient_age_years": -1}, "patient_age_years"), ({"predicted_context": {"probability": 2.0}}, "probability"),
    ({"predicted_context": {"modality": ["CT"]}}, "predicted_context"),
])
def test_image_context_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImageContext(**kwargs)


def test_generate_checks_n_and_caches():
    kb = KnowledgeBaseGenerator()
    with pytest.raises(ValueError, match="n must be"):
        kb.generate("liver", ImageContext("CT"), n=0)
    kb.generate("liver", ImageContext("CT"), n=2, seed=1)
    kb.generate("liver", ImageContext("CT"), n=2, seed=1)
    assert (kb.cache.hits, kb.cache.misses) == (1, 1)


# ---------------------------------------------------------------------------------------------- DICOM header


def _dataset(**attrs):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("attrs,expected", [
    (dict(Modality="CT", SeriesDescription="ABD PV 5mm", ContrastBolusAgent="Omnipaque 350", BodyPartExamined="ABDOMEN",
          SliceThickness="5.0", PatientSex="F", PatientAge="045Y"),
     dict(modality="CT", contrast_phase="portal venous", region="abdomen", slice_thickness_mm=5.0, patient_sex="F",
          patient_age_years=45.0)),
    (dict(Modality="CT", SeriesDescription="Arterial 1.25", BodyPartExamined="LIVER"),
     dict(modality="CT", contrast_phase="arterial", region="abdomen")),
    (dict(Modality="CT", SeriesDescription="Nativ", ContrastBolusAgent="Omnipaque"), dict(contrast_phase="unenhanced")),
    (dict(Modality="CT", SeriesDescription="Thorax 3mm", ContrastBolusAgent="NONE"), dict(contrast_phase="unenhanced")),
    (dict(Modality="CT", SeriesDescription="Abdomen 3mm", ContrastBolusAgent="Iomeron"), dict(contrast_phase=None)),
    (dict(Modality="MR", SeriesDescription="t2_haste_tra_mbh", BodyPartExamined="ABDOMEN"),
     dict(modality="MR", sequence="T2", region="abdomen")),
    (dict(Modality="MR", SeriesDescription="t1_vibe_fs_tra_post"), dict(sequence="T1")),
    (dict(Modality="MR", SeriesDescription="AX T2* GRE"), dict(sequence=None)),
    (dict(Modality="MR", SeriesDescription="series 5", RepetitionTime="4500", EchoTime="95"), dict(sequence="T2")),
    (dict(Modality="MR", SeriesDescription="series 6", RepetitionTime="550", EchoTime="10"), dict(sequence="T1")),
    (dict(Modality="PT", BodyPartExamined="HEADNECK", PatientAge="006M", PatientSex="M", SliceThickness="3.27"),
     dict(modality="PET", region="head_neck", patient_age_years=0.5, patient_sex="M", slice_thickness_mm=3.27)),
    (dict(), dict(modality=None, sequence=None, region=None, contrast_phase=None, slice_thickness_mm=None,
                  patient_sex=None, patient_age_years=None)),
    (dict(Modality="SEG", PatientSex="O", BodyPartExamined="WHOLEBODY", PatientAge=""),
     dict(modality=None, patient_sex=None, region=None, patient_age_years=None)),
])
def test_from_dicom(attrs, expected):
    ctx = ImageContext.from_dicom(_dataset(**attrs))
    assert {k: getattr(ctx, k) for k in expected} == expected


def _raw(ds, tag, vr, value: bytes):
    """An element as read from a file, not yet validated (how odd values arrive from a PACS)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


def test_from_dicom_survives_odd_values():
    ds = _dataset(Modality="CT", PatientSex="", SeriesDescription="")
    _raw(ds, 0x00180050, "DS", b"abc ")                        # SliceThickness
    _raw(ds, 0x00101010, "AS", b"forty ")                      # PatientAge
    ctx = ImageContext.from_dicom(ds)
    assert (ctx.modality, ctx.patient_age_years, ctx.slice_thickness_mm, ctx.patient_sex) == ("CT", None, None, None)
    aged = _raw(_dataset(), 0x00101010, "AS", b"45")
    assert ImageContext.from_dicom(aged).patient_age_years == 45.0
    assert ImageContext.from_dicom(_raw(_dataset(), 0x00101010, "AS", b"130Y")).patient_age_years == 130.0
    assert ImageContext.from_dicom(_raw(_dataset(), 0x00101010, "AS", b"200Y")).patient_age_years is None

    class Broken:                                     # an element that raises when read
        Modality = "MR"

        @property
        def SliceThickness(self):
            raise ValueError("corrupt element")

    assert ImageContext.from_dicom(Broken(), {"region": "abdomen"}) == ImageContext("MR", predicted_context={
        "region": "abdomen"})


# ---------------------------------------------------------------------------------------------- guard rails

GOOD = "The liver lies under the right hemidiaphragm and shows low T2 signal, about 2.5 times approx. that of fat."


@pytest.mark.parametrize("raw,target,expected", [
    (GOOD + " The spleen is on the left.", "liver", GOOD),
    ("Instruction: " + GOOD + "\nMore text.", "liver", GOOD),
    ("<think>liver or spleen?</think>\n- **" + GOOD + "**", "liver", GOOD),
    ('"The left kidney shows corticomedullary enhancement in the arterial phase"', "left kidney",
     "The left kidney shows corticomedullary enhancement in the arterial phase"),
])
def test_parse_accepts_a_good_first_sentence(raw, target, expected):
    assert parse_instruction(raw, target) == expected


@pytest.mark.parametrize("raw,target,reason", [
    ("The liver and the spleen enhance homogeneously.", "liver", "names another target: 'spleen'"),
    ("", "liver", "empty"),
    ("   \n  ", "liver", "empty"),
    (None, "liver", "no text"),
    ("The liver " + "is large and smooth " * 20 + ".", "liver", "at most 256"),
    ("The liver enhances\x07 homogeneously.", "liver", "non-printable"),
    ("It enhances homogeneously in this phase.", "liver", "does not name the target"),
    ("The left kidney and the right kidney enhance.", "left kidney", "names another target"),
    ("The left kidney lies beside the right psoas muscle.", "left kidney", "left side"),
    ("liver liver liver liver liver", "liver", "repetitive"),
    ("Liver 12 34 56 78 90 11 12 13 14 15 16.", "liver", "not prose"),
    ("The liver is", "liver", "too short"),
    ("The liver lies in the right upper quadrant and shows", "liver", "cut off"),
])
def test_parse_rejects_bad_answers(raw, target, reason):
    with pytest.raises(InstructionRejected, match=reason):
        parse_instruction(raw, target, truncated=reason == "cut off")


def test_instruction_validates_itself():
    with pytest.raises(ValueError, match="backend"):
        Instruction("liver", "The liver.", "gpt")
    with pytest.raises(ValueError, match="empty"):
        Instruction("liver", " ", "http")


# ---------------------------------------------------------------------------------------------- transformers

SENTENCES = ["the liver lies in the right upper quadrant and shows low signal .",
             "the spleen shows high signal on this image .", "segment the pancreas , a lobulated gland .",
             "the aorta enhances in the arterial phase .", "a metastatic lymph node shows uptake ."]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 1-layer GPT-2 with random weights and a word-level tokenizer trained here: what save_pretrained writes."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_lm")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(fast), n_positions=512,
                     bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_random_lm_output_falls_back_to_the_knowledge_base(tiny_lm, caplog):
    gen = TransformersGenerator(tiny_lm, max_new_tokens=16)
    ctx = ImageContext("MR", "T2", "abdomen")
    with caplog.at_level(logging.WARNING, logger="duplus.instructions"):
        out = gen.generate("liver", ctx) + gen.generate("hepar", ctx, n=2, seed=5)
    for ins in out:
        assert ins.target == "liver" and ins.backend == "knowledge_base"
        assert ins.fallback_reason.startswith("transformers: ") and "signal" in ins.text
    assert out[0] == gen.generate("liver", ctx)[0]                    # cached; greedy decoding is deterministic
    assert sum("fell back" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 3
    prompt = gen.prompt_text("liver", ctx)
    assert "T2-weighted MRI" in prompt and "Analyse the image and describe the liver" in prompt


def test_lm_answer_that_passes_the_guard_rails_is_used(tiny_lm, monkeypatch):
    gen = TransformersGenerator(tiny_lm, max_new_tokens=8)
    monkeypatch.setattr(gen, "_complete", lambda prompt, n, seed: [(GOOD + " Second sentence.", False)] * n)
    out = gen.generate("liver", ImageContext("MR", "T2"), n=2)
    assert [(i.text, i.backend, i.fallback_reason) for i in out] == [(GOOD, "transformers", None)] * 2


def test_transformers_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no language model folder"):
        TransformersGenerator(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="not hold a causal language model"):
        TransformersGenerator(tmp_path)


# ---------------------------------------------------------------------------------------------- HTTP


class _FakeChatServer(BaseHTTPRequestHandler):
    """/v1/chat/completions whose behaviour is chosen by the request's model field."""

    received: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        mode = body["model"]
        content = {"good": GOOD + " And more.", "wrong-target": "The spleen shows high T2 signal.",
                   "truncated": "The liver lies in the right"}.get(mode, GOOD)
        reply = {"choices": [{"message": {"role": "assistant", "content": content},
                              "finish_reason": "length" if mode == "truncated" else "stop"}]}
        if mode == "http-500":
            self.send_error(500, "model crashed")
            return
        if mode == "slow":
            time.sleep(1.0)
        payload = {"malformed": b"{not json", "empty": json.dumps({"choices": []}).encode()}.get(
            mode, json.dumps(reply).encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except OSError:          # the client gave up (timeout)
            pass


@pytest.fixture(scope="module")
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def received(chat_server, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    _FakeChatServer.received.clear()
    return _FakeChatServer.received


def test_http_good_answer_and_the_request_it_sent(chat_server, received, monkeypatch):
    monkeypatch.setenv("DUPLUS_TEST_LLM_KEY", "sk-test-123")
    gen = HttpGenerator(chat_server + "/v1/", model="good", timeout_s=5, api_key_env="DUPLUS_TEST_LLM_KEY")
    ctx = ImageContext("MR", "T2", "abdomen")
    (ins,) = gen.generate("liver", ctx, seed=3)
    assert (ins.text, ins.backend, ins.fallback_reason) == (GOOD, "http", None)
    (req,) = received
    body = req["body"]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test-123"
    assert body["model"] == "good" and [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "T2-weighted MRI" in body["messages"][1]["content"] and "liver" in body["messages"][1]["content"]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (48, 0.0, 3)
    gen.generate("liver", ctx, seed=3)
    assert len(received) == 1                                  # served from the cache
    HttpGenerator(chat_server, model="good").generate("liver", ctx)
    assert received[-1]["auth"] is None
    (short,) = HttpGenerator(chat_server, model="good", count_tokens=lambda x: len(x.split()), max_tokens=8
                             ).generate("liver", ctx)                   # a token limit the answer does not fit
    assert short.backend == "knowledge_base" and "at most 8" in short.fallback_reason
    assert short.text == "Segment the liver on this image."


@pytest.mark.parametrize("mode,reason", [
    ("malformed", "malformed JSON"), ("empty", "no choices"), ("wrong-target", "names another target: 'spleen'"),
    ("truncated", "cut off"), ("http-500", "HTTP 500"), ("slow", "timed out after 0.5 s"),
])
def test_http_failures_fall_back_with_a_reason(chat_server, received, caplog, mode, reason):
    gen = HttpGenerator(chat_server, model=mode, timeout_s=0.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="duplus.instructions"):
        out = gen.generate("liver", ImageContext("PET"), n=2)
    assert time.monotonic() - start < 0.9
    for ins in out:
        assert ins.backend == "knowledge_base" and "uptake" in ins.text
        assert ins.fallback_reason.startswith("http: ") and reason in ins.fallback_reason
    transport = mode in ("http-500", "slow")
    assert len(received) == (1 if transport else 2)             # no further requests to a failing endpoint
    assert any(reason in r.getMessage() for r in caplog.records)
    gen.generate("liver", ImageContext("PET"), n=2)
    assert len(received) == (2 if transport else 4)             # fallbacks are not cached


def test_http_connection_refused(received):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (ins,) = HttpGenerator(f"http://127.0.0.1:{port}", model="m", timeout_s=0.5).generate("aorta", ImageContext("CT"))
    assert ins.backend == "knowledge_base" and "connection failed" in ins.fallback_reason


# ---------------------------------------------------------------------------------------------- configuration and command


def test_generator_config(tmp_path, tiny_lm):
    path = tmp_path / "gen.yaml"
    path.write_text("backend: http\nbase_url: http://127.0.0.1:9\nmodel: m\napi_key_env: MY_KEY\ntimeout_s: 2\n")
    cfg = GeneratorConfig.from_yaml(path)
    gen = make_generator(cfg)
    assert isinstance(gen, HttpGenerator) and gen.url == "http://127.0.0.1:9/v1/chat/completions"
    assert gen.api_key_env == "MY_KEY" and gen.timeout_s == 2.0
    assert isinstance(make_generator(GeneratorConfig()), KnowledgeBaseGenerator)
    assert isinstance(make_generator(GeneratorConfig.from_yaml(path, backend="transformers", path=str(tiny_lm))),
                      TransformersGenerator)
    path.write_text("backend: http\napi_key: sk-secret\n")
    with pytest.raises(ValueError, match="unknown configuration keys"):
        GeneratorConfig.from_yaml(path)
    for kwargs, field in [({"backend": "openai"}, "backend"), ({"backend": "http", "model": "m"}, "base_url"),
                          ({"backend": "transformers"}, "path"), ({"api_key_env": "sk-abc-123"}, "api_key_env"),
                          ({"timeout_s": 0}, "timeout_s")]:
        with pytest.raises(ValueError, match=field):
            GeneratorConfig(**kwargs)


def test_command_line(capsys):
    assert main(["--target", "liver", "--modality", "MR", "--sequence", "T2", "--region", "abdomen", "--n", "5",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 5 and {i["target"] for i in out} == {"liver"} and all("T2" in i["text"] for i in out)
    assert main(["--target", "GTVp", "--modality", "PET"]) == 0
    assert "uptake" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--base-url" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--target", "gallbladder"])
    assert e.value.code == 2 and "gallbladder" in capsys.readouterr().err


def test_the_module_is_import_light():
    import subprocess
    import sys

    code = "import sys, duplus.instructions; print(sorted({'torch', 'transformers', 'yaml'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    assert canonical_target("hepar") == "liver"


# ---- serving: the context of one request ------------------------------------------------------------------------

def test_request_context_from_t1_affine_and_header_fields():
    from duplus.instructions import request_context

    aff = np.diag([0.8, 0.8, 4.0, 1.0])
    ctx = request_context("MR", "T2-weighted MRI of the abdomen", aff)
    assert (ctx.modality, ctx.sequence, ctx.region, ctx.slice_thickness_mm) == ("MR", "T2", "abdomen", 4.0)
    assert request_context("MR", "T1w MRI of the upper abdomen").sequence == "T1"
    assert request_context("MR", "MRI of the abdomen").sequence is None            # the T1 names no weighting
    assert request_context("CT", "CT of the head and neck").region == "head_neck"
    assert request_context("CT", "CT scan").region is None
    # the header's fields win over the words and the affine; the JSON a DICOM node sends is the same mapping
    header = {"sequence": "T1", "slice_thickness_mm": 2.5, "patient_sex": "F", "patient_age_years": 61}
    ctx = request_context("MR", "T2-weighted MRI of the abdomen", aff, json.dumps(header))
    assert (ctx.sequence, ctx.slice_thickness_mm, ctx.patient_sex, ctx.patient_age_years) == ("T1", 2.5, "F", 61.0)
    assert ctx == request_context("MR", "T2-weighted MRI of the abdomen", aff, header)
    assert ImageContext(**ctx.to_dict()) == ctx                                    # to_dict round-trips
    pred = ImageContext("CT", predicted_context={"region": "abdomen", "probability": 0.9})
    assert ImageContext(**pred.to_dict()) == pred


@pytest.mark.parametrize("context, words", [
    ("{not json", "CONTEXT is not valid JSON"),
    ("[1, 2]", "CONTEXT must be a JSON object"),
    ('{"modality": "CT"}', "unknown fields ['modality']"),
    ('{"colour": "blue"}', "unknown fields ['colour']"),
    ('{"patient_age_years": 300}', "patient_age_years must be a number in [0, 130]"),
    ('{"sequence": "T1"}', "sequence 'T1' applies to MR only"),
    ('{"contrast_phase": "late"}', "contrast_phase must be one of"),
    ("x" * 5000, "at most 2048"),
])
def test_request_context_refuses_a_malformed_context_naming_it(context, words):
    from duplus.contract import InvalidRequest
    from duplus.instructions import request_context

    with pytest.raises(InvalidRequest) as err:
        request_context("CT", "CT of the abdomen", None, context)
    assert words in str(err.value)


def test_instruction_mode():
    from duplus.contract import InvalidRequest
    from duplus.instructions import instruction_mode

    assert instruction_mode(None) == instruction_mode("") == instruction_mode(" names ") == "names"
    assert instruction_mode("AUTO") == "auto"
    with pytest.raises(InvalidRequest, match="INSTRUCTIONS must be one of"):
        instruction_mode("sometimes")
