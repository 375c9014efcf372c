"""The report's HTML: one page with inline CSS and no script, so it opens from disk and can be mailed or archived."""

from __future__ import annotations

import html
import math
import time

from pipeline.reporting.plots import Plot
from pipeline.reporting.run_files import EvalResult, Metrics, RunConfigText
from pipeline.reporting.sample_grid import png_data_uri

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.note { color: #666; font-size: 0.9em; } .problem { color: #a40; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 0.8em; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #666; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.5em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; position: sticky; top: 0; }
.grid td { max-width: 22em; } .key { font-size: 0.75em; color: #888; }
.match { background: #dfd; } .gen { background: #fff; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def render_page(title: str, sections: list[tuple[str, str]]) -> str:
    """The whole document; `sections` are (heading, inner HTML) pairs, headings plain text."""
    body = [f"<h1>{html.escape(title)}</h1>", f"<p class='note'>written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p>"]
    for heading, inner in sections:
        body.append(f"<section><h2>{html.escape(heading)}</h2>{inner}</section>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def summary_html(run_name: str, metrics: Metrics, config: RunConfigText) -> str:
    rows = [("run", run_name), ("stage", str(config.stage) if config.stage is not None else "unknown")]
    last_step = max((steps[-1] for steps, _ in metrics.series.values() if steps), default=None)
    if last_step is None:
        rows.append(("last logged step", "none yet"))
    else:
        target = f" of {config.max_steps}" if config.max_steps else ""
        rows.append(("last logged step", f"{last_step}{target}"))
    for key, label in (("loss", "last train loss"), ("val/loss", "last validation loss")):
        last = metrics.last(key)
        if last:
            rows.append((label, f"{format_number(last[1])} (step {last[0]})"))
    if metrics.first_time is not None and metrics.last_time is not None:
        rows.append(("logged over", _duration(metrics.last_time - metrics.first_time)))
    if metrics.resumes:
        rows.append(("resumed", f"{metrics.resumes} times (steps logged twice are shown as the resumed run saw them)"))
    out = _table(rows)
    if metrics.unreadable_lines:
        out += f"<p class='problem'>{metrics.unreadable_lines} lines of metrics.jsonl could not be read.</p>"
    if config.problem:
        out += f"<p class='problem'>{html.escape(config.problem)}</p>"
    return out


def plots_html(plots: list[Plot], metrics: Metrics) -> str:
    if metrics.records == 0:
        return "<p class='note'>metrics.jsonl is missing or empty: no step has been logged yet.</p>"
    figures = []
    for plot in plots:
        caption = f"<figcaption>{html.escape(plot.note)}</figcaption>" if plot.note else ""
        if plot.png is None:
            figures.append(f"<figure><strong>{html.escape(plot.title)}</strong>{caption}</figure>")
        else:
            image = f"<img src='{png_data_uri(plot.png)}' alt='{html.escape(plot.title)}' class='plot'>"
            figures.append(f"<figure>{image}{caption}</figure>")
    return "<div class='plots'>" + "".join(figures) + "</div>"


def evals_html(results: list[EvalResult]) -> str:
    if not results:
        return "<p class='note'>No evaluation outputs under eval/ yet.</p>"
    parts = []
    for result in results:
        parts.append(f"<h3>{html.escape(result.name)}</h3>")
        if result.problem:
            parts.append(f"<p class='problem'>{html.escape(result.problem)}</p>")
        if result.metrics is not None:
            if result.metrics.get("task") == "vqa":
                parts.append("<p class='note'>VQA accuracies are in percent, as the official VQA script reports.</p>")
            parts.append(_table(list(_flatten(result.metrics))) or "<p class='note'>metrics.json holds no numbers.</p>")
        if result.misses:
            rows = "".join(
                f"<tr><td>{html.escape(str(m['input']))}</td><td>{html.escape(str(m['output']))}</td>"
                f"<td>{html.escape(str(m['expected']))}</td></tr>"
                for m in result.misses
            )
            parts.append(
                f"<p class='note'>First misses ({len(result.misses)} shown):</p><table><tr><th>input</th>"
                f"<th>generated</th><th>expected</th></tr>{rows}</table>"
            )
    return "".join(parts)


def config_html(config: RunConfigText) -> str:
    if not config.text:
        return f"<p class='problem'>{html.escape(config.problem)}</p>"
    return f"<details><summary>config.yaml (resolved)</summary><pre>{html.escape(config.text)}</pre></details>"


# Provenance fields of metrics.json (hashes of what was generated from, input file lists) are not results.
SKIPPED_EVAL_KEYS = {"fingerprint", "files"}


def _flatten(metrics: dict, prefix: str = ""):
    """(name, shown value) for every number and short string, nested dicts as "outer/inner"."""
    for key, value in metrics.items():
        if key in SKIPPED_EVAL_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, format_number(value)
        elif isinstance(value, str) and value:
            yield name, value


def format_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _table(rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    cells = "".join(
        f"<tr><th>{html.escape(name)}</th><td{_numeric_class(value)}>{html.escape(value)}</td></tr>"
        for name, value in rows
    )
    return f"<table>{cells}</table>"


def _numeric_class(value: str) -> str:
    try:
        float(value)
    except ValueError:
        return ""
    return " class='num'"
