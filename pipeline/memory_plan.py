"""Will a config fit a card? `python -m pipeline.memory_plan --config configs/stage1_8b_24gb.yaml --gpu-memory-gib 24`

Prints the run's memory plan (`pipeline.training.memory`: frozen weights, trainable state, activations at the data's
lengths, allowance) for the configured micro batch and for every micro batch that divides the global batch over
`--gpus` ranks, marking those that fit, without a GPU and without loading a weight: only the model configs
(config.json), the tokenizer and the first training shard are read. Without that shard the plan assumes every sample
at its configured maximum length (`model.max_caption_tokens`, `model.max_sequence_tokens`), which overstates stage 2.
Training makes the same plan at start-up, logs it, and stops there when it would not fit.
"""

from __future__ import annotations

import argparse
import sys
import tarfile

from pipeline.config import ConfigError, load_config
from pipeline.data.shards import DataError


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/stage1_70b.yaml")
    parser.add_argument("--gpu-memory-gib", type=positive(float), help="memory per GPU (default: train.gpu_memory_gib)")
    parser.add_argument("--gpus", type=positive(int), default=1, help="ranks the global batch is split over [1]")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.micro_batch_size=16")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.gpu_memory_gib is not None:
            config.train.gpu_memory_gib = args.gpu_memory_gib
        from transformers import AutoTokenizer

        from pipeline.training.memory import MemoryPlanner

        tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
        planner = MemoryPlanner(config, tokenizer, args.gpus, config.train.gpu_memory_gib)
    # ValueError: a backbone family the pipeline does not load; TarError: a damaged first shard.
    except (ConfigError, DataError, OSError, ValueError, tarfile.TarError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = planner.plan(config.train.micro_batch_size)
    print(plan.describe())
    global_batch = config.train.global_batch_size
    print(f"{'micro':>6} {'accumulation':>12} {'LLM tokens':>10} {'peak GiB':>9}  fits")
    for micro in range(1, global_batch // args.gpus + 1):
        if global_batch % (micro * args.gpus):
            continue
        row = planner.plan(micro)
        fits = "?" if row.budget_gib is None else "yes" if row.fits else "no"
        accumulation = global_batch // (micro * args.gpus)
        print(f"{micro:>6} {accumulation:>12} {row.tokens_per_micro_batch:>10} {row.peak_gib:>9.1f}  {fits}")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
