"""Data-parallel training under torchrun's environment (gloo, CPU): N ranks take the steps of one process.

The ranks are forked from this process (MONAI and torch already imported: a torchrun subprocess would
spend about 8 s per rank importing them) and run the command-line entry point with the variables
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from training import distributed
from training.config import DatasetSpec, OptimConfig, TrainConfig
from training.data import CaseRecord
from training.train_segmentation import PatchSampler, PreparedCase

WORLD = 2
STEPS = 4
# the tiny model of tests/training/test_data_and_training.py; no validation cases (sliding windows over
# whole phantoms cost seconds); one intra-op thread per process; float32 (under bfloat16 autocast a batch
# of 1 and a batch of 2 already differ by about 0.2 % in the gradients, DDP or not)
CONFIG = {"val_every": 2, "seed": 3, "threads": 1,
          "datasets": [
              {"path": "CT", "phantom": {"region": "head_neck", "modality": "CT", "cases": 2, "seed": 11},
               "val_cases": 0},
              {"path": "PET", "phantom": {"region": "head_neck", "modality": "PET", "cases": 1, "seed": 12,
                                          "labelled": ["primary tumour"]}, "val_cases": 0}],
          "model": {"channels": [4, 8, 16], "patch_size": [32, 32, 32], "film_hidden": 32,
                    "controller_hidden": 32, "head_channels": 4, "head_levels": 2},
          "optim": {"steps": STEPS, "batch_size": 2, "targets_per_step": 2, "bf16": False}}


@pytest.fixture
def keep_threads():
    """train() sets torch's intra-op threads (1 here); give the rest of the session its count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, fn, timeout_s: float = 120.0) -> None:
    """Fork ``world`` ranks with torchrun's environment, each calling ``fn(rank)``; a failure in one fails the test."""
    import torch.multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("the ranks are forked from the test process; this platform cannot fork")
    port = _free_port()

    def rank_main(i: int) -> None:
        os.environ.update(RANK=str(i), LOCAL_RANK=str(i), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        fn(i)

    ctx = mp.start_processes(rank_main, nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):  # raises when a rank failed (and ends the others)
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout_s} s")


def _train_ranks(world: int, argv: list[str], watch: Path, tmp_path: Path) -> list[list[str]]:
    """Run ``world`` ranks of the training command; the names of the files each rank wrote under ``watch``."""
    reports = [tmp_path / f"rank{r}.json" for r in range(world)]

    def rank_main(i: int) -> None:
        written: list[str] = []

        def audit(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+"):
                path = args[0]
            elif event == "os.rename":  # os.replace too: how save_checkpoint commits its file
                path = args[1]
            else:
                return
            if str(path).startswith(str(watch)):
                written.append(Path(str(path)).name)

        sys.addaudithook(audit)  # in a forked child: the hook ends with it
        from training.train_segmentation import main

        try:
            main(argv)
        finally:
            reports[i].write_text(json.dumps(sorted(set(written))))

    _spawn(world, rank_main)
    return [json.loads(r.read_text()) for r in reports]


def _config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output": str(tmp_path / name), "data_root": str(tmp_path / "data")}))
    return path


def test_two_ranks_take_the_steps_of_one_process_and_resume(tmp_path, keep_threads):
    """1 process x 2 patches vs 2 ranks x 1 patch (stopped after 2 steps, resumed to 4): same losses, same weights;
    only rank 0 writes."""
    from training.train_segmentation import main

    main(["--config", str(_config(tmp_path, "single"))])  # also writes the phantom data sets
    ddp = _config(tmp_path, "ddp")
    first = _train_ranks(WORLD, ["--config", str(ddp), "--steps", "2"], tmp_path / "ddp", tmp_path)
    resumed = _train_ranks(WORLD, ["--config", str(ddp)], tmp_path / "ddp", tmp_path)

    single = torch.load(tmp_path / "single" / "last.pt", weights_only=False)
    parallel = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert parallel["step"] == single["step"] == STEPS
    steps, losses = zip(*parallel["history"]["loss"])
    ref_steps, ref_losses = zip(*single["history"]["loss"])
    assert steps == ref_steps == tuple(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(ref_losses, 4))) == STEPS  # the steps did train on different batches
    diffs = {k: float((parallel["state_dict"][k].float() - v.float()).abs().max())
             for k, v in single["state_dict"].items()}
    # A stem's convolution bias is cancelled by the instance norm after it: its gradient is zero but for
    # rounding (~1e-10), which Adam rescales into steps of up to the learning rate, differently in each run.
    # Every other weight agrees to float rounding (measured: 4e-7 at most, the losses to 1.2e-7).
    cancelled = {k for k in diffs if k.startswith("segmenter.stems.") and k.endswith(".conv.bias")}
    assert max(v for k, v in diffs.items() if k not in cancelled) < 2e-6, sorted(diffs.items(), key=lambda kv: -kv[1])
    o = OptimConfig()  # the default warm-up: the learning rate of step s is lr * (s + 1) / warmup
    assert max(diffs[k] for k in cancelled) <= sum(o.lr * (s + 1) / o.warmup for s in range(STEPS))
    halfway = torch.load(tmp_path / "single" / "best.pt", weights_only=False)  # step 2 (no validation Dice to beat)
    assert halfway["step"] == 2  # ... and the steps after it, taken by the resumed ranks, moved the weights
    assert any(not torch.equal(halfway["state_dict"][k], v) for k, v in single["state_dict"].items())

    for rank_files in (first, resumed):
        assert rank_files[1] == [], f"rank 1 wrote {rank_files[1]}"
        assert {"last.pt", "curves.png"} <= set(rank_files[0]), rank_files[0]
    assert "config.json" in first[0]


def _prepared(modality: str, targets: dict[int, str], seed: int) -> PreparedCase:
    g = np.random.default_rng(seed)
    label = g.integers(0, len(targets) + 1, size=(20, 18, 16)).astype(np.uint8)
    record = CaseRecord(f"case{seed}", Path("img.nii.gz"), Path("lab.nii.gz"), modality, "head_neck", modality,
                        targets)
    centres = {v: np.argwhere(label == v).astype(np.int32) for v in targets}
    return PreparedCase(record, torch.from_numpy(g.normal(size=(1, 20, 18, 16)).astype(np.float32)), label, centres)


@pytest.mark.parametrize("world,batch_size", [(2, 4), (4, 4), (3, 6)])
def test_shards_of_the_ranks_are_the_global_batch(world, batch_size):
    """Every rank makes all the draws of the global batch and keeps its share; put together, the shards are the
    batch one process draws, step after step (noise, paraphrases and torch's generator included)."""
    cfg = TrainConfig(output="unused", datasets=(DatasetSpec("CT"), DatasetSpec("PET")),
                      model={"channels": [4, 8], "patch_size": [8, 8, 8], "head_levels": 1},
                      optim={"batch_size": batch_size, "targets_per_step": 2})
    data = [(cfg.datasets[0], [_prepared("CT", {1: "primary tumour", 2: "lymph node"}, s) for s in (1, 2)]),
            (cfg.datasets[1], [_prepared("PET", {1: "primary tumour"}, 3)])]

    def draws(part: slice | None) -> tuple[list, torch.Tensor]:
        torch.manual_seed(0)
        sampler = PatchSampler(cfg, data, seed=7)
        return [sampler.sample(part) for _ in range(12)], torch.get_rng_state()

    whole, state = draws(None)
    ranks = [draws(distributed.shard(batch_size, r, world)) for r in range(world)]
    for _, rank_state in ranks:
        assert torch.equal(rank_state, state)
    for step, (images, masks, modalities, t1s, t2s) in enumerate(whole):
        parts = [r[0][step] for r in ranks]
        assert all(p[0].shape[0] == batch_size // world for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), images), step
        assert torch.equal(torch.cat([p[1] for p in parts]), masks), step
        assert sum((p[2] for p in parts), []) == modalities and sum((p[3] for p in parts), []) == t1s
        assert all(p[4] == t2s for p in parts)


@pytest.mark.parametrize("call,message", [
    (lambda: distributed.shard(3, 0, 2), "batch_size=3 must be a multiple of the world size 2"),
    (lambda: distributed.shard(4, 2, 2), "need 0 <= rank < world size"),
    (lambda: distributed.resolve_backend("mpi", "cpu"), "backend must be one of"),
    (lambda: distributed.resolve_backend("nccl", "cpu"), "needs CUDA GPUs"),
])
def test_ill_distributed_settings(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_single_process_helpers_are_the_identity(monkeypatch):
    """Without torchrun's environment nothing is initialised and the loss statistics stay local."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group() as world:
        assert world == 1 and not distributed.is_distributed()
        x = torch.arange(3.0, requires_grad=True)
        assert distributed.global_sum(x) is x
        assert distributed.shard(4) == slice(0, 4) and distributed.is_main()
        assert distributed.mean_over_ranks(2.5) == 2.5 and distributed.broadcast_object({"a": 1}) == {"a": 1}
        assert distributed.select_device("cpu") == torch.device("cpu")


def test_helpers_across_two_ranks():
    """The process group from torchrun's environment (left at the end and on error), shards, metrics, broadcast,
    and the gradient of a loss of a global sum: averaged over the ranks as DDP does, it is the gradient one process
    computes on the whole batch."""
    data = torch.tensor([[0.3, -1.2], [2.0, 0.1], [-0.7, 0.4], [1.1, 1.5]])
    w0 = torch.tensor([0.5, -1.0])

    def loss_of(sum_fn, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        stats = sum_fn(torch.stack([(rows @ w).exp().sum(), rows.sum()]))  # pooled over the batch
        return stats[0].log() * stats[1]

    def rank_main(i: int) -> None:
        import torch.distributed as dist

        with distributed.process_group("gloo") as world:
            assert world == 2 and distributed.is_distributed() and distributed.rank() == i
            assert distributed.is_main() == (i == 0) and distributed.shard(4) == slice(2 * i, 2 * i + 2)
            assert distributed.select_device("cpu") == torch.device("cpu") and distributed.cpu_threads(0) >= 1
            assert distributed.mean_over_ranks(float(i)) == 0.5
            assert distributed.broadcast_object({"rank": i}) == {"rank": 0}
            w = w0.clone().requires_grad_(True)
            loss_of(distributed.global_sum, data[distributed.shard(4)], w).backward()
            grad = w.grad.clone()
            dist.all_reduce(grad)
            w_ref = w0.clone().requires_grad_(True)
            reference = loss_of(lambda t: t, data, w_ref)
            reference.backward()
            torch.testing.assert_close(grad / world, w_ref.grad, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(loss_of(distributed.global_sum, data[distributed.shard(4)], w0), reference)
        assert not distributed.is_distributed()  # the group is left
        # no collective inside: a rank that leaves first would reset a peer still reading the barrier's reply
        # (gloo "Connection reset by peer", seen once in a CI run); joining the group is the synchronisation
        with pytest.raises(RuntimeError, match="a failing step"), distributed.process_group("gloo"):
            raise RuntimeError("a failing step")
        assert not distributed.is_distributed()  # ... on error too

    _spawn(2, rank_main)


def test_instruction_training_draws_instructions_for_the_step_context():
    """Zeus in training: with instructions.prob, a target's prompt is one of its knowledge-base instructions for the
    step's context (modality, region, MR weighting), else a name; deterministic per seed, disjoint from the
    evaluation's generator seeds; without it the draws are those of before (the demo checkpoint's recipe)."""
    from duplus.instructions import named_targets
    from duplus.vocabulary import t2_paraphrases
    from training.config import InstructionTraining
    from training.train_segmentation import instruction_pool

    base = dict(output="unused", datasets=(DatasetSpec("CT"), DatasetSpec("PET")),
                model={"channels": [4, 8], "patch_size": [8, 8, 8], "head_levels": 1},
                optim={"batch_size": 2, "targets_per_step": 2})
    cfg = TrainConfig(**base, instructions={"prob": 0.5, "per_context": 6})
    data = [(cfg.datasets[0], [_prepared("CT", {1: "primary tumour", 2: "lymph node"}, s) for s in (1, 2)]),
            (cfg.datasets[1], [_prepared("PET", {1: "primary tumour"}, 3)])]
    pool = instruction_pool(cfg, data, progress=False)
    assert set(pool) == {("primary tumour", "CT", "head_neck", None), ("lymph node", "CT", "head_neck", None),
                         ("primary tumour", "PET", "head_neck", None)}
    assert all(len(v) == 6 and len(set(v)) >= 5 for v in pool.values())
    assert pool == instruction_pool(cfg, data, progress=False)                     # deterministic
    assert all("uptake" in t or "SUV" in t or "FDG" in t for t in pool[("primary tumour", "PET", "head_neck", None)])
    with pytest.raises(ValueError, match="needs the instruction pool"):
        PatchSampler(cfg, data, seed=7)
    sampler = PatchSampler(cfg, data, seed=7, instructions=pool)
    kinds = {"name": 0, "instruction": 0}
    for _ in range(30):
        _, masks, modalities, _, t2s = sampler.sample()
        for t2 in t2s:
            (target,) = named_targets(t2) or {None}
            key = (target, modalities[0], "head_neck", None)
            if t2 in pool.get(key, ()):
                kinds["instruction"] += 1
            else:
                assert any(t2 in t2_paraphrases(t) for t in ("primary tumour", "lymph node")), t2
                kinds["name"] += 1
    assert kinds["instruction"] > 10 and kinds["name"] > 10, kinds
    # prob 0 (the default): the same draws as a sampler that knows nothing of instructions
    plain = TrainConfig(**base)
    assert plain.instructions == InstructionTraining()
    a, b = PatchSampler(plain, data, seed=7), PatchSampler(plain, data, seed=7, instructions=pool)
    torch.manual_seed(0)
    first = [a.sample()[4] for _ in range(5)]
    torch.manual_seed(0)
    assert [b.sample()[4] for _ in range(5)] == first
    with pytest.raises(ValueError, match="held-out evaluation"):
        InstructionTraining(prob=0.5, seed=3)
