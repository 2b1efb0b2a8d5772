"""Biomed-DPT on a CLIP checkpoint in Hugging Face format (duplus.context.hf_clip), with a tiny randomly
initialised transformers.CLIPModel (no CLIP weights can be installed here) and the stack's packaged WordPiece
tokenizer: the towers equal the library's own features, the template prompt equals its text, and the method's
text context and deep visual prompts train through the frozen towers from a checkpoint folder on disk."""

import numpy as np
import pytest
import torch

from duplus.context.classes import CONTEXT_KEYS, classes_of
from duplus.context.hf_clip import HFClipImageTower, HFClipTextTower, load_hf_clip
from duplus.context.model import PromptLearner, VisualPrompts


@pytest.fixture(scope="module")
def tiny_clip(text_encoder):
    from transformers import CLIPConfig, CLIPModel

    tok = text_encoder.tokenizer
    cfg = CLIPConfig(
        text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "bos_token_id": tok.cls_token_id,
                     "eos_token_id": tok.sep_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 3, "num_attention_heads": 2},
        projection_dim=24)
    torch.manual_seed(0)
    return CLIPModel(cfg).eval(), tok


def _pattern_views(n_per_class: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views [N, 3, 64, 64] in [0, 1]: class k is a bright square at its own place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    views, labels = [], []
    for k in range(classes):
        for _ in range(n_per_class):
            v = torch.rand(3, 64, 64, generator=g) * 0.2
            r, c = divmod(k, 4)
            v[:, 8 + 24 * r:32 + 24 * r, 4 + 15 * c:18 + 15 * c] += 0.7
            views.append(v.clamp(0, 1))
            labels.append(k)
    return torch.stack(views), torch.tensor(labels)


def test_text_tower_gives_clips_own_text_features(tiny_clip):
    model, tok = tiny_clip
    tower = HFClipTextTower(model, tok)
    texts = ["CT of the abdomen.", "a T2-weighted MRI of the head and neck, axial"]
    ids, mask = tower.tokenize(texts)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
                                            dim=-1)
    torch.testing.assert_close(tower.encode_text(texts), ref, atol=1e-6, rtol=1e-5)
    assert tower.dim == 24 and not any(p.requires_grad for p in tower.parameters())


def test_image_tower_gives_clips_own_image_features(tiny_clip):
    model, _ = tiny_clip
    tower = HFClipImageTower(model)
    views, _ = _pattern_views(2, 2, 0)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.get_image_features(pixel_values=tower.pixels(views)).pooler_output,
                                            dim=-1)
        torch.testing.assert_close(tower(views), ref, atol=1e-6, rtol=1e-5)
        assert tower.pixels(views).shape == (4, 3, 32, 32) and (tower.depth, tower.width) == (3, 32)
        # zero-vector visual prompts are tokens the CLS attends to: they change the features
        prompts = VisualPrompts(tower.depth, 4, tower.width, 0.0)
        assert (tower(views, prompts) - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match="do not fit"):
        tower(views, VisualPrompts(2, 4, tower.width, 0.0))


def test_template_context_reads_as_the_template(tiny_clip):
    model, tok = tiny_clip
    tower = HFClipTextTower(model, tok)
    names = [c.name for c in classes_of(CONTEXT_KEYS[:3])]
    learner = PromptLearner(tower, names, n_ctx=4, init="a medical image of")
    with torch.no_grad():
        torch.testing.assert_close(learner(), tower.encode_text([f"a medical image of {n}." for n in names]),
                                   atol=1e-6, rtol=1e-5)


def test_biomed_dpt_trains_prompts_on_a_clip_folder_from_disk(tiny_clip, tmp_path):
    from training.train_context import tune_hf_clip

    model, tok = tiny_clip
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    image, _, _ = load_hf_clip(folder)
    frozen = {k: v.clone() for k, v in image.state_dict().items()}
    pool = dict(zip(("views", "labels"), _pattern_views(4, len(CONTEXT_KEYS), 1)))
    val = dict(zip(("views", "labels"), _pattern_views(2, len(CONTEXT_KEYS), 2)))
    record = tune_hf_clip(folder, tmp_path / "prompts.pt", steps=60, pool=pool, val=val, progress=False)
    saved = torch.load(tmp_path / "prompts.pt", weights_only=False)
    assert saved["kind"] == "context_prompts_hf_clip" and saved["keys"] == list(CONTEXT_KEYS)
    assert saved["text_features"].shape == (len(CONTEXT_KEYS), 24)
    losses = record["losses"]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    # on its own training views the tuned prompts fit better than the template (a random backbone cannot be
    # expected to generalise to the validation views; the record carries their accuracy)
    from training.train_context import predict, zero_shot_texts

    image_t, text_t, scale = load_hf_clip(folder)
    names = [c.name for c in classes_of(CONTEXT_KEYS)]
    visual = VisualPrompts(image_t.depth, 4, image_t.width, 0.0)
    visual.load_state_dict(saved["visual_prompts"])
    visual.eval()

    def nll(text, prompts):
        probs = predict(image_t, text, pool["views"], prompts, scale)
        return float(-torch.log(probs[torch.arange(len(probs)), pool["labels"]]).mean())

    before = nll(text_t.encode_text(zero_shot_texts(names, "a medical image of")), None)
    after = nll(saved["text_features"], visual)
    print(f"training-view NLL: template {before:.3f}, tuned {after:.3f}; validation accuracy {record['val_accuracy']}")
    assert after < before - 0.1
    assert set(record["val_accuracy"]) == {"zero_shot", "dpt"}
    assert saved["visual_prompts"]["tokens"].abs().max() > 0          # the deep prompts moved from zero
    for k, v in image.state_dict().items():                            # the towers did not
        torch.testing.assert_close(v, frozen[k])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_clip(tmp_path)
