"""The report's curves against step, drawn with matplotlib's Agg canvas into PNG bytes.

Figures are built as `Figure` objects on an Agg canvas, not through pyplot, so drawing needs no display, keeps no
global figure state, and cannot switch the backend of a process that imported pyplot for something else.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.reporting.run_files import Metrics

FIGURE_SIZE_IN = (5.6, 3.3)
DPI = 110
# Markers only while they stay apart; a long run's thousands of points read better as a plain line.
MARKERS_UP_TO_POINTS = 60


@dataclass
class Plot:
    title: str
    png: bytes | None  # None when there was nothing to draw; `note` then says why
    note: str = ""


@dataclass
class Curve:
    key: str
    label: str


# (title, y-axis label, curves); a panel is drawn when at least one of its keys was logged.
PANELS = [
    ("Loss", "token-mean cross-entropy", [Curve("loss", "train"), Curve("val/loss", "validation")]),
    ("Learning rate", "lr", [Curve("lr", "lr")]),
    ("Gradient norm", "global gradient norm", [Curve("grad_norm", "grad norm")]),
    ("Samples/s per GPU", "samples/s", [Curve("samples_per_s_per_gpu", "per GPU")]),
    ("MFU", "model FLOPs utilisation", [Curve("mfu", "MFU")]),
    ("Data-wait fraction", "share of step time waiting for data", [Curve("data_wait_frac", "data wait")]),
]
# Keys whose absence is normal and not worth a note: MFU is only logged on GPUs with a known peak.
OPTIONAL_KEYS = {"mfu"}


def metric_plots(metrics: Metrics) -> list[Plot]:
    plots = []
    for title, ylabel, curves in PANELS:
        present = [c for c in curves if metrics.has(c.key)]
        if not present:
            if not all(c.key in OPTIONAL_KEYS for c in curves):
                plots.append(Plot(title, None, f"nothing logged under {', '.join(c.key for c in curves)}"))
            continue
        missing = [c.key for c in curves if c not in present]
        note = f"no {', '.join(missing)} logged (not enabled, or not reached yet)" if missing else ""
        plots.append(_draw(title, ylabel, [(c.label, *metrics.series[c.key]) for c in present], note))
    plots.append(skip_plot(metrics))
    return plots


def skip_plot(metrics: Metrics) -> Plot:
    """Cumulative skipped samples by reason; reasons that stayed at zero are named in the note, not drawn."""
    title = "Skipped samples (cumulative)"
    reasons = sorted(k for k in metrics.series if k.startswith("skipped/"))
    if not reasons:
        return Plot(title, None, "no skipped/* counters logged")
    nonzero = [k for k in reasons if any(v > 0 for v in metrics.series[k][1])]
    if not nonzero:
        return Plot(title, None, f"no sample skipped ({len(reasons)} reasons counted, all zero)")
    lines = [(k.removeprefix("skipped/"), *metrics.series[k]) for k in nonzero]
    return _draw(title, "samples", lines, "other reasons stayed at zero" if len(nonzero) < len(reasons) else "")


def _draw(title: str, ylabel: str, lines: list[tuple[str, list[int], list[float]]], note: str) -> Plot:
    finite = [(label, *_finite(steps, values)) for label, steps, values in lines]
    dropped = sum(len(steps) for _, steps, _ in lines) - sum(len(steps) for _, steps, _ in finite)
    finite = [line for line in finite if line[1]]
    if dropped:
        note = "; ".join(filter(None, [note, f"{dropped} non-finite value{'s' if dropped > 1 else ''} left out"]))
    if not finite:
        return Plot(title, None, note or "no finite values")
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, steps, values in finite:
        marker = "o" if len(steps) <= MARKERS_UP_TO_POINTS else None
        axes.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.4)
    positive = [v for _, _, values in finite for v in values if v > 0]
    all_values = [v for _, _, values in finite for v in values]
    # Learning-rate warm-up and early gradient norms span decades; a log axis keeps the later values readable.
    if len(positive) == len(all_values) and max(positive) / min(positive) > 100:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if len(finite) > 1:
        axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Plot(title, buffer.getvalue(), note)


def _finite(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    kept = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]
