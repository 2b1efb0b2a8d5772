"""Train the DuPLUS segmenter.

    python -m training.train_segmentation --config configs/demo.yaml

Each step draws one data set, B patches from its training cases and a random subset of
the targets it labels (partial labels: a data set is only asked about its own targets),
with random T1/T2 paraphrases as prompt augmentation. Loss: BCE + soft Dice per target.
Progress bar, validation Dice per target on held-out cases, checkpoints with the model
config and the prompt vocabulary, resume from ``last.pt``, and a PNG of the curves.

Data-parallel on several CPU processes or GPUs with torchrun (gloo on CPU, NCCL on GPU):

    torchrun --nproc_per_node 2 -m training.train_segmentation --config configs/demo.yaml

Every rank makes the random draws of the whole global batch of ``optim.batch_size`` patches
(data set, targets, cases, centres, augmentation, paraphrases) and keeps its share of
batch_size / world_size patches; the batch-pooled loss statistics are summed over the ranks.
So N ranks take the same steps as one process, up to float rounding (under bfloat16 autocast,
bf16 rounding: about 0.2 % in the gradients, as between any two splits of a batch), and a run
may resume on another number of ranks. Rank 0 alone logs, validates and writes checkpoints and
curves; ``last.pt`` keeps the random streams, so a resumed run continues the interrupted one's draws.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from duplus.inference import Predictor
from duplus.metrics import dice
from duplus.models.duplus import DuPLUS, count_parameters
from duplus.preprocessing import fuse_labels, to_model_space
from duplus.text_encoder import EmbeddingCache, TextEncoder
from duplus.vocabulary import PromptVocabulary, canonical_t1, t1_paraphrases, t2_paraphrases
from training import distributed
from training.config import DatasetSpec, TrainConfig
from training.data import CaseRecord, load_decathlon, read_case

log = logging.getLogger("train_segmentation")


@dataclass
class PreparedCase:
    record: CaseRecord
    image: torch.Tensor                 # [1, X, Y, Z] model space, normalised
    label: np.ndarray                   # [X, Y, Z] uint8
    centres: dict[int, np.ndarray]      # label value -> sample of voxel coordinates [n, 3]


def _pad_to(image: torch.Tensor, label: np.ndarray, size: tuple[int, int, int]):
    pads = [max(0, s - d) for s, d in zip(size, label.shape)]
    if not any(pads):
        return image, label
    widths = [(p // 2, p - p // 2) for p in pads]
    img = np.pad(image[0].numpy(), widths, mode="constant", constant_values=float(image.min()))
    return torch.from_numpy(img)[None], np.pad(label, widths, mode="constant")


def prepare_case(record: CaseRecord, spacing, patch_size, rng: np.random.Generator, max_centres: int = 4000):
    image, label, affine = read_case(record)
    x, lab = to_model_space(image, affine, record.modality, spacing, label=label)
    x, lab_np = _pad_to(x.as_tensor().float(), lab[0].numpy().astype(np.uint8), patch_size)
    centres = {}
    for value in record.targets:
        idx = np.argwhere(lab_np == value)
        if len(idx) == 0:
            continue
        if len(idx) > max_centres:
            idx = idx[rng.choice(len(idx), max_centres, replace=False)]
        centres[value] = idx.astype(np.int32)
    return PreparedCase(record, x.contiguous(), lab_np, centres)


def prepare_datasets(cfg: TrainConfig) -> list[tuple[DatasetSpec, list[CaseRecord]]]:
    out = []
    for spec in cfg.datasets:
        path = cfg.dataset_path(spec)
        if not (path / "dataset.json").is_file():
            if spec.phantom is None:
                raise FileNotFoundError(f"{path}/dataset.json is missing and no phantom spec is given")
            from duplus.synth.phantoms import write_decathlon_dataset

            p = spec.phantom
            log.info("generating phantom data set %s (%s %s, %d cases, seed %d)", path, p.modality, p.region,
                     p.cases, p.seed)
            write_decathlon_dataset(path.parent, path.name, p.region, p.modality, p.cases, p.seed,
                                    labelled=p.labelled, sequence=p.sequence)
        out.append((spec, load_decathlon(path, region=spec.region)))
    return out


def crop(case: PreparedCase, centre: np.ndarray, size: tuple[int, int, int]):
    starts = [int(min(max(c - s // 2, 0), d - s)) for c, s, d in zip(centre, size, case.label.shape)]
    sl = tuple(slice(a, a + s) for a, s in zip(starts, size))
    return case.image[(slice(None),) + sl], case.label[sl]


InstructionKey = tuple[str, str, str, str | None]   # (target, modality, region, MR sequence)


def instruction_pool(cfg: TrainConfig, datasets: list[tuple[DatasetSpec, list[PreparedCase]]],
                     progress: bool = True) -> dict[InstructionKey, list[str]]:
    """``cfg.instructions.per_context`` knowledge-base instructions for each (target, context) the data sets label.

    Each instruction is written for its own image context: the data set's modality, region and MR sequence, with
    slice thickness, patient sex and age drawn at random (or left unknown), so that the T2 path sees the variety a
    DICOM header gives. Deterministic in ``cfg.instructions.seed``.
    """
    from duplus.instructions import ImageContext, KnowledgeBaseGenerator

    ic = cfg.instructions
    keys = sorted({(t, c.record.modality, c.record.region, c.record.sequence)
                   for _, cases in datasets for c in cases for t in c.record.targets.values()},
                  key=lambda k: tuple(str(x) for x in k))
    generator = KnowledgeBaseGenerator(cache_entries=1)
    rng = random.Random(ic.seed)
    pool: dict[InstructionKey, list[str]] = {}
    for key in tqdm(keys, desc="instructions", unit="context", disable=not progress):
        target, modality, region, sequence = key
        texts: list[str] = []
        for j in range(ic.per_context):
            ctx = ImageContext(
                modality=modality, sequence=sequence, region=region,
                slice_thickness_mm=rng.choice([None, 0.8, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]),
                patient_sex=rng.choice([None, "M", "F"]),
                patient_age_years=rng.choice([None, float(rng.randint(18, 90))]))
            texts.append(generator.generate(target, ctx, n=1, seed=ic.seed + len(pool) * ic.per_context + j)[0].text)
        pool[key] = texts
    return pool


class PatchSampler:
    def __init__(self, cfg: TrainConfig, datasets: list[tuple[DatasetSpec, list[PreparedCase]]], seed: int,
                 instructions: dict[InstructionKey, list[str]] | None = None):
        self.cfg = cfg
        self.datasets = [(s, c) for s, c in datasets if c]
        self.weights = np.array([s.weight for s, _ in self.datasets], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.rng = np.random.default_rng(seed)
        self.prompt_rng = random.Random(seed)
        self.instructions = instructions or {}
        if cfg.instructions.prob > 0 and not self.instructions:
            raise ValueError("instructions.prob > 0 needs the instruction pool (instruction_pool)")

    def sample(self, shard: slice | None = None):
        """One step's batch: the whole global batch's random draws, the patches of ``shard`` (default: all).

        Every rank makes every draw, in the same order, so that the random streams stay in step and
        the shards of N ranks put together are the batch one process draws.
        """
        o = self.cfg.optim
        keep = range(o.batch_size)[shard or slice(None)]
        size = self.cfg.model.patch_size
        spec, cases = self.datasets[self.rng.choice(len(self.datasets), p=self.weights)]
        values = sorted(cases[0].record.targets)
        chosen = sorted(self.rng.choice(values, size=min(o.targets_per_step, len(values)), replace=False).tolist())
        images, masks, t1s, modalities = [], [], [], []
        first = None
        for i in range(o.batch_size):
            case = cases[self.rng.integers(len(cases))]
            first = first or case.record
            present = [v for v in chosen if v in case.centres]
            if present and self.rng.random() < o.foreground_prob:
                pts = case.centres[present[self.rng.integers(len(present))]]
                centre = pts[self.rng.integers(len(pts))]
            else:
                centre = np.array([self.rng.integers(d) for d in case.label.shape])
            img, lab = crop(case, centre, size)
            # intensity augmentation on the normalised image (no flips: laterality is part of the task)
            scale, shift = float(self.rng.uniform(0.9, 1.1)), float(self.rng.uniform(-0.1, 0.1))
            mine = i in keep
            if mine:
                img = img * scale + shift
            if self.rng.random() < 0.3:
                # another rank's patch: draw its noise all the same (torch's generator advances alike)
                noise = torch.randn_like(img) if mine else torch.randn(img.shape, dtype=img.dtype)
                sigma = float(self.rng.uniform(0.0, 0.1))
                if mine:
                    img = img + noise * sigma
            r = case.record
            t1 = self.prompt_rng.choice(t1_paraphrases(r.modality, r.region, r.sequence))
            if mine:
                images.append(img)
                masks.append(np.stack([lab == v for v in chosen]))
                t1s.append(t1)
                modalities.append(r.modality)
        t2s = [self.prompt_rng.choice(t2_paraphrases(cases[0].record.targets[v])) for v in chosen]
        if self.cfg.instructions.prob > 0:  # Zeus: some targets are described by a generated instruction instead
            for k, v in enumerate(chosen):
                if self.prompt_rng.random() < self.cfg.instructions.prob:
                    key = (cases[0].record.targets[v], first.modality, first.region, first.sequence)
                    t2s[k] = self.prompt_rng.choice(self.instructions[key])
        return (torch.stack(images), torch.from_numpy(np.stack(masks)).float(), modalities, t1s, t2s)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """BCE over every voxel + soft Dice per target over the whole batch, for targets present in the batch.

    A per-sample Dice is ~1 for a target absent from a patch whatever the prediction (no useful
    gradient, a misleading loss floor); pooling over the batch and skipping absent targets keeps
    the Dice term informative while BCE still pushes absent targets to zero.

    ``global_batch``: this rank holds a shard of the batch; the voxel sums are summed over the ranks
    (``distributed.global_sum``), so the loss is that of the global batch on every rank.
    """
    logits = logits.float()
    dims = (0,) + tuple(range(2, logits.ndim))
    if not global_batch:
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = torch.sigmoid(logits)
        inter = (prob * target).sum(dims)
        truth = target.sum(dims)
        prob_sum = prob.sum(dims)
    else:
        prob = torch.sigmoid(logits)
        k = logits.shape[1]
        local = torch.cat([F.binary_cross_entropy_with_logits(logits, target, reduction="sum").reshape(1),
                           (prob * target).sum(dims), target.sum(dims), prob.sum(dims)])
        total = distributed.global_sum(local)
        bce = total[0] / (target.numel() * distributed.world_size())
        inter, truth, prob_sum = total[1:1 + k], total[1 + k:1 + 2 * k], total[1 + 2 * k:]
    soft_dice = 1.0 - (2.0 * inter + 1.0) / (prob_sum + truth + 1.0)
    present = truth > 0
    return bce + (soft_dice[present].mean() if bool(present.any()) else soft_dice.new_zeros(()))


def validate(predictor: Predictor, cases: list[PreparedCase],
             instructions: dict[InstructionKey, list[str]] | None = None) -> dict[str, float]:
    """Validation Dice per target with its name; with ``instructions``, also per target with the first
    instruction of its pool for the case's context (key ``"<target> (instruction)"``), from the same pass."""
    scores: dict[str, list[float]] = {}
    for case in cases:
        r = case.record
        values = sorted(r.targets)
        names = [r.targets[v] for v in values]
        t1 = canonical_t1(r.modality, r.region, r.sequence)
        keys = [(n, r.modality, r.region, r.sequence) for n in names]
        with_instructions = bool(instructions) and all(k in instructions for k in keys)
        if with_instructions:
            cond = predictor.condition_texts(t1, names + [instructions[k][0] for k in keys], names * 2)
        else:
            cond = predictor.condition(t1, names)
        probs = predictor.predict_preprocessed(case.image, r.modality, cond)
        k = len(names)
        for part, suffix in ((slice(0, k), ""), (slice(k, 2 * k), " (instruction)"))[:1 + with_instructions]:
            labels = fuse_labels(probs[part]).numpy()
            for i, (v, name) in enumerate(zip(values, names)):
                scores.setdefault(name + suffix, []).append(dice(labels == i + 1, case.label == v))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def plot_curves(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps, losses = zip(*history["loss"]) if history["loss"] else ((), ())
    if losses:
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        axes[0].plot(steps, losses, alpha=0.25, color="tab:blue")
        axes[0].plot(steps[k - 1:], smooth, color="tab:blue")
    axes[0].set(title="training loss (BCE + soft Dice)", xlabel="step", yscale="log")
    for target in sorted({t for _, d in history["val"] for t in d}):
        pts = [(s, d[target]) for s, d in history["val"] if target in d]
        axes[1].plot(*zip(*pts), marker="o", label=target)
    axes[1].set(title="validation Dice per target", xlabel="step", ylim=(0, 1))
    axes[1].legend(fontsize=8, loc="lower right")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_checkpoint(path: Path, model: DuPLUS, vocab: PromptVocabulary, cfg: TrainConfig, step: int,
                    history: dict, training_seeds: list[int], extra: dict | None = None) -> None:
    state = {"model_config": model.cfg.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in
                                                                  model.state_dict().items()},
             "vocabulary": vocab.to_dict(), "train_config": cfg.to_dict(), "step": step, "history": history,
             "training_seeds": sorted(set(training_seeds)), "format": "duplus-checkpoint/1"}
    state.update(extra or {})
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX.

    Elsewhere (e.g. an AVX2-only CPU) oneDNN emulates bf16 convolutions, about 100x slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def sampler_state(sampler: PatchSampler) -> dict:
    """The random streams a resumed run continues from (the same on every rank)."""
    return {"patches": sampler.rng.bit_generator.state, "prompts": sampler.prompt_rng.getstate(),
            "torch": torch.get_rng_state()}


def restore_sampler_state(sampler: PatchSampler, state: dict) -> None:
    sampler.rng.bit_generator.state = state["patches"]
    sampler.prompt_rng.setstate(state["prompts"])
    torch.set_rng_state(state["torch"])


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Train from ``cfg``; under an initialised process group (torchrun), as one rank of a data-parallel run."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    main_rank, parallel = distributed.is_main(), distributed.is_distributed()
    torch.set_num_threads(distributed.cpu_threads(cfg.threads))
    device = distributed.select_device(cfg.device)
    shard = distributed.shard(cfg.optim.batch_size) if parallel else None
    bf16 = cfg.optim.bf16 and native_bf16(device)
    if cfg.optim.bf16 and not bf16:
        log.warning("optim.bf16: this %s has no native bfloat16 (CPU capability %s); training in float32", device.type,
                    torch.backends.cpu.get_cpu_capability())
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if main_rank:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # the text encoder first: a wrong name or width fails before minutes of data preparation
    encoder = TextEncoder(cfg.model.text_encoder)
    if encoder.dim != cfg.model.text_dim:
        raise ValueError(f"model.text_dim={cfg.model.text_dim} but the text encoder "
                         f"{cfg.model.text_encoder!r} gives {encoder.dim}")

    with distributed.main_first():  # rank 0 writes missing phantom data sets
        datasets = prepare_datasets(cfg)
    train_sets, val_cases, training_seeds = [], [], []
    bar = tqdm(total=sum(len(r) for _, r in datasets), desc="preprocessing", unit="case", disable=not main_rank)
    for spec, records in datasets:
        n_val = min(spec.val_cases, max(0, len(records) - 1))
        prepared = []
        for r in records:
            prepared.append(prepare_case(r, cfg.model.spacing, cfg.model.patch_size, rng))
            bar.update()
        train_sets.append((spec, prepared[:len(prepared) - n_val]))
        val_cases += prepared[len(prepared) - n_val:]
        training_seeds += [r.seed for r in records if r.seed is not None]
    bar.close()

    vocab = PromptVocabulary()
    cache = EmbeddingCache(encoder, max_entries=100_000)
    contexts = {(c.record.modality, c.record.region, c.record.sequence) for _, cs in train_sets for c in cs}
    targets = {t for _, cs in train_sets for c in cs for t in c.record.targets.values()}
    pool = instruction_pool(cfg, train_sets + [(None, val_cases)], progress=main_rank) \
        if cfg.instructions.prob > 0 else {}
    cache.preload([p for m, r, s in contexts for p in t1_paraphrases(m, r, s)] +
                  [p for t in targets for p in t2_paraphrases(t)] + [p for texts in pool.values() for p in texts])
    if pool:
        log.info("instruction pool: %d instructions for %d (target, context) pairs, e.g. %r",
                 sum(map(len, pool.values())), len(pool), next(iter(pool.values()))[0])
    log.info("prompt cache: %d embeddings for %d contexts and %d targets", len(cache), len(contexts), len(targets))

    model = DuPLUS(cfg.model).to(device)
    log.info("DuPLUS: %.2f M parameters", count_parameters(model) / 1e6)
    if cfg.init_from:
        init = torch.load(cfg.init_from, map_location=device, weights_only=False)
        if init.get("model_config") != cfg.model.to_dict():
            raise ValueError(f"init_from {cfg.init_from}: its model config differs from this configuration's")
        model.load_state_dict(init["state_dict"])
        log.info("initialised from %s (trained %s steps)", cfg.init_from, init.get("step"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.optim.warmup:
            return (step + 1) / cfg.optim.warmup
        t = (step - cfg.optim.warmup) / max(1, cfg.optim.steps - cfg.optim.warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    # centre the controller's input on the trained targets' prompts (saved with the weights)
    if not cfg.init_from:
        prompts = [p for t in sorted(targets) for p in t2_paraphrases(t)]
        model.conditioning.set_t2_statistics(cache.encode(prompts).to(device))
    history = {"loss": [], "val": []}
    start, best, ckpt = 0, -1.0, None
    last = out / "last.pt"
    if resume and last.is_file():  # every rank loads it
        ckpt = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start, history, best = ckpt["step"], ckpt["history"], ckpt.get("best", -1.0)
        log.info("resumed from %s at step %d", last, start)
    net = distributed.data_parallel(model, device)  # DDP under torchrun, the model itself otherwise
    trained = {}
    for _, cs in train_sets:
        for c in cs:
            key = f"{c.record.modality}|{c.record.region}"
            trained[key] = sorted(set(trained.get(key, [])) | set(c.record.targets.values()))
    meta = {"trained_contexts": trained}
    sampler = PatchSampler(cfg, train_sets, seed=cfg.seed + start, instructions=pool)
    if ckpt is not None and "rng" in ckpt:  # continue the random streams where the interrupted run was
        restore_sampler_state(sampler, ckpt["rng"])
    predictor = Predictor(model, vocab, encoder, device=device, bf16=bf16)   # windows per pass: the device's default
    predictor.cache = cache

    model.train()
    pbar = tqdm(range(start, cfg.optim.steps), initial=start, total=cfg.optim.steps, desc="training", unit="step",
                disable=not main_rank)
    t0 = time.time()
    for step in pbar:
        images, masks, modalities, t1s, t2s = sampler.sample(shard)
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(images, model.modality_index(modalities).to(device), cache.encode(t1s).to(device),
                         cache.encode(t2s).to(device))
        loss = segmentation_loss(logits, masks, global_batch=parallel)  # the global batch's loss on every rank
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        history["loss"].append((step + 1, float(loss.detach())))
        pbar.set_postfix(loss=f"{history['loss'][-1][1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        done = step + 1
        checkpoint_now = done % cfg.val_every == 0 or done == cfg.optim.steps
        if checkpoint_now and main_rank:
            model.eval()
            scores = validate(predictor, val_cases, pool) if val_cases else {}
            model.train()
            history["val"].append((done, scores))
            mean = float(np.mean(list(scores.values()))) if scores else 0.0
            log.info("step %d: validation mean Dice %.3f %s (%.0f s)", done, mean,
                     {k: round(v, 3) for k, v in scores.items()}, time.time() - t0)
            if mean > best:
                best = mean
                save_checkpoint(out / "best.pt", model, vocab, cfg, done, history, training_seeds,
                                {"val_mean_dice": mean, **meta})
            save_checkpoint(last, model, vocab, cfg, done, history, training_seeds,
                            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best": best,
                             "rng": sampler_state(sampler), **meta})
            plot_curves(history, out / "curves.png")
        if checkpoint_now and parallel:
            # the other ranks wait for rank 0's validation and take its torch random state, which
            # validation would have advanced in a single process too (the patch noise draws from it)
            torch.set_rng_state(distributed.broadcast_object(torch.get_rng_state()))
    log.info("done: best validation mean Dice %.3f; checkpoints in %s", best, out)
    return out / "best.pt"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.train_segmentation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML training configuration (see configs/demo.yaml)")
    ap.add_argument("--output", help="override the output folder of the configuration")
    ap.add_argument("--steps", type=int, help="override optim.steps")
    ap.add_argument("--lr", type=float, help="override optim.lr, the peak learning rate of the warm-up + cosine "
                    "schedule (e.g. lower when continuing from --init-from)")
    ap.add_argument("--init-from", help="start from the weights of this checkpoint (fresh optimizer and schedule), "
                    "e.g. to continue training the shipped checkpoint on a faster machine")
    ap.add_argument("--no-resume", action="store_true", help="start from scratch even if OUTPUT/last.pt exists")
    ap.add_argument("--backend", choices=distributed.BACKENDS,
                    help=f"process-group backend under torchrun (default: ${distributed.BACKEND_ENV}, else nccl on "
                    "CUDA GPUs and gloo on CPU)")
    ap.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    args = ap.parse_args(argv)
    # under torchrun only rank 0 reports progress; the others say only what goes wrong
    level = args.log_level if os.environ.get("RANK", "0") == "0" else "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_yaml(args.config, output=args.output, init_from=args.init_from)
    from dataclasses import replace

    if args.steps:
        cfg = replace(cfg, optim=replace(cfg.optim, steps=args.steps))
    if args.lr:
        cfg = replace(cfg, optim=replace(cfg.optim, lr=args.lr))
    with distributed.process_group(args.backend, cfg.device):
        train(cfg, resume=not args.no_resume)


if __name__ == "__main__":
    main()
