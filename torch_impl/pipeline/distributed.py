"""Data-parallel training over processes (``torchrun``): rank set-up, slide sharding, gradient averaging.

    torchrun --nproc_per_node N -m torch_impl train --data DIR --out RUN ...

Every process holds a full model replica and trains on its own share of each epoch's slides
(rank r takes positions r, r + N, r + 2N, ... of the epoch order). Before each optimizer step
the processes average their gradients, so all replicas take the same step and stay equal.

Why gradients are averaged by hand (one ``all_reduce``) rather than by
``torch.nn.parallel.DistributedDataParallel``:

* Counting: a step's gradient is the mean over the slides that *actually* contributed,
  across all processes. With ``--skip-bad-slides`` a process may skip a slide, or a whole
  accumulation group; DDP would then either hang (one rank runs no backward) or divide by
  the wrong count. Here the slide count travels in the same reduction as the gradients.
* Phases: DDP fixes the set of parameters it synchronises when it is constructed (those
  with ``requires_grad``). Unfreezing the trunk for phase 2 would need a new DDP wrapper,
  and ``find_unused_parameters`` in phase 1.
* No lost overlap: DDP's advantage is overlapping communication with the backward pass,
  bucket by bucket. The streamed trunk's backward (:class:`torch_impl.streaming.StreamingTrunk`)
  is one custom autograd function that returns *all* trunk gradients at its very end, after
  recomputing every tile, so there is nothing to overlap with for the trunk (nearly all the
  parameters); the head's gradients are tiny.
* Per-slide gradients come from ``torch.autograd.grad`` (see :mod:`torch_impl.pipeline.train`), which
  does not fire DDP's gradient hooks at all.

Equivalence: N processes each accumulating k slides, then averaging, take exactly the step
that one process takes accumulating the same N k slides (``tests/test_ddp.py``).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from .runtime import resolve_device

__all__ = [
    "DistInfo",
    "init_distributed",
    "shutdown_distributed",
    "shard",
    "reduce_gradients",
    "all_reduce_sum",
    "gather_objects",
    "broadcast_parameters",
    "barrier",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process trains (a process group exists)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and logs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_minutes: float = 60.0) -> tuple[DistInfo, torch.device]:
    """Read ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (set by ``torchrun``), join the process group.

    ``device`` goes through :func:`torch_impl.pipeline.runtime.resolve_device` with this
    process's local rank (``"auto"``/``"cuda"``: ``cuda:LOCAL_RANK``), which becomes the
    current CUDA device.

    Without those variables (or ``WORLD_SIZE=1``) nothing is initialised: a single process.
    The backend is NCCL on CUDA and Gloo on the CPU; ``MASTER_ADDR``/``MASTER_PORT`` come from
    the environment (``env://``). An already initialised group is reused.

    Returns:
        (DistInfo, the device this process computes on).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad distributed environment: RANK={rank}, WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and unplaced tensors use this process's GPU
    info = DistInfo(rank, world_size, local_rank)
    if world_size == 1:
        return info, dev
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {missing} not set; launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
        logger.info("process group: rank %d of %d (%s) on %s", rank, world_size, backend, dev)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"environment says rank {rank} of {world_size}"
        )
    return info, dev


def shutdown_distributed(info: DistInfo) -> None:
    """Leave the process group (if this module's caller made one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(order: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of an epoch order: positions rank, rank + N, ... of the order
    padded (by wrapping around to its start) to a multiple of N, so every rank gets the same
    number of slides and takes the same number of optimizer steps."""
    items = list(order)
    if not items:
        return []
    padded = items + [items[i % len(items)] for i in range(-len(items) % world_size)]
    return padded[rank::world_size]


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all processes in place (identity for a single process). Returns it."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def reduce_gradients(params: Sequence[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum every parameter's ``.grad`` over all processes, one flat reduction per dtype.

    Every parameter in ``params`` must have a ``.grad`` (zeros where a process got none), on
    every process, in the same order, so the flat buffers line up.
    """
    if not info.enabled:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            raise RuntimeError("reduce_gradients: a parameter has no .grad; fill it with zeros first")
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every process (replicas start equal)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op for a single process)."""
    if info.enabled:
        dist.barrier()
