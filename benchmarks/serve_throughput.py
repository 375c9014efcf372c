"""Serving throughput: `pipeline.serve`'s batched generation against the same requests sent one at a time.

The model is the 8B recipe with random weights, built on the device from the published configs
(`pipeline/model/reference.py`: CLIP ViT-L/14 at 224 px cut after its penultimate layer, the default Perceiver
Resampler with 64 latents, LLaMA-3-8B) in bf16 through the exported model's own class
(`pipeline/hf_export/modeling_anymal.py`), so nothing is downloaded or written to disk. The tokenizer is the toy
world's (LLaMA-3's special tokens and chat template over a small vocabulary): random weights never emit a terminator,
so every answer is exactly `--max-tokens` tokens, a short VQA-style answer. The server is the real app (FastAPI,
uvicorn on loopback, the batching engine) in this process; clients POST /v1/chat/completions over HTTP.

    PYTHONPATH=. python benchmarks/serve_throughput.py --out benchmarks/results/serve_throughput_h200.json
    PYTHONPATH=. python benchmarks/serve_throughput.py --tiny   # a CPU smoke test of the script; numbers mean nothing

For each concurrency (1, 8, 32 by default) the same `--requests` requests (distinct images and questions) are sent by
that many concurrent clients; concurrency 1 is the one-at-a-time baseline. Reported: requests/s, p50/p99 latency,
the engine's batches, and the speedup over concurrency 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

QUESTIONS = [
    "what colour is the shape ?",
    "what shape is it ?",
    "how many shapes are there ?",
    "is the shape small or large ?",
    "what is the background colour ?",
    "where is the shape ?",
]


def build_model(tiny: bool, device: str):
    """The exported model class with random weights, and its processor."""
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from pipeline.hf_export.configuration_anymal import AnyMALConfig
    from pipeline.hf_export.modeling_anymal import AnyMALForConditionalGeneration
    from pipeline.hf_export.processing_anymal import AnyMALProcessor
    from pipeline.model.reference import clip_vit_l14_config, llama3_8b_config
    from pipeline.toy.models import build_tokenizer, toy_vocabulary

    tokenizer = build_tokenizer(tempfile.mkdtemp(prefix="serve_bench_tokenizer_"), toy_vocabulary())
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if tiny:
        vision = CLIPVisionConfig(
            image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=3, num_attention_heads=4
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **special,
        )
        resampler = dict(num_image_tokens=8, resampler_depth=2, resampler_heads=4, resampler_head_dim=32)
        dtype, size = torch.float32, 64
    else:
        # The feature layer is the penultimate one: 23 of the 24 layers are kept.
        vision = clip_vit_l14_config(num_hidden_layers=23)
        text = llama3_8b_config(**special)
        resampler = dict(num_image_tokens=64, resampler_depth=6, resampler_heads=16, resampler_head_dim=64)
        dtype, size = torch.bfloat16, 224
    config = AnyMALConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>"),
        task="chat",
        **resampler,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AnyMALForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )
    processor = AnyMALProcessor(image_processor, tokenizer, task="chat", num_image_tokens=config.num_image_tokens)
    return model, processor, size


def request_bodies(count: int, size: int, max_tokens: int) -> list[bytes]:
    """Distinct requests: a random-coloured image (PNG data URL) and a short question each."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    bodies = []
    for index in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(image).ellipse(
            [size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=tuple(rng.randrange(256) for _ in range(3))
        )
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[index % 6]}]
        body = {
            "model": "anymal-bench",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


def start_server(engine, port: int):
    import uvicorn

    from pipeline.serve.api import ServerLimits, create_app

    app = create_app(engine, "anymal-bench", ServerLimits())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


async def send_all(base: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], list[str]]:
    """Send every body with `concurrency` clients; wall time, each request's latency and each answer."""
    import httpx

    pending = list(enumerate(bodies))
    latencies, answers = [0.0] * len(bodies), [""] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def worker():
            while pending:
                index, body = pending.pop(0)
                began = time.perf_counter()
                response = await client.post(
                    "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
                )
                latencies[index] = time.perf_counter() - began
                response.raise_for_status()
                answers[index] = response.json()["choices"][0]["message"]["content"]

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began, latencies, answers


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU: checks the script")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests sent at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=10, help="answer length (random weights never stop early)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--out", help="result JSON (default: benchmarks/results/serve_throughput_gpu.json)")
    args = parser.parse_args(argv)

    from pipeline.serve.engine import Engine

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    began = time.perf_counter()
    model, processor, size = build_model(args.tiny, device)
    build_s = time.perf_counter() - began
    engine = Engine(model, processor, args.max_batch_size, args.batch_window_ms / 1000)
    engine.start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server, thread = start_server(engine, port)
    base = f"http://127.0.0.1:{port}"
    bodies = request_bodies(args.requests, size, args.max_tokens)
    asyncio.run(send_all(base, bodies[: min(4, len(bodies))], 2))  # warm-up: kernels, allocator, first batches
    levels = []
    reference = None
    for concurrency in args.concurrency:
        stats_before = (engine.stats.batches, engine.stats.requests)
        wall_s, latencies, answers = asyncio.run(send_all(base, bodies, concurrency))
        batches = engine.stats.batches - stats_before[0]
        if reference is None:
            reference = answers
        level = {
            "concurrency": concurrency,
            "requests": len(bodies),
            "wall_s": round(wall_s, 3),
            "requests_per_s": round(len(bodies) / wall_s, 3),
            "latency_p50_s": round(statistics.median(latencies), 4),
            "latency_p99_s": round(percentile(latencies, 0.99), 4),
            "batches": batches,
            "mean_batch": round((engine.stats.requests - stats_before[1]) / max(batches, 1), 2),
            "answers_equal_one_at_a_time": answers == reference,
        }
        levels.append(level)
        print(json.dumps(level))
    baseline = levels[0]["requests_per_s"]
    for level in levels:
        level["speedup_vs_first"] = round(level["requests_per_s"] / baseline, 2)
    server.should_exit = True
    thread.join(timeout=30)
    engine.stop()
    result = {
        "benchmark": "serve_throughput",
        "model": "tiny random"
        if args.tiny
        else "8B recipe, random weights (CLIP ViT-L/14-224 + resampler + LLaMA-3-8B)",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype),
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "batch_window_ms": args.batch_window_ms,
        "build_s": round(build_s, 1),
        "levels": levels,
    }
    # A smoke test's numbers mean nothing: they go to a temporary directory unless --out says otherwise.
    results = Path(tempfile.mkdtemp()) if args.tiny else Path(__file__).resolve().parent / "results"
    out = Path(args.out or results / "serve_throughput_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    for level in levels:
        print(
            f"concurrency {level['concurrency']:>3}: {level['requests_per_s']:8.2f} req/s  p50 "
            f"{level['latency_p50_s']:.3f} s  p99 {level['latency_p99_s']:.3f} s  mean batch {level['mean_batch']:5.1f}"
            f"  x{level['speedup_vs_first']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
