import pytest
import torch

from duplus.text_encoder import EmbeddingCache


def test_embeddings_are_normalised_and_semantic(text_encoder):
    e = text_encoder.encode(["liver", "the liver", "left kidney", "primary tumour"])
    assert e.shape == (4, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4), rtol=1e-5, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.8 > sim[0, 3]


def test_cache_encodes_each_prompt_once(text_encoder):
    cache = EmbeddingCache(text_encoder, max_entries=8)
    a = cache.encode(["liver", "Liver ", "spleen"])  # 'Liver ' normalises to 'liver'
    assert cache.misses == 2 and len(cache) == 2
    b = cache.encode(["spleen", "liver"])
    assert cache.misses == 2 and cache.hits == 2
    torch.testing.assert_close(a[2], b[0])
    torch.testing.assert_close(a[0], text_encoder.encode(["liver"])[0])


def test_cache_is_bounded(text_encoder):
    cache = EmbeddingCache(text_encoder, max_entries=3)
    cache.encode([f"organ {i}" for i in range(5)])
    assert len(cache) == 3


def test_tokens_contract(text_encoder):
    batch = text_encoder.tokenize(["CT of the abdomen", "liver"])
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == batch["attention_mask"].shape
    out = text_encoder(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out, text_encoder.encode(["CT of the abdomen", "liver"]))


def test_any_local_hugging_face_model_by_path(tmp_path, text_encoder):
    """A user's own encoder (e.g. PubMedBERT's text tower) loads from a folder; its width sets text_dim."""
    from transformers import BertConfig, BertModel

    from duplus.models.duplus import DuPLUS, DuPLUSConfig
    from duplus.text_encoder import TextEncoder

    folder = tmp_path / "my-bert"
    text_encoder.tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=text_encoder.tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=96)).save_pretrained(str(folder))
    enc = TextEncoder(str(folder))
    assert enc.dim == 48
    e = enc.encode(["CT of the abdomen", "liver", "spleen"])
    assert e.shape == (3, 48)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), rtol=1e-5, atol=1e-5)

    model = DuPLUS(DuPLUSConfig(text_dim=enc.dim, text_encoder=str(folder), channels=(8, 16, 32)))
    out = model(torch.randn(1, 1, 16, 16, 16), torch.tensor([0]), e[:1], e[1:])
    assert out.shape == (1, 2, 16, 16, 16)


@pytest.mark.parametrize("name,message", [
    ("someorg/not-a-cached-model", "not in the local Hugging Face cache"),
    ("./no/such/folder", "no such folder"),
    ("~/no/such/folder", "no such folder"),
])
def test_unknown_text_encoder_is_named(name, message):
    from duplus.text_encoder import TextEncoder

    with pytest.raises(ValueError, match=message):
        TextEncoder(name)
