"""Process-group setup that works under torchrun (any number of ranks, NCCL or gloo) and as one plain process."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the ranks it trains with. `rank` and `world_size` count those ranks only; with
    tracker.placement=ranks they are the first ranks of the torchrun world (so `rank` is also the global rank) and
    `group` is their process group, which every helper below and DDP use (None: the whole world)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA device is visible")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); without torchrun run alone.

    NCCL on CUDA, gloo on CPU. Multi-node: torchrun's rendezvous flags (--nnodes, --node_rank, --rdzv_endpoint)
    set the same variables, so nothing else changes here.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier(group=info.group)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=info.group)
    return tensor


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """`src` is a global rank (rank 0 trains in every placement)."""
    if info.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=info.group)
    return holder[0]


def shutdown(info: DistInfo) -> None:
    # `group`: a single training rank beside tracking ranks still belongs to a world of several
    if (info.world_size > 1 or info.group is not None) and dist.is_initialized():
        dist.destroy_process_group()
