"""Where this process stands in its job, read from whatever launched it, before any process group exists.

The deepspeed launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK; srun exports SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID. A bare `python -m pipeline.train` runs as a world of one on loopback.
"""

from __future__ import annotations

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


def job_rank_and_world(env=os.environ) -> tuple[int, int]:
    """One worker's place in an offline job (the feature cache): torchrun's RANK/WORLD_SIZE; else SLURM array task x
    srun task; else rank 0 of 1. Raises ValueError for an array task outside a contiguous range.

    SLURM's task count is taken from SLURM_STEP_NUM_TASKS, which only srun sets: a script that runs the job once
    in the batch step of a multi-task allocation then counts as one rank, not as rank 0 of several that never run.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    rank, world = int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_STEP_NUM_TASKS", 1))
    if "SLURM_ARRAY_TASK_ID" in env:
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        index = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))) // step
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if not 0 <= index < count:
            raise ValueError(f"SLURM array task {env['SLURM_ARRAY_TASK_ID']} is not in a contiguous range")
        rank, world = index * world + rank, count * world
    return rank, world


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
