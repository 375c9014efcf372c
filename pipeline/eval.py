"""Evaluation entry point: score a trained run on a captioning or VQA benchmark, or on the toy world.

Stage-1 runs caption (coco_caption, toy_caption); stage-2 runs (a run directory, its export/ or a merged directory)
answer VQA questions and caption through their chat prompt (coco_caption, vqa).

    python -m pipeline.eval --run RUN_DIR --task coco_caption --annotations dataset_coco.json --images COCO --out DIR
    python -m pipeline.eval --run RUN_DIR --task vqa --questions Q.json --annotations A.json --images val2014 --out DIR
    python -m pipeline.eval --run RUN_DIR --task toy_caption --shards 'runs/demo/shards/val/*.tar' --out DIR

Launch it bare for one process, or under torchrun / srun for many: the items are split across ranks and gathered
on rank 0, which writes predictions.json (the benchmark's submission format) and metrics.json. Rerunning with the
same --out resumes: finished parts are not generated again. The story: check arguments, Java and the annotation
files → process group → model → generate, gather, score, write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.shards import DataError, expand_shards
from pipeline.evaluation import benchmarks
from pipeline.evaluation.caption_metrics import CAPTION_METRICS, JavaNotFound, require_java
from pipeline.training.distributed import read_dist_env

log = logging.getLogger("pipeline.eval")
TASKS = ("coco_caption", "vqa", "toy_caption")
# Ranks wait for each other at the final gather while the slowest finishes its last part.
GATHER_TIMEOUT_S = 3 * 3600


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="training run directory (config + export/)")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory; rerun with it to resume")
    parser.add_argument("--annotations", help="captions: dataset_coco.json or captions_*.json; VQA: annotations")
    parser.add_argument("--questions", help="VQA format (VQAv2, OK-VQA): the questions file")
    parser.add_argument("--images", help="image folder (the COCO root for Karpathy's file)")
    parser.add_argument(
        "--image-pattern",
        help="VQA image file name from the question's fields, e.g. '{image_id:012d}.jpg' for COCO-2017 names",
    )
    parser.add_argument("--split", default="test", help="split of Karpathy's dataset_coco.json (default: test)")
    parser.add_argument("--shards", help="toy_caption: shard spec of held-out toy images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--part-size", type=int, default=1024, help="items per resumable part file")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, help="evaluate only the first N images or questions")
    parser.add_argument(
        "--metrics",
        default=",".join(CAPTION_METRICS),
        help="caption metrics to compute, comma-separated (default: all)",
    )
    args = parser.parse_args(argv)
    if args.task == "toy_caption" and not args.shards:
        parser.error("--task toy_caption needs --shards")
    if args.task == "toy_caption" and read_dist_env().world_size > 1:
        parser.error("--task toy_caption runs in one process; launch it without torchrun or srun")
    if args.task == "coco_caption" and not (args.annotations and args.images):
        parser.error("--task coco_caption needs --annotations and --images")
    if args.task == "vqa" and not ((args.questions or args.annotations) and args.images):
        parser.error("--task vqa needs --images and --questions (with --annotations to score) or --annotations")
    unknown = sorted(set(args.metrics.split(",")) - set(CAPTION_METRICS))
    if unknown:
        parser.error(f"--metrics: unknown {unknown}; choose from {','.join(CAPTION_METRICS)}")
    return args


def read_benchmark(args):
    if args.task == "toy_caption":
        return expand_shards(args.shards, "--shards")
    if args.task == "coco_caption":
        benchmark = benchmarks.read_caption_benchmark(args.annotations, args.images, args.split)
    else:
        benchmark = benchmarks.read_vqa_benchmark(args.images, args.questions, args.annotations, args.image_pattern)
    return benchmarks.take_first(benchmark, args.limit) if args.limit else benchmark


def run_stage(args) -> int:
    """1 or 2, from the run's export: a stage-2 export has a manifest (and may be a merged directory)."""
    run = Path(args.run)
    if (run / "manifest.json").is_file() or (run / "export" / "manifest.json").is_file():
        return 2
    for needed in ("config.yaml", "export/resampler.safetensors"):
        if not (run / needed).is_file():
            raise ConfigError(f"--run {run} has no {needed}; point at a training run that finished and exported")
    return 1


def check_run(args) -> None:
    stage = run_stage(args)
    # Stage 1 trains captions with no text before them, so its models cannot follow a question.
    if args.task == "vqa" and stage == 1:
        raise ConfigError(
            f"--task vqa needs an instruction-tuned (stage 2) run; {args.run} is a stage-1 run, which "
            "only captions (use --task coco_caption)"
        )
    if args.task == "toy_caption" and stage == 2:
        raise ConfigError(f"--task toy_caption scores stage-1 captions; {args.run} is a stage-2 run (use --task vqa)")


def start_processes():
    import torch

    from pipeline.training.distributed import device_for, init_distributed

    dist_env = read_dist_env()
    if dist_env.world_size > 1:
        init_distributed("nccl" if torch.cuda.is_available() else "gloo", timeout_s=GATHER_TIMEOUT_S)
    return dist_env, device_for(dist_env)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(args, export_dir: Path, llm: str, vision: str) -> dict:
    """What the generated texts depend on besides the items; a resumed run must match it."""
    fingerprint = {
        "run": str(Path(args.run).resolve()),
        "resampler_sha256": sha256(export_dir / "resampler.safetensors"),
        "task": args.task,
        "llm": llm,
        "vision": vision,
        "max_new_tokens": args.max_new_tokens,
    }
    adapter = export_dir / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        fingerprint["adapter_sha256"] = sha256(adapter)
    return fingerprint


def evaluate(args, benchmark, device) -> dict | None:
    if run_stage(args) == 2:
        return evaluate_instruct(args, benchmark, device)
    from pipeline.data.captions import load_image_processor
    from pipeline.inference.answering import Stage1Captioner
    from pipeline.inference.loading import load_run

    model, tokenizer, config = load_run(args.run, device)
    if args.task == "toy_caption":
        from pipeline.toy.captions import evaluate_toy_captions

        return evaluate_toy_captions(
            model,
            tokenizer,
            config,
            benchmark,
            args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
    captioner = Stage1Captioner(model, tokenizer, load_image_processor(config.model.vision.model), args.max_new_tokens)
    return benchmarks.evaluate_captions(
        benchmark,
        captioner,
        args.out,
        batch_size=args.batch_size,
        part_size=args.part_size,
        fingerprint=run_fingerprint(args, Path(args.run) / "export", config.model.llm.model, config.model.vision.model),
        metrics=tuple(args.metrics.split(",")),
    )


def evaluate_instruct(args, benchmark, device) -> dict | None:
    """VQA or captioning with a stage-2 model: its answers to the benchmark's documented prompts."""
    from pipeline.data.captions import load_image_processor
    from pipeline.inference.answering import InstructAnswerer
    from pipeline.inference.loading import find_instruct_export, load_instruct

    model, tokenizer, manifest = load_instruct(args.run, device)
    answerer = InstructAnswerer(
        model,
        tokenizer,
        load_image_processor(manifest["vision_model"]),
        args.max_new_tokens,
        manifest["system_prompt"],
    )
    export_dir = find_instruct_export(args.run)
    fingerprint = run_fingerprint(args, export_dir, manifest["llm_model"], manifest["vision_model"])
    options = {"batch_size": args.batch_size, "part_size": args.part_size, "fingerprint": fingerprint}
    if args.task == "vqa":
        return benchmarks.evaluate_vqa(benchmark, answerer, args.out, **options)
    return benchmarks.evaluate_captions(
        benchmark, answerer, args.out, metrics=tuple(args.metrics.split(",")), **options
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    is_main = read_dist_env().rank == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        datefmt="%H:%M:%S",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.task in ("coco_caption", "toy_caption"):
            log.info("Java for the caption metrics: %s", require_java())
        benchmark = read_benchmark(args)
        check_run(args)
    except (ConfigError, DataError, JavaNotFound, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dist_env, device = start_processes()
    metrics = evaluate(args, benchmark, device)
    if dist_env.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if dist_env.is_main:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
