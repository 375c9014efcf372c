"""Stage-1 step throughput on one GPU: the pipeline's DeepSpeed step against a naive padded HF step, same run.

Both use the real architectures with random weights built from config (no download): LLaMA-3-8B (released config
values) frozen in bf16, and the default Perceiver Resampler (width 1024, 64 latents) on cached CLIP ViT-L/14
features [B, 257, 1024], i.e. the vision tower is not run (the cached-feature setting). `--backbones` picks another
pair: SigLIP2-so400m-384 + Qwen3-8B, or CLIP ViT-L/14 + LLaMA-3-70B.

    python benchmarks/stage1_throughput.py --runs baseline@64 pipeline+varlen+compile@128 [--profile] [--out r.json]
    python benchmarks/stage1_throughput.py --backbones clip-llama3-70b --quantization nf4 \
        --runs pipeline+varlen+compile@32x2 pipeline+varlen+compile@48x2 --steps 6 --warmup 2

`--quantization nf4` keeps the decoder's Linear weights in bitsandbytes NF4 (double quantization, bf16 compute, as
transformers' `BitsAndBytesConfig` loads them; embeddings and LM head stay bf16). That LLM is built on the meta device
and materialised on the GPU one decoder layer at a time, each layer initialised like HF's init (normal(0, 0.02) for
Linear weights and embeddings, ones for norms) and quantized before the next exists, so only one layer is ever in
bf16 and nothing passes through host memory: a 70B LLM (141 GB in bf16) builds on one H200 in ~37 GiB.

Each run is VARIANT@MICRO[xN]. Caption lengths come from a fixed LAION-like distribution: log-normal with mean ~18
tokens, clipped to [4, 64] (EOS included), seeded, so every run sees the same captions. Batches sit in page-locked
memory, as the training loader delivers them on a GPU. VARIANT@MICROxN runs N micro batches per optimizer step
(default 1: an optimizer step after every micro batch, the most it can cost; the 8B recipe has 2 on one 8-GPU node).

Variants:
  baseline      captions padded to 64 tokens, full logits, HF `LlamaForCausalLM(labels=...)` loss, SDPA,
                plain torch AdamW on the resampler. This is the "plain HF step".
  pipeline      the trainer's own step (`Trainer.train_step`, then its stop-signal exchange, as `fit` runs them)
                through DeepSpeed ZeRO-2: packed rows laid out on the host, loss at supervised positions only, global
                token-mean normalisation; SDPA over the packed row's mask.
  +flex         flex attention (block-sparse over the packed row) instead of SDPA.
  +varlen       PyTorch's variable-length flash attention over the samples' boundaries (pipeline/model/attention.py),
                through HF's decoder layers.
  +overlap      ZeRO-2's overlap_comm on (stage 1's ds_configs/zero2_stage1.json has it off: it synchronizes the
                device after every micro batch's backward, and the resampler's gradients come last, with nothing
                left to overlap). Stage 2's zero2.json keeps it on: its adapters' gradients come all through the
                backward (benchmarks/stage2_throughput.py).
  +dstimers     DeepSpeed's throughput timer on, its default (both JSONs have it off: it synchronizes the device at
                every micro batch's forward and optimizer step, to time them).
  +nooverflow   bf16's gradient overflow check off ("check_grad_overflow": false): DeepSpeed then no longer reads
                a flag on the host before each optimizer step, but applies a step whose gradients hold inf or NaN.
  +nogc         Python's automatic garbage collection off while the DeepSpeed engine lives ("disable_python_gc").
  +devicelayout the caption ids and lengths are moved to the GPU with the features, so the token layout is built
                there, with host syncs (how the step ran before the layout moved to the host).
  +compile      each LLM decoder layer compiled (torch.compile, dynamic shapes), as model.llm.compile_layers does;
                compiled layers stay compiled for the runs that follow, so list compiled runs last.
  +ckpt         activation checkpointing of the frozen decoder layers (`pipeline.model.llm.checkpoint_layers`, as
                model.llm.activation_checkpointing does); with +compile the checkpoint wraps each compiled layer, as
                training does. The wrapping is not undone, so whenever a run's +ckpt, or with +ckpt its +compile,
                differs from the run before it, the LLM is built afresh (same seed, same weights, uncompiled): list
                the +ckpt runs together, first or last.
Every run reports its first step's loss: all runs start from the same resampler on the same batch, so the losses
must agree (bf16) whatever the attention kernel.

MFU counts useful FLOPs only (pipeline/training/metrics.py; no padding, no recompute, attention's quadratic term
left out, NF4 weights counted by their unpacked shapes), against 989 TFLOP/s dense bf16 per H100/H200:
  4 * N_body * (1 + 64 + caption tokens) per sample   N_body = LLM parameters less the embedding and the LM head
  + 4 * N_head * caption tokens                        the LM head, at supervised positions only
  + 6 * N_resampler * 64 per sample.
`--profile` adds GPU kernel time per step by category (GEMM, attention, other) and the top kernels of each run;
`--trace DIR` writes a host+device trace of 2 more steps per run and reports where the GPU sat idle and which host
code it waited for (benchmarks/trace_gaps.py). On a GPU the script first checks the varlen kernel against SDPA
under the equivalent mask, for equal and for end-aligned unequal query and key spans.
Each run's row also records the LLM's parameter count, its quantization and whether checkpointing was on; the
results record the commit and the command.
`--smoke` runs everything on the CPU with a 2-layer LLM of width 256 (no compile; with `--quantization nf4` through
the same layer-by-layer builder, bitsandbytes' CPU kernels), to check the script before spending GPU time; its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from common import (
    attention_of,
    check_varlen_kernel,
    compile_decoder_layers,
    deepspeed_config_of,
    extra_batches,
    free_memory,
    measure,
    parse_runs,
    pinned,
    print_table,
    quantize_nf4,
    record,
    record_failure,
    save,
    trace_path,
)

from pipeline.config import RunConfig
from pipeline.model.anymal import AnyMAL, build_resampler
from pipeline.model.attention import register_varlen
from pipeline.model.layout import caption_sequence
from pipeline.model.llm import checkpoint_layers
from pipeline.model.reference import (
    CLIP_VIT_L14,
    SIGLIP2_SO400M_384,
    llama3_8b_config,
    llama3_70b_config,
    qwen3_8b_config,
)
from pipeline.training.metrics import llm_flop_parameters, peak_tflops, step_flops
from pipeline.training.stages import parameter_count

MEAN_CAPTION_TOKENS = 18.0
CAPTION_SIGMA = 0.5
# The pairs `--backbones` picks: the tower's cached-feature shape [tokens, width], the LLM's published config and its
# (bos, eos, pad) ids; Qwen has no BOS, so its rows start with the image.
BACKBONES = {
    "clip-llama3": ((257, CLIP_VIT_L14["hidden_size"]), llama3_8b_config, "LlamaForCausalLM", (128000, 128009, 128004)),
    "clip-llama3-70b": (
        (257, CLIP_VIT_L14["hidden_size"]),
        llama3_70b_config,
        "LlamaForCausalLM",
        (128000, 128009, 128004),
    ),
    "siglip2-qwen3": (
        ((384 // 14) ** 2, SIGLIP2_SO400M_384["hidden_size"]),
        qwen3_8b_config,
        "Qwen3ForCausalLM",
        (None, 151645, 151643),
    ),
}
DEVICE = torch.device("cuda")
STAGE1_DEEPSPEED_CONFIG = "ds_configs/zero2_stage1.json"  # as configs/stage1_8b.yaml


def caption_lengths(count: int, seed: int) -> torch.Tensor:
    """LAION-like caption lengths (EOS included): log-normal with mean ~18, clipped to [4, 64]."""
    generator = torch.Generator().manual_seed(seed)
    mu = math.log(MEAN_CAPTION_TOKENS) - CAPTION_SIGMA**2 / 2
    lengths = torch.exp(mu + CAPTION_SIGMA * torch.randn(count, generator=generator)).round()
    return lengths.clamp(4, 64).long()


def make_batches(steps: int, micro: int, vocab: int, eos: int, features: tuple[int, int], seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        lengths = caption_lengths(micro, seed * 1000 + step)
        ids = torch.randint(0, vocab - 1000, (int(lengths.sum()),), generator=generator)
        ends = torch.cumsum(lengths, 0) - 1
        ids[ends] = eos
        batches.append(
            {
                "keys": [f"{step}_{i}" for i in range(micro)],
                "image_features": torch.randn(micro, *features, generator=generator, dtype=torch.float32).to(
                    torch.bfloat16
                ),
                "caption_ids": ids,
                "caption_lengths": lengths,
            }
        )
    return batches


def build_llm(attn: str, smoke: bool, backbones: str, quantization: str):
    import transformers

    _, make_config, class_name, _ = BACKBONES[backbones]
    shrink = (
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if smoke
        else {}
    )
    if smoke and backbones == "siglip2-qwen3":
        shrink["head_dim"] = 64
    config = make_config(**shrink)
    config._attn_implementation = attn
    model_class = getattr(transformers, class_name)
    torch.manual_seed(0)
    if quantization == "nf4":
        llm = build_nf4_llm(model_class, config)
    else:
        with DEVICE:
            llm = model_class(config).to(torch.bfloat16)
    llm.requires_grad_(False)
    llm.eval()
    return llm


@torch.no_grad()
def build_nf4_llm(model_class, config):
    """The LLM with its decoder's Linear weights in NF4, built on the meta device and materialised on DEVICE one
    decoder layer at a time: each layer is initialised and quantized before the next is allocated."""
    with torch.device("meta"):
        llm = model_class(config).to(torch.bfloat16)
    llm.requires_grad_(False)
    decoder = llm.get_decoder()
    for layer in decoder.layers:
        initialise_like_hf(layer.to_empty(device=DEVICE), config.initializer_range)
        quantize_nf4(layer)
    for module in (llm.get_input_embeddings(), decoder.norm, llm.get_output_embeddings()):
        initialise_like_hf(module.to_empty(device=DEVICE), config.initializer_range)
    # The rotary frequencies are computed from the config, in fp32 as from_pretrained keeps them.
    with DEVICE:
        decoder.rotary_emb = type(decoder.rotary_emb)(config)
    unbuilt = [name for name, tensor in [*llm.named_parameters(), *llm.named_buffers()] if tensor.is_meta]
    if unbuilt:
        raise RuntimeError(f"build_nf4_llm left {', '.join(unbuilt[:3])} on the meta device; materialise them too")
    return llm


def initialise_like_hf(module: torch.nn.Module, std: float) -> None:
    """HF's `_init_weights` for a decoder: Linear weights and embeddings normal(0, std), biases zero, every other
    weight (the RMSNorm gains) ones."""
    for child in module.modules():
        if isinstance(child, (torch.nn.Linear, torch.nn.Embedding)):
            child.weight.normal_(0.0, std)
            if getattr(child, "padding_idx", None) is not None:
                child.weight[child.padding_idx].zero_()
        elif isinstance(getattr(child, "weight", None), torch.nn.Parameter):
            child.weight.fill_(1.0)
        if isinstance(getattr(child, "bias", None), torch.nn.Parameter):
            child.bias.zero_()


def weight_bytes(llm) -> int:
    """Bytes of the LLM's parameters as stored (4-bit weights packed) plus their quantization statistics."""
    total = 0
    for param in llm.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        while state is not None:
            total += sum(
                t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset) if t is not None
            )
            state = state.state2
    return total


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def useful_flops(n_body: int, n_head: int, n_res: int, batches: list[dict], latents: int, first: int) -> float:
    """`first`: the tokens before the image (1 with a BOS, 0 without)."""
    total = 0.0
    for batch in batches:
        samples = batch["caption_lengths"].numel()
        supervised = int(batch["caption_lengths"].sum())
        total += step_flops(
            n_body, n_head, n_res, 0, supervised + samples * (first + latents), supervised, samples, latents, 0
        )
    return total


def baseline_step(llm, resampler, bos, pad):
    optimizer = torch.optim.AdamW(resampler.parameters(), lr=2e-4)
    embed = llm.get_input_embeddings()

    def step(micro_batches):
        total = 0.0
        for batch in micro_batches:
            loss = micro_step(batch) / len(micro_batches)
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def micro_step(batch):
        batch = {k: v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        prefix = resampler(batch["image_features"])
        # Pad every caption to 64 tokens, as a plain HF collator with max_length padding does.
        lengths = batch["caption_lengths"]
        padded_ids = torch.full((lengths.numel(), 64), pad, dtype=torch.long, device=DEVICE)
        present = torch.arange(64, device=DEVICE)[None] < lengths[:, None]
        padded_ids[present] = batch["caption_ids"]
        seq = caption_sequence(padded_ids[present], lengths, prefix.shape[1], bos, pad)
        width = (bos is not None) + prefix.shape[1] + 64
        input_ids = torch.full((lengths.numel(), width), pad, dtype=torch.long, device=DEVICE)
        input_ids[:, : seq.input_ids.shape[1]] = seq.input_ids
        labels = torch.full_like(input_ids, -100)
        labels[:, : seq.labels.shape[1]] = seq.labels
        mask = torch.zeros_like(input_ids)
        mask[:, : seq.attention_mask.shape[1]] = seq.attention_mask
        embeds = embed(input_ids).index_put(
            (seq.prefix_rows, seq.prefix_positions), prefix.reshape(-1, prefix.shape[-1]).to(torch.bfloat16)
        )
        return llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss

    return step


def pipeline_step(llm, resampler, bos, eos, pad, micro, accumulation: int, variant: str):
    import torch.distributed as dist

    from pipeline.training.distributed import DistEnv, init_distributed
    from pipeline.training.stages import stage_for
    from pipeline.training.trainer import Trainer

    config = RunConfig()
    config.train.global_batch_size = micro * accumulation
    config.train.micro_batch_size = micro
    config.train.precision = "bfloat16"
    config.data.sources = []
    config.train.deepspeed_config = deepspeed_config_of(variant, STAGE1_DEEPSPEED_CONFIG)
    if not dist.is_initialized():
        init_distributed("nccl" if DEVICE.type == "cuda" else "gloo")
    model = AnyMAL(None, resampler, llm, bos, eos, pad, packing=True, max_caption_tokens=64)
    trainer = Trainer(config, stage_for(model, config), lambda state: None, DistEnv(0, 1, 0), DEVICE)
    text_on_device = "+devicelayout" in variant

    def step(micro_batches):
        if text_on_device:
            micro_batches = [
                {k: v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                for b in micro_batches
            ]
        totals = trainer.train_step(micro_batches)
        trainer.agreed_stop_signal()
        return totals[0] / totals[1]

    step.close = trainer.engine.destroy  # its hooks keep the resampler and its optimizer state alive otherwise
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["baseline@64", "pipeline+varlen+compile@128"],
        help="VARIANT@MICRO[xACCUMULATION], e.g. baseline@64 pipeline+varlen+compile@128x2",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", help="attention of the baseline and of plain `pipeline`")
    parser.add_argument("--profile", action="store_true", help="kernel time by category, 2 extra steps per run")
    parser.add_argument("--trace", default="", help="directory for host+device traces (2 extra steps per run)")
    parser.add_argument("--out", default="")
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA on the CPU: checks the script, no numbers")
    parser.add_argument("--backbones", choices=sorted(BACKBONES), default="clip-llama3", help="tower + LLM pair")
    parser.add_argument(
        "--quantization",
        choices=("none", "nf4"),
        default="none",
        help="the LLM's decoder Linear weights: bf16, or NF4 built layer by layer on the device",
    )
    args = parser.parse_args()
    runs = parse_runs(args.runs)
    if args.quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--quantization nf4 needs bitsandbytes: pip install 'bitsandbytes>=0.50'")
    if args.backbones == "clip-llama3-70b" and args.quantization == "none" and not args.smoke:
        parser.error("clip-llama3-70b in bf16 needs 141 GB for its weights alone; add --quantization nf4")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.backends.cuda.matmul.allow_tf32 = True
    register_varlen()
    global DEVICE
    if args.smoke:
        DEVICE, args.steps, args.warmup = torch.device("cpu"), 2, 1
        runs = [(variant.replace("+compile", ""), 4, acc) for variant, _, acc in runs]

    features, _, _, (bos, eos, pad) = BACKBONES[args.backbones]
    latents = RunConfig().model.resampler.num_latents
    peak = peak_tflops() or 989.0
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (smoke test)"
    results = {
        "commit": git_commit(),
        "command": shlex.join(["python", *sys.argv]),
        "device": device_name,
        "backbones": args.backbones,
        "quantization": args.quantization,
        "timed_steps": args.steps,
        "torch": torch.__version__,
        "variants": {},
    }
    if DEVICE.type == "cuda":
        results["varlen_kernel_check"] = check_varlen_kernel(DEVICE)
        print("varlen kernel check", json.dumps(results["varlen_kernel_check"]), flush=True)
    llm, llm_checkpointing = None, None
    for variant, micro, acc in runs:
        name = f"{variant}@{micro}" + (f"x{acc}" if acc > 1 else "")
        checkpointed = "+ckpt" in variant
        # (checkpointed, compiled inside the checkpoint): the wrapping cannot be undone or compiled later.
        checkpointing = (checkpointed, checkpointed and "compile" in variant)
        if checkpointing != llm_checkpointing:
            if llm is not None:
                torch._dynamo.reset()  # so that no compiled graph keeps the old layers alive
            llm = step = None
            free_memory(DEVICE)
            llm = build_llm(args.attn, args.smoke, args.backbones, args.quantization)
            if checkpointed:
                checkpoint_layers(llm, compile_layers=checkpointing[1])
            llm_checkpointing = checkpointing
            n_body, n_head = llm_flop_parameters(llm, parameter_count)
            llm_facts = {
                "llm_parameters": parameter_count(llm),
                "llm_weights_gib": weight_bytes(llm) / 2**30,
                "quantization": args.quantization,
                "activation_checkpointing": checkpointed,
            }
            print("LLM", json.dumps(llm_facts), flush=True)
        steps = args.steps + args.warmup + extra_batches(args.profile, bool(args.trace))
        batches = make_batches(steps * acc, micro, llm.config.vocab_size, eos, features)
        if DEVICE.type == "cuda":
            batches = [pinned(batch) for batch in batches]
        timed = batches[args.warmup * acc : (args.warmup + args.steps) * acc]
        step_inputs = [batches[i * acc : (i + 1) * acc] for i in range(steps)]
        results["mean_caption_tokens"] = float(torch.cat([b["caption_lengths"] for b in timed]).float().mean())
        torch.manual_seed(0)
        resampler = build_resampler(RunConfig().model, features[1], llm.config.hidden_size).to(DEVICE)
        n_res = parameter_count(resampler)
        free_memory(DEVICE)
        llm.config._attn_implementation = attention_of(variant, args.attn)
        step = None
        try:
            if "compile" in variant and not checkpointed:
                compile_decoder_layers(llm)
            if variant == "baseline":
                step = baseline_step(llm, resampler.to(torch.bfloat16), bos, pad)
            else:
                step = pipeline_step(llm, resampler, bos, eos, pad, micro, acc, variant)
            run = measure(
                step,
                step_inputs,
                args.warmup,
                args.steps,
                DEVICE,
                profile=args.profile,
                trace=trace_path(args.trace, name),
            )
        except Exception as exc:  # noqa: BLE001 - record the failure and go on to the next run
            record_failure(results, name, exc)
            continue
        finally:
            getattr(step, "close", lambda: None)()
        seconds, samples = run["seconds"], args.steps * micro * acc
        first = 1 if bos is not None else 0
        tokens = sum(int(b["caption_lengths"].sum()) + b["caption_lengths"].numel() * (first + latents) for b in timed)
        row = {
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "step_s": seconds / args.steps,
            "mfu": useful_flops(n_body, n_head, n_res, timed, latents, first) / seconds / (peak * 1e12),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None,
            "first_step_loss": run["losses"][0],
            "attention": llm.config._attn_implementation,
            **llm_facts,
            **{key: run[key] for key in ("profile", "idle", "host") if key in run},
        }
        record(results, name, row, args.out)
    baselines = [
        row["samples_per_s"]
        for key, row in results["variants"].items()
        if key.startswith("baseline@") and "error" not in row
    ]
    if baselines:
        for row in results["variants"].values():
            if "error" not in row:
                row["speedup_vs_best_baseline"] = row["samples_per_s"] / max(baselines)
    save(results, args.out)
    print_table(results, ["samples_per_s", "speedup_vs_best_baseline", "mfu", "peak_mem_gb", "first_step_loss"])


if __name__ == "__main__":
    main()
