"""`make demo`: the whole pipeline, stage 1 and stage 2, on the toy world, on a CPU, with no weights and no internet.

    toy images → loopback HTTP → img2dataset shards → tiny CLIP + tiny pretrained Llama (save_pretrained)
    → cached CLIP feature shards → DeepSpeed ZeRO-2 stage 1 on 2 CPU ranks (gloo) → greedy captions of held-out images
    → LLaVA-format toy conversations → instruction shards → stage 2 (LoRA + resampler) on 2 CPU ranks
    → VQA accuracy on held-out images and held-out question phrasings → a report per stage and summary.json

Every step runs the production code path: img2dataset downloads over HTTP, the models load through
`from_pretrained`, the conversations go through the LLaVA converter, training starts through
`launch/stage1_local.sh` and `launch/stage2_local.sh` exactly as on a GPU node, and the VQA score comes from the
evaluation harness (`evaluate_vqa`, the official VQA accuracy).

The console shows the demo's steps, the training runs' own log lines (progress with the ETA, samples, checkpoints)
and errors. Everything else stays out of it but not out of reach: the deepspeed launcher's whole output is in
`<out>/stage1/logs/launcher.log` and `<out>/stage2/logs/launcher.log`, img2dataset's and the feature cache's in
`<out>/logs/`, and what libraries log, warn or print inside the demo's own process in `<out>/logs/demo.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("pipeline.demo")
ROOT = Path(__file__).resolve().parents[1]
SERVE_PORT = 8000
# A line logged through the pipeline's loggers, by a training rank ("12:00:01 rank0 INFO pipeline.train: ...") or
# by the feature-cache job ("12:00:01 pipeline.feature_cache: ...").
PIPELINE_LINE = re.compile(
    r"^(?P<time>\d\d:\d\d:\d\d) (?:rank(?P<rank>\d+) (?P<level>[A-Z]+) )?pipeline[\w.]*: (?P<message>.*)$"
)
# The numbers of a training step line that the console keeps; the log file has all of them.
STEP_FIELDS = ("loss", "samples_per_s", "eta")
# Where the demo's own process keeps what libraries log, warn and print, under the demo directory.
DEMO_LOG = "logs/demo.log"
TAIL_LINES = 25


class StepFailed(Exception):
    """A subprocess of the demo exited with an error; its whole output is in `log_path`."""

    def __init__(self, label: str, returncode: int, log_path: Path, error_shown: bool):
        super().__init__(f"{label} failed (exit status {returncode})")
        self.log_path, self.error_shown = log_path, error_shown


def console_line(line: str, label: str) -> str | None:
    """What the console shows of one output line of a subprocess: a pipeline line, shortened; errors; else None."""
    match = PIPELINE_LINE.match(line)
    if match is None:
        return line if line.startswith("error:") else None
    message = match["message"]
    if message.startswith("step ") and " loss=" in message:
        step, _, rest = message.partition(" ")[2].partition(" ")
        fields = dict(field.split("=", 1) for field in rest.split() if "=" in field)
        message = f"step {step} " + " ".join(f"{name}={fields[name]}" for name in STEP_FIELDS if name in fields)
    level = match["level"]
    if level and level != "INFO":
        message = f"{level.lower()}: {message}"
    rank = match["rank"]
    return f"{match['time']} {label}{f' rank {rank}' if rank not in (None, '0') else ''}: {message}"


def run_logged(command: list[str], log_path: Path, label: str, env: dict | None = None) -> None:
    """Run `command` from the repository root with its whole output in `log_path`; print what `console_line` keeps."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Unbuffered, so the children's lines reach the console when they are written, not when a buffer fills.
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    with (
        open(log_path, "w", encoding="utf-8", buffering=1) as log_file,  # line by line: `tail -f` it while it runs
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as process,
    ):
        error_shown = False
        for line in process.stdout:
            log_file.write(line)
            shown = console_line(line.rstrip("\n"), label)
            if shown is not None:
                print(shown, flush=True)
                error_shown = error_shown or shown.startswith("error:")
    if process.returncode != 0:
        raise StepFailed(label, process.returncode, log_path, error_shown)


def download_shards(world_dir: Path, shard_root: Path, split: str, base_url: str, shard_size: int) -> Path:
    from pipeline.toy.world import write_url_parquet

    parquet = write_url_parquet(world_dir, split, base_url, world_dir / f"{split}_urls.parquet")
    out = shard_root / split
    command = [str(ROOT / "data_prep/img2dataset.sh"), "--input", str(parquet), "--output", str(out)]
    command += ["--image-size", "64", "--processes", "2", "--threads", "8", "--shard-size", str(shard_size)]
    run_logged(["bash", *command], shard_root.parent / "logs" / f"img2dataset_{split}.log", "img2dataset")
    return out


def launch_env() -> dict:
    """Two CPU ranks, offline, on a free rendezvous port (another job on this machine may hold the default)."""
    from pipeline.training.distributed import free_port

    return {
        **os.environ,
        "NPROC": "2",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MASTER_PORT": str(free_port()),
    }


def cache_features(shard_root: Path, split: str, models: dict) -> Path:
    """The feature-cache job on one split's image shards, with the training config's tower and layer."""
    out = shard_root / "features" / split
    command = [sys.executable, "-m", "pipeline.prep.feature_cache", "run", "--config", "configs/toy.yaml"]
    command += ["--shards", f"{shard_root}/{split}/*.tar", "--out", str(out), "--num-workers", "2"]
    command += ["--batch-size", "64", "--no-progress", f"model.vision.model={models['clip']}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run_logged(command, shard_root.parent / "logs" / f"feature_cache_{split}.log", "features", env)
    return out


def train_stage1(run_dir: Path, models: dict, shard_root: Path, overrides: list[str]) -> None:
    """Stage 1 from cached features: the vision tower is not loaded; sample captions still come from images."""
    command = [
        str(ROOT / "launch/stage1_local.sh"),
        "configs/toy.yaml",
        f"run_dir={run_dir}",
        f"model.vision.model={models['clip']}",
        f"model.llm.model={models['llm']}",
        "data.input=features",
        f"data.sources=[{{shards: '{shard_root}/features/train/*.tar'}}]",
        f"data.val_shards={shard_root}/features/val/*.tar",
        f"logging.sample_shards={shard_root}/val/*.tar",
        *overrides,
    ]
    run_logged(command, run_dir / "logs" / "launcher.log", "stage 1", launch_env())


def prepare_stage2_data(world_dir: Path, shard_root: Path, out: Path) -> dict:
    """Toy conversations (LLaVA format) through the LLaVA converter; the VQA files of the held-out set."""
    from pipeline.prep.instruct_shards import convert
    from pipeline.toy.instruct import write_llava_json, write_vqa_files

    for split, shard_size in (("train", 500), ("val", 500)):
        conversations = write_llava_json(world_dir, split, world_dir / f"llava_{split}.json")
        convert(conversations, world_dir, shard_root / f"instruct_{split}", shard_size=shard_size, workers=2)
    return write_vqa_files(world_dir, "val", out / "vqa", per_image=2)


def train_stage2(run_dir: Path, models: dict, shard_root: Path, stage1_dir: Path, overrides: list[str]) -> None:
    command = [
        str(ROOT / "launch/stage2_local.sh"),
        "configs/toy_stage2.yaml",
        f"run_dir={run_dir}",
        f"model.vision.model={models['clip']}",
        f"model.llm.model={models['llm']}",
        f"model.stage1_resampler={stage1_dir}",
        f"data.sources=[{{shards: '{shard_root}/instruct_train/*.tar'}}]",
        f"data.val_shards={shard_root}/instruct_val/*.tar",
        *overrides,
    ]
    run_logged(command, run_dir / "logs" / "launcher.log", "stage 2", launch_env())


def evaluate_stage2(run_dir: Path, vqa: dict) -> dict:
    """The evaluation harness on the toy VQA files: official VQA accuracy of greedy short answers."""
    from pipeline.data.captions import load_image_processor
    from pipeline.evaluation.benchmarks import evaluate_vqa, read_vqa_benchmark
    from pipeline.inference.answering import InstructAnswerer
    from pipeline.inference.loading import load_instruct

    model, tokenizer, manifest = load_instruct(run_dir)
    answerer = InstructAnswerer(
        model,
        tokenizer,
        load_image_processor(manifest["vision_model"]),
        max_new_tokens=8,
        system_prompt=manifest["system_prompt"],
    )
    benchmark = read_vqa_benchmark(vqa["images"], vqa["questions"], vqa["annotations"], vqa["image_pattern"])
    return evaluate_vqa(benchmark, answerer, run_dir / "eval" / "vqa", batch_size=64)


def evaluate_stage1(run_dir: Path, shard_root: Path) -> dict:
    from pipeline.data.shards import expand_shards
    from pipeline.inference.loading import load_run
    from pipeline.toy.captions import evaluate_toy_captions

    model, tokenizer, config = load_run(run_dir)
    shards = expand_shards(f"{shard_root}/val/*.tar", "demo val shards")
    return evaluate_toy_captions(model, tokenizer, config, shards, run_dir / "eval" / "toy_caption")


def shown_path(path: Path) -> str:
    """`path` as the user would type it: relative to the working directory when it lies below it."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


@contextlib.contextmanager
def output_to(log_path: Path):
    """Everything written to this process's stdout and stderr goes to `log_path` for a while, at the level of file
    descriptors: that also catches what C code and child processes print (the caption metrics' Java tokenizer)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a", encoding="utf-8") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in enumerate(saved, start=1):
                os.dup2(original, fd)
                os.close(original)


def write_stage_report(run_dir: Path, stage: str) -> None:
    """The run report, rewritten now that the stage's evaluation is in the run directory."""
    from pipeline.reporting import write_report

    log.info("%s report: %s", stage, shown_path(write_report(run_dir)))


def quiet_libraries(log_path: Path) -> None:
    """The demo's lines, the pipeline's warnings and any error on the console; everything logged, in `log_path`.

    transformers logs through its own stderr handler and draws weight-loading progress bars; both say nothing to
    someone watching the demo, so its records join the root logger's (the file) and the bars are off. What libraries
    print rather than log is caught by running their work inside `output_to`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(asctime)s demo: %(message)s", "%H:%M:%S"))
    console.addFilter(
        lambda record: (
            record.name == log.name
            or record.levelno >= (logging.WARNING if record.name.startswith("pipeline.") else logging.ERROR)
        )
    )
    log_file = logging.FileHandler(log_path, encoding="utf-8")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[console, log_file], force=True)
    logging.captureWarnings(True)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the toy world end to end.")
    parser.add_argument("--out", default="runs/demo", help="demo directory (recreated)")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--val-images", type=int, default=300)
    # A step count, not a time, so that a loaded machine pretrains the same LM; why 250: docs/performance.md.
    parser.add_argument("--lm-steps", type=int, default=250, help="pretraining steps of the tiny LM")
    parser.add_argument("overrides", nargs="*", help="stage-1 config overrides, e.g. train.max_steps=100")
    parser.add_argument(
        "--stage2",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="stage-2 config overrides, e.g. --stage2 train.max_steps=100",
    )
    return parser.parse_args(argv)


def prepare_data(args, out: Path, timings: dict) -> tuple[Path, Path, dict]:
    """The toy world, its img2dataset shards, the tiny models and the cached features. Returns
    (world directory, shard root, the models' paths and LM statistics)."""
    from pipeline.toy.http_server import serve_directory
    from pipeline.toy.models import build_toy_models
    from pipeline.toy.world import write_toy_world

    started = time.monotonic()
    log.info("writing the toy world: %d train, %d held-out images", args.train_images, args.val_images)
    world_dir = out / "world"
    write_toy_world(world_dir, args.train_images, args.val_images, seed=0)
    log.info("downloading it with img2dataset from a loopback HTTP server")
    base_url, stop_server = serve_directory(world_dir)
    try:
        shard_root = out / "shards"
        download_shards(world_dir, shard_root, "train", base_url, shard_size=500)
        download_shards(world_dir, shard_root, "val", base_url, shard_size=500)
    finally:
        stop_server()
    timings["data_s"] = time.monotonic() - started

    log.info("building the tiny CLIP and pretraining the tiny Llama for %d steps", args.lm_steps)
    mark = time.monotonic()
    with output_to(out / DEMO_LOG):
        models = build_toy_models(out / "models", world_dir, seed=0, lm_steps=args.lm_steps)
    log.info("tiny Llama: %s", json.dumps(models["lm_stats"]))
    timings["models_s"] = time.monotonic() - mark

    log.info("caching the toy CLIP's features of both splits (data_prep/cache_features.sh's job)")
    mark = time.monotonic()
    for split in ("train", "val"):
        cache_features(shard_root, split, models)
    timings["feature_cache_s"] = time.monotonic() - mark
    return world_dir, shard_root, models


def run_stage1(args, out: Path, shard_root: Path, models: dict, timings: dict) -> tuple[Path, dict]:
    """Stage 1 through the launcher, then captions of the held-out images. Returns (run directory, scores)."""
    log.info("stage 1 from cached features: DeepSpeed ZeRO-2 on 2 CPU ranks")
    mark = time.monotonic()
    run_dir = out / "stage1"
    train_stage1(run_dir, models, shard_root, args.overrides)
    timings["stage1_train_s"] = time.monotonic() - mark
    log.info("captioning the held-out images")
    with output_to(out / DEMO_LOG):
        scores = evaluate_stage1(run_dir, shard_root)
    scores = {k.replace("colour", "color"): v for k, v in scores.items()}
    log.info("stage 1: held-out caption exact match %.3f", scores["caption_accuracy"])
    write_stage_report(run_dir, "stage 1")
    return run_dir, scores


def run_stage2(args, out: Path, world_dir: Path, shard_root: Path, models: dict, stage1_dir: Path, timings: dict):
    """Stage-2 data, stage 2 through the launcher, then VQA. Returns (run directory, the harness's scores)."""
    log.info("stage 2: toy conversations through the LLaVA converter")
    mark = time.monotonic()
    with output_to(out / DEMO_LOG):
        vqa = prepare_stage2_data(world_dir, shard_root, out)
    timings["stage2_data_s"] = time.monotonic() - mark
    log.info("stage 2: DeepSpeed ZeRO-2 on 2 CPU ranks, LoRA adapters and the stage-1 resampler")
    mark = time.monotonic()
    run_dir = out / "stage2"
    train_stage2(run_dir, models, shard_root, stage1_dir, args.stage2)
    timings["stage2_train_s"] = time.monotonic() - mark
    log.info("stage 2: VQA on held-out images and question phrasings")
    mark = time.monotonic()
    with output_to(out / DEMO_LOG):
        vqa_scores = evaluate_stage2(run_dir, vqa)
    timings["stage2_eval_s"] = time.monotonic() - mark
    log.info("stage 2: held-out VQA accuracy %.3f", vqa_scores["accuracy"] / 100)
    write_stage_report(run_dir, "stage 2")
    return run_dir, vqa_scores


def write_summary(out: Path, stage1: tuple[Path, dict], stage2: tuple[Path, dict], models: dict, timings: dict):
    (stage1_dir, scores), (stage2_dir, vqa_scores) = stage1, stage2
    summary = {
        "stage1": {**scores, "input": "features", "run_dir": str(stage1_dir)},
        # Fractions; the harness's metrics.json reports percent, as the official VQA script does.
        "stage2": {
            "vqa_accuracy": vqa_scores["accuracy"] / 100,
            "n": vqa_scores["n"],
            "per_question_type": {k: v / 100 for k, v in vqa_scores["per_question_type"].items()},
            "per_answer_type": {k: v / 100 for k, v in vqa_scores["per_answer_type"].items()},
            "held_out": "val images, question phrasings not in the training conversations",
            "run_dir": str(stage2_dir),
        },
        "lm_pretraining": models["lm_stats"],
        "timings": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("done in %.0f s; scores and timings: %s", timings["total_s"], shown_path(out / "summary.json"))


def print_next_steps(stage1_dir: Path, stage2_dir: Path) -> None:
    python = shown_path(Path(sys.executable)) if Path(sys.executable).is_relative_to(Path.cwd()) else "python"
    print(f"\nReports (open in a browser): {shown_path(stage1_dir / 'report.html')}")
    print(f"                             {shown_path(stage2_dir / 'report.html')}")
    print("Chat with the stage-2 model in the browser:")
    print(f"    {python} -m pipeline.serve {shown_path(stage2_dir)} --port {SERVE_PORT}")
    print(f"then open http://127.0.0.1:{SERVE_PORT}/")


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.evaluation.caption_metrics import JavaNotFound, require_java

    try:
        # The held-out caption scores need Java (pycocoevalcap); say so now, not after stage 1 has trained.
        require_java()
    except JavaNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    quiet_libraries(out / DEMO_LOG)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    timings = {}
    started = time.monotonic()
    try:
        world_dir, shard_root, models = prepare_data(args, out, timings)
        stage1 = run_stage1(args, out, shard_root, models, timings)
        stage2 = run_stage2(args, out, world_dir, shard_root, models, stage1[0], timings)
    except StepFailed as failure:
        if not failure.error_shown:  # no error line of its own: the end of its output says what happened
            lines = failure.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-TAIL_LINES:]
            print("\n".join([f"{failure}; the last lines of its output:", *lines]), file=sys.stderr)
        print(f"error: {failure}; its whole output: {shown_path(failure.log_path)}", file=sys.stderr)
        return 1
    timings["total_s"] = time.monotonic() - started
    write_summary(out, stage1, stage2, models, timings)
    print_next_steps(stage1[0], stage2[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
