"""Reading what a run wrote: logged metrics, sample rounds, evaluation outputs and the resolved config.

Every reader tolerates a partial run (a file not written yet, a line cut off by a killed writer) and says what it
could not read instead of raising, because the report is also written while the run is still going.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Metrics:
    """Each logged key's (steps, values), in step order, as the run that reached the newest step saw them."""

    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    records: int = 0
    unreadable_lines: int = 0
    resumes: int = 0
    first_time: float | None = None
    last_time: float | None = None

    def has(self, key: str) -> bool:
        return bool(self.series.get(key, ([], []))[0])

    def last(self, key: str) -> tuple[int, float] | None:
        steps, values = self.series.get(key, ([], []))
        return (steps[-1], values[-1]) if steps else None


def read_metrics(path: Path) -> Metrics:
    """metrics.jsonl: one JSON object per logged step, {"step", "time", key: number, ...}.

    A resumed run appends to the same file and logs again the steps after its checkpoint; whatever the interrupted
    run had logged from that step on never happened in the run that continued, so it is dropped."""
    metrics = Metrics()
    points: dict[str, dict[int, float]] = {}
    newest_step = -1
    if not path.is_file():
        return metrics
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            metrics.unreadable_lines += 1
            continue
        if step < newest_step:
            metrics.resumes += 1
            for by_step in points.values():
                for later in [s for s in by_step if s >= step]:
                    del by_step[later]
        newest_step = step
        metrics.records += 1
        if isinstance(record.get("time"), (int, float)):
            metrics.first_time = record["time"] if metrics.first_time is None else metrics.first_time
            metrics.last_time = record["time"]
        for key, value in record.items():
            # bool is an int subclass; a flag is not a curve.
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                points.setdefault(key, {})[step] = float(value)
    for key, by_step in points.items():
        steps = sorted(by_step)
        metrics.series[key] = (steps, [by_step[s] for s in steps])
    return metrics


@dataclass
class SampleRow:
    key: str
    image: Path | None  # absolute path of the sample's image, None when the row names none
    prompt: str
    reference: str
    generated: str


@dataclass
class SampleRound:
    step: int
    rows: list[SampleRow]


def read_sample_rounds(samples_dir: Path) -> tuple[list[SampleRound], list[str]]:
    """Every samples/step_XXXXXXXX.jsonl in step order, and a note for each file that could not be read."""
    rounds, problems = [], []
    for path in sorted(samples_dir.glob("step_*.jsonl")):
        try:
            step = int(path.stem.removeprefix("step_"))
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            rows = [
                SampleRow(
                    key=str(r["key"]),
                    image=samples_dir / r["image"] if r.get("image") else None,
                    prompt=str(r.get("prompt") or ""),
                    reference=str(r.get("reference", "")),
                    generated=str(r.get("generated", "")),
                )
                for r in records
            ]
        except (ValueError, KeyError, TypeError, OSError) as error:
            problems.append(f"{path.name}: {type(error).__name__}: {error}")
            continue
        rounds.append(SampleRound(step, rows))
    rounds.sort(key=lambda r: r.step)
    return rounds, problems


@dataclass
class EvalResult:
    name: str  # the folder under eval/
    metrics: dict | None  # metrics.json, None while the evaluation has not finished
    misses: list[dict]  # a few examples the model got wrong: {"input", "output", "expected"}
    problem: str = ""


def read_evals(eval_dir: Path, max_misses: int = 5) -> list[EvalResult]:
    """One result per folder of eval/ (python -m pipeline.eval --out, or the demo's toy_caption and vqa)."""
    results = []
    for folder in sorted(p for p in eval_dir.glob("*") if p.is_dir()):
        metrics_path = folder / "metrics.json"
        result = EvalResult(folder.name, None, [])
        if metrics_path.is_file():
            try:
                result.metrics = json.loads(metrics_path.read_text())
            except ValueError as error:
                result.problem = f"metrics.json is not valid JSON ({error})"
        else:
            result.problem = "no metrics.json yet (still generating, or stopped before scoring)"
        result.misses = _read_misses(folder, max_misses)
        results.append(result)
    return results


def _read_misses(folder: Path, limit: int) -> list[dict]:
    """Wrong answers from answers.jsonl (VQA: accuracy below 1) or toy_captions.jsonl (caption differs)."""
    misses = []
    for name in ("answers.jsonl", "toy_captions.jsonl"):
        path = folder / name
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if "accuracy" in record and _is_number(record["accuracy"]) and record["accuracy"] < 1:
                expected = ", ".join(sorted(set(map(str, record.get("human_answers", [])))))
                misses.append(
                    {"input": record.get("question", ""), "output": record.get("answer", ""), "expected": expected}
                )
            elif "generated" in record and _normalise(record["generated"]) != _normalise(record.get("reference", "")):
                misses.append(
                    {"input": record.get("key", ""), "output": record["generated"], "expected": record["reference"]}
                )
            if len(misses) == limit:
                return misses
    return misses


def _normalise(text) -> str:
    return " ".join(str(text).lower().split())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RunConfigText:
    text: str  # config.yaml as written, "" when missing
    stage: int | None = None
    max_steps: int | None = None
    problem: str = ""


def read_config(path: Path) -> RunConfigText:
    if not path.is_file():
        return RunConfigText("", problem="no config.yaml in the run directory")
    text = path.read_text(errors="replace")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        return RunConfigText(text, problem=f"config.yaml does not parse as YAML ({error})")
    if not isinstance(raw, dict):
        return RunConfigText(text, problem="config.yaml is not a mapping")
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    stage, max_steps = raw.get("stage"), train.get("max_steps")
    return RunConfigText(
        text,
        stage=stage if isinstance(stage, int) else None,
        max_steps=max_steps if isinstance(max_steps, int) else None,
    )
