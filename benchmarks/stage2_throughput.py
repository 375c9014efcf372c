"""Stage-2 step throughput on one GPU, LoRA and QLoRA: the pipeline's DeepSpeed step against a plain padded HF step.

All variants use the real architectures with random weights built from config (no download): LLaMA-3-8B (released
config values) with peft LoRA adapters (rank 64, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down), and the default
Perceiver Resampler (width 1024, 64 latents) on cached CLIP ViT-L/14 features [B, 257, 1024] (the vision tower is
not run). LoRA keeps the frozen base weights in bf16; QLoRA quantizes them to NF4 with double quantization and bf16
compute (bitsandbytes `Linear4bit`, as `BitsAndBytesConfig` loads them).

    python benchmarks/stage2_throughput.py --micro-batch 16 --steps 8 [--variants ...] [--out result.json]

Conversation lengths come from a LLaVA-Instruct-150K-like distribution (LLaMA-3 tokens, chat template included):
log-normal text lengths with mean ~300, clipped to [48, 2048 - 64]; 1 to 4 user/assistant turn pairs, the user turns
taking ~30% of the text and the assistant turns (supervised) the rest; the image goes after the first user header.
Seeded, so every variant sees the same conversations.

Variants:
  baseline          every sample of the micro batch padded to the longest, full [B, T, 128K] logits and the loss of
                    HF `LlamaForCausalLM(labels=...)` through the peft model, SDPA, bf16 autocast, torch AdamW on the
                    adapters and the resampler. This is the "plain HF step".
  pipeline          the trainer's own step (`Trainer.train_step` with `InstructStage`) through DeepSpeed ZeRO-2 bf16:
                    the micro batch packed into one row (positions restart per sample), logits at supervised
                    positions only, global token-mean normalisation.
  qlora-baseline, qlora-pipeline: the same two over NF4 base weights.
Reported per variant: tokens/s per GPU (text tokens + 64 image tokens per sample, no padding counted), samples/s,
step time and peak GPU memory.

`--smoke` runs every variant on the CPU with a 2-layer LLaMA of width 256 and 4 steps, to check the script before
spending GPU time; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import RunConfig  # noqa: E402
from pipeline.model.anymal import IGNORE_INDEX, AnyMAL, build_resampler, pad_samples  # noqa: E402
from pipeline.model.lora import add_lora  # noqa: E402
from pipeline.model.reference import CLIP_VIT_L14, llama3_8b_config  # noqa: E402

MEAN_TEXT_TOKENS = 300.0
TEXT_SIGMA = 0.6
MAX_SEQUENCE_TOKENS = 2048
IMAGE_TOKENS = 64
PATCH_TOKENS = 257
IMAGE_OFFSET = 5  # BOS, <|start_header_id|>, user, <|end_header_id|>, "\n\n"
BOS, EOT, PAD = 128000, 128009, 128004
DEVICE = torch.device("cuda")


def conversation(length: int, generator: torch.Generator, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of one synthetic conversation of `length` text tokens."""
    ids = torch.randint(0, vocab - 1000, (length,), generator=generator)
    ids[0] = BOS
    labels = torch.full_like(ids, IGNORE_INDEX)
    pairs = int(torch.randint(1, 5, (1,), generator=generator))
    bounds = torch.linspace(IMAGE_OFFSET, length, pairs + 1).long().tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        answer_start = start + max(1, int(0.3 * (end - start)))  # the user turn, then the assistant turn
        labels[answer_start:end] = ids[answer_start:end]
        ids[end - 1] = EOT
        labels[end - 1] = EOT
    return ids, labels


def text_lengths(count: int, seed: int) -> torch.Tensor:
    """LLaVA-Instruct-like text lengths: log-normal with mean ~300, clipped to [48, 2048 - 64]."""
    generator = torch.Generator().manual_seed(seed)
    mu = math.log(MEAN_TEXT_TOKENS) - TEXT_SIGMA**2 / 2
    lengths = torch.exp(mu + TEXT_SIGMA * torch.randn(count, generator=generator)).round()
    return lengths.clamp(48, MAX_SEQUENCE_TOKENS - IMAGE_TOKENS).long()


def make_batches(steps: int, micro: int, vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        lengths = text_lengths(micro, seed * 1000 + step)
        texts = [conversation(int(n), generator, vocab) for n in lengths]
        batches.append({
            "keys": [f"{step}_{i}" for i in range(micro)],
            "image_features": torch.randn(micro, PATCH_TOKENS, CLIP_VIT_L14["hidden_size"], generator=generator,
                                          dtype=torch.float32).to(torch.bfloat16),
            "text_ids": torch.cat([ids for ids, _ in texts]),
            "text_labels": torch.cat([labels for _, labels in texts]),
            "text_lengths": lengths,
            "image_offsets": torch.full((micro,), IMAGE_OFFSET),
        })
    return batches


def quantize_nf4(llm) -> None:
    """Replace the decoder's Linear layers by bitsandbytes NF4 ones (double quantization, bf16 compute), in place."""
    import bitsandbytes as bnb

    for layer in llm.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4")
                setattr(parent, name, quantized.to(DEVICE))


def build_model(quantized: bool, attn: str, smoke: bool) -> AnyMAL:
    from transformers import LlamaForCausalLM

    from pipeline.config import LoRAConfig

    shrink = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2) if smoke else {}
    config = llama3_8b_config(**shrink)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with DEVICE:
        llm = LlamaForCausalLM(config).to(torch.bfloat16)
    llm.requires_grad_(False)
    if quantized:
        quantize_nf4(llm)
    llm = add_lora(llm, LoRAConfig())
    resampler = build_resampler(RunConfig().model, CLIP_VIT_L14["hidden_size"], config.hidden_size).to(DEVICE)
    model = AnyMAL(None, resampler, llm, BOS, EOT, PAD, packing=True)
    model.freeze_for_stage2()
    return model


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step_fn, batches: list[dict], warmup: int) -> float:
    for batch in batches[:warmup]:
        step_fn(batch)
    synchronize()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step_fn(batch)
    synchronize()
    return time.perf_counter() - start


def to_device(batch: dict) -> dict:
    return {k: v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_baseline(model: AnyMAL, batches: list[dict], warmup: int) -> float:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step(batch):
        batch = to_device(batch)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            prefix = model.resampler(batch["image_features"])
            layout = pad_samples(batch["text_ids"], batch["text_labels"], batch["text_lengths"],
                                 batch["image_offsets"], prefix.shape[1], PAD)
            loss = model.llm(inputs_embeds=model.embed(layout, prefix), attention_mask=layout.attention_mask,
                             labels=layout.labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, batches, warmup)


def run_pipeline(model: AnyMAL, batches: list[dict], warmup: int, micro: int) -> float:
    import torch.distributed as dist

    from pipeline.training.distributed import DistEnv, init_distributed
    from pipeline.training.stages import InstructStage
    from pipeline.training.trainer import Trainer

    config = RunConfig()
    config.stage = 2
    config.train.global_batch_size = micro
    config.train.micro_batch_size = micro
    config.train.precision = "bfloat16"
    config.optim.lr = 1e-5
    config.data.sources = []
    if not dist.is_initialized():
        init_distributed("nccl" if DEVICE.type == "cuda" else "gloo")
    trainer = Trainer(config, InstructStage(model, config), lambda state: None, DistEnv(0, 1, 0), DEVICE)

    def step(batch):
        trainer.train_step([batch])

    return time_steps(step, batches, warmup)


def free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[16])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["baseline", "pipeline", "qlora-baseline", "qlora-pipeline"])
    parser.add_argument("--attn", default="sdpa", help="the baseline's attention; the pipeline uses it too")
    parser.add_argument("--out", default="")
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA on the CPU: checks the script, no numbers")
    args = parser.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.backends.cuda.matmul.allow_tf32 = True
    global DEVICE
    if args.smoke:
        DEVICE, args.steps, args.warmup, args.micro_batch = torch.device("cpu"), 2, 1, [2]

    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (smoke test)"
    results = {"device": device_name, "timed_steps": args.steps, "lora": "r64 alpha16 dropout0.05", "variants": {}}
    for quantized in (False, True):
        variants = [v for v in args.variants if v.startswith("qlora-") == quantized]
        if not variants:
            continue
        model = build_model(quantized, args.attn, args.smoke)
        for micro, variant in [(m, v) for m in args.micro_batch for v in variants]:
            batches = make_batches(args.steps + args.warmup, micro, model.llm.config.vocab_size)
            timed = batches[args.warmup:]
            lengths = torch.cat([b["text_lengths"] for b in timed])
            results["mean_text_tokens"] = float(lengths.float().mean())
            free_memory()
            try:
                if variant.endswith("baseline"):
                    seconds = run_baseline(model, batches, args.warmup)
                else:
                    seconds = run_pipeline(model, batches, args.warmup, micro)
            except torch.OutOfMemoryError:
                results["variants"][f"{variant}@{micro}"] = {"error": "out of memory"}
                print(variant, micro, "out of memory", flush=True)
                continue
            tokens = int(lengths.sum()) + lengths.numel() * IMAGE_TOKENS
            results["variants"][f"{variant}@{micro}"] = {
                "tokens_per_s_per_gpu": tokens / seconds,
                "samples_per_s": args.steps * micro / seconds,
                "step_s": seconds / args.steps,
                "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None,
            }
            print(variant, micro, json.dumps(results["variants"][f"{variant}@{micro}"]), flush=True)
        del model
        free_memory()
    for key, row in results["variants"].items():
        baseline = results["variants"].get(key.replace("pipeline", "baseline"), {})
        if "error" not in row and key != key.replace("pipeline", "baseline") and "error" not in baseline and baseline:
            row["speedup_vs_baseline"] = row["tokens_per_s_per_gpu"] / baseline["tokens_per_s_per_gpu"]
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
