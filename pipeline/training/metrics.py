"""Training metrics: a rank-0 console line, a JSONL file in the run directory, and wandb.

MFU counts useful FLOPs only (no padding, no recompute), per optimizer step:
    frozen LLM body 4 * N_body * T     forward (2N) plus the backward to activations only (2N), T = real tokens
                                       (BOS + image tokens + text); N_body = the LLM's parameters less its input
                                       embedding (a lookup) and its LM head; no weight gradients are computed
    LM head         4 * N_head * S     the same, at the S supervised positions only (the only logits computed)
    resampler       6 * N_res * B * L  forward plus the full backward, L latents per sample
    vision tower    2 * N_vis * B * P  forward only, P = patches + CLS; zero when reading cached features
    (stage 2 adds 2 * N_adapters * T: the adapters' weight gradients; the adapters are part of N_body)
Attention's quadratic term is left out (small at these lengths). MFU = FLOPs / step time / (GPUs * peak).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak per GPU, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def step_flops(
    n_body: int,
    n_head: int,
    n_resampler: int,
    n_vision: int,
    llm_tokens: float,
    supervised_tokens: float,
    samples: float,
    latents: int,
    vision_tokens: int,
) -> float:
    """Useful FLOPs of a step (see the module docstring)."""
    return (
        4.0 * n_body * llm_tokens
        + 4.0 * n_head * supervised_tokens
        + 6.0 * n_resampler * samples * latents
        + 2.0 * n_vision * samples * vision_tokens
    )


def llm_flop_parameters(llm, count) -> tuple[int, int]:
    """(N_body, N_head) of a causal LM, `count` counting a module's parameters (4-bit weights unpacked)."""
    embedding, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    n_embedding, n_head = count(embedding), count(head)
    tied = head.weight is embedding.weight
    return count(llm) - n_embedding - (0 if tied else n_head), n_head


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so call sites need no rank checks."""

    def __init__(
        self, run_dir: Path, enabled: bool, wandb_settings: dict | None, config_dict: dict, resume_id: str | None = None
    ):
        self.enabled = enabled
        self.wandb_run = None
        self.jsonl = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_settings and wandb_settings["mode"] != "disabled":
            self.wandb_run = _start_wandb(run_dir, wandb_settings, config_dict, resume_id)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if console:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if not isinstance(v, dict))
            log.info("step %d %s", step, shown)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def wandb_mode(setting: str) -> str:
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


def _start_wandb(run_dir: Path, settings: dict, config_dict: dict, resume_id: str | None):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; metrics go to metrics.jsonl only")
        return None
    return wandb.init(
        project=settings["project"],
        name=settings["name"] or run_dir.name,
        dir=str(run_dir),
        mode=settings["mode"],
        config=config_dict,
        id=resume_id,
        resume="allow" if resume_id else None,
    )
