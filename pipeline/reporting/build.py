"""`write_report`: assemble a run directory's report page from its files and write it atomically.

This is what callers import (the CLI in `pipeline.report`, and training or the demo when they refresh a run's
report); it imports nothing of the model, data or training code, so any layer may call it.
"""

from __future__ import annotations

import gc
import html
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.reporting.page import config_html, evals_html, plots_html, render_page, summary_html
from pipeline.reporting.plots import metric_plots
from pipeline.reporting.run_files import read_config, read_evals, read_metrics, read_sample_rounds
from pipeline.reporting.sample_grid import sample_grid_html

log = logging.getLogger(__name__)
REPORT_NAME = "report.html"
DEFAULT_MAX_ROUNDS = 16


def write_report(run_dir: Path, out: Path | None = None, max_rounds: int = DEFAULT_MAX_ROUNDS) -> Path:
    """Write the report of `run_dir` (to `run_dir/report.html` unless `out` is given) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out = Path(out) if out is not None else run_dir / REPORT_NAME
    metrics = read_metrics(run_dir / "metrics.jsonl")
    config = read_config(run_dir / "config.yaml")
    sections = [
        ("Summary", _section("summary", lambda: summary_html(run_dir.resolve().name, metrics, config))),
        ("Training curves", _section("curves", lambda: plots_html(metric_plots(metrics), metrics))),
        ("Samples by round", _section("samples", lambda: _samples_html(run_dir / "samples", max_rounds))),
        ("Evaluation", _section("evaluation", lambda: evals_html(read_evals(run_dir / "eval")))),
        ("Config", _section("config", lambda: config_html(config))),
    ]
    page = render_page(f"Run report: {run_dir.resolve().name}", sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Training rewrites the report while someone may be reading it: a reader sees the old page or the new one.
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, out)
    # Drawing leaves reference cycles behind: matplotlib's mathtext parser (log-axis tick labels) keeps exceptions
    # whose tracebacks reach up the stack into the caller's frames. Until a full collection those frames keep the
    # caller's locals alive; in training that is the trainer and its data-loader workers, which the interpreter
    # then waits for at exit instead of shutting them down when training returns.
    gc.collect()
    return out


def _samples_html(samples_dir: Path, max_rounds: int) -> str:
    rounds, problems = read_sample_rounds(samples_dir)
    notes = "".join(f"<p class='problem'>unreadable sample round {html.escape(p)}</p>" for p in problems)
    if not rounds:
        where = "samples/ has no step_*.jsonl" if samples_dir.is_dir() else "there is no samples/ directory"
        why = "sample logging is off (logging.sample_every_steps, logging.sample_shards) or no round has run yet"
        return notes + f"<p class='note'>No sample rounds: {where}; {why}.</p>"
    return notes + sample_grid_html(rounds, max_rounds)


def _section(name: str, build: Callable[[], str]) -> str:
    """One section's HTML; a section that fails says so in the page, so the rest of the report is still written."""
    try:
        return build()
    except Exception as error:  # the report must not take down the training run that asked for it
        log.warning("run report: the %s section failed", name, exc_info=True)
        return (
            f"<p class='problem'>This section could not be built: {html.escape(type(error).__name__)}: "
            f"{html.escape(str(error))}</p>"
        )
