"""The demo: segment sample phantom volumes with the shipped checkpoint and write demo_out/.

    python -m clients.demo --checkpoint checkpoints/duplus_demo.pt --out demo_out --serve model_repository

With ``--serve`` (what ``make demo`` does) it starts the embedded Triton server on the built
repository and segments every sample over gRPC through the ``segment_volume`` model; without it,
in-process PyTorch. For each sample (CT abdomen, MR abdomen, CT and PET head and neck; seeds never used in
training) it writes the input volume, the predicted label map (NIfTI, input geometry), a PNG
overlay with the ground truth outlined, and ``summary.json`` with per-case modality, prompts,
Dice per target and seconds. When the repository holds the prognosis models, a few held-out synthetic
head-and-neck patients (PET + EHR note) also go through ``prognose`` (risk, measured vs true tumour); when it
holds PEMMA, one held-out head-and-neck PET/CT pair goes through ``segment_petct`` as CT+PET, CT alone and PET alone
(labels on the CT's grid, the PET's for PET alone; Dice per target, for PET alone against the truth resampled onto
the PET's grid; an overlay of the CT+PET result).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from duplus.checkpoint import load_checkpoint, trained_contexts
from duplus.inference import Predictor
from duplus.metrics import dice
from duplus.visualize import overlay_png
from duplus.vocabulary import canonical_t1

log = logging.getLogger("demo")

# (name, region, modality, seed): held-out seeds (training used dataset seeds 101..103)
SAMPLES = (("ct_abdomen", "abdomen", "CT", 424242),
           ("mr_abdomen", "abdomen", "MR", 434343),
           ("ct_head_neck", "head_neck", "CT", 444444),
           ("pet_head_neck", "head_neck", "PET", 444444))


def run(checkpoint: str, out: Path, device: str = "cpu", samples=SAMPLES, serve: str | None = None) -> dict:
    if serve is None:
        predictor = Predictor.from_checkpoint(checkpoint, device=device)

        def segment(image, affine, modality, t1, targets):
            pred = predictor.predict_array(image, affine, modality, t1, targets)
            return pred.labels, pred.resolved, pred.stem

        return _run(checkpoint, out, segment, "in-process", device, samples)

    from clients.grpc_client import SegmentationClient
    from serving.serve import TritonServer

    with TritonServer(serve, checkpoint=checkpoint, log_file=out / "triton.log") as server:
        with SegmentationClient(server.grpc_url) as client:
            client.check_ready()

            def segment(image, affine, modality, t1, targets):
                res = client.segment_volume(image, affine, modality, t1, targets)
                return res.labels, res.resolved, res.stem

            extra = {"grpc_url": server.grpc_url, "repository": str(serve)}
            if "prognosis" in server.manifest:
                extra["prognosis"] = _prognose(client, server.manifest["prognosis"])
            if "pemma" in server.manifest:
                extra["petct"] = _segment_petct(client, out)
            return _run(checkpoint, out, segment, "triton", "triton:" + server.manifest["engine"], samples,
                        extra=extra)


#: held-out synthetic head-and-neck patients for the prognosis part of the demo (never a training seed)
PROGNOSIS_SEED, PROGNOSIS_PATIENTS = 9101, 4


def _prognose(client, manifest: dict) -> list[dict]:
    """Risk for a few held-out synthetic patients through Triton's prognose model (PET + EHR note)."""
    from duplus.synth.cohort import CohortSpec, generate_cohort, pet_volume

    rows = []
    for p in tqdm(generate_cohort(CohortSpec(PROGNOSIS_PATIENTS, PROGNOSIS_SEED)), desc="prognose", unit="patient"):
        ph = pet_volume(p)
        t0 = time.perf_counter()
        res = client.prognose(ph.image, ph.affine, manifest["modality"], manifest["t1"], p.note)
        rows.append({"patient": p.patient_id, "ehr": p.note, "risk": round(res.risk, 4),
                     "true_risk": p.clinical["true_risk"],
                     "tumour_ml": {"measured": round(float(np.exp(res.features["log_tumour_volume"]) - 0.1), 2),
                                   "true": p.clinical["tumour_volume_ml"]},
                     "suv_max": {"measured": round(res.features["suv_max"], 2), "true": p.clinical["suv_max"]},
                     "event": p.event, "months": p.time, "seconds": round(time.perf_counter() - t0, 2)})
        log.info("%s: risk %.3f (true log-hazard %.3f)", p.patient_id, res.risk, p.clinical["true_risk"])
    return rows


#: the PET/CT pair of the demo: centre E (the centre PEMMA was adapted on), a seed outside configs/pemma.yaml's sets
PETCT_CENTRE, PETCT_SEED = "E", 454545


def grid_dice(labels: np.ndarray, affine: np.ndarray, truth: np.ndarray, truth_affine: np.ndarray,
              names) -> dict[str, float]:
    """Dice per target (``names[k]`` for label k >= 1) of ``labels`` on the grid ``affine``, against ``truth`` on its
    own grid: where the grids differ (PET alone answers on the PET's grid, the truth lies on the CT's), the truth is
    resampled onto the labels' grid, nearest neighbour."""
    if labels.shape != truth.shape or not np.allclose(affine, truth_affine, atol=1e-6):
        import torch

        from duplus.preprocessing import to_input_grid

        truth = to_input_grid(torch.from_numpy(np.asarray(truth, np.float32)[None]), truth_affine, affine,
                              labels.shape, mode="nearest")[0].numpy().round().astype(np.uint8)
    return {t: round(dice(labels == k, truth == k), 4) for k, t in enumerate(names) if k}


def _segment_petct(client, out: Path) -> list[dict]:
    """One held-out PET/CT pair through Triton's segment_petct in each input mode (PEMMA)."""
    import nibabel as nib

    from duplus.synth.phantoms import generate_petct

    pair = generate_petct(PETCT_CENTRE, PETCT_SEED)
    case_dir = out / "petct_head_neck"
    case_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(pair.ct.image, pair.ct.affine), str(case_dir / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(pair.pet.image, pair.pet.affine), str(case_dir / "pet.nii.gz"))
    rows = []
    for mode, args in (("ct+pet", (pair.ct.image, pair.ct.affine, pair.pet.image, pair.pet.affine)),
                       ("ct", (pair.ct.image, pair.ct.affine, None, None)),
                       ("pet", (None, None, pair.pet.image, pair.pet.affine))):
        t0 = time.perf_counter()
        res = client.segment_petct(*args)
        seconds = time.perf_counter() - t0
        name = f"labels_{mode.replace('+', '_')}.nii.gz"
        grid = pair.ct if mode != "pet" else pair.pet
        nib.save(nib.Nifti1Image(res.labels, grid.affine), str(case_dir / name))
        scores = grid_dice(res.labels, grid.affine, pair.label, pair.ct.affine, res.label_names)
        rows.append({"mode": res.mode, "dice": scores, "seconds": round(seconds, 2), "shape": list(res.labels.shape),
                     "grid": "PET" if mode == "pet" else "CT",    # the PET's: scored against the truth resampled to it
                     "file": f"petct_head_neck/{name}"})
        log.info("PET/CT %s: %s in %.1f s", mode, scores, seconds)
        if mode == "ct+pet":
            overlay_png(pair.ct.image, res.labels, pair.ct.affine, case_dir / "overlay.png",
                        list(res.label_names[1:]), truth=pair.label, window=(-200.0, 300.0),
                        title=f"PEMMA CT+PET ({PETCT_CENTRE}-{PETCT_SEED}): {scores}")
    return rows


def _run(checkpoint: str, out: Path, segment, served_by: str, device: str, samples, extra=None) -> dict:
    import nibabel as nib

    from duplus.synth.phantoms import generate_phantom

    ckpt = load_checkpoint(checkpoint)
    contexts = trained_contexts(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    used = set(ckpt.get("training_seeds", []))
    cases = []
    for name, region, modality, seed in tqdm(samples, desc="demo", unit="volume"):
        if seed in used:
            raise ValueError(f"demo seed {seed} was used in training")
        ph = generate_phantom(region, modality, seed)
        targets = contexts.get((modality, region)) or list(ph.label_names)
        t1 = canonical_t1(modality, region, ph.sequence)
        t0 = time.perf_counter()
        labels, resolved, stem = segment(ph.image, ph.affine, modality, t1, targets)
        seconds = time.perf_counter() - t0
        case_dir = out / name
        case_dir.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(ph.image, ph.affine), str(case_dir / "image.nii.gz"))
        nib.save(nib.Nifti1Image(labels, ph.affine), str(case_dir / "mask.nii.gz"))
        truth = np.zeros_like(ph.label)
        scores = {}
        for k, target in enumerate(targets):
            gt = ph.label == ph.label_names.index(resolved[k]) + 1
            truth[gt] = k + 1
            scores[target] = round(dice(labels == k + 1, gt), 4)
        window = (-200.0, 300.0) if modality == "CT" else None
        overlay_png(ph.image, labels, ph.affine, case_dir / "overlay.png", targets, truth=truth, window=window,
                    title=f"{name}: T1 = '{t1}', Dice {np.mean(list(scores.values())):.3f}")
        cases.append({"case": name, "modality": modality, "region": region, "sequence": ph.sequence,
                      "t1": t1, "stem": stem, "targets": list(targets), "seed": seed, "shape": list(ph.image.shape),
                      "spacing_mm": np.round(np.linalg.norm(ph.affine[:3, :3], axis=0), 3).tolist(),
                      "dice": scores, "mean_dice": round(float(np.mean(list(scores.values()))), 4),
                      "seconds": round(seconds, 2),
                      "files": {k: f"{name}/{k}" for k in ("image.nii.gz", "mask.nii.gz", "overlay.png")}})
        log.info("%s: mean Dice %.3f in %.1f s", name, cases[-1]["mean_dice"], seconds)
    summary = {"checkpoint": str(checkpoint), "served_by": served_by, "device": device, **(extra or {}),
               "machine": platform.machine(), "python": platform.python_version(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": cases}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clients.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/duplus_demo.pt", help="DuPLUS checkpoint to run")
    ap.add_argument("--out", default="demo_out", help="output folder (created; files are overwritten)")
    ap.add_argument("--device", default="cpu", help="torch device for in-process inference (cpu or cuda)")
    ap.add_argument("--serve", metavar="REPOSITORY", default=None,
                    help="start Triton on this model repository (built by export/build_engines.py from the same "
                         "checkpoint) and segment over gRPC; without it: in-process PyTorch")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(args.checkpoint, Path(args.out), args.device, serve=args.serve)
    for c in summary["cases"]:
        print(f"{c['case']:15s} {c['modality']:4s} mean Dice {c['mean_dice']:.3f}  {c['seconds']:6.1f} s  "
              f"{json.dumps(c['dice'])}")
    for r in summary.get("prognosis", []):
        print(f"{r['patient']:15s} prognose: risk {r['risk']:+.3f} (true log-hazard {r['true_risk']:+.3f})  "
              f"tumour {r['tumour_ml']['measured']} ml (true {r['tumour_ml']['true']})  {r['seconds']:.1f} s")
    for r in summary.get("petct", []):
        print(f"petct_head_neck {r['mode']:6s} segment_petct: {json.dumps(r['dice'])} ({r['grid']} grid)"
              f"  {r['seconds']:.1f} s")
    print(f"wrote {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
