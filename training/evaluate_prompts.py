"""Free-text target prompts on held-out phantoms: is every accepted prompt as good as its canonical name?

    python -m training.evaluate_prompts --checkpoint checkpoints/duplus_demo.pt \\
        --prompts training/heldout/target_paraphrases_2026-12-03.json --cases 3 --seed 22001 --json

For each region of the prompt set, ``--cases`` fresh CT phantoms (case seeds the checkpoint never saw) are
segmented once with the canonical target names and once with every prompt that the stack accepts, all in
one sliding-window pass per case (the backbone is shared; each prompt has its own head). Each prompt is
scored against the phantom's label of the target it was *expected* to name, so a prompt that resolves to the
wrong target counts as a silent failure, not as a good match. Reported per prompt: accepted (resolved to
which target, with which similarity) or refused (the message), mean Dice over the cases, the canonical
name's mean Dice, and the difference. Each channel is thresholded on its own at 0.5 (a single-target
request), with the largest connected component kept for single-structure targets, canonical and paraphrase
alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.evaluate import case_seed, check_held_out

log = logging.getLogger("evaluate_prompts")


def _binary(prob: np.ndarray, target: str) -> np.ndarray:
    from duplus.preprocessing import keep_largest_components

    mask = (prob > 0.5).astype(np.uint8)
    return keep_largest_components(mask, [target]) == 1


def evaluate_prompts(predictor, ckpt: dict, prompt_set: dict, cases: int, seed: int, *, progress: bool = True) -> dict:
    import torch

    from duplus.inference import UnknownPromptError
    from duplus.metrics import dice
    from duplus.preprocessing import to_model_space
    from duplus.synth.phantoms import generate_phantom
    from duplus.vocabulary import REGION_TARGETS

    check_held_out(ckpt, cases, seed)
    rows = []
    for region, t1 in prompt_set["context"].items():
        prompts = [p for p in prompt_set["prompts"] if p["region"] == region]
        if not prompts:
            continue
        accepted = []
        for p in prompts:
            row = {**p, "region": region, "t1": t1}
            try:
                resolved, sims = predictor.resolve_targets([p["text"]])
                row.update(outcome="accepted", resolved=resolved[0], similarity=round(sims[0], 4))
                accepted.append(row)
            except (UnknownPromptError, ValueError) as exc:
                row.update(outcome="refused", reason=str(exc))
            rows.append(row)
        canon = list(REGION_TARGETS[region])
        texts = canon + [r["text"] for r in accepted]
        dices: dict[str, list[float]] = {t: [] for t in texts}
        with torch.no_grad():
            cond = predictor.condition(t1, texts)
            for i in tqdm(range(cases), desc=f"{region} cases", disable=not progress):
                ph = generate_phantom(region, "CT", case_seed(seed, i))
                x, lab = to_model_space(ph.image, ph.affine, "CT", predictor.cfg.spacing, label=ph.label)
                truth = lab[0].numpy().astype(np.uint8)
                probs = predictor.predict_preprocessed(x, "CT", cond).numpy()
                for k, text in enumerate(texts):
                    expected = text if k < len(canon) else accepted[k - len(canon)]["expected"]
                    if expected is None:                      # accepted although it names no target: no truth
                        continue
                    shown = canon[k] if k < len(canon) else accepted[k - len(canon)]["resolved"]
                    pred = _binary(probs[k], shown)
                    dices[text].append(dice(pred, truth == ph.label_names.index(expected) + 1))
        canonical = {t: float(np.mean(dices[t])) for t in canon}
        for r in accepted:
            if r["expected"] is not None:
                r["dice"] = round(float(np.mean(dices[r["text"]])), 4)
                r["canonical_dice"] = round(canonical[r["expected"]], 4)
                r["delta"] = round(r["dice"] - r["canonical_dice"], 4)
    ok = [r for r in rows if r["outcome"] == "accepted" and r["expected"] is not None and r["resolved"] == r["expected"]]
    wrong = [r for r in rows if r["outcome"] == "accepted" and r["resolved"] != r["expected"]]
    summary = {
        "prompts": len(rows),
        "accepted_right_target": len(ok),
        "accepted_wrong_target_or_not_a_target": len(wrong),
        "refused_rightly": sum(r["outcome"] == "refused" and r["expected"] is None for r in rows),
        "refused_but_nameable": sum(r["outcome"] == "refused" and r["expected"] is not None for r in rows),
        "worst_delta_accepted": min((r["delta"] for r in rows if "delta" in r and r["outcome"] == "accepted"),
                                    default=None),
        "accepted_more_than_0.05_below_canonical": sum(r.get("delta", 0) < -0.05 for r in rows
                                                       if r["outcome"] == "accepted"),
    }
    return {"cases": cases, "seed": seed, "summary": summary, "rows": rows}


def markdown(report: dict) -> str:
    lines = ["| prompt | kind | expected | outcome | Dice | canonical | Δ |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["outcome"] == "accepted":
            outcome = f"→ {r['resolved']} ({r['similarity']:.2f})"
        else:
            outcome = "refused: " + r["reason"].replace("|", "/")[:90]
        d = {k: f"{r[k]:.3f}" if k in r else "–" for k in ("dice", "canonical_dice", "delta")}
        lines.append(f"| {r['text']} | {r['kind']} | {r['expected'] or '(refuse)'} | {outcome} | {d['dice']} | "
                     f"{d['canonical_dice']} | {d['delta']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_prompts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/duplus_demo.pt")
    ap.add_argument("--prompts", default="training/heldout/target_paraphrases_2026-12-03.json",
                    help="the held-out prompt set (JSON: context per region, prompts with their expected target)")
    ap.add_argument("--cases", type=int, default=3, help="held-out phantoms per region")
    ap.add_argument("--seed", type=int, default=22001, help="case seeds derive from it (never a training seed)")
    ap.add_argument("--target-conditioning", choices=("canonical", "prompt"), default=None,
                    help="what conditions the head of an accepted prompt: the matched target's canonical name "
                         "(the default) or the prompt's own words (the behaviour before issue 22)")
    ap.add_argument("--json", action="store_true", help="print the whole report as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help="write the per-prompt table here")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from duplus.checkpoint import load_checkpoint
    from duplus.inference import Predictor

    ckpt = load_checkpoint(args.checkpoint)
    prompt_set = json.loads(Path(args.prompts).read_text())
    kwargs = {"target_conditioning": args.target_conditioning} if args.target_conditioning else {}
    report = evaluate_prompts(Predictor.from_checkpoint(args.checkpoint, **kwargs), ckpt, prompt_set, args.cases,
                              args.seed)
    report["target_conditioning"] = args.target_conditioning or "the predictor's default"
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(report) + "\n")
    print(json.dumps(report if args.json else report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
