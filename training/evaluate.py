"""Evaluate a DuPLUS checkpoint on freshly generated, held-out phantom volumes.

    python -m training.evaluate --checkpoint checkpoints/duplus_demo.pt --modality CT --cases 4 --seed 9001 --json

Each case is generated with a seed that the checkpoint never saw in training (the command
refuses seeds that were), run through the full inference path (orientation, resampling,
sliding window, inverse mapping) and scored on the input's own grid. ``--t1`` overrides the
context prompt (the DuPLUS prompt-mismatch experiment): the volume keeps the intensity
normalisation of ``--modality``, while the stem and FiLM follow the modality the prompt names.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from duplus.checkpoint import load_checkpoint, trained_contexts
from duplus.metrics import dice
from duplus.vocabulary import MODALITIES, canonical_t1

if TYPE_CHECKING:  # the model and MONAI load only when a predictor is built (main), not to refuse a request
    from duplus.inference import Predictor

log = logging.getLogger("evaluate")


def case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def check_held_out(ckpt: dict, cases: int, seed: int) -> None:
    """Refuse a ``seed`` whose case seeds were used to train the checkpoint (before any model is built)."""
    used = set(ckpt.get("training_seeds", []))
    for i in range(cases):
        s = case_seed(seed, i)
        if s in used:
            raise ValueError(f"seed {seed} gives case seed {s}, which was used for training; choose another --seed")


def evaluate(predictor: Predictor, ckpt: dict, modality: str, cases: int, seed: int, *, region: str | None = None,
             t1: str | None = None, targets: list[str] | None = None, progress: bool = True,
             predictions: list | None = None) -> dict:
    """Mean Dice per target over ``cases`` fresh phantoms; ``predictions``, when given, receives each case's
    ``Prediction`` (labels on the input grid) in order."""
    from duplus.synth.phantoms import generate_phantom

    contexts = trained_contexts(ckpt)
    regions = [r for (m, r) in contexts if m == modality]
    if region is not None:
        regions = [region]
    if not regions:
        raise ValueError(f"the checkpoint was not trained on modality {modality!r}; "
                         f"trained contexts: {sorted(contexts)}")
    check_held_out(ckpt, cases, seed)
    per_case, scores, t0 = [], {}, time.perf_counter()
    for i in tqdm(range(cases), desc=f"evaluate {modality}", disable=not progress):
        reg = regions[i % len(regions)]
        s = case_seed(seed, i)
        ph = generate_phantom(reg, modality, s)
        names = targets or contexts.get((modality, reg)) or list(ph.label_names)
        prompt = t1 or canonical_t1(modality, reg, ph.sequence)
        pred = predictor.predict_array(ph.image, ph.affine, modality, prompt, names)
        if predictions is not None:
            predictions.append(pred)
        case = {"case": i, "seed": s, "region": reg, "t1": prompt, "stem": pred.stem, "shape": list(ph.image.shape),
                "spacing_mm": np.round(np.linalg.norm(ph.affine[:3, :3], axis=0), 3).tolist(),
                "seconds": round(pred.seconds, 2), "dice": {}}
        for k, name in enumerate(names):
            if pred.resolved[k] not in ph.label_names:
                raise ValueError(f"target {name!r} does not exist in a {reg} phantom")
            truth = ph.label == ph.label_names.index(pred.resolved[k]) + 1
            d = dice(pred.labels == k + 1, truth)
            case["dice"][name] = round(d, 4)
            scores.setdefault(name, []).append(d)
        per_case.append(case)
    mean_per_target = {k: round(float(np.mean(v)), 4) for k, v in scores.items()}
    return {"modality": modality, "cases": cases, "seed": seed, "t1_override": t1,
            "mean_dice": round(float(np.mean(list(mean_per_target.values()))), 4), "dice": mean_per_target,
            "per_case": per_case, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="DuPLUS checkpoint (.pt) written by train_segmentation")
    ap.add_argument("--modality", required=True, choices=MODALITIES, help="modality of the generated phantoms")
    ap.add_argument("--cases", type=int, default=4, help="number of held-out phantom volumes (default 4)")
    ap.add_argument("--seed", type=int, default=9001, help="base seed of the held-out volumes; seeds used in "
                    "training are refused (default 9001)")
    ap.add_argument("--region", choices=("abdomen", "head_neck"), help="body region; default: every region the "
                    "checkpoint was trained on for this modality, alternating over cases")
    ap.add_argument("--t1", help="override the context (T1) prompt, e.g. 'T2-weighted MRI of the abdomen' on CT "
                    "volumes for the prompt-mismatch experiment (stem and FiLM follow the prompt, normalisation follows "
                    "--modality)")
    ap.add_argument("--targets", nargs="+", help="target (T2) prompts; default: the targets trained for the context")
    ap.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--no-largest-component", action="store_true",
                    help="skip the post-processing that keeps the largest connected component of single-structure "
                         "targets (liver, spleen, kidneys, aorta, pancreas, stomach), for ablation")
    ap.add_argument("--json", action="store_true", help="print one JSON object (default: a short table)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.cases < 1:
        ap.error("--cases must be >= 1")
    ckpt = load_checkpoint(args.checkpoint)
    try:
        check_held_out(ckpt, args.cases, args.seed)   # before the model, MONAI and the text encoder load
        from duplus.inference import Predictor

        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, overlap=args.overlap,
                                              largest_component=not args.no_largest_component)
        result = evaluate(predictor, ckpt, args.modality, args.cases, args.seed, region=args.region, t1=args.t1,
                          targets=args.targets, progress=not args.json)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.modality}: mean Dice {result['mean_dice']:.3f} over {args.cases} cases")
        for k, v in result["dice"].items():
            print(f"  {k:16s} {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
