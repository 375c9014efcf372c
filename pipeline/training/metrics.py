"""Training metrics: rank 0's console progress, a JSONL file in the run directory, wandb, and the run report.

On the console rank 0 shows step, loss, samples/s and the ETA: one live progress line when stdout is a terminal,
and in batch logs (stdout a file or a pipe) the periodic metric line, with the ETA added. The ETA is the steps left
over the step rate measured since the first step this process finished, so start-up and a resumed run's earlier
steps do not skew it, while sample rounds, validation and checkpoints count, as they do on the wall clock.

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
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

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
    """Rank 0 writes; other ranks hold a logger that does nothing, so call sites need no rank checks.

    `live` chooses the console's progress line (default: whether stdout is a terminal)."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        wandb_settings: dict | None,
        config_dict: dict,
        resume_id: str | None = None,
        live: bool | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.wandb_run = None
        self.jsonl = None
        self.progress: ConsoleProgress | None = None
        self.live = sys.stdout.isatty() if live is None else live
        if not enabled:
            return
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_settings and wandb_settings["mode"] != "disabled":
            self.wandb_run = _start_wandb(self.run_dir, wandb_settings, config_dict, resume_id)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def start_progress(self, step: int, max_steps: int) -> None:
        """The loop is about to run from `step` to `max_steps`: start the ETA clock (and the live line)."""
        if self.enabled:
            self.progress = ConsoleProgress(step, max_steps, self.live)

    def advance(self, step: int) -> None:
        """A training step has finished; cheap enough for every step (it reads nothing from the device)."""
        if self.progress is not None:
            self.progress.advance(step)

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if not console:
            return
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if not isinstance(v, dict))
        if self.progress is None or "loss" not in metrics:
            log.info("step %d %s", step, shown)
            return
        eta = self.progress.show(metrics)
        # On a live console the progress line shows this step, so the record stays off the console; it still reaches
        # the rank's log file.
        log.info("step %d/%d %s eta=%s", step, self.progress.max_steps, shown, eta, extra={PROGRESS_RECORD: True})

    def close(self) -> None:
        """End the live line, close the files and wandb, and refresh the run report one last time."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.enabled:
            refresh_report(self.run_dir)


def refresh_report(run_dir: Path) -> None:
    """Rewrite run_dir/report.html. A report that cannot be written is a warning: it never stops training."""
    try:
        # Imported here: the report pulls in matplotlib, which a rank that never writes one should not pay for.
        from pipeline.reporting import write_report

        write_report(run_dir)
    except Exception as error:
        log.warning(
            "could not write the run report in %s (%s: %s); the run is not affected",
            run_dir,
            type(error).__name__,
            error,
        )


# A log record with this attribute set is a step line that the live progress line already shows on the console.
PROGRESS_RECORD = "progress_line"


class ConsoleProgress:
    """Step rate, ETA and, on a terminal, the live progress line of one training loop."""

    def __init__(self, step: int, max_steps: int, live: bool, clock=time.monotonic):
        self.max_steps = max_steps
        self.clock = clock
        self.first: tuple[int, float] | None = None  # (step, time) of the first step finished here
        self.latest: tuple[int, float] | None = None
        self.shown = ""
        self.bar = None
        self.swapped: list[tuple[logging.Handler, logging.Handler]] = []
        if live:
            self.bar = tqdm(
                total=max_steps,
                initial=step,
                file=sys.stdout,
                dynamic_ncols=True,
                mininterval=0.5,
                bar_format="step {n}/{total} {percentage:3.0f}%|{bar}| {desc}",
            )
            self._route_console_logs()

    def advance(self, step: int) -> None:
        now = self.clock()
        if self.first is None:
            self.first = (step, now)
        self.latest = (step, now)
        if self.bar is not None:
            self.bar.set_description_str(self._line(), refresh=False)
            self.bar.update(step - self.bar.n)

    def eta_s(self) -> float | None:
        """Seconds to max_steps at the measured rate; None until two steps have finished."""
        if self.first is None or self.latest is None or self.latest[0] == self.first[0]:
            return None
        (first_step, first_time), (step, now) = self.first, self.latest
        seconds_per_step = (now - first_time) / (step - first_step)
        return max(self.max_steps - step, 0) * seconds_per_step

    def show(self, metrics: dict) -> str:
        """Take the newest loss and throughput for the live line; returns the ETA as shown."""
        parts = [f"loss {_fmt(metrics['loss'])}"]
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
        self.shown = " · ".join(parts)
        if self.bar is not None:
            self.bar.set_description_str(self._line())
        return format_duration(self.eta_s())

    def _line(self) -> str:
        eta = f"ETA {format_duration(self.eta_s())}"
        return f"{self.shown} · {eta}" if self.shown else eta

    def _route_console_logs(self) -> None:
        """Console log records are written above the live line, so it stays the last line of the terminal."""
        handlers = logging.getLogger().handlers
        for index, handler in enumerate(handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr):
                handlers[index] = _AboveTheLiveLine(handler)
                self.swapped.append((handler, handlers[index]))

    def close(self) -> None:
        handlers = logging.getLogger().handlers
        for handler, above in self.swapped:
            if above in handlers:
                handlers[handlers.index(above)] = handler
        self.swapped = []
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _AboveTheLiveLine(logging.Handler):
    """Stands in for a console handler while the live line runs: same level, filters and format, written through
    tqdm so the line is redrawn below the record; step lines are left out, the live line shows them."""

    def __init__(self, console: logging.StreamHandler):
        super().__init__(console.level)
        self.console = console
        self.setFormatter(console.formatter)
        for record_filter in console.filters:
            self.addFilter(record_filter)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, PROGRESS_RECORD, False):
            return
        try:
            tqdm.write(self.format(record), file=self.console.stream)
        except Exception:
            self.handleError(record)


def format_duration(seconds: float | None) -> str:
    """4h05m, 12m30s, 45s; '?' while unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


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
