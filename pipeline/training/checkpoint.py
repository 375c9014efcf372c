"""Checkpoints that a run can resume from exactly, and that a preempted write can never corrupt.

Layout under `<run_dir>/checkpoints/`:
    step_00001000/                DeepSpeed's files (resampler, ZeRO optimizer partitions, scheduler)
    step_00001000/rank_00003.pt   that rank's data-loader position and RNG states
    step_00001000/COMPLETE        written by rank 0 after every rank has finished writing
    latest                        the newest complete tag, replaced atomically

Resume picks the newest tag that has COMPLETE, so a checkpoint cut off mid-write (preemption, node failure) is
never chosen even if `latest` was not yet updated. Such partial folders are removed at resume and, when older than
the newest complete checkpoint, after every save: nobody can finish them, and a run killed at a step it never saves
again would otherwise keep one on disk forever.
"""

from __future__ import annotations

import io
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.common.files import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^step_(\d{8})$")
COMPLETE_MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = TAG_PATTERN.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_partial_checkpoints(checkpoint_dir: Path, before_step: int | None = None) -> list[Path]:
    """Delete checkpoint folders without COMPLETE (those of steps below `before_step` only, when given)."""
    if not checkpoint_dir.is_dir():
        return []
    removed = []
    for path in checkpoint_dir.iterdir():
        match = TAG_PATTERN.match(path.name)
        if not match or (path / COMPLETE_MARKER).is_file():
            continue
        if before_step is None or int(match.group(1)) < before_step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d partial checkpoint(s): %s", len(removed), ", ".join(p.name for p in sorted(removed)))
    return removed


def latest_complete(checkpoint_dir: Path) -> Path | None:
    found = complete_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine, checkpoint_dir: Path, step: int, rank_state: dict, trainer_state: dict, rank: int, keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's directory."""
    tag = tag_for(step)
    path = checkpoint_dir / tag
    # DeepSpeed writes its own `latest` file only when asked; ours is written after COMPLETE instead.
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=trainer_state, save_latest=False)
    buffer = io.BytesIO()
    torch.save({"rank_state": rank_state, "rng": rng_state()}, buffer)
    write_bytes_atomic(path / f"rank_{rank:05d}.pt", buffer.getvalue())
    dist.barrier()
    if rank == 0:
        (path / COMPLETE_MARKER).write_text(f"{step}\n")
        write_text_atomic(checkpoint_dir / "latest", tag)
        for _, old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        remove_partial_checkpoints(checkpoint_dir, before_step=step)
        log.info("saved checkpoint %s", path)
    dist.barrier()
    return path


def load_checkpoint(engine, path: Path, rank: int) -> tuple[dict, dict]:
    """Restore DeepSpeed state from `path`; returns (trainer_state, this rank's state). RNG is restored too."""
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise RuntimeError(
            f"checkpoint {path} has no {rank_file.name}: it was written by a run with fewer ranks; "
            "resume with the same number of processes"
        )
    _, trainer_state = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    saved = torch.load(rank_file, weights_only=False)
    set_rng_state(saved["rng"])
    return trainer_state or {}, saved["rank_state"]
