"""The training loop of both stages, and with `pipeline.training.checkpoint` all the DeepSpeed it calls.

It owns engine initialisation, the optimizer step with token-normalised loss, checkpoints and exact resume,
validation, preemption signals, logging and the final export. Model and data code know nothing of the engine; a
stage (`pipeline.training.stages`) says what the engine wraps, which parameter groups the optimizer gets, how a
micro batch's loss and token counts are computed, and how the result is exported.

Loss normalisation: the loss of a step is the mean over every supervised token of the global batch, whatever the
micro-batch split and world size (averaging per micro batch is the mistake reported in huggingface/transformers#35203).
Before the first micro batch of a step, the supervised-token count of all the step's micro batches on all ranks is
all-reduced; each micro batch then back-propagates sum_loss * world_size / global_tokens. DeepSpeed averages
gradients over ranks, so the update is exactly that of sum-over-global-batch / global_tokens.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import RunConfig, gradient_accumulation_steps, to_dict
from pipeline.model.anymal import IMAGE_INPUTS
from pipeline.training import checkpoint as ckpt
from pipeline.training.failure import LauncherWatch
from pipeline.training.metrics import MetricsLogger, peak_tflops, wandb_mode
from pipeline.training.preflight import read_deepspeed_json

log = logging.getLogger(__name__)


def deepspeed_config(config: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON of the run, with batch sizes and clipping filled in from the run config."""
    ds = read_deepspeed_json(config.train.deepspeed_config)
    accumulation = gradient_accumulation_steps(config, world_size)
    ds.update(
        train_batch_size=config.train.global_batch_size,
        train_micro_batch_size_per_gpu=config.train.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=config.optim.grad_clip,
        zero_allow_untested_optimizer=True,
    )
    for key in ("optimizer", "scheduler"):
        ds.pop(key, None)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": config.train.precision == "bfloat16"}
    ds.setdefault("steps_per_print", 10**9)
    return ds


def lr_lambda(config: RunConfig):
    warmup, total, floor = config.optim.warmup_steps, config.train.max_steps, config.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class StopSignal:
    """Turns SIGUSR1 (SLURM's pre-timeout warning) and SIGTERM (preemption) into a checkpoint-and-exit request."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum


class DeferredMax:
    """An all-reduced maximum whose answer is read one exchange later, so that reading it does not wait for work
    queued on the GPU after it (the all-reduce runs in stream order behind the step that posted it).

    On a GPU the answers land in two page-locked host buffers used in turn, allocated once: the one an exchange
    writes was last read at the exchange before, after its copy had finished."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending = None
        self.answers = (
            [torch.empty(1, dtype=torch.int64, pin_memory=True) for _ in range(2)] if device.type == "cuda" else []
        )
        self.exchanges = 0

    def exchange(self, value: int) -> int:
        """Post `value`; return the maximum over ranks of the values posted at the previous exchange (0 at first)."""
        agreed = 0
        if self.pending is not None:
            answer, done = self.pending
            if done is not None:
                done.synchronize()
            agreed = int(answer.item())
        # Small host-to-device copies go from pageable memory: CUDA stages them at once, without a device wait.
        flag = torch.tensor([value], dtype=torch.int64).to(self.device, non_blocking=True)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        done = None
        if self.answers:
            answer = self.answers[self.exchanges % 2]
            answer.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            flag = answer
        self.exchanges += 1
        self.pending = (flag, done)
        return agreed


class Trainer:
    def __init__(self, config: RunConfig, stage, make_loader, dist_env, device: torch.device, val_batches=None):
        """`stage` is a `CaptionStage` or `InstructStage` (its model frozen for it); `make_loader(state)` builds this
        rank's training loader, from a saved position or from the start."""
        import deepspeed

        self.config, self.stage, self.make_loader = config, stage, make_loader
        self.loader = None
        self.dist_env, self.device = dist_env, device
        self.val_batches = val_batches
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.accumulation = gradient_accumulation_steps(config, dist_env.world_size)
        optimizer = torch.optim.AdamW(
            stage.param_groups(), lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=stage.trainable_module(),
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, dist_env.world_size),
            dist_init_required=False,
        )
        self.step = 0
        self.samples_seen = 0
        self.wandb_id = None
        self.stop_signal = StopSignal()
        # After the stop handlers: a SIGTERM that follows a sibling rank's death must end this rank, not checkpoint.
        self.launcher_watch = LauncherWatch(dist_env.rank, dist_env.world_size)
        self.launcher_watch.start()
        self.stop_agreement = DeferredMax(device)

    # -- checkpoints -------------------------------------------------------------------------------------------

    def maybe_resume(self) -> bool:
        """Continue from the newest complete checkpoint in the run directory, if any; builds the loader."""
        if self.dist_env.is_main:
            # Every rank is here, before any save: no partial checkpoint is being written, so none can be finished.
            ckpt.remove_partial_checkpoints(self.checkpoint_dir)
        path = ckpt.latest_complete(self.checkpoint_dir)
        if path is None:
            self.loader = self.make_loader(None)
            return False
        trainer_state, rank_state = ckpt.load_checkpoint(self.engine, path, self.dist_env.rank)
        self.step = trainer_state["step"]
        self.samples_seen = trainer_state["samples_seen"]
        self.wandb_id = trainer_state.get("wandb_id")
        self.loader = self.make_loader(rank_state["loader"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def save(self) -> None:
        trainer_state = {"step": self.step, "samples_seen": self.samples_seen, "wandb_id": self.wandb_id}
        ckpt.save_checkpoint(
            self.engine,
            self.checkpoint_dir,
            self.step,
            {"loader": self.loader.state_dict()},
            trainer_state,
            self.dist_env.rank,
            self.config.train.keep_last_checkpoints,
        )

    # -- the step ----------------------------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        """The image inputs on the device (page-locked batches copy asynchronously); the text fields stay here."""
        return {k: v.to(self.device, non_blocking=True) if k in IMAGE_INPUTS else v for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over this rank's micro batches.

        Returns the step's global [loss sum, supervised tokens, samples, LLM tokens] (float64) on the device: nothing
        here waits for the GPU, so the host queues the next step while this one runs. `fit` reads the numbers only
        when it logs."""
        local = torch.tensor([self.stage.token_counts(batch) for batch in micro_batches], dtype=torch.float64)
        totals = local.sum(0).to(self.device, non_blocking=True)  # pageable, as for DeferredMax's flag
        dist.all_reduce(totals)
        # Every micro batch back-propagates its summed loss over the step's global supervised-token count.
        scale = (self.dist_env.world_size / totals[0]).float()
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            batch = self._to_device(batch)
            micro_loss, _ = self.stage.loss(self.engine, batch)
            self.engine.backward(micro_loss * scale, scale_wrt_gas=False)
            self.engine.step()
            loss_sum += micro_loss.detach().double()
        dist.all_reduce(loss_sum)
        if self.config.train.record_sample_keys:
            self._record_keys(micro_batches)
        return torch.cat([loss_sum, totals])

    def _record_keys(self, micro_batches: list[dict]) -> None:
        keys = [key for batch in micro_batches for key in batch["keys"]]
        path = self.run_dir / "logs" / f"keys_rank_{self.dist_env.rank:05d}.jsonl"
        with open(path, "a") as out:
            out.write(json.dumps({"step": self.step + 1, "keys": keys}) + "\n")

    def _next_micro_batches(self, data_iter) -> tuple[list[dict], float]:
        start = time.perf_counter()
        batches = [next(data_iter) for _ in range(self.accumulation)]
        return batches, time.perf_counter() - start

    # -- validation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.val_batches is None:
            return None
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with self.stage.model.evaluating():  # no adapter dropout in the validation loss
            for index, batch in enumerate(self.val_batches()):
                if index >= self.config.train.eval_batches:
                    break
                loss, tokens = self.stage.loss(self.engine, self._to_device(batch))
                totals[0] += loss.double()
                totals[1] += tokens.double()
        dist.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).item()

    # -- the loop ----------------------------------------------------------------------------------------------

    def fit(self, metrics: MetricsLogger, sample_round=None) -> str:
        """Train until max_steps, stop_after_steps or a stop signal. Returns why it stopped.

        `sample_round(step)`, given on rank 0 only, captions held-out images every logging.sample_every_steps.
        """
        cfg = self.config.train
        sample_every = self.config.logging.sample_every_steps
        world = self.dist_env.world_size
        peak = peak_tflops()
        data_iter = iter(self.loader)
        window = {"time": 0.0, "data_wait": 0.0, "totals": 0.0}
        step_started = time.perf_counter()
        metrics.start_progress(self.step, cfg.max_steps)
        while self.step < cfg.max_steps:
            micro_batches, data_wait = self._next_micro_batches(data_iter)
            totals = self.train_step(micro_batches)
            self.step += 1
            metrics.advance(self.step)
            # Every micro batch holds micro_batch_size samples (the loader's streams are endless).
            self.samples_seen += cfg.global_batch_size
            now = time.perf_counter()
            window["time"] += now - step_started
            step_started = now
            window["data_wait"] += data_wait
            window["totals"] = window["totals"] + totals
            if self.step % cfg.log_every_steps == 0 or self.step == 1:
                metrics.log(self.step, self._step_metrics(totals, window, world, peak))
                window = {"time": 0.0, "data_wait": 0.0, "totals": 0.0}
            sample_due = sample_every and (self.step % sample_every == 0 or self.step == cfg.max_steps)
            if sample_round is not None and sample_due:
                sample_round(self.step)
            if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0:
                val_loss = self.validate()
                if val_loss is not None:
                    metrics.log(self.step, {"val/loss": val_loss})
            stop = self.agreed_stop_signal()
            if stop:
                self.launcher_watch.disarm()
            if (
                stop
                or self.step % cfg.save_every_steps == 0
                or self.step == cfg.max_steps
                or (cfg.stop_after_steps and self.step >= cfg.stop_after_steps)
            ):
                self.save()
            if stop:
                return f"signal {stop}"
            if cfg.stop_after_steps and self.step >= cfg.stop_after_steps:
                return "stop_after_steps"
        return "max_steps"

    def agreed_stop_signal(self) -> int:
        """The stop request all ranks agreed on one step ago (0 for none); this step's request goes out now.

        Every rank gets the same answer at the same step, so they checkpoint together whichever rank got the signal.
        Reading the answer of the step before, whose all-reduce finished long ago, never waits for the GPU."""
        return self.stop_agreement.exchange(self.stop_signal.received or 0)

    def _step_metrics(self, totals: torch.Tensor, window: dict, world: int, peak: float | None) -> dict:
        """The logged numbers: the last step's loss, the window's throughput. Reading them waits for the GPU."""
        loss_sum, supervised, _, _ = totals.tolist()
        _, window_supervised, window_samples, window_llm_tokens = window["totals"].tolist()
        seconds = max(window["time"], 1e-9)
        flops = self.stage.flops(window_llm_tokens, window_supervised, window_samples)
        out = {
            "loss": loss_sum / supervised,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": _grad_norm(self.engine),
            "samples_per_s": window_samples / seconds,
            "tokens_per_s": window_llm_tokens / seconds,
            "samples_per_s_per_gpu": window_samples / seconds / world,
            "data_wait_frac": window["data_wait"] / seconds,
            "peak_mem_gb": _peak_memory_gb(),
        }
        skips = self._skip_counts()
        out["skipped"] = sum(skips.values())
        out.update({f"skipped/{reason}": count for reason, count in skips.items()})
        if peak:
            out["mfu"] = flops / seconds / (world * peak * 1e12)
        return out

    def _skip_counts(self) -> dict:
        counts = self.loader.skip_counts()
        names = sorted(counts)
        values = torch.tensor([float(counts[n]) for n in names], dtype=torch.float64, device=self.device)
        if names:
            dist.all_reduce(values)
        return dict(zip(names, values.tolist(), strict=True))

    def export(self) -> Path | None:
        """Rank 0 writes the stage's export to <run_dir>/export."""
        if not self.dist_env.is_main:
            return None
        return self.stage.export(self.engine.module, self.run_dir / "export", self.step)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def make_metrics_logger(config: RunConfig, is_main: bool, resume_id: str | None) -> MetricsLogger:
    settings = {
        "project": config.logging.wandb_project,
        "name": config.logging.wandb_run_name,
        "mode": wandb_mode(config.logging.wandb_mode),
    }
    return MetricsLogger(Path(config.run_dir), is_main, settings, to_dict(config), resume_id)
