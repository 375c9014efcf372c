"""Stage-2 step throughput on one GPU, LoRA and QLoRA: the pipeline's DeepSpeed step against a plain padded HF step.

All variants use the real architectures with random weights built from config (no download): LLaMA-3-8B (released
config values) with peft LoRA adapters (rank 64, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down), and the default
Perceiver Resampler (width 1024, 64 latents) on cached CLIP ViT-L/14 features [B, 257, 1024] (the vision tower is
not run). LoRA keeps the frozen base weights in bf16; QLoRA quantizes them to NF4 with double quantization and bf16
compute (bitsandbytes `Linear4bit`, as `BitsAndBytesConfig` loads them).

    python benchmarks/stage2_throughput.py --runs baseline@4 pipeline+varlen@16 qlora-pipeline+varlen@16 \
        [--profile] [--out result.json]

Conversation lengths come from a LLaVA-Instruct-150K-like distribution (LLaMA-3 tokens, chat template included):
log-normal text lengths with mean ~300, clipped to [48, 2048 - 64]; 1 to 4 user/assistant turn pairs, the user turns
taking ~30% of the text and the assistant turns (supervised) the rest; the image goes after the first user header.
Seeded, so every variant sees the same conversations.

Each run is VARIANT@MICRO_BATCH. Variants:
  baseline          every sample of the micro batch padded to the longest, full [B, T, 128K] logits and the loss of
                    HF `LlamaForCausalLM(labels=...)` through the peft model, SDPA, bf16 autocast, torch AdamW on the
                    adapters and the resampler. This is the "plain HF step".
  pipeline          the trainer's own step (`Trainer.train_step` with `InstructStage`) through DeepSpeed ZeRO-2 bf16:
                    the micro batch packed into one row (positions restart per sample), logits at supervised
                    positions only, global token-mean normalisation; SDPA unless:
  +flex / +varlen   flex attention / PyTorch's variable-length flash attention over the packed row;
  +compile          each decoder layer compiled (dynamic shapes); it stays compiled for later runs of that model.
  +dstimers         DeepSpeed's throughput timer on, as in stage1_throughput.py (ds_configs/zero2.json, stage 2's, has
                    it off and overlap_comm on); the pipeline runs of one process share one engine, so the first
                    pipeline run's settings hold for all.
  qlora-...         the same over NF4 base weights (one model per kind: LoRA runs first, then QLoRA runs).
Reported per run: tokens/s per GPU (text tokens + 64 image tokens per sample, no padding counted), samples/s, step
time, MFU (useful FLOPs as pipeline/training/metrics.py counts them: 4 N_body per token, 4 N_head per supervised
token, 2 N_adapters per token for the adapters' weight gradients, 6 N_resampler per latent), peak GPU memory and
the first step's loss (the same batch and initial weights in every run, so it must agree across runs).

`--smoke` runs every variant on the CPU with a 2-layer LLaMA of width 256 and 4 steps, to check the script before
spending GPU time; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from common import (
    attention_of,
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

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import RunConfig
from pipeline.model.anymal import AnyMAL, build_resampler
from pipeline.model.attention import register_varlen
from pipeline.model.layout import pad_samples
from pipeline.model.lora import add_lora
from pipeline.model.reference import CLIP_VIT_L14, llama3_8b_config
from pipeline.training.metrics import llm_flop_parameters, peak_tflops, step_flops
from pipeline.training.stages import parameter_count

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
        batches.append(
            {
                "keys": [f"{step}_{i}" for i in range(micro)],
                "image_features": torch.randn(
                    micro, PATCH_TOKENS, CLIP_VIT_L14["hidden_size"], generator=generator, dtype=torch.float32
                ).to(torch.bfloat16),
                "text_ids": torch.cat([ids for ids, _ in texts]),
                "text_labels": torch.cat([labels for _, labels in texts]),
                "text_lengths": lengths,
                "image_offsets": torch.full((micro,), IMAGE_OFFSET),
            }
        )
    return batches


def build_model(quantized: bool, attn: str, smoke: bool) -> AnyMAL:
    from transformers import LlamaForCausalLM

    from pipeline.config import LoRAConfig

    shrink = (
        dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if smoke
        else {}
    )
    config = llama3_8b_config(**shrink)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with DEVICE:
        llm = LlamaForCausalLM(config).to(torch.bfloat16)
    llm.requires_grad_(False)
    if quantized:
        for layer in llm.model.layers:
            quantize_nf4(layer)
    llm = add_lora(llm, LoRAConfig())
    resampler = build_resampler(RunConfig().model, CLIP_VIT_L14["hidden_size"], config.hidden_size).to(DEVICE)
    model = AnyMAL(None, resampler, llm, BOS, EOT, PAD, packing=True, max_sequence_tokens=MAX_SEQUENCE_TOKENS)
    model.freeze_for_stage2()
    return model


def to_device(batch: dict) -> dict:
    return {k: v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def baseline_step(model: AnyMAL):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step(batch):
        batch = to_device(batch)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            prefix = model.resampler(batch["image_features"])
            layout = pad_samples(
                batch["text_ids"],
                batch["text_labels"],
                batch["text_lengths"],
                batch["image_offsets"],
                prefix.shape[1],
                PAD,
            )
            loss = model.llm(
                inputs_embeds=model.embed(layout, prefix),
                attention_mask=layout.attention_mask,
                labels=layout.labels,
                use_cache=False,
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def pipeline_step(model: AnyMAL, micro: int, variant: str):
    """The trainer's step; the engine does not depend on the micro batch, so later runs of other sizes reuse it."""
    import torch.distributed as dist

    from pipeline.training.distributed import DistEnv, init_distributed
    from pipeline.training.stages import stage_for
    from pipeline.training.trainer import Trainer

    config = RunConfig()
    config.stage = 2
    config.train.global_batch_size = micro
    config.train.micro_batch_size = micro
    config.train.precision = "bfloat16"
    config.optim.lr = 1e-5
    config.data.sources = []
    config.train.deepspeed_config = deepspeed_config_of(variant, config.train.deepspeed_config)
    if not dist.is_initialized():
        init_distributed("nccl" if DEVICE.type == "cuda" else "gloo")
    trainer = Trainer(config, stage_for(model, config), lambda state: None, DistEnv(0, 1, 0), DEVICE)

    def step(batch):
        totals = trainer.train_step([batch])
        trainer.agreed_stop_signal()
        return totals[0] / totals[1]

    return step


def useful_flops(model: AnyMAL, batches: list[dict]) -> float:
    n_body, n_head = llm_flop_parameters(model.llm, parameter_count)
    n_adapters = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" in n)
    n_res = parameter_count(model.resampler)
    total = 0.0
    for batch in batches:
        samples = batch["text_lengths"].numel()
        tokens = int(batch["text_lengths"].sum()) + samples * IMAGE_TOKENS
        supervised = int((batch["text_labels"] != IGNORE_INDEX).sum())
        total += step_flops(n_body, n_head, n_res, 0, tokens, supervised, samples, IMAGE_TOKENS, 0)
        total += 2.0 * n_adapters * tokens
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["baseline@4", "pipeline+varlen@16", "qlora-baseline@4", "qlora-pipeline+varlen@16"],
        help="VARIANT@MICRO_BATCH",
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", help="attention of the baseline and of plain `pipeline`")
    parser.add_argument("--profile", action="store_true", help="kernel time by category, 2 extra steps per run")
    parser.add_argument("--trace", default="", help="directory for host+device traces (2 extra steps per run)")
    parser.add_argument(
        "--warm-pass",
        action="store_true",
        help="run the timed batches once untimed first (steady-state per-shape costs)",
    )
    parser.add_argument("--out", default="")
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA on the CPU: checks the script, no numbers")
    args = parser.parse_args()
    runs = [(variant, micro) for variant, micro, accumulation in parse_runs(args.runs) if accumulation == 1]
    if len(runs) != len(args.runs):
        raise SystemExit("error: stage-2 runs take no accumulation (VARIANT@MICRO)")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.backends.cuda.matmul.allow_tf32 = True
    register_varlen()
    global DEVICE
    if args.smoke:
        DEVICE, args.steps, args.warmup = torch.device("cpu"), 2, 1
        runs = [(variant.replace("+compile", ""), 2) for variant, _ in runs]

    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (smoke test)"
    peak = peak_tflops() or 989.0
    results = {
        "device": device_name,
        "timed_steps": args.steps,
        "torch": torch.__version__,
        "lora": "r64 alpha16 dropout0.05",
        "warm_pass": args.warm_pass,
        "variants": {},
    }
    for quantized in (False, True):
        # Baselines first: once a DeepSpeed engine has hooked the adapters, a plain backward would trigger its
        # gradient reductions. The pipeline runs of a model share one trainer, as they share its parameters.
        kind_runs = sorted(
            [(v, m) for v, m in runs if v.startswith("qlora-") == quantized],
            key=lambda run: not run[0].endswith("baseline"),
        )
        if not kind_runs:
            continue
        model = build_model(quantized, args.attn, args.smoke)
        trainer_step = None
        initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for variant, micro in kind_runs:
            name = f"{variant}@{micro}"
            extra = extra_batches(args.profile, bool(args.trace))
            batches = make_batches(args.steps + args.warmup + extra, micro, model.llm.config.vocab_size)
            if DEVICE.type == "cuda":
                batches = [pinned(batch) for batch in batches]
            timed = batches[args.warmup : args.warmup + args.steps]
            lengths = torch.cat([b["text_lengths"] for b in timed])
            results["mean_text_tokens"] = float(lengths.float().mean())
            with torch.no_grad():  # every run starts from the same adapters and resampler
                for n, p in model.named_parameters():
                    if n in initial:
                        p.copy_(initial[n])
            free_memory(DEVICE)
            model.llm.config._attn_implementation = attention_of(variant, args.attn)
            try:
                if "compile" in variant:
                    compile_decoder_layers(model.llm)
                if variant.endswith("baseline"):
                    step = baseline_step(model)
                else:
                    trainer_step = trainer_step or pipeline_step(model, micro, variant)
                    step = trainer_step
                run = measure(
                    step,
                    batches,
                    args.warmup,
                    args.steps,
                    DEVICE,
                    profile=args.profile,
                    trace=trace_path(args.trace, name),
                    warm_pass=args.warm_pass,
                )
            except Exception as exc:  # noqa: BLE001 - record the failure and go on to the next run
                record_failure(results, name, exc)
                free_memory(DEVICE)
                continue
            seconds = run["seconds"]
            tokens = int(lengths.sum()) + lengths.numel() * IMAGE_TOKENS
            row = {
                "tokens_per_s_per_gpu": tokens / seconds,
                "samples_per_s": args.steps * micro / seconds,
                "step_s": seconds / args.steps,
                "mfu": useful_flops(model, timed) / seconds / (peak * 1e12),
                "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None,
                "first_step_loss": run["losses"][0],
                "attention": model.llm.config._attn_implementation,
                **{key: run[key] for key in ("profile", "idle", "host") if key in run},
            }
            record(results, name, row, args.out)
        del model, initial, trainer_step
        free_memory(DEVICE)
    for prefix in ("", "qlora-"):
        baselines = [
            row["tokens_per_s_per_gpu"]
            for key, row in results["variants"].items()
            if key.startswith(prefix + "baseline@") and "error" not in row
        ]
        for key, row in results["variants"].items():
            if baselines and key.startswith(prefix + "pipeline") and "error" not in row:
                row["speedup_vs_best_baseline"] = row["tokens_per_s_per_gpu"] / max(baselines)
    save(results, args.out)
    print_table(results, ["tokens_per_s_per_gpu", "speedup_vs_best_baseline", "mfu", "peak_mem_gb", "first_step_loss"])


if __name__ == "__main__":
    main()
