"""Stage-1 training entry point: `python -m pipeline.train --config configs/toy.yaml [key=value ...]`.

Launch it under the deepspeed launcher, torchrun or srun (it reads its rank from the environment), or bare for a
single process. Pointing at an existing run directory resumes it: `--resume runs/stage1` reads the config saved
there, and a run whose run_dir already holds a complete checkpoint continues from it (this is how a requeued SLURM
job picks up). The story: check config and shards → process group → frozen towers and resampler → data → train.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, gradient_accumulation_steps, load_config, save_config, to_dict
from pipeline.data.shards import DataError, expand_shards
from pipeline.training.distributed import read_dist_env

log = logging.getLogger("pipeline.train")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config, e.g. configs/stage1_8b.yaml")
    parser.add_argument("--resume", metavar="RUN_DIR", help="resume this run directory with its saved config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=1e-4")
    args, unknown = parser.parse_known_args(argv)
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    unknown = [u for u in unknown if not u.startswith("--local_rank")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (config values are given as key=value)")
    if bool(args.config) == bool(args.resume):
        parser.error("give exactly one of --config FILE or --resume RUN_DIR")
    return args


def resolve_config(args) -> RunConfig:
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a run directory?")
        return load_config(saved, [f"run_dir={args.resume}", *args.overrides])
    return load_config(args.config, args.overrides)


def preflight(config: RunConfig) -> list[list[str]]:
    """Everything that can be checked before a process group exists; returns the expanded shard lists."""
    gradient_accumulation_steps(config, read_dist_env().world_size)
    return [expand_shards(s.shards, f"data.sources[{i}].shards") for i, s in enumerate(config.data.sources)]


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    rank_file = logging.FileHandler(run_dir / "logs" / f"rank_{rank:05d}.log")
    rank_file.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [console, rank_file]
    root.setLevel(logging.INFO)


def run(config: RunConfig) -> str:
    from transformers import AutoTokenizer

    from pipeline.data.loaders import build_caption_loader, build_val_batches
    from pipeline.model.anymal import build_anymal
    from pipeline.prep.offline import enforce_offline
    from pipeline.training.distributed import device_for, init_distributed
    from pipeline.training.trainer import Trainer, make_metrics_logger

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist_env = init_distributed(config.train.distributed_backend)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, dist_env.rank)
    # Local model directories need no Hub: with offline mode on, a compute node never waits on the network.
    enforce_offline([config.model.vision.model, config.model.llm.model])
    if dist_env.is_main:
        save_config(config, run_dir / "config.yaml")
    import torch

    torch.manual_seed(config.train.seed)
    device = device_for(dist_env)
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    model = build_anymal(config.model, tokenizer, load_vision=config.data.input == "images")
    model.llm.to(device)
    if model.vision is not None:
        model.vision.to(device)
    trainer = Trainer(
        config, model, lambda state: build_caption_loader(config, dist_env, state), dist_env, device,
        val_batches=build_val_batches(config, dist_env),
    )
    trainer.maybe_resume()
    metrics = make_metrics_logger(config, dist_env.is_main, trainer.wandb_id)
    trainer.wandb_id = metrics.wandb_id
    sample_round = None
    if dist_env.is_main:
        from pipeline.training.samples import SampleLogger

        samples = SampleLogger(config, model, run_dir, metrics)
        sample_round = (lambda step: samples.log_round(step, tokenizer)) if samples.enabled else None
    log.info("training to step %d: global batch %d = micro %d x %d ranks x %d accumulation", config.train.max_steps,
             config.train.global_batch_size, config.train.micro_batch_size, dist_env.world_size, trainer.accumulation)
    reason = trainer.fit(metrics, sample_round)
    if reason == "max_steps":
        trainer.export(to_dict(config.model))
    log.info("stopped at step %d: %s", trainer.step, reason)
    metrics.close()
    return reason


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = resolve_config(args)
        preflight(config)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
