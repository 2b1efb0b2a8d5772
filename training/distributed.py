"""Data-parallel training under torchrun: the pieces every trainer shares.

    torchrun --nproc_per_node 2 -m training.train_segmentation --config configs/demo.yaml

torchrun starts one process per rank and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``).
``process_group`` joins the group from there (gloo on CPU, NCCL on GPU, or as asked) and always
leaves it; without that environment, or with a world of one, nothing is set up and every helper
here is the identity, so a single process trains exactly as it did before.

A trainer draws the *global* batch with the same random draws on every rank and keeps its
``shard``; losses that pool over the batch (a soft Dice over all patches, a Cox partial
likelihood over a risk set) are computed from ``global_sum`` statistics, so that N ranks with
B/N samples each take the same optimisation step as one process with B samples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKEND_ENV = "DUPLUS_DIST_BACKEND"     # gloo | nccl; the --backend flag wins over it
BACKENDS = ("gloo", "nccl")


def env_world_size() -> int:
    """The world size the launcher announced (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, validates and writes files."""
    return rank() == 0


def default_backend(device: str) -> str:
    """NCCL where the ranks train on CUDA GPUs, gloo otherwise (``device`` as in the configuration)."""
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def resolve_backend(requested: str | None, device: str) -> str:
    backend = requested or os.environ.get(BACKEND_ENV) or default_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (--backend or ${BACKEND_ENV}), got {backend!r}")
    if backend == "nccl" and (device == "cpu" or not torch.cuda.is_available()):
        raise ValueError(f"backend 'nccl' needs CUDA GPUs, but device={device!r} and CUDA available is "
                         f"{torch.cuda.is_available()}; use gloo")
    return backend


@contextmanager
def process_group(backend: str | None = None, device: str = "auto",
                  timeout: timedelta = timedelta(minutes=30)) -> Iterator[int]:
    """Join the process group torchrun describes in the environment, and leave it however the block ends.

    Yields the world size. With ``WORLD_SIZE`` unset or 1 nothing is initialised (single process).
    ``timeout`` bounds how long the other ranks wait for rank 0 while it validates alone.
    """
    world = env_world_size()
    if world <= 1:
        yield 1
        return
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this PyTorch build has no torch.distributed")
    backend = resolve_backend(backend, device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timeout)
    log.info("rank %d of %d (local rank %d), backend %s", dist.get_rank(), world, local_rank(), backend)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def select_device(requested: str) -> torch.device:
    """The configured device (auto | cpu | cuda); under DDP each rank takes the GPU of its local rank."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank()) if is_distributed() else torch.device("cuda")


def cpu_threads(configured: int) -> int:
    """Intra-op threads: the configured count, or the cores shared out between the ranks of this machine."""
    if configured:
        return configured
    cores = os.cpu_count() or 1
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if is_distributed() else 1
    return max(1, cores // per_machine)


def shard(batch_size: int, rank_: int | None = None, world: int | None = None) -> slice:
    """A rank's contiguous share of a global batch (default: this rank's): rank r keeps [r*B/N, (r+1)*B/N)."""
    n = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if n < 1 or not 0 <= r < n:
        raise ValueError(f"rank {r} of world size {n}: need 0 <= rank < world size")
    if batch_size % n:
        raise ValueError(f"optim.batch_size={batch_size} must be a multiple of the world size {n} "
                         f"(each rank trains on batch_size / world_size samples)")
    per_rank = batch_size // n
    return slice(r * per_rank, (r + 1) * per_rank)


def global_sum(local: torch.Tensor) -> torch.Tensor:
    """The sum of ``local`` over all ranks, differentiable through this rank's share.

    The value is the all-reduced sum; the gradient flows into ``local`` only, scaled by the world
    size, so that DDP's averaging of gradients yields the gradient of a loss computed from the global
    sum (every rank computes the same function of it). The collective runs in the forward pass
    only: none is added to backward, where DDP's own gradient buckets are in flight.
    """
    if not is_distributed():
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    return total + world_size() * (local - local.detach())


def mean_over_ranks(value: float | torch.Tensor) -> float:
    """A scalar metric averaged over the ranks (for logging; no gradient)."""
    if not is_distributed():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable object, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writing phantom data or a feature cache), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel, or the model itself in a single process.

    BatchNorm would normalise each rank's B/N samples on their own: on GPUs it becomes SyncBatchNorm
    (statistics of the global batch); on CPU, where PyTorch has no SyncBatchNorm, it is refused.
    ``find_unused_parameters``: the stems of the modalities absent from a step take no part in it.
    """
    if not is_distributed():
        return model
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn:
        if device.type != "cuda":
            raise ValueError("model.norm='batch' cannot train data-parallel on CPU (no SyncBatchNorm there); "
                             "use norm 'instance' or 'group', or CUDA devices")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


__all__ = ["BACKENDS", "BACKEND_ENV", "barrier", "broadcast_object", "cpu_threads", "data_parallel",
           "default_backend", "env_world_size", "global_sum", "is_distributed", "is_main", "local_rank",
           "main_first", "mean_over_ranks", "process_group", "rank", "resolve_backend", "select_device", "shard",
           "world_size"]
