"""DuPLUS network: shapes as tables, ill inputs, unit composition, dynamic head."""

import pytest
import torch

from duplus.models.duplus import DuPLUS, DuPLUSConfig, apply_dynamic_head
from duplus.models.fastpaths import pytorch_kernels

SMALL = dict(channels=(4, 8, 16), patch_size=(16, 16, 16), film_hidden=32, controller_hidden=32, head_channels=4, head_levels=2)

SHAPE_CASES = [
    # (config overrides, batch, modalities, K, spatial)
    ({}, 1, [0], 1, (16, 16, 16)),
    ({}, 2, [0, 2], 3, (32, 16, 16)),
    ({"head_layers": 2}, 3, [1, 1, 1], 9, (16, 32, 48)),
    ({"channels": (4, 8, 16, 32)}, 1, [2], 2, (32, 32, 16)),
]


@pytest.mark.parametrize("overrides,b,mods,k,spatial", SHAPE_CASES)
def test_output_shape(overrides, b, mods, k, spatial):
    cfg = DuPLUSConfig(**{**SMALL, **overrides, "patch_size": (16, 16, 16) if "channels" not in overrides
                          else (32, 32, 32)})
    model = DuPLUS(cfg).eval()
    x = torch.randn(b, 1, *spatial)
    mod = torch.tensor(mods)
    t1, t2 = torch.randn(b, cfg.text_dim), torch.randn(k, cfg.text_dim)
    model.check_inputs(x, mod, t1, t2)
    with torch.no_grad():
        y = model(x, mod, t1, t2)
    assert y.shape == (b, k, *spatial)
    assert torch.isfinite(y).all()


CONFIG_ILL = [
    ({"channels": (8,)}, "channels"),
    ({"channels": (8, -1)}, "channels"),
    ({"modalities": ("CT", "CT")}, "modalities"),
    ({"patch_size": (96, 96, 60)}, "patch_size"),
    ({"head_layers": 0}, "head_layers"),
    ({"spacing": (1.5, 0, 1.5)}, "spacing"),
    ({"norm": "layer"}, "norm"),
]


@pytest.mark.parametrize("overrides,field", CONFIG_ILL)
def test_config_rejects_bad_hyperparameters(overrides, field):
    with pytest.raises(ValueError, match=field):
        DuPLUSConfig(**overrides)


INPUT_ILL = [
    ("wrong channels", lambda: (torch.randn(1, 2, 16, 16, 16), torch.tensor([0])), "one channel"),
    ("4-D image", lambda: (torch.randn(1, 16, 16, 16), torch.tensor([0])), "shape"),
    ("integer image", lambda: (torch.zeros(1, 1, 16, 16, 16, dtype=torch.int32), torch.tensor([0])), "floating"),
    ("odd size", lambda: (torch.randn(1, 1, 16, 16, 18), torch.tensor([0])), "multiple"),
    ("modality out of range", lambda: (torch.randn(1, 1, 16, 16, 16), torch.tensor([3])), "out of range"),
    ("modality float", lambda: (torch.randn(1, 1, 16, 16, 16), torch.tensor([0.0])), "int64"),
]


@pytest.mark.parametrize("name,make,message", INPUT_ILL, ids=[c[0] for c in INPUT_ILL])
def test_check_inputs_rejects(name, make, message):
    model = DuPLUS(DuPLUSConfig(**SMALL))
    x, mod = make()
    with pytest.raises(ValueError, match=message):
        model.check_inputs(x, mod, torch.randn(x.shape[0], 384), torch.randn(2, 384))


def test_unknown_modality_name():
    with pytest.raises(ValueError, match="unknown modality 'US'"):
        DuPLUS(DuPLUSConfig(**SMALL)).modality_index(["CT", "US"])


def test_empty_target_list_rejected():
    model = DuPLUS(DuPLUSConfig(**SMALL))
    with pytest.raises(ValueError, match="K >= 1"):
        model.check_inputs(torch.randn(1, 1, 16, 16, 16), torch.tensor([0]), torch.randn(1, 384),
                           torch.randn(0, 384))


def test_units_compose_to_the_training_model(text_encoder):
    """text_encoder -> conditioning -> segmenter equals the training model, bit for bit."""
    torch.manual_seed(0)
    model = DuPLUS(DuPLUSConfig(**SMALL)).eval()
    for p in model.conditioning.film[-1].parameters():  # leave the identity FiLM init so FiLM matters
        torch.nn.init.normal_(p, std=0.1)
    t1 = ["CT of the abdomen", "T2-weighted MRI of the abdomen"]
    t2 = ["liver", "spleen", "left kidney"]
    x = torch.randn(2, 1, 16, 16, 16)
    mod = torch.tensor([0, 1])
    with torch.no_grad():
        full = model(x, mod, text_encoder.encode(t1), text_encoder.encode(t2))
        tok1, tok2 = text_encoder.tokenize(t1), text_encoder.tokenize(t2)
        e1 = text_encoder(tok1["input_ids"], tok1["attention_mask"])
        e2 = text_encoder(tok2["input_ids"], tok2["attention_mask"])
        film, head = model.conditioning(e1, e2)
        units = model.segmenter(x, mod, film, head)
    assert film.shape == (2, model.cfg.film_size) and head.shape == (3, model.cfg.head_params)
    assert torch.equal(full, units)


def test_backbone_runs_once_for_k_targets():
    """K targets share one backbone pass: each output channel equals a one-target run."""
    torch.manual_seed(1)
    model = DuPLUS(DuPLUSConfig(**SMALL)).eval()
    x, mod, t1 = torch.randn(1, 1, 16, 16, 16), torch.tensor([2]), torch.randn(1, 384)
    t2 = torch.randn(4, 384)
    calls = []
    hook = model.segmenter.encoder[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        together = model(x, mod, t1, t2)
        assert len(calls) == 1
        alone = torch.cat([model(x, mod, t1, t2[k:k + 1]) for k in range(4)], dim=1)
    hook.remove()
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_stem_selection_matches_per_modality_and_mixed_batches():
    """The export path (one-hot mask over all stems) equals the eager per-modality stem."""
    torch.manual_seed(2)
    model = DuPLUS(DuPLUSConfig(**SMALL)).eval()
    x = torch.randn(3, 1, 16, 16, 16)
    mod = torch.tensor([0, 1, 2])
    with torch.no_grad():
        mixed = model.segmenter.stems(x, mod)
        for i in range(3):
            single = model.segmenter.stems.stems[i](x[i:i + 1])
            # equal to float rounding: oneDNN may pick other kernels for a batch of 3 than of 1 (e.g. AVX2 CPUs)
            torch.testing.assert_close(mixed[i:i + 1], single, rtol=1e-5, atol=1e-6)
        # different modalities really give different features
        assert not torch.allclose(model.segmenter.stems(x[:1], torch.tensor([0])),
                                  model.segmenter.stems(x[:1], torch.tensor([1])))


def test_dynamic_head_equals_explicit_convolutions():
    """Eager (one baddbmm per layer on channels-first features), eager without gradients (chunks of voxels) and
    traced (the batched MatMul + Add that ONNX gets) all equal K explicit 1x1x1 convolution stacks, in values and
    (where they have them) in gradients."""
    cfg = DuPLUSConfig(**SMALL)
    torch.manual_seed(3)
    feats = torch.randn(2, cfg.head_in_channels, 4, 5, 6, requires_grad=True)
    params = torch.randn(3, cfg.head_params, requires_grad=True)
    out = apply_dynamic_head(feats, params, cfg.head_shapes)
    traced = torch.jit.trace(lambda f, p: apply_dynamic_head(f, p, cfg.head_shapes), (feats, params))
    assert "aten::baddbmm" not in str(traced.graph) and "aten::matmul" in str(traced.graph)
    graph_out = traced(feats, params)
    torch.testing.assert_close(out, graph_out, rtol=1e-6, atol=1e-6)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, (feats, params), upstream)
    graph_grads = torch.autograd.grad(graph_out, (feats, params), upstream)
    for got, want in zip(grads, graph_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = out.detach()
    ref = []
    for k in range(3):
        h, off = feats, 0
        for layer, (o, i) in enumerate(cfg.head_shapes):
            w = params[k, off:off + o * i].reshape(o, i, 1, 1, 1)
            off += o * i
            b = params[k, off:off + o]
            off += o
            h = torch.nn.functional.conv3d(h, w, b)
            if layer < len(cfg.head_shapes) - 1:
                h = torch.relu(h)
        ref.append(h.detach())
    torch.testing.assert_close(out, torch.cat(ref, 1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():   # inference: the layers run chunk by chunk (7 voxels here: 17 chunks, the last one short)
        chunked = apply_dynamic_head(feats, params, cfg.head_shapes, chunk=7)
        with pytorch_kernels(), torch.profiler.profile() as prof:   # the stock path: one baddbmm per layer
            stock = apply_dynamic_head(feats, params, cfg.head_shapes, chunk=7)
    assert [e.name for e in prof.events()].count("aten::baddbmm") == len(cfg.head_shapes)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, torch.cat(ref, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stock, torch.cat(ref, 1), rtol=1e-5, atol=1e-5)


def test_film_identity_at_initialisation():
    model = DuPLUS(DuPLUSConfig(**SMALL))
    film, _ = model.conditioning(torch.randn(2, 384), torch.randn(1, 384))
    assert torch.count_nonzero(film) == 0
