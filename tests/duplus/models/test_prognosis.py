"""The prognosis model's parts: Cox loss, C-index, radiomics, EHR validation, LoRA and its merge, the head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from duplus.models.prognosis import (
    EHREncoder,
    PrognosisConfig,
    PrognosisHead,
    PrognosisModel,
    c_index,
    cox_loss,
    radiomics,
    validate_ehr,
)


def _breslow_brute_force(risk, time, event):
    total, n_events = 0.0, 0
    for i in range(len(risk)):
        if event[i]:
            at_risk = [j for j in range(len(risk)) if time[j] >= time[i]]
            total += risk[i] - math.log(sum(math.exp(risk[j]) for j in at_risk))
            n_events += 1
    return -total / n_events


def test_cox_loss_matches_breslow_with_ties():
    rng = np.random.default_rng(0)
    risk = rng.normal(size=12)
    time = np.array([5, 3, 3, 8, 1, 5, 9, 2, 3, 7, 7, 4], float)   # ties at 3, 5, 7
    event = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    r = torch.tensor(risk, requires_grad=True)
    loss = cox_loss(r, torch.tensor(time), torch.tensor(event))
    assert float(loss) == pytest.approx(_breslow_brute_force(risk, time, event), rel=1e-9)
    loss.backward()
    assert torch.isfinite(r.grad).all()
    # shifting every risk by a constant leaves the partial likelihood unchanged
    assert float(cox_loss(r.detach() + 3.0, torch.tensor(time), torch.tensor(event))) == pytest.approx(float(loss))
    assert float(cox_loss(r.detach(), torch.tensor(time), torch.zeros(12))) == 0.0
    with pytest.raises(ValueError, match="1-D"):
        cox_loss(r.detach()[None], torch.tensor(time), torch.tensor(event))


def test_c_index_orientation_and_lifelines_agreement():
    from lifelines.utils import concordance_index

    t = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    e = np.array([1, 1, 1, 0, 1])
    assert c_index(t, -t, e) == 1.0          # higher risk, earlier event
    assert c_index(t, t, e) == 0.0
    r = np.array([0.3, 0.1, 0.4, -0.2, 0.0])
    assert c_index(t, r, e) == pytest.approx(concordance_index(t, -r, e))


def test_radiomics_on_known_lesions():
    shape = (40, 40, 40)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    probs = np.zeros((2,) + shape, np.float32)
    tumour = ((grid - 12) ** 2).sum(0) <= 6 ** 2
    probs[0][tumour] = 1.0
    for centre in ((28, 8, 30), (28, 30, 30)):                # two nodes of radius 5 voxels (1.7 ml)
        probs[1][((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= 25] = 1.0
    probs[1][2, 2, 2] = 1.0                                   # a one-voxel speck is not a node
    image = np.full(shape, 0.2, np.float32)                   # normalised PET: SUV = 5 x value
    image[tumour] = 2.0
    image[12, 12, 12] = 3.0                                   # SUV 15 at the centre
    spacing = (1.5, 1.5, 1.5)
    r = radiomics(probs, image, "PET", spacing)
    assert math.exp(r["log_tumour_volume"]) - 0.1 == pytest.approx(tumour.sum() * 1.5 ** 3 / 1000, rel=1e-5)
    assert r["suv_max"] == pytest.approx(15.0)
    assert 10.0 <= r["suv_mean"] <= 10.1
    assert r["node_count"] == 2.0
    empty = radiomics(np.zeros((2,) + shape, np.float32), image, "PET", spacing)
    assert empty["node_count"] == 0.0 and empty["suv_max"] == 0.0


def test_prognosis_config_and_ehr_validation():
    with pytest.raises(ValueError, match="lora_rank"):
        PrognosisConfig(lora_rank=0)
    with pytest.raises(ValueError, match="lora_targets"):
        PrognosisConfig(lora_targets=())
    assert validate_ehr("  63-year-old   man ") == "63-year-old man"
    with pytest.raises(ValueError, match="empty"):
        validate_ehr("   ")
    with pytest.raises(ValueError, match="UTF-8"):
        validate_ehr(b"\xff\xfe note")
    with pytest.raises(ValueError, match="characters"):
        validate_ehr("x" * 5000)


def test_lora_trainable_fraction_and_merge_equals_adapted():
    torch.manual_seed(0)
    model = PrognosisModel(PrognosisConfig(lora_rank=4), image_dim=77)
    counts = model.parameter_counts()
    assert 0 < counts["trainable_fraction"] < 0.02                # LoRA + head only: the encoder is frozen
    lora = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora and all(("query" in n or "value" in n) for n in lora)
    for n, p in model.ehr.model.named_parameters():               # make the adapters non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    notes = ["Age: 61; Sex: M; HPV/p16: p16-negative; Staging: T3 N2 M0.", "Never smoker, ECOG 0, cT1N1M0."]
    tok = model.ehr.tokenize(notes)
    with torch.no_grad():
        adapted = model.ehr(tok["input_ids"], tok["attention_mask"])
        merged = model.ehr.merged()(tok["input_ids"], tok["attention_mask"])
        base = EHREncoder(PrognosisConfig(lora_rank=4)).model.get_base_model()(**tok).last_hidden_state
    assert float((adapted - merged).abs().max()) < 1e-5
    assert adapted.shape == (2, 384)
    assert base.shape[0] == 2
    with pytest.raises(ValueError, match="tokens"):
        model.ehr.tokenize(["word " * 400])


def test_head_is_additive_and_standardises_images():
    head = PrognosisHead(5, 8, text_hidden=4, dropout=0.0).eval()
    x = torch.randn(20, 5) * 3 + 7
    head.set_image_statistics(x)
    emb = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    with torch.no_grad():
        head.image[1].weight.fill_(0.5)
        r = head(x, emb)
        r_img = head.image((x - head.image_mean) / head.image_std).reshape(-1)
        r_txt = head.text(head.read_out(emb)).reshape(-1)
    assert torch.allclose(r, r_img + r_txt, atol=1e-6)
    assert r.shape == (20,)
