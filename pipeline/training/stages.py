"""What a training stage gives the shared `Trainer`: what trains, its loss, its token counts and its export.

Stage 1 (`CaptionStage`) trains the resampler on captions. DeepSpeed wraps the resampler alone, so the frozen
LLM's weights are never broadcast, cast to another dtype or partitioned.

Stage 2 (`InstructStage`) trains the resampler and the LoRA adapters inside the LLM on conversations. DeepSpeed
wraps `TrainableParts`, a module that registers exactly those submodules (the resampler and every adapter's lora_A
and lora_B Linear), so its bf16 cast, its rank-0 broadcast, its checkpoints and its ZeRO-2 gradient hooks see
only them; the LLM's base weights (bf16 or 4-bit) are not its parameters. The engine's forward runs the whole
model's loss, so the engine's backward hooks sit on the loss and ZeRO reduces the adapters' gradients as the
LLM's backward produces them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import RunConfig, to_dict
from pipeline.model.anymal import IGNORE_INDEX, AnyMAL
from pipeline.training.export import export_resampler, export_stage2
from pipeline.training.metrics import llm_flop_parameters, step_flops


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


class CaptionStage:
    """Stage 1: the resampler learns to caption through the frozen LLM."""

    name = "stage 1"

    def __init__(self, model: AnyMAL, config: RunConfig):
        self.model, self.config = model, config
        model.freeze_for_stage1()

    def trainable_module(self) -> nn.Module:
        return self.model.resampler

    def param_groups(self) -> list[dict]:
        return decay_groups(self.model.resampler.parameters(), self.config.optim.weight_decay)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.caption_loss(batch, resampler=engine)

    def token_counts(self, batch: dict) -> tuple[int, int, int]:
        """(supervised tokens, samples, LLM input tokens) of a micro batch, known before its forward."""
        lengths = batch["caption_lengths"]
        samples = lengths.numel()
        return int(lengths.sum()), samples, int(lengths.sum()) + samples * (1 + self.model.resampler.num_latents)

    def flops(self, llm_tokens: float, supervised_tokens: float, samples: float) -> float:
        """Useful FLOPs (see `metrics.step_flops`) of this many LLM tokens, supervised tokens and samples."""
        model = self.model
        n_vision, vision_tokens = 0, 0
        if model.vision is not None:
            clip = model.vision.clip.config
            n_vision = parameter_count(model.vision)
            vision_tokens = (clip.image_size // clip.patch_size) ** 2 + 1
        n_body, n_head = llm_flop_parameters(model.llm, parameter_count)
        return step_flops(
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

    def export(self, engine_module: nn.Module, out_dir: Path, step: int) -> Path:
        return export_resampler(engine_module, out_dir, to_dict(self.config.model), step)


class TrainableParts(nn.Module):
    """What DeepSpeed wraps in stage 2: the trainable submodules, registered here; the loss runs through the model.

    The model itself is kept outside the module tree (in a tuple), so that none of the LLM's base weights becomes a
    parameter of the engine.
    """

    def __init__(self, model: AnyMAL, adapters: list[nn.Module]):
        super().__init__()
        self.resampler = model.resampler
        self.adapters = nn.ModuleList(adapters)
        self._model = (model,)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._model[0].conversation_loss(batch)


class InstructStage(CaptionStage):
    """Stage 2: the resampler and the LLM's LoRA adapters learn to answer in conversations."""

    name = "stage 2"

    def __init__(self, model: AnyMAL, config: RunConfig):
        from pipeline.model.lora import adapter_modules

        self.model, self.config = model, config
        model.freeze_for_stage2()
        self.parts = TrainableParts(model, adapter_modules(model.llm))

    def trainable_module(self) -> nn.Module:
        return self.parts

    def param_groups(self) -> list[dict]:
        optim = self.config.optim
        # The adapters first: the logged lr is the first group's.
        groups = decay_groups(self.parts.adapters.parameters(), optim.weight_decay)
        resampler_lr = optim.resampler_lr if optim.resampler_lr is not None else optim.lr
        return groups + decay_groups(self.parts.resampler.parameters(), optim.weight_decay, lr=resampler_lr)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return engine(batch)

    def token_counts(self, batch: dict) -> tuple[int, int, int]:
        samples = batch["text_lengths"].numel()
        supervised = int((batch["text_labels"] != IGNORE_INDEX).sum())
        return supervised, samples, int(batch["text_lengths"].sum()) + samples * self.model.resampler.num_latents

    def flops(self, llm_tokens: float, supervised_tokens: float, samples: float) -> float:
        # The adapters also compute weight gradients: 2 more FLOPs per adapter parameter and token.
        n_adapters = sum(p.numel() for p in self.parts.adapters.parameters())
        return super().flops(llm_tokens, supervised_tokens, samples) + 2.0 * n_adapters * llm_tokens

    def export(self, engine_module: nn.Module, out_dir: Path, step: int) -> Path:
        return export_stage2(self.model, out_dir, to_dict(self.config), step)
