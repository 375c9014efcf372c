"""Process-group set-up from whatever launched us (the rank layout: `pipeline.common.dist_env`)."""

from __future__ import annotations

import datetime
import os

from pipeline.common.dist_env import DistEnv, free_port, read_dist_env


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
