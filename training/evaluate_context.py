"""Evaluate Biomed-DPT prompt tuning of the context classifier with the paper's protocols.

* **few-shot**: K in {1, 2, 4, 8, 16} cases per class from the ``pool`` split, 3 seeds, all eight contexts;
  zero-shot (the template 'a medical image of <class>.'), CoOp and Biomed-DPT; accuracy mean +- sd on the
  held-out ``test`` split;
* **ablation** at K = 16: CoOp, + L1 to the teacher descriptions, + KL to the zero-shot logits, + visual
  prompts (= Biomed-DPT);
* **base-to-novel**: trained on the five base contexts (K = 16), tested on the base contexts and, through
  their class names alone, on the three novel ones (new combinations of the same words); harmonic mean;
* **guard**: the shipped classifier (checkpoints/context_dpt.pt) as the T1 guard: alpha chosen on ``val`` for
  at most 1 % false alarms there; on ``test`` renderings and on full-size phantoms of the segmenter's own
  contexts (random acquisitions, the DuPLUS mismatch experiment's kind), false alarms with the right T1 and
  the share flagged with the wrong modality (CT sent as MR, MR as CT, PET as CT);
* **attention maps**: Grad-CAM on the last block's patch tokens, CoOp (frozen tower) vs Biomed-DPT (with
  visual prompts), for one test case of each base context.

``--on val`` runs the same protocols on the validation split (for choosing steps and learning rate); the
held-out ``test`` split is read only by the default run, which counts its looks in ``heldout_looks.json``.

    python -m training.evaluate_context --out docs/context
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from duplus.context.classes import BASE_KEYS, CONTEXT_KEYS, NOVEL_KEYS, classes_of
from duplus.context.model import HFTextTower
from training.context_data import load_split
from training.train_context import (
    METHODS,
    TuneConfig,
    choose_alpha,
    few_shot,
    guard_rates,
    load_backbone,
    load_descriptions,
    methods,
    predict,
    prompt_tune,
    subset,
    wrong_t1,
    zero_shot_texts,
)

log = logging.getLogger("training.evaluate_context")

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (1, 2, 3)
FEW_SHOT_METHODS = ("CoOp", "DPT (+visual prompts)")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean())


def hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


class Evaluator:
    def __init__(self, backbone: Path, on: str, tune: TuneConfig, weights: dict | None = None):
        from duplus.text_encoder import TextEncoder

        self.tower = HFTextTower(TextEncoder())
        self.model = load_backbone(backbone, self.tower)
        self.cfg = self.model.cfg
        self.scale = float(self.model.scale())
        self.pool = load_split("pool")
        self.eval = load_split(on)
        self.tune = tune
        self.descriptions = load_descriptions()
        self.methods = weights or METHODS

    def zero_shot(self, keys) -> torch.Tensor:
        return self.tower.encode_text(zero_shot_texts([c.name for c in classes_of(keys)], self.cfg.ctx_init))

    def run(self, method: str, train_keys, views, labels, seed: int):
        return prompt_tune(self.model.image, self.tower, train_keys, views, labels, self.methods[method], self.cfg,
                           self.scale, self.tune, seed=seed, descriptions=self.descriptions)

    def score(self, keys, text: torch.Tensor, visual=None) -> float:
        views, labels = subset(self.eval, keys)
        return accuracy(predict(self.model.image, text, views, visual, self.scale), labels)


def few_shot_protocol(ev: Evaluator, methods=FEW_SHOT_METHODS, shots=SHOTS, seeds=SEEDS) -> dict:
    from tqdm.auto import tqdm

    keys = CONTEXT_KEYS
    out = {"zero-shot": {str(k): [ev.score(keys, ev.zero_shot(keys))] * len(seeds) for k in shots}}
    jobs = [(m, k, s) for m in methods for k in shots for s in seeds]
    for m, k, s in tqdm(jobs, desc="few-shot"):
        views, labels = few_shot(ev.pool, keys, k, s)
        tuned = ev.run(m, keys, views, labels, s)
        out.setdefault(m, {}).setdefault(str(k), []).append(ev.score(keys, tuned.text_features(), tuned.visual))
    return out


def ablation_protocol(ev: Evaluator, k: int = 16, seeds=SEEDS, done: dict | None = None) -> dict:
    out = {}
    for m in ev.methods:
        if done and m in done and str(k) in done[m]:
            out[m] = done[m][str(k)]
            continue
        out[m] = []
        for s in seeds:
            views, labels = few_shot(ev.pool, CONTEXT_KEYS, k, s)
            tuned = ev.run(m, CONTEXT_KEYS, views, labels, s)
            out[m].append(ev.score(CONTEXT_KEYS, tuned.text_features(), tuned.visual))
    return out


def base_to_novel_protocol(ev: Evaluator, k: int = 16, seeds=SEEDS) -> dict:
    out = {"zero-shot": [{"base": ev.score(BASE_KEYS, ev.zero_shot(BASE_KEYS)),
                          "novel": ev.score(NOVEL_KEYS, ev.zero_shot(NOVEL_KEYS))}] * len(seeds)}
    for m in ev.methods:
        out[m] = []
        for s in seeds:
            views, labels = few_shot(ev.pool, BASE_KEYS, k, s)
            tuned = ev.run(m, BASE_KEYS, views, labels, s)
            base = ev.score(BASE_KEYS, tuned.text_features(), tuned.visual)
            novel = ev.score(NOVEL_KEYS, tuned.text_features(NOVEL_KEYS), tuned.visual)
            out[m].append({"base": base, "novel": novel})
    for runs in out.values():
        for r in runs:
            r["hm"] = hm(r["base"], r["novel"])
    return out


# --------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------

def full_size_cases(n_per_context: int, seed0: int = 7_000_000):
    """Phantoms as the segmenter sees them (random acquisitions at full resolution) of its own contexts."""
    from tqdm.auto import tqdm

    from duplus.context.views import context_views
    from duplus.synth.phantoms import generate_phantom

    contexts = [("abdomen", "CT"), ("abdomen", "MR"), ("head_neck", "CT"), ("head_neck", "PET")]
    views, keys = [], []
    for i in tqdm(range(n_per_context * len(contexts)), desc="full-size phantoms"):
        region, modality = contexts[i % len(contexts)]
        p = generate_phantom(region, modality, seed0 + i)
        views.append(context_views(p.image, p.affine))
        keys.append(f"{modality}:{p.sequence}|{region}" if p.sequence else f"{modality}|{region}")
    return torch.stack(views), keys


def guard_protocol(checkpoint: Path, on: str, full_size: int) -> dict:
    from duplus.context.model import load_classifier

    clf, meta = load_classifier(checkpoint)
    keys = clf.keys

    def probs_of(views):
        with torch.no_grad():
            return torch.cat([clf(views[i:i + 256]) for i in range(0, len(views), 256)]).numpy()

    val = load_split("val")
    pv, lv = probs_of(val["views"]), val["labels"].numpy()
    chosen = float(meta.get("guard_alpha", choose_alpha(keys, pv, lv)[0]))    # chosen on val by the training
    out = {"alpha": chosen, "val": guard_rates(keys, pv, lv, chosen), "checkpoint_meta": meta}
    if on == "test":
        test = load_split("test")
        out["test"] = guard_rates(keys, probs_of(test["views"]), test["labels"].numpy(), chosen)
        if full_size:
            views, fkeys = full_size_cases(full_size)
            out["full_size"] = guard_rates(keys, probs_of(views), np.array([keys.index(k) for k in fkeys]), chosen)
    return out


#: real images available offline: (name, package, file inside it, the context key it truly is)
REAL_IMAGES = (
    ("MNI152 2009c T1 template (nilearn)", "nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
     "MR:T1|head_neck"),
)


def real_images() -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(name, volume, affine, true key) of each real image whose package is installed (its file read from the
    package's own folder: nothing is downloaded)."""
    import importlib.util

    import nibabel as nib

    out = []
    for name, package, rel, key in REAL_IMAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            log.warning("%s: package %s is not installed", name, package)
            continue
        img = nib.load(Path(spec.submodule_search_locations[0]) / rel)
        out.append((name, np.asarray(img.dataobj, dtype=np.float32), img.affine, key))
    return out


def real_protocol(checkpoint: Path) -> dict:
    """The served classifier on real images: its top classes, the guard's verdict on the image's true T1
    (a false alarm if it disagrees) and on DuPLUS's mismatch T1 (should be flagged), and what a client filling in
    the T1 of a header that names the true modality (and MR sequence) but no region gets: a T1, or a refusal."""
    from duplus.context.classes import parse_key
    from duplus.context.guard import ImageContradictsHeader, fill_t1, verdict
    from duplus.context.model import load_classifier
    from duplus.context.views import context_views

    clf, meta = load_classifier(checkpoint)
    alpha = float(meta.get("guard_alpha", 0.1))
    out = []
    for name, volume, affine, key in real_images():
        with torch.no_grad():
            probs = clf(context_views(volume, affine)[None])[0].numpy()
        true_t1 = classes_of([key])[0].name
        right, wrong = verdict(clf.keys, probs, true_t1, alpha), verdict(clf.keys, probs, wrong_t1(key), alpha)
        top = np.argsort(-probs)[:3]
        truth = parse_key(key)
        try:
            filled = fill_t1(truth.modality, list(clf.keys), probs, truth.sequence, alpha=alpha)[0]
        except ImageContradictsHeader as exc:
            filled = f"refused: {exc}"
        out.append({"image": name, "shape": list(volume.shape), "truth": key, "predicted": clf.keys[int(top[0])],
                    "top3": {clf.keys[int(i)]: round(float(probs[i]), 4) for i in top},
                    "p_truth": round(float(probs[clf.keys.index(key)]), 4),
                    "true_t1": true_t1, "true_t1_flagged": right.agrees is False, "true_t1_reason": right.reason,
                    "wrong_t1": wrong_t1(key), "wrong_t1_flagged": wrong.agrees is False,
                    "silent_header_fill": filled})
    return {"alpha": alpha, "images": out}


# --------------------------------------------------------------------------------------
# Attention maps, plots, tables
# --------------------------------------------------------------------------------------


def grad_cam(image, text: torch.Tensor, views: torch.Tensor, visual=None, scale: float = 100.0) -> np.ndarray:
    """Grad-CAM on the patch tokens entering the last block (after it only the CLS token is read, so its own
    output's patch tokens get no gradient): [N, g, g] maps for the predicted class, each scaled to max 1."""
    last = image.blocks[-1]
    store = {}

    def hook(_m, args):
        args[0].retain_grad()
        store["tokens"] = args[0]

    h = last.register_forward_pre_hook(hook)
    try:
        logits = scale * image(views, visual) @ text.T
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    finally:
        h.remove()
    tok, grad = store["tokens"], store["tokens"].grad
    skip = 1 + (visual.n if visual is not None else 0)
    cam = torch.relu((tok[:, skip:] * grad[:, skip:].mean(1, keepdim=True)).sum(-1))
    g = int(round(cam.shape[1] ** 0.5))
    cam = cam.reshape(-1, g, g).detach()
    return (cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-9)).numpy()


def attention_figure(ev: Evaluator, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    views, labels = few_shot(ev.pool, CONTEXT_KEYS, 16, 1)
    coop = ev.run("CoOp", CONTEXT_KEYS, views, labels, 1)
    dpt = ev.run("DPT (+visual prompts)", CONTEXT_KEYS, views, labels, 1)
    picks = [int(np.flatnonzero(ev.eval["labels"].numpy() == CONTEXT_KEYS.index(k))[0]) for k in BASE_KEYS]
    x = ev.eval["views"][picks]
    for p in ev.model.image.parameters():
        p.requires_grad_(True)
    maps = {"CoOp (no visual prompts)": grad_cam(ev.model.image, coop.text_features(), x, None, ev.scale),
            "Biomed-DPT (visual prompts)": grad_cam(ev.model.image, dpt.text_features(), x, dpt.visual, ev.scale)}
    fig, axes = plt.subplots(len(picks), 1 + 2 * 3, figsize=(14, 2.1 * len(picks)))
    for r, k in enumerate(BASE_KEYS):
        axes[r, 0].text(0.0, 0.5, classes_of([k])[0].name, fontsize=8, va="center")
        axes[r, 0].axis("off")
        for m, (title, cams) in enumerate(maps.items()):
            up = F.interpolate(torch.from_numpy(cams[r])[None, None], size=x.shape[-2:], mode="bilinear")[0, 0]
            for v, vname in enumerate(("axial", "coronal", "sagittal")):
                ax = axes[r, 1 + 3 * m + v]
                ax.imshow(x[r, v].T.flip(0), cmap="gray")
                ax.imshow(up.T.flip(0), cmap="jet", alpha=0.35)
                ax.axis("off")
                if r == 0:
                    ax.set_title(f"{title}\n{vname}" if v == 1 else vname, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_few_shot(few: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m, by_k in few.items():
        ks = sorted(int(k) for k in by_k)
        mean = [100 * np.mean(by_k[str(k)]) for k in ks]
        sd = [100 * np.std(by_k[str(k)]) for k in ks]
        ax.errorbar(ks, mean, yerr=sd, marker="o", capsize=3, label=m, ls="--" if m == "zero-shot" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("held-out accuracy, 8 contexts (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(values) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def tables(res: dict) -> str:
    lines = ["### Few-shot (8 contexts, accuracy %, mean ± sd over 3 seeds)", "",
             "| method | " + " | ".join(f"K={k}" for k in SHOTS) + " | mean |", "|---" * (len(SHOTS) + 2) + "|"]
    for m, by_k in res["few_shot"].items():
        row = [_ms(by_k[str(k)]) for k in SHOTS]
        lines.append(f"| {m} | " + " | ".join(row) + f" | {100 * np.mean([np.mean(by_k[str(k)]) for k in SHOTS]):.1f} |")
    lines += ["", "### Ablation (K = 16, 8 contexts, accuracy %)", "", "| method | accuracy |", "|---|---|"]
    for m, v in res["ablation"].items():
        lines.append(f"| {m} | {_ms(v)} |")
    lines += ["", "### Base-to-novel (K = 16 on the 5 base contexts; %)", "", "| method | base | novel | HM |",
              "|---|---|---|---|"]
    for m, runs in res["base_to_novel"].items():
        lines.append(f"| {m} | {_ms([r['base'] for r in runs])} | {_ms([r['novel'] for r in runs])} | "
                     f"{_ms([r['hm'] for r in runs])} |")
    if "guard" in res:
        g = res["guard"]
        lines += ["", f"### T1 guard (alpha = {g['alpha']}, chosen on val)", "",
                  "| set | n | accuracy | false alarms (right T1) | flagged (wrong modality) |", "|---|---|---|---|---|"]
        for name in ("val", "test", "full_size"):
            if name in g:
                r = g[name]
                lines.append(f"| {name} | {r['n']} | {100 * r['accuracy']:.1f} % | {r['false_alarms']} "
                             f"({100 * r['false_alarms'] / r['n']:.1f} %) | {r['flagged']} "
                             f"({100 * r['flagged'] / r['n']:.1f} %) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", type=Path, default=Path("runs/context/clip.pt"))
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/context_dpt.pt"))
    ap.add_argument("--on", choices=("val", "test"), default="test")
    ap.add_argument("--out", type=Path, default=Path("docs/context"))
    ap.add_argument("--steps", type=int, default=TuneConfig.steps)
    ap.add_argument("--lr", type=float, default=TuneConfig.lr)
    ap.add_argument("--l1", type=float, default=None, help="lambda_1 (default: training.train_context.L1_WEIGHT)")
    ap.add_argument("--kl", type=float, default=None, help="lambda_2 (default: training.train_context.KL_WEIGHT)")
    ap.add_argument("--full-size", type=int, default=25, help="full-size phantoms per context for the guard")
    ap.add_argument("--protocols", default="few_shot,ablation,base_to_novel,guard,attention",
                    help="comma-separated: few_shot, ablation, base_to_novel, guard, attention, and real (the "
                         "--checkpoint on the real images installed packages ship: nilearn's MNI152 T1)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    protocols = set(args.protocols.split(","))
    from training.train_context import KL_WEIGHT, L1_WEIGHT

    l1, kl = (L1_WEIGHT if args.l1 is None else args.l1), (KL_WEIGHT if args.kl is None else args.kl)
    res: dict = {"on": args.on, "steps": args.steps, "lr": args.lr, "l1": l1, "kl": kl}
    ev = (Evaluator(args.backbone, args.on, TuneConfig(steps=args.steps, lr=args.lr), methods(l1, kl))
          if protocols & {"few_shot", "ablation", "base_to_novel", "attention"} else None)
    if "real" in protocols:
        res["real"] = real_protocol(args.checkpoint)
    if "few_shot" in protocols:
        res["few_shot"] = few_shot_protocol(ev)
    if "ablation" in protocols:
        res["ablation"] = ablation_protocol(ev, done=res.get("few_shot"))
    if "base_to_novel" in protocols:
        res["base_to_novel"] = base_to_novel_protocol(ev)
    if "guard" in protocols and args.checkpoint.exists():
        res["guard"] = guard_protocol(args.checkpoint, args.on, args.full_size if args.on == "test" else 0)
    args.out.mkdir(parents=True, exist_ok=True)
    full = {"few_shot", "ablation", "base_to_novel"} <= protocols
    suffix = ("" if args.on == "test" else f"-{args.on}") + ("" if full else "-" + "-".join(sorted(protocols)))
    if "attention" in protocols and args.on == "test":
        attention_figure(ev, args.out / "attention.png")
    if "few_shot" in protocols:
        plot_few_shot(res["few_shot"], args.out / f"few_shot{suffix}.png")
    res["minutes"] = (time.time() - t0) / 60
    (args.out / f"results{suffix}.json").write_text(json.dumps(res, indent=1, default=float))
    if {"few_shot", "ablation", "base_to_novel"} <= protocols:
        (args.out / f"results{suffix}.md").write_text(tables(res))
    if args.on == "test" and protocols & {"few_shot", "ablation", "base_to_novel", "guard"}:   # scores read
        looks = args.out / "heldout_looks.json"
        n = json.loads(looks.read_text())["looks"] + 1 if looks.exists() else 1
        looks.write_text(json.dumps({"looks": n, "last": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
        log.info("held-out test split read (look %d)", n)
    log.info("done in %.1f min -> %s", res["minutes"], args.out)
    print(tables(res) if {"few_shot", "ablation", "base_to_novel"} <= protocols else json.dumps(res, indent=1,
                                                                                             default=float))


if __name__ == "__main__":
    main()
