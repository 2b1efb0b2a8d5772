"""Zeus's experiments on held-out phantoms: targets named, described by generated instructions, or described by
another target's instruction (shuffled), and the zero-shot cross-modal case.

    python -m training.evaluate_instructions --checkpoint checkpoints/duplus_demo.pt checkpoints/duplus_zeus.pt \\
        --cases 4 --seed 23001 --markdown docs/zeus.md.table

For each context (CT and MR of the abdomen, CT and PET of the head and neck), ``--cases`` fresh phantoms (case
seeds the checkpoint never saw) are segmented in one sliding-window pass with three heads per target: its
canonical name, an instruction written for it by the instruction generator from what is known of the image
(the context a served request with ``INSTRUCTIONS: auto`` gets, ``duplus.instructions.request_context``: modality,
MR weighting and region from the T1 words, slice thickness from the affine; the offline knowledge base by default,
generator seed = case index), and the instruction of
the next target in the list (shuffled: a wrong description that still goes to this target's head). Each head
is scored against the target's own label (threshold 0.5 per channel, the largest component for single
structures). In the MR abdomen, pancreas, aorta and stomach are zero-shot cross-modal: the demo checkpoint's MR
training set never labels them, its CT set does.

Instructions condition the heads directly (``Predictor.condition_texts``: the caller knows the target, no
matching). Several checkpoints are evaluated on the same cases and instructions, side by side: the demo checkpoint
(trained on names and a few short descriptions) is the baseline of one fine-tuned on instructions
(``configs/zeus.yaml``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from duplus.metrics import bootstrap_mean_interval
from training.evaluate import case_seed, check_held_out

log = logging.getLogger("evaluate_instructions")

#: (modality, region, T1 by MR sequence, zero-shot targets for this context)
CONTEXTS = (
    ("CT", "abdomen", {None: "CT of the abdomen"}, ()),
    ("MR", "abdomen", {"T1": "T1-weighted MRI of the abdomen", "T2": "T2-weighted MRI of the abdomen"},
     ("pancreas", "aorta", "stomach")),
    ("CT", "head_neck", {None: "CT of the head and neck"}, ()),
    ("PET", "head_neck", {None: "PET of the head and neck"}, ()),
)
CONDITIONS = ("name", "instruction", "shuffled")


def training_instructions(config: str | Path) -> set[str]:
    """Every instruction a training configuration's run conditioned on (``instructions.prob`` > 0): its pool,
    rebuilt from the configuration and its data sets' records, to count held-out instructions seen verbatim."""
    from types import SimpleNamespace

    from training.config import TrainConfig
    from training.train_segmentation import instruction_pool, prepare_datasets

    cfg = TrainConfig.from_yaml(config)
    if cfg.instructions.prob <= 0:
        return set()
    datasets = [(spec, [SimpleNamespace(record=r) for r in records]) for spec, records in prepare_datasets(cfg)]
    return {t for texts in instruction_pool(cfg, datasets, progress=False).values() for t in texts}


def evaluate_instructions(predictor, ckpt: dict, cases: int, seed: int, generator=None, *,
                          progress: bool = True, seen: set[str] | None = None,
                          contexts: tuple[tuple[str, str], ...] | None = None) -> dict:
    """``seen``: instructions used in training; the report counts the held-out instructions among them.
    ``contexts``: only these (modality, region) of ``CONTEXTS`` (default: all)."""
    import torch

    from duplus.instructions import KnowledgeBaseGenerator, request_context
    from duplus.metrics import dice
    from duplus.preprocessing import keep_largest_components, to_model_space
    from duplus.synth.phantoms import generate_phantom
    from duplus.vocabulary import REGION_TARGETS

    check_held_out(ckpt, cases, seed)
    generator = generator or KnowledgeBaseGenerator()
    rows, written = [], []
    for modality, region, t1s, zero_shot in CONTEXTS:
        if contexts is not None and (modality, region) not in contexts:
            continue
        targets = list(REGION_TARGETS[region])
        scores = {(t, c): [] for t in targets for c in CONDITIONS}
        examples = {}
        for i in tqdm(range(cases), desc=f"{modality} {region}", disable=not progress):
            ph = generate_phantom(region, modality, case_seed(seed, i))
            t1 = t1s.get(ph.sequence) or t1s[None]
            ctx = request_context(modality, t1, ph.affine)
            instr = [generator.generate(t, ctx, n=1, seed=i)[0].text for t in targets]
            shuffled = instr[1:] + instr[:1]
            written += instr
            examples.setdefault("instruction", dict(zip(targets, instr)))
            with torch.no_grad():
                cond = predictor.condition_texts(t1, targets + instr + shuffled, targets * 3)
                x, lab = to_model_space(ph.image, ph.affine, modality, predictor.cfg.spacing, label=ph.label)
                probs = predictor.predict_preprocessed(x, modality, cond).numpy()
            truth = lab[0].numpy().astype(np.uint8)
            for c, condition in enumerate(CONDITIONS):
                for k, t in enumerate(targets):
                    mask = keep_largest_components((probs[c * len(targets) + k] > 0.5).astype(np.uint8), [t]) == 1
                    scores[(t, condition)].append(dice(mask, truth == ph.label_names.index(t) + 1))
        for t in targets:
            row = {"modality": modality, "region": region, "target": t, "zero_shot": t in zero_shot,
                   "example_instruction": examples["instruction"][t]}
            for condition in CONDITIONS:
                v = scores[(t, condition)]
                row[condition] = round(float(np.mean(v)), 4)
                row[f"{condition}_ci95"] = [round(x, 4) for x in bootstrap_mean_interval(v)]
            rows.append(row)
    summary = {}
    for label, sel in (("trained", [r for r in rows if not r["zero_shot"]]),
                       ("zero-shot cross-modal (MR)", [r for r in rows if r["zero_shot"]])):
        if not sel:
            continue
        summary[label] = {c: round(float(np.mean([r[c] for r in sel])), 4) for c in CONDITIONS}
    overlap = {"instructions": len(written), "distinct": len(set(written)),
               "seen_in_training": None if seen is None else sum(t in seen for t in written)}
    return {"cases": cases, "seed": seed, "generator": type(generator).__name__, "summary": summary,
            "instructions": overlap, "rows": rows}


def markdown(reports: dict[str, dict]) -> str:
    """The per-target table and the summary, one group of columns per checkpoint (name -> report)."""
    names = list(reports)
    first = reports[names[0]]
    head = "| context | target | " + " | ".join(f"{c} ({n})" for n in names for c in CONDITIONS) + " |"
    lines = [head, "|---|---|" + "---|" * (len(names) * len(CONDITIONS))]
    for i, r in enumerate(first["rows"]):
        cells = []
        for n in names:
            row = reports[n]["rows"][i]
            cells += [f"{row[c]:.3f} [{row[c + '_ci95'][0]:.2f}, {row[c + '_ci95'][1]:.2f}]" for c in CONDITIONS]
        zs = " (zero-shot)" if r["zero_shot"] else ""
        lines.append(f"| {r['modality']} {r['region'].replace('_', ' ')} | {r['target']}{zs} | " + " | ".join(cells)
                     + " |")
    lines += ["", "| mean Dice | checkpoint | name | instruction | shuffled |", "|---|---|---|---|---|"]
    for label in first["summary"]:
        for n in names:
            s = reports[n]["summary"][label]
            lines.append(f"| {label} | {n} | {s['name']:.3f} | {s['instruction']:.3f} | {s['shuffled']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate_instructions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", default=["checkpoints/duplus_demo.pt"],
                    help="one or more checkpoints, evaluated on the same cases and instructions, side by side")
    ap.add_argument("--cases", type=int, default=4, help="held-out phantoms per context")
    ap.add_argument("--seed", type=int, default=23001, help="case seeds derive from it (never a training seed)")
    ap.add_argument("--generator-config", type=Path, default=None,
                    help="YAML of duplus.instructions.GeneratorConfig (default: the offline knowledge base)")
    ap.add_argument("--training-config", type=Path, action="append", default=[],
                    help="a training YAML with instructions (configs/zeus.yaml): count the held-out instructions "
                         "its run saw verbatim (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the whole reports as JSON (else the summaries)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from duplus.checkpoint import load_checkpoint
    from duplus.inference import Predictor
    from duplus.instructions import GeneratorConfig, make_generator

    ckpts = {Path(c).stem: load_checkpoint(c) for c in args.checkpoint}
    for ckpt in ckpts.values():     # every checkpoint's training seeds, before any model work
        check_held_out(ckpt, args.cases, args.seed)
    seen = set().union(*(training_instructions(c) for c in args.training_config)) if args.training_config else None
    reports = {}
    for name, path in zip(ckpts, args.checkpoint):
        predictor = Predictor.from_checkpoint(path)
        generator = None
        if args.generator_config:
            generator = make_generator(GeneratorConfig.from_yaml(args.generator_config),
                                       count_tokens=predictor.count_tokens)
        reports[name] = evaluate_instructions(predictor, ckpts[name], args.cases, args.seed, generator, seen=seen)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(reports) + "\n")
    print(json.dumps(reports if args.json else {n: {"summary": r["summary"], "instructions": r["instructions"]}
                                                for n, r in reports.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
