"""Stage-1 training entry point: `python -m pipeline.train --config configs/toy.yaml [key=value ...]`.

Launch it under the deepspeed launcher, torchrun or srun (it reads its rank from the environment), or bare for a
single process. Pointing at an existing run directory resumes it: `--resume runs/stage1` reads the config saved
there, and a run whose run_dir already holds a complete checkpoint continues from it (this is how a requeued SLURM
job picks up). The story: check config, models and shards (`pipeline.training.preflight`) → process group → frozen
towers and resampler, frozen for the stage → data → train → export, then `<run_dir>/FINISHED`. Stage 2
(`pipeline.train_stage2`) tells the same story. A rank that fails ends at once (`pipeline.training.failure`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from pipeline.config import ConfigError, RunConfig, load_config, save_config
from pipeline.data.shards import DataError
from pipeline.training.distributed import read_dist_env
from pipeline.training.failure import exit_after_failure, stop_workers
from pipeline.training.preflight import RankError, preflight

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


def run(config: RunConfig, plan=None) -> str:
    """Train `config` to its end or a stop signal; `plan` is the start-up memory plan, logged and saved with the run."""
    from transformers import AutoTokenizer

    from pipeline.data.loaders import build_train_loader, build_val_batches
    from pipeline.prep.offline import enforce_offline
    from pipeline.training.distributed import device_for, init_distributed
    from pipeline.training.stages import build_stage
    from pipeline.training.trainer import Trainer, make_metrics_logger

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, read_dist_env().rank)
    dist_env = init_distributed(config.train.distributed_backend)
    # Local model directories need no Hub: with offline mode on, a compute node never waits on the network.
    enforce_offline([config.model.vision.model, config.model.llm.model])
    if dist_env.is_main:
        save_config(config, run_dir / "config.yaml")
    import torch

    from pipeline.training.memory import cap_process_memory

    if plan is not None:
        log.info("%s", plan.describe())
        if dist_env.is_main:
            plan.save(run_dir / "memory_plan.json")
    torch.manual_seed(config.train.seed)
    device = device_for(dist_env)
    cap_process_memory(config, device)
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    stage = build_stage(config, tokenizer, device)
    trainer = Trainer(
        config,
        stage,
        lambda state: build_train_loader(config, dist_env, state),
        dist_env,
        device,
        val_batches=build_val_batches(config, dist_env),
    )
    trainer.maybe_resume()
    metrics = make_metrics_logger(config, dist_env.is_main, trainer.wandb_id)
    trainer.wandb_id = metrics.wandb_id
    sample_round = None
    if dist_env.is_main:
        from pipeline.training.samples import SampleLogger

        samples = SampleLogger(config, stage.model, run_dir, metrics, tokenizer)
        sample_round = samples.log_round if samples.enabled else None
    log.info(
        "%s to step %d: global batch %d = micro %d x %d ranks x %d accumulation",
        stage.name,
        config.train.max_steps,
        config.train.global_batch_size,
        config.train.micro_batch_size,
        dist_env.world_size,
        trainer.accumulation,
    )
    reason = trainer.fit(metrics, sample_round)
    trainer.launcher_watch.disarm()
    # The batch script may re-send the stop warning while this process exports and exits.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if reason == "max_steps" and dist_env.is_main:
        trainer.export()
        # Written last: a requeued job (launch/*.sbatch) takes it to mean the run has reached its end.
        (run_dir / "FINISHED").write_text(f"{trainer.step}\n")
    log.info("stopped at step %d: %s", trainer.step, reason)
    metrics.close()
    return reason


def plan_memory(config: RunConfig, world_size: int, local_rank: int):
    """The run's memory plan where there is memory to plan for (a GPU, or train.gpu_memory_gib); `ConfigError` when it
    would not fit. Tokenizing a few hundred samples and tracing one layer on the meta device take about a second."""
    from pipeline.training.memory import check_memory, gpu_budget_gib

    if gpu_budget_gib(config, local_rank) is None:
        return None
    from transformers import AutoTokenizer

    return check_memory(config, AutoTokenizer.from_pretrained(config.model.llm.model), world_size, local_rank)


def main(argv=None, stage: int = 1) -> int:
    """`stage` is the stage this entry point trains (pipeline.train_stage2 passes 2); the config must agree.

    A config or data mistake found before training exits with status 2 and one `error:` line (on rank 0 only, unless
    it is this rank's own); anything that fails later ends the rank at once (`exit_after_failure`)."""
    args = parse_args(argv)
    # Packed micro batches differ in length at every step; with fixed-size segments the caching allocator fragments
    # until a run that fits by its plan runs out of memory (the 70B at micro 64 on an H200), and growable segments
    # cost nothing measurable (docs/memory.md). Set before anything touches CUDA; a user's own setting, under either
    # of the names PyTorch reads, wins.
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    dist_env = read_dist_env()
    try:
        config = resolve_config(args)
        if config.stage != stage:
            entry = "pipeline.train_stage2" if config.stage == 2 else "pipeline.train"
            raise ConfigError(f"the config says stage: {config.stage}; train it with python -m {entry}")
        preflight(config, dist_env.world_size, dist_env.local_rank)
        plan = plan_memory(config, dist_env.world_size, dist_env.local_rank)
    except (ConfigError, DataError) as err:
        if dist_env.is_main or isinstance(err, RankError):
            print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        run(config, plan)
    except (Exception, KeyboardInterrupt) as error:
        exit_after_failure(error, dist_env.rank, dist_env.world_size)
    # The run is saved; its loader workers have nothing left to do. Ending them here means the interpreter's exit,
    # which stops children with SIGTERM (ignored by the workers) and then joins them, never waits on one that a
    # lingering reference kept alive.
    stop_workers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
