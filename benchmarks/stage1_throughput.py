"""Stage-1 step throughput on one GPU: the pipeline's DeepSpeed step against a naive padded HF step, same run.

Both use the real architectures with random weights built from config (no download): LLaMA-3-8B (released config
values) frozen in bf16, and the default Perceiver Resampler (width 1024, 64 latents) on cached CLIP ViT-L/14
features [B, 257, 1024], i.e. the vision tower is not run (the cached-feature setting).

    python benchmarks/stage1_throughput.py --micro-batch 32 --steps 10 [--variants ...] [--out result.json]

Caption lengths come from a fixed LAION-like distribution: log-normal with mean ~18 tokens, clipped to [4, 64]
(EOS included), seeded, so every variant sees the same captions.

Variants:
  baseline      captions padded to 64 tokens, full logits, HF `LlamaForCausalLM(labels=...)` loss, SDPA,
                plain torch AdamW on the resampler. This is the "plain HF step".
  pipeline      the trainer's own step (`Trainer.train_step`) through DeepSpeed ZeRO-2: packed rows, loss at
                supervised positions only, global token-mean normalisation.
  pipeline+flex      the same with flex attention (block-sparse over the packed row) instead of SDPA.
  pipeline+compile   the same as pipeline, with each LLM decoder layer compiled (torch.compile, dynamic shapes);
                     compiled layers stay compiled for the variants that follow in the same run.
  pipeline+flex+compile   both.

MFU counts useful FLOPs only (no padding, no recompute, attention's quadratic term left out):
  4 * N_llm * (1 + 64 + caption tokens) per sample  (frozen LLM: forward 2N, backward to activations 2N)
  + 6 * N_resampler * 64 per sample, against 989 TFLOP/s dense bf16 per H100/H200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import RunConfig  # noqa: E402
from pipeline.model.anymal import AnyMAL, build_resampler, caption_sequence  # noqa: E402
from pipeline.model.reference import CLIP_VIT_L14, llama3_8b_config  # noqa: E402
from pipeline.training.metrics import peak_tflops, step_flops  # noqa: E402

MEAN_CAPTION_TOKENS = 18.0
CAPTION_SIGMA = 0.5
PATCH_TOKENS = 257


def caption_lengths(count: int, seed: int) -> torch.Tensor:
    """LAION-like caption lengths (EOS included): log-normal with mean ~18, clipped to [4, 64]."""
    generator = torch.Generator().manual_seed(seed)
    mu = math.log(MEAN_CAPTION_TOKENS) - CAPTION_SIGMA**2 / 2
    lengths = torch.exp(mu + CAPTION_SIGMA * torch.randn(count, generator=generator)).round()
    return lengths.clamp(4, 64).long()


def make_batches(steps: int, micro: int, vocab: int, eos: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        lengths = caption_lengths(micro, seed * 1000 + step)
        ids = torch.randint(0, vocab - 1000, (int(lengths.sum()),), generator=generator)
        ends = torch.cumsum(lengths, 0) - 1
        ids[ends] = eos
        batches.append({
            "keys": [f"{step}_{i}" for i in range(micro)],
            "image_features": torch.randn(micro, PATCH_TOKENS, CLIP_VIT_L14["hidden_size"], generator=generator,
                                          dtype=torch.float32).to(torch.bfloat16),
            "caption_ids": ids,
            "caption_lengths": lengths,
        })
    return batches


def build_llm(attn: str):
    from transformers import LlamaForCausalLM

    config = llama3_8b_config()
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device("cuda"):
        llm = LlamaForCausalLM(config).to(torch.bfloat16)
    llm.requires_grad_(False)
    llm.eval()
    return llm


def useful_flops(n_llm: int, n_res: int, batches: list[dict], latents: int) -> float:
    total = 0.0
    for batch in batches:
        samples = batch["caption_lengths"].numel()
        tokens = int(batch["caption_lengths"].sum()) + samples * (1 + latents)
        total += step_flops(n_llm, n_res, 0, tokens, samples, latents, 0)
    return total


def time_steps(step_fn, batches: list[dict], warmup: int) -> float:
    for batch in batches[:warmup]:
        step_fn(batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step_fn(batch)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_baseline(llm, resampler, batches, warmup, bos, pad):
    optimizer = torch.optim.AdamW(resampler.parameters(), lr=2e-4)
    embed = llm.get_input_embeddings()

    def step(batch):
        batch = {k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        prefix = resampler(batch["image_features"])
        # Pad every caption to 64 tokens, as a plain HF collator with max_length padding does.
        lengths = batch["caption_lengths"]
        padded_ids = torch.full((lengths.numel(), 64), pad, dtype=torch.long, device="cuda")
        present = torch.arange(64, device="cuda")[None] < lengths[:, None]
        padded_ids[present] = batch["caption_ids"]
        seq = caption_sequence(padded_ids[present], lengths, prefix.shape[1], bos, pad)
        width = 1 + prefix.shape[1] + 64
        input_ids = torch.full((lengths.numel(), width), pad, dtype=torch.long, device="cuda")
        input_ids[:, : seq.input_ids.shape[1]] = seq.input_ids
        labels = torch.full_like(input_ids, -100)
        labels[:, : seq.labels.shape[1]] = seq.labels
        mask = torch.zeros_like(input_ids)
        mask[:, : seq.attention_mask.shape[1]] = seq.attention_mask
        embeds = embed(input_ids)
        embeds = torch.cat([embeds[:, :1], prefix.to(embeds.dtype), embeds[:, 1 + prefix.shape[1]:]], dim=1)
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, batches, warmup)


def run_pipeline(llm, resampler, batches, warmup, bos, eos, pad, micro, compile_layers: bool, attn: str):
    import torch.distributed as dist

    from pipeline.training.distributed import DistEnv, init_distributed
    from pipeline.training.stages import CaptionStage
    from pipeline.training.trainer import Trainer

    llm.config._attn_implementation = attn
    if compile_layers and not getattr(llm, "_layers_compiled", False):
        # In place and once: later variants in the same run keep the compiled layers.
        for layer in llm.model.layers:
            layer.compile(dynamic=True)
        llm._layers_compiled = True
    config = RunConfig()
    config.train.global_batch_size = micro
    config.train.micro_batch_size = micro
    config.train.precision = "bfloat16"
    config.data.sources = []
    if not dist.is_initialized():
        init_distributed("nccl")
    model = AnyMAL(None, resampler, llm, bos, eos, pad, packing=True)
    trainer = Trainer(config, CaptionStage(model, config), lambda state: None, DistEnv(0, 1, 0), torch.device("cuda"))

    def step(batch):
        trainer.train_step([batch])

    return time_steps(step, batches, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[32])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["baseline", "pipeline"])
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.backends.cuda.matmul.allow_tf32 = True

    llm = build_llm(args.attn)
    bos, eos, pad = 128000, 128009, 128004
    latents = 64
    cfg = RunConfig()
    n_llm = sum(p.numel() for p in llm.parameters())
    peak = peak_tflops() or 989.0
    results = {"device": torch.cuda.get_device_name(), "timed_steps": args.steps, "variants": {}}
    # Variant-major: layers compiled by a "compile" variant stay compiled, so those variants come last.
    for variant, micro in [(v, m) for v in args.variants for m in args.micro_batch]:
        batches = make_batches(args.steps + args.warmup, micro, llm.config.vocab_size, eos)
        timed = batches[args.warmup:]
        flops = useful_flops(n_llm, 0, timed, latents)
        results["mean_caption_tokens"] = float(torch.cat([b["caption_lengths"] for b in timed]).float().mean())
        torch.manual_seed(0)
        resampler = build_resampler(cfg.model, CLIP_VIT_L14["hidden_size"], llm.config.hidden_size).cuda()
        n_res = sum(p.numel() for p in resampler.parameters())
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            if variant == "baseline":
                llm.config._attn_implementation = args.attn
                seconds = run_baseline(llm, resampler.to(torch.bfloat16), batches, args.warmup, bos, pad)
            else:
                seconds = run_pipeline(llm, resampler, batches, args.warmup, bos, eos, pad, micro,
                                       compile_layers="compile" in variant,
                                       attn="flex_attention" if "flex" in variant else args.attn)
        except torch.OutOfMemoryError:
            results["variants"][f"{variant}@{micro}"] = {"error": "out of memory"}
            print(variant, micro, "out of memory", flush=True)
            continue
        samples = args.steps * micro
        tokens = sum(int(b["caption_lengths"].sum()) + b["caption_lengths"].numel() * (1 + latents) for b in timed)
        variant_flops = flops + useful_flops(0, n_res, timed, latents)
        results["variants"][f"{variant}@{micro}"] = {
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "step_s": seconds / args.steps,
            "mfu": variant_flops / seconds / (peak * 1e12),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        }
        print(variant, micro, json.dumps(results["variants"][f"{variant}@{micro}"]), flush=True)
    baselines = [
        row["samples_per_s"]
        for key, row in results["variants"].items()
        if key.startswith("baseline@") and "error" not in row
    ]
    if baselines:
        for row in results["variants"].values():
            if "error" not in row:
                row["speedup_vs_best_baseline"] = row["samples_per_s"] / max(baselines)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
