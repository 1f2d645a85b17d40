"""Spawn N gloo ranks on CPU for multi-process tests: `spawn(fn, world_size, *args)`.

Each rank gets one thread (two ranks x two threads on two cores is ~100x slower), a fresh free port,
and an environment without a previous run's MASTER_*/RANK variables.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  imported after init_process_group, these two pin the
import torch.distributed.fsdp  # noqa: F401  group past destroy (retrieval.index.init_distributed_from_env)
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) on world_size gloo processes; raises if any rank fails."""
    mp.spawn(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
