"""What each training stage trains, built in one place: `build_stage` loads, checks, adapts, freezes and wraps.

Stage 1 (`CaptionStage`) trains the resampler on captions; stage 2 (`InstructStage`) trains the resampler and LoRA
adapters inside the LLM on conversations. Both give DeepSpeed the same kind of module, `TrainableParts`: it registers
exactly the trainable submodules (the resampler, and in stage 2 every adapter's lora_A and lora_B Linear), so the
engine's bf16 cast, rank-0 broadcast, checkpoints and ZeRO-2 gradient hooks see only them; the LLM's base weights
(bf16 or 4-bit) and the vision tower are never its parameters. Its forward runs the whole model's loss, so the engine
runs the stage's forward and its backward hooks sit on that loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import ConfigError, RunConfig, load_config, to_dict
from pipeline.inference.export import export_resampler, export_stage2, load_exported_resampler
from pipeline.model.anymal import AnyMAL, build_anymal, build_resampler
from pipeline.model.resampler import PerceiverResampler
from pipeline.training.checkpoint import COMPLETE_MARKER, latest_complete
from pipeline.training.metrics import llm_flop_parameters, step_flops

log = logging.getLogger(__name__)


def build_stage(config: RunConfig, tokenizer, device, *, llm=None) -> CaptionStage | InstructStage:
    """The run's model on `device`, frozen for its stage, inside the stage object the trainer drives.

    Loads the frozen towers (by hub id or path; `llm` replaces the loaded LLM, as benchmarks pass a random one) and a
    resampler: a fresh one in stage 1, in stage 2 the stage-1 one (`model.stage1_resampler`), checked against this
    config. Stage 2 then puts LoRA adapters on the LLM."""
    resampler = None
    if config.stage == 2 and config.model.stage1_resampler:
        resampler, source = load_stage1_resampler(config.model.stage1_resampler)
        log.info("stage-1 resampler from %s", source)
    elif config.stage == 2:
        log.warning("model.stage1_resampler is empty: stage 2 starts from a freshly initialised resampler")
    model = build_anymal(
        config.model,
        tokenizer,
        load_vision=config.data.input == "images",
        device=device,
        llm=llm,
        resampler=resampler,
    )
    if resampler is not None:
        check_stage1_resampler(model, config)
    if model.vision is not None:
        model.vision.to(device)
    if config.model.llm.quantization == "none":  # a quantized LLM was loaded onto the device
        model.llm.to(device)
    model.resampler.to(device)
    return stage_for(model, config)


def stage_for(model: AnyMAL, config: RunConfig) -> CaptionStage | InstructStage:
    """A built model adapted, frozen and wrapped for the config's stage: stage 2 puts LoRA adapters on the LLM unless
    it has them already (a benchmark's padded baseline shares the adapted model)."""
    if config.stage == 1:
        return CaptionStage(model, config)
    from pipeline.model.lora import add_lora, has_adapters

    if not has_adapters(model.llm):
        model.llm = add_lora(model.llm, config.model.lora)
    return InstructStage(model, config)


def check_stage1_resampler(model: AnyMAL, config: RunConfig) -> None:
    """The stage-1 resampler fits this run: its latents are the configured image tokens, its input the tower's width
    and its output the LLM's width."""
    shape = model.resampler.config
    vision_width = model.vision.width if model.vision is not None else shape["vision_width"]
    expected = {
        "num_latents": (config.model.resampler.num_latents, "model.resampler.num_latents"),
        "vision_width": (vision_width, f"the width of {config.model.vision.model}"),
        "output_width": (model.llm.config.hidden_size, f"the hidden size of {config.model.llm.model}"),
    }
    for key, (value, what) in expected.items():
        if shape[key] != value:
            raise ConfigError(
                f"model.stage1_resampler '{config.model.stage1_resampler}' has {key}={shape[key]}, but {what} is "
                f"{value}; train stage 2 with the stage-1 run's backbones and resampler settings"
            )


def load_stage1_resampler(source: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PerceiverResampler, str]:
    """A stage-1 resampler from its export directory, its run directory (the export, else the newest complete
    checkpoint) or one checkpoint directory. Returns it with a description of where it came from."""
    source = Path(source)
    for export_dir in (source, source / "export"):
        if (export_dir / "resampler.json").is_file():
            resampler, meta = load_exported_resampler(export_dir, dtype)
            return resampler, f"export {export_dir} (step {meta['step']})"
    checkpoint = source if (source / COMPLETE_MARKER).is_file() else latest_complete(source / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(
            f"model.stage1_resampler '{source}' holds no resampler.json, export/ or complete checkpoint; point at a "
            "stage-1 run directory, its export/ directory or one of its checkpoints/step_* directories"
        )
    config = load_config(checkpoint.parent.parent / "config.yaml")
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    # The engine wraps `TrainableParts`, whose resampler's keys start "resampler."; a bare resampler's do not.
    states = {key.removeprefix("resampler."): value for key, value in states.items() if not key.startswith("adapters.")}
    width = states["latents"].shape[1]
    vision_width = states["project_in.weight"].shape[1] if "project_in.weight" in states else width
    resampler = build_resampler(config.model, vision_width, states["to_llm.weight"].shape[0])
    resampler.load_state_dict(states)
    return resampler.to(dtype), f"checkpoint {checkpoint}"


def decay_groups(params, weight_decay: float, **options) -> list[dict]:
    """Decay matrices and the latents; leave biases and norm gains alone. Empty groups are left out (ZeRO drops
    them, and the scheduler must see the groups the optimizer keeps)."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **options},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **options},
    ]
    return [group for group in groups if group["params"]]


def parameter_count(module: nn.Module) -> int:
    """Parameters as the model has them: a 4-bit weight counts its unpacked shape, not its packed bytes."""
    return sum(
        p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        for p in module.parameters()
    )


class TrainableParts(nn.Module):
    """What DeepSpeed wraps: the trainable submodules, registered here; `forward(batch)` runs the stage's loss
    through the whole model.

    The model itself is kept outside the module tree (in a tuple), so that none of the LLM's base weights becomes a
    parameter of the engine.
    """

    def __init__(self, model: AnyMAL, adapters: list[nn.Module], loss):
        super().__init__()
        self.resampler = model.resampler
        self.adapters = nn.ModuleList(adapters)
        self._model = (model,)
        self._loss = loss

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loss(batch)


class _Stage:
    """What the shared `Trainer` needs of a stage: the module the engine wraps, parameter groups, token counts,
    useful FLOPs and the export."""

    name = ""

    def __init__(self, model: AnyMAL, config: RunConfig, adapters: list[nn.Module], loss):
        self.model, self.config = model, config
        self.parts = TrainableParts(model, adapters, loss)

    def trainable_module(self) -> nn.Module:
        return self.parts

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro batch's summed loss and supervised-token count, through the engine's forward."""
        return engine(batch)

    def flops(self, llm_tokens: float, supervised_tokens: float, samples: float) -> float:
        """Useful FLOPs (see `metrics.step_flops`) of this many LLM tokens, supervised tokens and samples; adapters
        also compute weight gradients, 2 more FLOPs per adapter parameter and token."""
        model = self.model
        n_vision, vision_tokens = 0, 0
        if model.vision is not None:
            n_vision = parameter_count(model.vision)
            vision_tokens = model.vision.tokens
        n_body, n_head = llm_flop_parameters(model.llm, parameter_count)
        n_adapters = sum(p.numel() for p in self.parts.adapters.parameters())
        return 2.0 * n_adapters * llm_tokens + step_flops(
            n_body,
            n_head,
            parameter_count(model.resampler),
            n_vision,
            llm_tokens,
            supervised_tokens,
            samples,
            model.resampler.num_latents,
            vision_tokens,
        )


class CaptionStage(_Stage):
    """Stage 1: the resampler learns to caption through the frozen LLM."""

    name = "stage 1"

    def __init__(self, model: AnyMAL, config: RunConfig):
        model.freeze_for_stage1()
        super().__init__(model, config, [], model.caption_loss)

    def param_groups(self) -> list[dict]:
        return decay_groups(self.model.resampler.parameters(), self.config.optim.weight_decay)

    def token_counts(self, batch: dict) -> tuple[int, int, int]:
        """(supervised tokens, samples, LLM input tokens) of a micro batch, known before its forward."""
        lengths = batch["caption_lengths"]
        samples = lengths.numel()
        return int(lengths.sum()), samples, int(lengths.sum()) + samples * (1 + self.model.resampler.num_latents)

    def export(self, engine_module: nn.Module, out_dir: Path, step: int) -> Path:
        return export_resampler(self.model.resampler, out_dir, to_dict(self.config.model), step)


class InstructStage(_Stage):
    """Stage 2: the resampler and the LLM's LoRA adapters learn to answer in conversations."""

    name = "stage 2"

    def __init__(self, model: AnyMAL, config: RunConfig):
        from pipeline.model.lora import adapter_modules

        model.freeze_for_stage2()
        super().__init__(model, config, adapter_modules(model.llm), model.conversation_loss)

    def param_groups(self) -> list[dict]:
        optim = self.config.optim
        # The adapters first: the logged lr is the first group's.
        groups = decay_groups(self.parts.adapters.parameters(), optim.weight_decay)
        resampler_lr = optim.resampler_lr if optim.resampler_lr is not None else optim.lr
        return groups + decay_groups(self.parts.resampler.parameters(), optim.weight_decay, lr=resampler_lr)

    def token_counts(self, batch: dict) -> tuple[int, int, int]:
        samples = batch["text_lengths"].numel()
        supervised = int((batch["text_labels"] != IGNORE_INDEX).sum())
        return supervised, samples, int(batch["text_lengths"].sum()) + samples * self.model.resampler.num_latents

    def export(self, engine_module: nn.Module, out_dir: Path, step: int) -> Path:
        return export_stage2(self.model, out_dir, to_dict(self.config), step)
