"""The process group of a fine-tuning run: one process, or many under ``torchrun``.

``torchrun`` (single- or multi-node) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in
each process's environment. :func:`start` reads them, joins the process group (``gloo``
for CPU tensors, ``nccl`` for CUDA ones) and picks each process's device; without them it
returns a one-process context and nothing is initialised. A group it initialises stays
until the process ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run.

    Attributes:
        rank: index of this process, 0 .. world_size - 1.
        world_size: number of processes.
        device: the device this process trains on.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None, local_rank: int = 0,
                   world_size: int = 1) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available (``cuda:LOCAL_RANK``), else CPU."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {str(device)!r} is not a device: use auto, cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available; "
                             "use device='cpu'")
        if device.index is not None and world_size > 1:
            raise ValueError(f"device {str(device)!r} would put every process on one GPU: "
                             "under torchrun give device='cuda' (each process takes "
                             "cuda:LOCAL_RANK)")
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"process {local_rank} has no GPU of its own "
                                 f"({torch.cuda.device_count()} visible): start at most that "
                                 "many processes per node, or use device='cpu'")
            device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def start(device: str | torch.device | None = None) -> Iterator[Context]:
    """Joins the ``torchrun`` process group if there is one.

    The group is kept for the rest of the process, so that later runs in it use the same
    group: initialising one again after destroying it can hang on torchrun's store.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        yield Context(rank=0, world_size=1, device=resolve_device(device))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device, local_rank, world_size)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("joined a %s process group of %d as rank %d", backend,
                    dist.get_world_size(), dist.get_rank())
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    yield Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=chosen)


def sum_across(context: Context, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (the values themselves alone)."""
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device(context))
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(context: Context, model: nn.Module) -> None:
    """Gives every process rank 0's buffers (BatchNorm statistics), so all hold one model."""
    if not context.distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def _comm_device(context: Context) -> torch.device:
    # nccl only moves CUDA tensors; gloo takes CPU ones.
    return context.device if context.device.type == "cuda" else torch.device("cpu")
