"""Process-group set-up from whatever launched us: the deepspeed launcher, torchrun, or srun.

The deepspeed launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK; srun exports SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID. A bare `python -m pipeline.train` runs as a world of one on loopback.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_dist_env() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistEnv(0, 1, 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str, timeout_s: int = 600) -> DistEnv:
    """Start the process group (once) and pick this rank's device; returns the rank layout."""
    import deepspeed
    import torch

    dist_env = read_dist_env()
    os.environ.setdefault("RANK", str(dist_env.rank))
    os.environ.setdefault("WORLD_SIZE", str(dist_env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(dist_env.local_rank))
    if dist_env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.distributed_backend=nccl needs GPUs; on a CPU machine use train.distributed_backend=gloo"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return dist_env


def device_for(dist_env: DistEnv):
    import torch

    return torch.device("cuda", dist_env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
