"""The run report (`python -m pipeline.report`): plots, the sample grid, eval and config sections, partial runs, and
the page as a browser shows it; training's side of it: the report refreshed at the end, and the console's progress.

The run directories are written here in the formats the trainer, the sample logger and the evaluation harness
write, so the report is checked against those files without training anything. The browser test opens the page
from disk in Debian's headless Chromium; it skips, with the reason, where Chromium or chromedriver are missing,
unless PIPELINE_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

import base64
import gc
import io
import json
import logging
import math
import subprocess
import sys
import weakref
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from browser import open_headless_chromium
from PIL import Image

from pipeline.report import write_report
from pipeline.reporting.run_files import read_metrics
from pipeline.reporting.sample_grid import choose_rounds
from pipeline.training.metrics import MetricsLogger, format_duration, refresh_report

ROOT = Path(__file__).resolve().parents[1]
SKIP_REASONS = ["bad_caption", "bad_tar", "corrupt_image", "empty_caption", "missing_member", "oversized_image"]
PLOT_TITLES = [
    "Loss",
    "Learning rate",
    "Gradient norm",
    "Samples/s per GPU",
    "MFU",
    "Data-wait fraction",
    "Skipped samples (cumulative)",
]
ROUNDS = {50: ["a shape", "a red shape", "a small red circle"], 100: ["a red circle", "a small red circle", None]}


def train_record(step: int, with_mfu: bool = True) -> dict:
    """One line as the trainer's _step_metrics logs it (cumulative skip counters, every reason present)."""
    record = {
        "step": step,
        "time": 1_700_000_000.0 + 2.0 * step,
        "loss": 4.0 * math.exp(-step / 60) + 0.5,
        "lr": 2e-4 * min(1.0, step / 20),
        "grad_norm": float("nan") if step == 10 else 3.0 / (1 + step / 40),
        "samples_per_s": 410.0,
        "tokens_per_s": 31_000.0,
        "samples_per_s_per_gpu": 205.0 + step % 7,
        "data_wait_frac": 0.02 + 0.001 * (step % 5),
        "peak_mem_gb": 61.5,
        "skipped": float(step // 20),
        **{f"skipped/{reason}": 0.0 for reason in SKIP_REASONS},
    }
    record["skipped/corrupt_image"] = float(step // 20)
    if with_mfu:
        record["mfu"] = 0.41 + 0.001 * (step % 3)
    return record


def write_metrics(run_dir: Path, steps: list[int], val_every: int = 50, with_mfu: bool = True) -> None:
    lines = []
    for step in steps:
        lines.append(train_record(step, with_mfu))
        if val_every and step % val_every == 0:
            lines.append({"step": step, "time": 1_700_000_000.0 + 2.0 * step + 1, "val/loss": 1.0 + 30 / step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_samples(run_dir: Path, stage: int) -> None:
    """Two rounds of samples/step_XXXXXXXX.jsonl with their images, as the sample logger writes them."""
    images = run_dir / "samples" / "images"
    images.mkdir(parents=True)
    colours = ["red", "green", "blue"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(images / f"{i:09d}.png")
    for step, texts in ROUNDS.items():
        rows = [
            {
                "step": step,
                "key": f"{i:09d}",
                "image": f"images/{i:09d}.png",
                "prompt": "What colour is the shape?" if stage == 2 else "",
                "reference": "a small red circle",
                "generated": text,
            }
            for i, text in enumerate(texts)
            if text is not None  # a sample missing from a round: the grid must say so, not shift columns
        ]
        (run_dir / "samples" / f"step_{step:08d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_run(run_dir: Path, stage: int = 1) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"stage": stage, "run_dir": str(run_dir), "train": {"max_steps": 100, "log_every_steps": 10}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_metrics(run_dir, list(range(10, 101, 10)))
    write_samples(run_dir, stage)
    toy = run_dir / "eval" / "toy_caption"
    toy.mkdir(parents=True)
    scores = {"task": "toy_caption", "caption_accuracy": 0.95, "color_accuracy": 0.98, "n": 60, "CIDEr": 8.91}
    (toy / "metrics.json").write_text(json.dumps(scores))
    miss = {"key": "000000007", "reference": "a large blue square", "generated": "a large green square"}
    (toy / "toy_captions.jsonl").write_text(json.dumps(miss) + "\n")
    return run_dir


class PageImages(HTMLParser):
    """The <img> tags, the sample grid's header cells and its body rows of a report page."""

    def __init__(self, page: str):
        super().__init__()
        self.images, self.grid_header, self.grid_rows = [], [], 0
        self._in_grid = self._in_header = self._in_th = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table" and attrs.get("class") == "grid":
            self._in_grid = True
        elif self._in_grid and tag == "thead":
            self._in_header = True
        elif self._in_grid and tag == "th":
            self._in_th = True
            self.grid_header.append("")
        elif self._in_grid and tag == "tr" and not self._in_header:
            self.grid_rows += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_grid = False
        elif tag == "thead":
            self._in_header = False
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th:
            self.grid_header[-1] += data


def decode_image(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:40]
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


def test_every_plot_is_an_embedded_png(tmp_path):
    """Each curve panel, MFU and the skip counters included, is a base64 PNG data URI that PIL decodes."""
    report = write_report(write_run(tmp_path / "run"))
    assert report == tmp_path / "run" / "report.html"
    page = report.read_text()
    plots = {img["alt"]: img["src"] for img in PageImages(page).images if img.get("class") == "plot"}
    assert list(plots) == PLOT_TITLES
    for title, uri in plots.items():
        image = decode_image(uri)
        assert image.format == "PNG" and image.width > 300 and image.height > 200, title
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "1 non-finite value left out" in page  # the NaN grad norm of step 10
    assert "other reasons stayed at zero" in page  # only corrupt_image has skips: one line, not six


@pytest.mark.parametrize("stage", [1, 2])
def test_sample_grid_has_one_column_per_round(tmp_path, stage):
    """Rows are samples with their image and reference (and prompt in stage 2); each round is one column."""
    page = write_report(write_run(tmp_path / "run", stage)).read_text()
    parsed = PageImages(page)
    prompt = ["prompt"] if stage == 2 else []
    assert parsed.grid_header == ["image", *prompt, "reference", "step 50", "step 100"]
    assert parsed.grid_rows == 3
    samples = [img for img in parsed.images if img.get("class") != "plot"]
    assert [img["alt"] for img in samples] == ["000000000", "000000001", "000000002"]
    assert [decode_image(img["src"]).getpixel((0, 0)) for img in samples] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    assert page.count("<span class='match'>a small red circle</span>") == 2
    assert "not in this round" in page
    assert ("What colour is the shape?" in page) == (stage == 2)


def test_eval_scores_misses_and_config(tmp_path):
    """eval/*/metrics.json numbers, the first misses, and config.yaml inside a collapsible <details>."""
    run_dir = write_run(tmp_path / "run")
    (run_dir / "eval" / "coco").mkdir()  # an evaluation still generating: named, not fatal
    vqa = run_dir / "eval" / "vqa"
    vqa.mkdir()
    scores = {"task": "vqa", "n": 2, "accuracy": 50.0, "per_answer_type": {"number": 0.0, "other": 100.0}}
    (vqa / "metrics.json").write_text(json.dumps(scores | {"fingerprint": {"model": "abc123"}}))
    answers = [
        {"question_id": 1, "question": "what shape is this ?", "answer": "circle", "accuracy": 1.0},
        {"question_id": 2, "question": "how many shapes ?", "answer": "one", "accuracy": 0.0, "human_answers": ["1"]},
    ]
    (vqa / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    page = write_report(run_dir).read_text()
    assert "<h3>toy_caption</h3>" in page and "caption_accuracy" in page and "8.91" in page
    assert "a large green square" in page and "a large blue square" in page
    assert "<h3>coco</h3>" in page and "no metrics.json yet" in page
    assert "per_answer_type/number" in page and "in percent" in page and "abc123" not in page
    assert "how many shapes ?" in page and "what shape is this ?" not in page  # only the miss is listed
    details = page[page.index("<details>") : page.index("</details>")]
    assert "max_steps: 100" in details and "log_every_steps: 10" in details
    assert "100 of 100" in page  # last logged step against train.max_steps


def partial_empty(run_dir: Path) -> str:
    return "no step has been logged yet"


def partial_one_step_no_val(run_dir: Path) -> str:
    write_metrics(run_dir, [10], val_every=0, with_mfu=False)
    return "no val/loss logged"


def partial_cut_line(run_dir: Path) -> str:
    write_metrics(run_dir, [10, 20])
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write('{"step": 30, "loss": 1.')  # the writer was killed mid-line
    return "1 lines of metrics.jsonl could not be read"


def partial_empty_samples(run_dir: Path) -> str:
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "samples").mkdir()
    (run_dir / "config.yaml").write_text("stage: 2\n")
    return "samples/ has no step_*.jsonl"


def partial_broken_image(run_dir: Path) -> str:
    write_samples(run_dir, 1)
    (run_dir / "samples" / "images" / "000000001.png").write_bytes(b"not a png")
    return "image unreadable"


@pytest.mark.parametrize(
    "make", [partial_empty, partial_one_step_no_val, partial_cut_line, partial_empty_samples, partial_broken_image]
)
def test_partial_runs_render_with_a_message(tmp_path, make):
    """A run with nothing, one step, a cut-off line, no rounds or a broken image still gets a page that says so."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    expected = make(run_dir)
    page = write_report(run_dir).read_text()
    assert expected in page
    assert "could not be built" not in page
    for image in PageImages(page).images:
        decode_image(image["src"])


def test_resumed_run_keeps_the_steps_of_the_run_that_continued(tmp_path):
    """Steps logged again after a resume replace the interrupted run's values from that step on."""
    lines = [{"step": s, "loss": 1.0} for s in (10, 20, 30)] + [{"step": s, "loss": 2.0} for s in (20, 30, 40)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = read_metrics(path)
    assert metrics.series["loss"] == ([10, 20, 30, 40], [1.0, 2.0, 2.0, 2.0])
    assert metrics.resumes == 1


def test_many_rounds_are_thinned_evenly_keeping_first_and_last():
    """More rounds than columns: evenly spaced, the first and the last always shown."""
    rounds = [type("Round", (), {"step": 100 * i})() for i in range(1, 21)]
    assert [r.step for r in choose_rounds(rounds, 5)] == [100, 600, 1100, 1500, 2000]
    assert choose_rounds(rounds[:3], 5) == rounds[:3]


def test_command_line(tmp_path):
    """python -m pipeline.report writes --out and prints its path; a missing run directory is one error line."""
    run_dir = write_run(tmp_path / "run")
    out = tmp_path / "elsewhere" / "page.html"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(run_dir), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and out.is_file() and not (run_dir / "report.html").exists()
    missing = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True
    )
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: run directory")


def test_write_report_frees_its_callers_locals_on_return(tmp_path):
    """Log-axis tick labels go through matplotlib's mathtext parser, which leaves reference cycles reaching up into
    the caller's frames; write_report collects them, so a caller's locals are freed as soon as it returns (in
    training: the trainer and its data-loader workers, which would otherwise be waited for at exit)."""
    run_dir = write_run(tmp_path / "run")
    records = [{**train_record(step), "loss": 4.0 * 10 ** (-step / 25)} for step in range(10, 101, 10)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    class Local:
        pass

    def caller() -> weakref.ref:
        local = Local()
        write_report(run_dir)
        return weakref.ref(local)

    gc.collect()
    gc.disable()
    try:
        local = caller()
        assert local() is None
    finally:
        gc.enable()


def logged_run(run_dir: Path, live: bool, steps: int = 10, seconds_per_step: float = 2.0) -> MetricsLogger:
    """A MetricsLogger driven as Trainer.fit drives it, on a clock that advances `seconds_per_step` a step."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(run_dir, True, None, {}, live=live)
    metrics.start_progress(0, 100)
    clock = iter(seconds_per_step * step for step in range(1, steps + 1))
    metrics.progress.clock = lambda: next(clock)
    for step in range(1, steps + 1):
        metrics.advance(step)
        if step in (1, steps):
            record = train_record(step)
            metrics.log(step, {key: value for key, value in record.items() if key not in ("step", "time")})
    return metrics


def test_batch_log_lines_carry_the_eta_from_the_step_rate(tmp_path, caplog):
    """Without a terminal each logged step is one plain line, step/total and the ETA added: 90 steps left at the
    2 s a step measured since the first step is 3m00s. The first step has no rate yet."""
    caplog.set_level(logging.INFO, logger="pipeline.training.metrics")
    metrics = logged_run(tmp_path / "run", live=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 1/100 loss=") and lines[0].endswith(" eta=?")
    assert lines[1].startswith("step 10/100 loss=") and " samples_per_s=410 " in lines[1]
    assert lines[1].endswith(" eta=3m00s")
    assert [format_duration(s) for s in (None, 0.4, 59, 61, 3600 * 4 + 300)] == ["?", "0s", "59s", "1m01s", "4h05m"]
    metrics.close()


def test_live_line_on_a_terminal_keeps_other_log_records_above_it(tmp_path, capsys):
    """On a terminal the step lines become one live line (step, loss, samples/s, ETA); other records still print,
    the step lines still reach the log file, and the console handler is back once the logger closes."""
    console = logging.StreamHandler(sys.stdout)
    log_file = logging.FileHandler(tmp_path / "rank_00000.log")
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = [console, log_file]
    root.setLevel(logging.INFO)
    try:
        metrics = logged_run(tmp_path / "run", live=True)
        logging.getLogger("pipeline.test").info("a sample round")
        assert console not in root.handlers
        metrics.close()
        assert root.handlers == [console, log_file]
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        log_file.close()
    shown = capsys.readouterr().out
    assert "step 10/100" in shown and "loss 3.886" in shown and "410.0 samples/s" in shown and "ETA 3m00s" in shown
    assert "a sample round\n" in shown and "loss=" not in shown
    assert "step 10/100 loss=" in (tmp_path / "rank_00000.log").read_text()


def test_training_refreshes_the_report_and_never_fails_on_it(tmp_path, caplog):
    """Closing the metrics logger (the end of training) rewrites report.html; a report that cannot be written is a
    warning, not an exception that would end the run."""
    logged_run(tmp_path / "run", live=False).close()
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Run report: run" in page and "data:image/png;base64," in page
    caplog.set_level(logging.WARNING, logger="pipeline.training.metrics")
    refresh_report(tmp_path / "missing")
    assert "could not write the run report" in caplog.text and "the run is not affected" in caplog.text


ALL_IMAGES_LOADED = """
const images = Array.from(document.images);
return {count: images.length,
        broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
        height: document.documentElement.scrollHeight};
"""


def test_report_opens_from_disk_in_headless_chromium(tmp_path):
    """Opened from a file:// URL, every image of the page (plots and samples) has loaded; a screenshot is kept."""
    report = write_report(write_run(tmp_path / "run", stage=2))
    expected_images = len(PageImages(report.read_text()).images)
    driver = open_headless_chromium(tmp_path / "chromium-profile", window="1400,900")
    try:
        driver.set_page_load_timeout(60)
        driver.get(report.as_uri())
        loaded = driver.execute_script(ALL_IMAGES_LOADED)
        driver.set_window_size(1400, min(int(loaded["height"]) + 200, 8000))
        screenshot = tmp_path / "report.png"
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert loaded["count"] == expected_images == len(PLOT_TITLES) + 3
    assert loaded["broken"] == []
    with Image.open(screenshot) as image:
        assert image.width >= 1000 and image.height > 900
