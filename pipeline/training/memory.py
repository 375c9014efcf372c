"""A run's peak GPU memory per rank, estimated at start-up from the model configs and the data, before any weight loads.

The peak of a step is the end of a micro batch's forward, when every activation autograd keeps for the backward is
alive. The plan adds up what a rank holds then:
- frozen weights: the LLM's (in its dtype, or with the decoder's Linear weights in NF4: 4 bits plus block scales,
  embeddings and LM head staying in the dtype, as bitsandbytes loads them) and the vision tower's, when it runs;
- trainable state: the resampler's and the LoRA adapters' bf16 weights and gradients, DeepSpeed's bucket copy, and
  fp32 master weights, gradients and Adam moments, which ZeRO-2 splits over the ranks;
- activations: what autograd keeps per token in one decoder layer of the real shapes, found by running one layer on
  PyTorch's meta device (no memory, no arithmetic) and counting the tensors it saves, times layers and tokens; with
  activation checkpointing, each layer's input instead, plus one layer rebuilt during the backward; the resampler's,
  counted the same way per sample; the fp32 log-probabilities the loss keeps for the supervised tokens;
- an allowance for workspaces, compiled kernels and the caching allocator's fragmentation.
Tokens per micro batch come from the data itself: up to `SAMPLED_RECORDS` samples of the first shard are tokenized as
training tokenizes them, and the plan takes a micro batch's mean plus three standard deviations. Planned against
measured peaks: docs/memory.md.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

GIB = 2**30
SAMPLED_RECORDS = 256
# NF4 with double quantisation: 4 bits per weight, an 8-bit scale per 64 weights, and an fp32 scale per 256 of those
# scales (plus one offset per tensor).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# Workspaces of cuBLAS and the attention kernels, compiled kernels' buffers and the allocator's rounding.
ALLOWANCE_GIB = 1.0
FRAGMENTATION = 0.05
# A plan fits when its peak stays below this share of the budget: measured peaks came to at most 2% above the plan
# (the 70B at micro 64 on an H200, 128.2 GiB against 125.8), and the CUDA context and kernels' scratch space at the
# largest sizes lie outside what the allocator reports.
HEADROOM = 0.92
# The loss's chunk through the LM head (`pipeline.model.anymal.LOGIT_CHUNK_TOKENS`): one chunk's bf16 logits and their
# fp32 copy exist at once, beside the fp32 log-probabilities every chunk keeps for the backward.
LOGIT_CHUNK_TOKENS = 4096
TRACE_ATTENTION = "memory_trace"
# The plan's note when the data could not be read: it then assumes every sample at its maximum length, several times
# what LLaVA-like conversations hold, and only warns instead of stopping the run.
LENGTHS_UNKNOWN = "data lengths unknown"
# Attention kernels that keep no [T, T] scores for the backward, as the trace assumes.
FLASH_LIKE_ATTENTION = ("varlen", "flex_attention", "flash_attention_2")
# What a real layer keeps per token against the meta-device trace, measured on an H200 for LLaMA-3-8B and -70B shapes,
# bf16 and NF4, with and without LoRA (benchmarks/layer_memory.py, benchmarks/results/layer_memory_h200.json): eager
# layers keep 0.91-1.10x the trace (the varlen kernel's buffers), compiled ones 0.70-0.73x (inductor recomputes
# elementwise results in the backward instead of keeping them). The plan takes the largest of each.
EAGER_LAYER_FRACTION = 1.10
COMPILED_LAYER_FRACTION = 0.73


@dataclass
class MemoryPlan:
    micro_batch_size: int
    tokens_per_micro_batch: int  # LLM tokens the plan is made for (mean + 3 standard deviations)
    supervised_per_micro_batch: int
    parts_gib: dict[str, float]
    peak_gib: float
    budget_gib: float | None  # what a rank may use; None where unknown (no GPU, no train.gpu_memory_gib)
    lengths_from: str  # where the token counts came from

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.peak_gib <= HEADROOM * self.budget_gib

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value:.1f}" for name, value in self.parts_gib.items())
        budget = ""
        if self.budget_gib is not None:
            verdict = "within" if self.fits else "over"
            budget = f" ({verdict} {HEADROOM:.0%} of {self.budget_gib:.1f} GiB)"
        return (
            f"memory plan: peak ~{self.peak_gib:.1f} GiB{budget} per GPU at micro batch {self.micro_batch_size} "
            f"(~{self.tokens_per_micro_batch} LLM tokens, {self.lengths_from}): {parts} GiB"
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "fits": self.fits}, indent=2) + "\n")


@dataclass
class _Shapes:
    """What the plan needs of the models, per token or sample and in bytes, independent of the micro batch."""

    llm_weights: float
    vision_weights: float
    trainable_parameters: int
    layers: int
    layer_bytes_per_token: float  # all a decoder layer keeps for its backward
    layer_input_bytes_per_token: float  # a checkpointed layer's input
    resampler_bytes_per_sample: float
    vision_bytes_per_sample: float  # the tower's output (or cached features), the resampler's input
    vocab: int
    hidden: int


class _TracedAttention(torch.autograd.Function):
    """Stands in for a flash/varlen attention kernel on the meta device: keeps query, key, value, output and the
    fp32 log-sum-exp per query, as those kernels do, and never the [T, T] scores a math attention would."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.transpose(1, 2).contiguous()
        lse = query.new_empty(query.shape[:3], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return grad.transpose(1, 2), torch.zeros_like(key), torch.zeros_like(value)


def _traced_attention(module, query, key, value, attention_mask, **kwargs):
    return _TracedAttention.apply(query, key, value), None


def saved_bytes(run) -> int:
    """Bytes of the distinct tensors autograd saves while `run()` builds its graph (meta tensors have no storage to
    compare, so a tensor saved twice by identity counts once)."""
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor):
        seen.setdefault(id(tensor), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(t.numel() * t.element_size() for t in seen.values())


def _per_unit(run, small: int, large: int) -> float:
    """Saved bytes per unit of size (tokens, samples): the difference of two sizes, so that saved weights, which do
    not grow with the size, cancel."""
    return (saved_bytes(lambda: run(large)) - saved_bytes(lambda: run(small))) / (large - small)


@dataclass
class _LayerTrace:
    """One decoder layer of the LLM, traced: per-layer counts, and what lies outside the layers."""

    bytes_per_token: float  # all the layer keeps for its backward
    adapter_parameters: int
    linear_weights: int  # frozen Linear weights, the ones NF4 quantizes
    other_weights: int  # norms
    outside_weights: int  # embeddings, final norm, LM head


def one_layer_config(llm_config):
    one_layer = copy.deepcopy(llm_config)
    one_layer.num_hidden_layers = 1
    if getattr(one_layer, "layer_types", None):
        one_layer.layer_types = one_layer.layer_types[:1]
    one_layer._attn_implementation = TRACE_ATTENTION
    return one_layer


def trace_llm_layer(
    llm_config, lora, training: bool, adapter_dtype: torch.dtype = torch.bfloat16, dtype: torch.dtype = torch.bfloat16
) -> _LayerTrace:
    """A one-layer model of the LLM's shapes (with stage 2's adapters when `lora` is given) on the meta device, and
    the bytes its layer keeps per token in the mode training runs it in (`training`: LoRA's dropout masks). The
    adapters are in `adapter_dtype`, as DeepSpeed's bf16 engine holds them; the layer computes in `dtype`."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(TRACE_ATTENTION, _traced_attention)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one_layer_config(llm_config), dtype=dtype)
        model.requires_grad_(False)
        if lora is not None:
            from pipeline.model.lora import add_lora

            model = add_lora(model, lora)
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(adapter_dtype)
    model.train(training)
    decoder = model.get_decoder()
    layer = decoder.layers[0]

    def run(tokens: int):
        states = torch.empty(1, tokens, llm_config.hidden_size, device="meta", dtype=dtype)
        states.requires_grad_(True)
        positions = torch.arange(tokens, device="meta")[None]
        out = layer(states, position_ids=positions, position_embeddings=decoder.rotary_emb(states, positions))
        return out[0] if isinstance(out, tuple) else out

    frozen = [p for p in layer.parameters() if not p.requires_grad]
    linear = sum(
        m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )
    in_layer = sum(p.numel() for p in frozen)
    return _LayerTrace(
        bytes_per_token=_per_unit(run, 64, 128),
        adapter_parameters=sum(p.numel() for p in layer.parameters() if p.requires_grad),
        linear_weights=linear,
        other_weights=in_layer - linear,
        outside_weights=sum(p.numel() for p in model.parameters() if not p.requires_grad) - in_layer,
    )


def _shapes(config: RunConfig) -> _Shapes:
    from transformers import AutoConfig

    from pipeline.data.features import expected_feature_shape
    from pipeline.model.anymal import build_resampler
    from pipeline.model.vision import TOWERS, tower_family, vision_config_of

    model = config.model
    llm_config = AutoConfig.from_pretrained(model.llm.model)
    precision = getattr(torch, config.train.precision)
    llm_dtype = getattr(torch, model.llm.dtype)
    lora = model.lora if config.stage == 2 else None
    layer = trace_llm_layer(llm_config, lora, config.stage == 2, precision, llm_dtype)
    layers = llm_config.num_hidden_layers
    dtype_bytes = torch.finfo(llm_dtype).bits // 8
    linear_bytes = NF4_BYTES_PER_WEIGHT if model.llm.quantization == "nf4" else dtype_bytes
    llm_weights = layers * (layer.linear_weights * linear_bytes + layer.other_weights * dtype_bytes)
    llm_weights += layer.outside_weights * dtype_bytes

    vision_raw = AutoConfig.from_pretrained(model.vision.model)
    vision_tokens, vision_width = expected_feature_shape(model.vision.model)
    vision_weights = 0.0
    if config.data.input == "images":  # cached features need no tower
        with torch.device("meta"):
            tower = TOWERS[tower_family(vision_raw.model_type)]()._from_config(vision_config_of(vision_raw))
        vision_bytes = torch.finfo(getattr(torch, model.vision.dtype)).bits // 8
        vision_weights = sum(p.numel() for p in tower.parameters()) * vision_bytes

    with torch.device("meta"):
        resampler = build_resampler(model, vision_width, llm_config.hidden_size).to(precision)

    def resample(samples: int):
        return resampler(torch.empty(samples, vision_tokens, vision_width, device="meta", dtype=precision))

    return _Shapes(
        llm_weights=llm_weights,
        vision_weights=vision_weights,
        trainable_parameters=sum(p.numel() for p in resampler.parameters()) + layer.adapter_parameters * layers,
        layers=layers,
        layer_bytes_per_token=layer.bytes_per_token,
        layer_input_bytes_per_token=llm_config.hidden_size * dtype_bytes,
        resampler_bytes_per_sample=_per_unit(resample, 1, 2),
        vision_bytes_per_sample=vision_tokens * vision_width * torch.finfo(precision).bits // 8,
        vocab=llm_config.vocab_size,
        hidden=llm_config.hidden_size,
    )


def sample_lengths(config: RunConfig, tokenizer) -> tuple[list[int], list[int], str]:
    """(LLM tokens, supervised tokens) per sample of up to `SAMPLED_RECORDS` records of the first training shard (local
    or remote), tokenized as training does, and a word on where they came from. A shard that breaks off keeps the
    lengths read before the break (the loader skips such a tar the same way); a shard that cannot be read at all, or
    holds nothing usable, leaves the configured maxima, which `LENGTHS_UNKNOWN` marks."""
    from pipeline.data.shards import expand_shards, iter_shard_records
    from pipeline.data.skips import SkipSample

    latents = config.model.resampler.num_latents
    tokens, supervised = [], []
    shard = ""
    if config.stage == 1:
        from pipeline.data.captions import CaptionSampleDecoder

        # Training's own caption encoding (truncation, EOS), with the tokenizer loaded already.
        decoder = CaptionSampleDecoder(config.model.llm.model, config.model.max_caption_tokens, tokenizer=tokenizer)
        encode = functools.partial(_caption_lengths, config, decoder)
    else:
        encode = functools.partial(_conversation_lengths, config, tokenizer)
    try:
        shard = expand_shards(
            config.data.sources[0].shards, "data.sources[0].shards", config.data.allow_missing_shards
        )[0]
        for _, members in iter_shard_records(shard):
            try:
                total, learned = encode(members)
            except (SkipSample, ValueError, KeyError, TypeError, AttributeError):
                continue  # a sample training would skip
            tokens.append(total)
            supervised.append(learned)
            if len(tokens) == SAMPLED_RECORDS:
                break
    except Exception as error:  # planning a run whose data is elsewhere, unreachable here, or damaged
        log.info("memory plan: read %d samples of the first shard (%s), then %s", len(tokens), shard, error)
    if tokens:
        return tokens, supervised, f"lengths of {len(tokens)} samples of {Path(shard).name}"
    if config.stage == 1:
        longest = config.model.max_caption_tokens
        return [1 + latents + longest], [longest], f"{LENGTHS_UNKNOWN}: every caption at its longest"
    longest = config.model.max_sequence_tokens
    return [longest], [(longest - latents) // 2], f"{LENGTHS_UNKNOWN}: every conversation at its longest"


def _caption_lengths(config: RunConfig, decoder, members: dict[str, bytes]) -> tuple[int, int]:
    from pipeline.data.captions import CAPTION_MEMBER

    learned = len(decoder.encode_caption(members[CAPTION_MEMBER]))  # the caption and its EOS
    bos = 0 if decoder.tokenizer.bos_token_id is None else 1
    return bos + config.model.resampler.num_latents + learned, learned


def _conversation_lengths(config: RunConfig, tokenizer, members: dict[str, bytes]) -> tuple[int, int]:
    from pipeline.data.conversations import CONVERSATION_MEMBER, chat_messages, encode_conversation

    record = json.loads(members[CONVERSATION_MEMBER])
    messages = chat_messages(record["conversations"], config.model.system_prompt)
    latents = config.model.resampler.num_latents
    encoded = encode_conversation(tokenizer, messages, latents, config.model.max_sequence_tokens)
    learned = sum(label != IGNORE_INDEX for label in encoded.labels)
    return latents + len(encoded.input_ids), learned


def _micro_batch_total(values: list[int], micro: int) -> int:
    """A micro batch's sum that random micro batches stay below almost always: mean + 3 standard deviations of the
    sum of `micro` samples, at most `micro` times the longest sample."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return int(min(micro * mean + 3 * spread * math.sqrt(micro), micro * max(values)))


class MemoryPlanner:
    """Plans one config for any micro batch: the models are traced once."""

    def __init__(self, config: RunConfig, tokenizer, world_size: int, budget_gib: float | None):
        self.config, self.world_size, self.budget_gib = config, world_size, budget_gib
        self.shapes = _shapes(config)
        self.tokens, self.supervised, self.lengths_from = sample_lengths(config, tokenizer)

    def plan(self, micro: int) -> MemoryPlan:
        s, llm = self.shapes, self.config.model.llm
        # Padded rows (model.packing=false) hold every sample at the longest one's length.
        tokens = _micro_batch_total(self.tokens, micro) if self.config.model.packing else micro * max(self.tokens)
        supervised = _micro_batch_total(self.supervised, micro)
        per_layer = s.layer_bytes_per_token * (COMPILED_LAYER_FRACTION if llm.compile_layers else EAGER_LAYER_FRACTION)
        if llm.activation_checkpointing:
            # Each layer's input stays; in the backward one layer is rebuilt, its activations and their gradients.
            layers = s.layers * s.layer_input_bytes_per_token * tokens + 2 * per_layer * tokens
        else:
            # All layers' activations, and one layer's gradients in the backward.
            layers = s.layers * per_layer * tokens + per_layer * tokens
        # Embeddings in and the final norm out, and their gradients.
        layers += 4 * s.layer_input_bytes_per_token * tokens
        logits = supervised * s.vocab * 4 + min(supervised, LOGIT_CHUNK_TOKENS) * s.vocab * (2 + 4)
        resampler = micro * (s.resampler_bytes_per_sample + s.vision_bytes_per_sample)
        # bf16 weights, gradients and DeepSpeed's gradient buckets; fp32 master weights, gradients, Adam's two moments,
        # split over the ranks by ZeRO-2.
        trainable = s.trainable_parameters * (2 + 2 + 2 + 16 / self.world_size)
        activations = layers + logits + resampler
        parts = {
            "LLM weights": s.llm_weights / GIB,
            "vision weights": s.vision_weights / GIB,
            "trainable state": trainable / GIB,
            "LLM activations": layers / GIB,
            "loss": logits / GIB,
            "resampler activations": resampler / GIB,
            "allowance": ALLOWANCE_GIB + FRAGMENTATION * activations / GIB,
        }
        return MemoryPlan(
            micro_batch_size=micro,
            tokens_per_micro_batch=tokens,
            supervised_per_micro_batch=supervised,
            parts_gib=parts,
            peak_gib=sum(parts.values()),
            budget_gib=self.budget_gib,
            lengths_from=self.lengths_from,
        )

    def largest_fitting_micro_batch(self) -> int | None:
        """The largest micro batch at most the configured one that divides the global batch over the ranks and fits."""
        train = self.config.train
        for micro in range(train.micro_batch_size, 0, -1):
            if train.global_batch_size % (micro * self.world_size) == 0 and self.plan(micro).fits:
                return micro
        return None


def gpu_budget_gib(config: RunConfig, local_rank: int) -> float | None:
    """GiB this rank may use: train.gpu_memory_gib, at most the card's memory (where there is a card)."""
    wanted = config.train.gpu_memory_gib
    if config.train.distributed_backend != "nccl" or not torch.cuda.is_available():
        return wanted
    total = torch.cuda.get_device_properties(local_rank).total_memory / GIB
    return total if wanted is None else min(wanted, total)


def cap_process_memory(config: RunConfig, device: torch.device) -> None:
    """Hold this process to train.gpu_memory_gib on its card, where that is less than the card's memory."""
    wanted = config.train.gpu_memory_gib
    if wanted is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if wanted < total:
        torch.cuda.set_per_process_memory_fraction(wanted / total, device)
        log.info("GPU memory capped at %.1f of the card's %.1f GiB (train.gpu_memory_gib)", wanted, total)


def check_memory(config: RunConfig, tokenizer, world_size: int, local_rank: int) -> MemoryPlan:
    """The run's plan; `ConfigError` (one line naming the micro batch that fits) when it would not fit,
    train.memory_check is on and the plan rests on the data's own lengths. A plan made without them only warns: it
    assumes every sample at its longest and would refuse runs that fit."""
    planner = MemoryPlanner(config, tokenizer, world_size, gpu_budget_gib(config, local_rank))
    plan = planner.plan(config.train.micro_batch_size)
    if config.model.llm.attn_implementation not in FLASH_LIKE_ATTENTION:
        log.warning(
            "memory plan: model.llm.attn_implementation=%s keeps attention scores the plan does not count; it is low",
            config.model.llm.attn_implementation,
        )
    if plan.fits or not config.train.memory_check:
        return plan
    if plan.lengths_from.startswith(LENGTHS_UNKNOWN):
        log.warning(
            "memory plan: %s; it may not fit, but the data's lengths are unknown, so the run goes on", plan.describe()
        )
        return plan
    micro = planner.largest_fitting_micro_batch()
    global_batch = config.train.global_batch_size
    if micro is not None:
        advice = (
            f"use train.micro_batch_size={micro} (accumulation {global_batch // (micro * world_size)}, same global "
            "batch)"
        )
    else:
        advice = "no micro batch fits"
    llm = config.model.llm
    options = [
        option
        for option, missing in (
            ("model.llm.quantization=nf4", llm.quantization == "none"),
            ("model.llm.activation_checkpointing=true", not llm.activation_checkpointing),
        )
        if missing
    ]
    if options:
        advice += f"; {' and '.join(options)} would leave room for more"
    raise ConfigError(
        f"train.micro_batch_size={config.train.micro_batch_size} needs ~{plan.peak_gib:.1f} GiB per GPU, more than "
        f"{HEADROOM:.0%} of the {plan.budget_gib:.1f} GiB available; {advice} (train.memory_check=false runs anyway; "
        "plan: python -m pipeline.memory_plan)"
    )
