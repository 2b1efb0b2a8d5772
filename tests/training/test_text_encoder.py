import torch

from training.text_encoder import EmbeddingCache


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
