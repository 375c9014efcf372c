"""Typed run configuration: YAML files in `configs/`, dotted command-line overrides, one validation pass.

Every entry point loads its config through `load_config`, which
  1. reads the YAML file (unknown keys are errors, never silently ignored),
  2. applies overrides such as `optim.lr=1e-4` or `data.sources=[...]` (values parsed as YAML),
  3. validates the result, raising `ConfigError` with one line naming the key and what to do.
Validation needs no process group, so a wrong config fails before anything is launched.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user-fixable problem in a config file or override; the message is one line."""


@dataclass
class VisionConfig:
    # Hub id or local directory of a CLIP or SigLIP checkpoint (full or vision-only) with its image processor;
    # families: pipeline/model/vision.py TOWERS.
    model: str = "openai/clip-vit-large-patch14"
    # Hidden state the resampler reads. -2 (the penultimate layer, as LLaVA and AnyMAL's reference code use)
    # keeps patch-level detail that the last layer trades away for the contrastive CLS objective.
    feature_layer: int = -2
    dtype: str = "bfloat16"


@dataclass
class ResamplerConfig:
    num_latents: int = 64
    depth: int = 6
    heads: int = 16
    head_dim: int = 64
    # Inner width; null means the vision width (1024 for ViT-L/14, ~80M parameters). The public
    # reference code runs at 4096, which makes a 1.6B-parameter connector.
    width: int | None = None
    ff_mult: int = 4


@dataclass
class LLMConfig:
    # Hub id or local directory of a causal LM with its tokenizer; families: pipeline/model/llm.py LLM_FAMILIES.
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    dtype: str = "bfloat16"
    # "sdpa", "flex_attention", "varlen" (PyTorch's variable-length flash kernel, pipeline/model/attention.py),
    # "eager", or "flash_attention_2" (only when flash-attn is installed). With packing on a GPU, varlen and
    # flex_attention never compute across samples; SDPA computes the whole row against a dense mask and is about 2x
    # slower there (benchmarks/stage1_throughput.py).
    attn_implementation: str = "sdpa"
    # torch.compile each decoder layer (dynamic shapes): fuses norms, rotary and activations around the GEMMs.
    compile_layers: bool = False
    # "none" keeps the frozen weights in `dtype`; "nf4" loads them 4-bit (bitsandbytes NF4 with double quantisation,
    # computing in `dtype`): QLoRA in stage 2, and in stage 1 a quarter of the LLM's memory for a smaller card or a
    # larger LLM.
    quantization: str = "none"
    # Keep only each decoder layer's input through the forward and recompute the layer in the backward: the frozen
    # LLM's activations shrink 12-33x (8B: from 100-270 KB to 8 KB per token and layer), and the forward runs twice:
    # half again the frozen LLM's compute, whose backward computes no weight gradients.
    # For a card whose memory would otherwise force a tiny micro batch (docs/memory.md).
    activation_checkpointing: bool = False


@dataclass
class LoRAConfig:
    """Stage 2: peft LoRA adapters on the LLM (the recipe: rank 64, alpha 16, dropout 0.05, every projection)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    # Module names to adapt, or [all-linear]: every Linear layer of the decoder, whatever the family calls them,
    # without the LM head (in LLaMA, Qwen and Mistral: q/k/v/o_proj and gate/up/down_proj).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # Caption tokens kept per sample (EOS included); longer captions are truncated.
    max_caption_tokens: int = 64
    # Pack a micro batch's samples into one row (block-diagonal attention, positions restart per sample) instead of
    # padding every caption to the longest; the loss is identical, the padding compute is gone.
    packing: bool = True
    # Stage 2 only: the adapters, where the stage-1 resampler comes from (its export/ directory, its run directory,
    # or one checkpoint directory; empty starts from a fresh resampler), the longest sample in tokens (image tokens
    # included; longer conversations lose their end, never the image) and an optional system prompt.
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    stage1_resampler: str = ""
    max_sequence_tokens: int = 2048
    system_prompt: str = ""


@dataclass
class SourceConfig:
    # Brace-expanded shard spec, e.g. "/data/laion/{00000..41407}.tar"; local paths may also use globs.
    shards: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # "images": img2dataset shards, decoded and run through the frozen CLIP tower every step.
    # "features": shards of cached CLIP features (data_prep/cache_features.sh); the vision tower is not loaded.
    input: str = "images"
    sources: list[SourceConfig] = field(default_factory=list)
    # Held-out shards for validation loss and sample captions; optional.
    val_shards: str = ""
    num_workers: int = 4
    shuffle_buffer: int = 1000
    seed: int = 0
    # A brace range that names a missing shard is an error; true trains on the shards that exist (with a warning),
    # e.g. while a download is still filling the range.
    allow_missing_shards: bool = False
    # Images with more pixels than this, even at the JPEG decoder's smallest draft scale, are skipped and counted
    # (skipped/oversized_image); large JPEGs are decoded at a reduced scale first, so they are cheap and kept.
    max_image_pixels: int = 16_777_216


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 2000
    # Cosine decay from lr to lr * min_lr_ratio over the remaining steps.
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # Stage 2: the resampler's own learning rate (same schedule); null trains it at `lr` like the adapters.
    resampler_lr: float | None = None


@dataclass
class TrainConfig:
    global_batch_size: int = 2048
    micro_batch_size: int = 32
    max_steps: int = 100_000
    # DeepSpeed JSON; batch sizes, optimizer, scheduler and clipping are filled in from this config.
    deepspeed_config: str = "ds_configs/zero2.json"
    # "bfloat16" or "float32" (fp32 is for CPU tests that compare updates exactly).
    precision: str = "bfloat16"
    seed: int = 1234
    distributed_backend: str = "nccl"
    save_every_steps: int = 1000
    keep_last_checkpoints: int = 3
    log_every_steps: int = 10
    # Stop (with a checkpoint) after this many steps without ending the schedule; 0 = run to max_steps.
    stop_after_steps: int = 0
    # Validation loss on data.val_shards every this many steps (0 = never), over at most eval_batches batches.
    eval_every_steps: int = 0
    eval_batches: int = 50
    # Append every step's sample keys to <run_dir>/logs/keys_rank_<r>.jsonl (data audits, resume checks).
    record_sample_keys: bool = False
    # GPU memory each rank plans for, in GiB (2**30 bytes); null: the card's. A value below the card's also caps the
    # process there (torch.cuda.set_per_process_memory_fraction), e.g. to check a config for a 24 GB card on a larger
    # one, or to leave room for another job.
    gpu_memory_gib: float | None = None
    # At start-up the run estimates its peak GPU memory (pipeline/training/memory.py) and logs it; with memory_check
    # a run that would not fit gpu_memory_gib stops there, naming the micro batch that would fit. false logs only.
    memory_check: bool = True


@dataclass
class LoggingConfig:
    wandb_project: str = "anymal"
    wandb_run_name: str = ""
    # "auto" = online if WANDB_API_KEY is set, else offline; "disabled" turns wandb off.
    wandb_mode: str = "auto"
    # Every sample_every_steps (0 = never), rank 0 captions num_samples held-out images into a wandb table and
    # <run_dir>/samples/. sample_shards are image shards; empty means data.val_shards when training on images.
    sample_every_steps: int = 0
    num_samples: int = 16
    sample_shards: str = ""


@dataclass
class RunConfig:
    # 1: align the resampler on captions (python -m pipeline.train); 2: instruction-tune the resampler and LoRA
    # adapters on conversations (python -m pipeline.train_stage2).
    stage: int = 1
    run_dir: str = "runs/stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


DTYPES = ("bfloat16", "float16", "float32")


def _build(cls, raw, where: str):
    """Turn plain YAML data into dataclass `cls`, naming the dotted key of any unknown or mistyped value."""
    hints = typing.get_type_hints(cls)
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
    values = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name) for name, value in raw.items()}
    return cls(**values)


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"'{where}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it obviously is.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"'{where}' must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.subkey=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': value is not valid YAML ({err.problem})") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None), apply dotted overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass one from configs/, e.g. configs/toy.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    for override in overrides:
        _apply_override(raw, override)
    config = _build(RunConfig, raw, "")
    validate(config)
    return config


# What each numeric key may hold. Keys of one section are listed together; stage-2 keys are checked in every stage
# (they are ignored in stage 1, but a nonsense value is still a mistake worth naming).
_POSITIVE = "positive"
_NON_NEGATIVE = ">= 0"
_FRACTION = "in [0, 1)"
_UNIT_INTERVAL = "in [0, 1]"
_RULES = {
    _POSITIVE: lambda v: v > 0,
    _NON_NEGATIVE: lambda v: v >= 0,
    _FRACTION: lambda v: 0 <= v < 1,
    _UNIT_INTERVAL: lambda v: 0 <= v <= 1,
}


def _numeric_rules(config: RunConfig) -> list[tuple[str, float | int | None, str]]:
    """(dotted key, value, rule) for every numeric key; a None value (an optional key left empty) passes."""
    train, optim, model, data, logging_ = config.train, config.optim, config.model, config.data, config.logging
    resampler, lora = model.resampler, model.lora
    return [
        ("train.global_batch_size", train.global_batch_size, _POSITIVE),
        ("train.micro_batch_size", train.micro_batch_size, _POSITIVE),
        ("train.max_steps", train.max_steps, _POSITIVE),
        ("train.save_every_steps", train.save_every_steps, _POSITIVE),
        ("train.keep_last_checkpoints", train.keep_last_checkpoints, _POSITIVE),
        ("train.log_every_steps", train.log_every_steps, _POSITIVE),
        ("train.eval_batches", train.eval_batches, _POSITIVE),
        ("train.eval_every_steps", train.eval_every_steps, _NON_NEGATIVE),
        ("train.stop_after_steps", train.stop_after_steps, _NON_NEGATIVE),
        ("train.seed", train.seed, _NON_NEGATIVE),
        ("train.gpu_memory_gib", train.gpu_memory_gib, _POSITIVE),
        ("optim.lr", optim.lr, _POSITIVE),
        ("optim.resampler_lr", optim.resampler_lr, _POSITIVE),
        ("optim.eps", optim.eps, _POSITIVE),
        ("optim.weight_decay", optim.weight_decay, _NON_NEGATIVE),
        ("optim.warmup_steps", optim.warmup_steps, _NON_NEGATIVE),
        ("optim.grad_clip", optim.grad_clip, _NON_NEGATIVE),
        ("optim.min_lr_ratio", optim.min_lr_ratio, _UNIT_INTERVAL),
        ("optim.betas[0]", optim.betas[0], _FRACTION),
        ("optim.betas[1]", optim.betas[1], _FRACTION),
        ("model.max_caption_tokens", model.max_caption_tokens, _POSITIVE),
        ("model.max_sequence_tokens", model.max_sequence_tokens, _POSITIVE),
        ("model.resampler.num_latents", resampler.num_latents, _POSITIVE),
        ("model.resampler.depth", resampler.depth, _POSITIVE),
        ("model.resampler.heads", resampler.heads, _POSITIVE),
        ("model.resampler.head_dim", resampler.head_dim, _POSITIVE),
        ("model.resampler.width", resampler.width, _POSITIVE),
        ("model.resampler.ff_mult", resampler.ff_mult, _POSITIVE),
        ("model.lora.r", lora.r, _POSITIVE),
        ("model.lora.alpha", lora.alpha, _POSITIVE),
        ("model.lora.dropout", lora.dropout, _FRACTION),
        ("data.num_workers", data.num_workers, _NON_NEGATIVE),
        ("data.shuffle_buffer", data.shuffle_buffer, _NON_NEGATIVE),
        ("data.seed", data.seed, _NON_NEGATIVE),
        ("data.max_image_pixels", data.max_image_pixels, _POSITIVE),
        ("logging.sample_every_steps", logging_.sample_every_steps, _NON_NEGATIVE),
        ("logging.num_samples", logging_.num_samples, _POSITIVE),
        *((f"data.sources[{i}].weight", source.weight, _POSITIVE) for i, source in enumerate(data.sources)),
    ]


def validate(config: RunConfig) -> None:
    """Checks that need no process group and no files beyond the config itself."""
    train, model = config.train, config.model
    for key, value, rule in _numeric_rules(config):
        # `not rule(value)` rather than the negated comparison, so that NaN fails every rule.
        if value is not None and not _RULES[rule](value):
            raise ConfigError(f"'{key}' must be {rule}, got {value}")
    if train.global_batch_size % train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={train.micro_batch_size}; pick sizes that divide"
        )
    for key, value in (
        ("model.vision.dtype", model.vision.dtype),
        ("model.llm.dtype", model.llm.dtype),
        ("train.precision", train.precision),
    ):
        if value not in DTYPES:
            raise ConfigError(f"'{key}' must be one of {', '.join(DTYPES)}, got '{value}'")
    if train.precision not in ("bfloat16", "float32"):
        raise ConfigError(f"'train.precision' must be bfloat16 or float32, got '{train.precision}'")
    if train.distributed_backend not in ("nccl", "gloo"):
        raise ConfigError(f"'train.distributed_backend' must be nccl or gloo, got '{train.distributed_backend}'")
    if model.llm.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flex_attention", "varlen"):
        raise ConfigError(
            f"'model.llm.attn_implementation' must be sdpa, eager, flex_attention, varlen or flash_attention_2, "
            f"got '{model.llm.attn_implementation}'"
        )
    for key, value in (("model.vision.model", model.vision.model), ("model.llm.model", model.llm.model)):
        if not value.strip():
            raise ConfigError(f"'{key}' is empty; give a hub id or a local model directory")
    if not config.run_dir.strip():
        raise ConfigError("'run_dir' is empty; give the directory the run writes to, e.g. run_dir=runs/stage1")
    if not config.data.sources:
        raise ConfigError(
            "'data.sources' is empty; give at least one shard spec, "
            "e.g. 'data.sources=[{shards: \"/data/{00000..00009}.tar\"}]'"
        )
    for i, source in enumerate(config.data.sources):
        if not source.shards:
            raise ConfigError(f"'data.sources[{i}].shards' is empty; give a shard spec like /data/{{00000..00099}}.tar")
    if config.data.input not in ("images", "features"):
        raise ConfigError(f"'data.input' must be images or features, got '{config.data.input}'")
    if config.logging.wandb_mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(
            f"'logging.wandb_mode' must be auto, online, offline or disabled, got '{config.logging.wandb_mode}'"
        )
    if config.stage not in (1, 2):
        raise ConfigError(f"'stage' must be 1 or 2, got {config.stage}")
    _validate_quantization(model.llm)
    if config.stage == 2:
        _validate_stage2(config)


def _validate_stage2(config: RunConfig) -> None:
    model, lora = config.model, config.model.lora
    if config.data.input != "images":
        raise ConfigError("stage 2 reads conversation shards with images; set data.input=images")
    if not lora.target_modules:
        raise ConfigError(
            "'model.lora.target_modules' is empty; use [all-linear] or name the projections, e.g. [q_proj, v_proj]"
        )
    if model.max_sequence_tokens <= model.resampler.num_latents:
        raise ConfigError(
            f"'model.max_sequence_tokens'={model.max_sequence_tokens} leaves no room for text after the "
            f"{model.resampler.num_latents} image tokens; raise it"
        )


def _validate_quantization(llm: LLMConfig) -> None:
    """A 4-bit (NF4) frozen LLM serves both stages: QLoRA in stage 2, a smaller card or a larger LLM in stage 1."""
    if llm.quantization not in ("none", "nf4"):
        raise ConfigError(f"'model.llm.quantization' must be none or nf4, got '{llm.quantization}'")
    # find_spec, not import: config checks stay fast.
    if llm.quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.llm.quantization=nf4 needs bitsandbytes; pip install 'bitsandbytes>=0.50'")


def gradient_accumulation_steps(config: RunConfig, world_size: int) -> int:
    """Accumulation derived from global batch, micro batch and world size; never configured separately."""
    train = config.train
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        fits = [m for m in range(train.micro_batch_size, 0, -1) if train.global_batch_size % (m * world_size) == 0]
        advice = (
            f"e.g. train.micro_batch_size={fits[0]} (accumulation {train.global_batch_size // (fits[0] * world_size)})"
            if fits
            else "change the global batch size"
        )
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not divisible by "
            f"micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) = {per_step}; {advice}"
        )
    return train.global_batch_size // per_step


def to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
