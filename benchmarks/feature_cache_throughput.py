"""Feature caching on one GPU: the bare CLIP forward against the whole job, and what caching saves per stage-1 step.

    python benchmarks/feature_cache_throughput.py            # ViT-L/14 and Llama-3-8B architectures, random weights
    python benchmarks/feature_cache_throughput.py --tiny     # tiny models, runs on a CPU (a smoke test)

In one process, on the same tower (saved and loaded back as the job loads it, layers after feature_layer dropped):
  1. the bare forward: `VisionTower` in bf16 on random pixels already on the GPU, batch 256, inference mode;
  2. the whole job (`pipeline.prep.feature_cache.cache_features`) on synthetic img2dataset shards of JPEGs it
     writes first (256 px short side and q95, as data_prep/img2dataset.sh stores LAION), from tar to written,
     hashed and renamed feature shard. Its steady rate is taken between 10% and 90% of the images, so worker start
     and the last shard's tail are left out; the wall rate of the whole call is reported too;
  3. one stage-1 step (caption loss, backward, AdamW on the resampler) with pixels through the tower and with
     cached features, per sample, at the config's micro batch (the LLM's weights random, no DeepSpeed).
Prints one JSON object. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.common.dtypes import torch_dtype
from pipeline.config import VisionConfig, load_config
from pipeline.model.anymal import AnyMAL, build_resampler
from pipeline.model.reference import clip_vit_l14_config, llama3_8b_config
from pipeline.model.vision import load_vision_tower
from pipeline.prep.feature_cache import cache_features, default_num_workers

ROOT = Path(__file__).resolve().parents[1]

# openai/clip-vit-large-patch14's preprocessor_config.json, so the job loads the class training loads.
OPENAI_CLIP_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_clip(out: Path, tiny: bool) -> Path:
    """A random-weight CLIP vision tower saved like a hub checkpoint (the real architecture unless tiny)."""
    if tiny:
        from pipeline.toy.models import build_tiny_clip

        return build_tiny_clip(out / "clip")
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(clip_vit_l14_config()).to(torch.bfloat16).save_pretrained(out / "clip")
    (out / "clip" / "preprocessor_config.json").write_text(json.dumps(OPENAI_CLIP_PREPROCESSOR, indent=2))
    return out / "clip"


def write_jpeg_shards(out: Path, shards: int, per_shard: int, size: tuple[int, int]) -> list[str]:
    """img2dataset-layout shards of smooth random JPEGs; 64 distinct images, cycled (decode cost is per image)."""
    rng = np.random.default_rng(0)
    width, height = size
    images = []
    for _ in range(64):
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
        images.append(buffer.getvalue())
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        path = out / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(per_shard):
                key = f"{shard:05d}{index:04d}"
                caption = f"a synthetic photo number {index} of shard {shard}".encode()
                members = {
                    "jpg": images[(shard * per_shard + index) % len(images)],
                    "txt": caption,
                    "json": json.dumps({"key": key, "status": "success"}).encode(),
                }
                for extension, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths


def bare_forward(vision: VisionConfig, device: torch.device, batch_size: int, image_size: int, iterations: int):
    tower = load_vision_tower(vision).to(device)
    pixels = torch.randn(batch_size, 3, image_size, image_size, device=device, dtype=torch_dtype(vision.dtype))
    with torch.inference_mode():
        for _ in range(3):
            tower(pixels)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            tower(pixels)
        synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": batch_size * iterations / seconds, "iterations": iterations}


def whole_job(vision: VisionConfig, shards: list[str], out: Path, device: torch.device, args) -> dict:
    marks: list[tuple[float, int]] = []

    def on_batch(images: int) -> None:
        marks.append((time.perf_counter(), (marks[-1][1] if marks else 0) + images))

    start = time.perf_counter()
    result = cache_features(
        vision,
        shards,
        out,
        dtype="float16",
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        writer_threads=args.writer_threads,
        device=device,
        progress=False,
        on_batch=on_batch,
    )
    wall = time.perf_counter() - start
    total = marks[-1][1]
    first = next(mark for mark in marks if mark[1] >= 0.1 * total)
    last = next(mark for mark in marks if mark[1] >= 0.9 * total)
    steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
    bytes_per_sample = sum(f.stat().st_size for f in out.glob("*.tar")) / max(1, result["images"])
    return {
        "images": result["images"],
        "steady_images_per_s": steady,
        "wall_images_per_s": result["images"] / wall,
        "wall_s": wall,
        "bytes_per_sample": bytes_per_sample,
        "write_gb_per_s": steady * bytes_per_sample / 1e9,
        "output_filesystem": filesystem_of(out),
        "num_workers": args.num_workers,
        "writer_threads": args.writer_threads,
        "skipped": result["skipped"],
        "wait_for_images_s": result["wait_for_images_s"],
        "wait_for_writers_s": result["wait_for_writers_s"],
    }


def filesystem_of(path: Path) -> str:
    """The mount (type and point) holding `path`, from /proc/mounts: tmpfs output leaves storage out of the timing."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best = max(
        (m for m in mounts if resolved == m[1] or resolved.startswith(m[1].rstrip("/") + "/")),
        key=lambda m: len(m[1]),
        default=None,
    )
    return f"{best[2]} at {best[1]}" if best else "unknown"


def stage1_step(config, vision: VisionConfig, device: torch.device, tiny: bool, steps: int) -> dict:
    """Per-sample time of one stage-1 step with the tower in the step and with cached (float16) features."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = torch_dtype(config.model.llm.dtype)
    llm_config = (
        LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
        )
        if tiny
        else llama3_8b_config()
    )
    torch.manual_seed(0)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(llm_config, dtype=dtype, attn_implementation="sdpa")
    llm.requires_grad_(False)
    tower = load_vision_tower(vision).to(device)
    resampler = build_resampler(config.model, tower.width, llm.config.hidden_size).to(device, dtype)
    eos = llm_config.eos_token_id
    model = AnyMAL(tower, resampler, llm, llm_config.bos_token_id, eos, eos, packing=config.model.packing)
    optimizer = torch.optim.AdamW(resampler.parameters(), lr=1e-5)
    batch_size = config.train.micro_batch_size
    image_size = tower.clip.config.image_size
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, config.model.max_caption_tokens, (batch_size,), generator=generator)
    caption_ids = torch.randint(100, llm_config.vocab_size - 1, (int(lengths.sum()),), generator=generator)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    batch = {"caption_ids": caption_ids.to(device), "caption_lengths": lengths.to(device)}
    with torch.no_grad():
        features = tower(pixels.to(device)).to(torch.float16)  # as a float16 cache stores them

    def timed(inputs: dict) -> float:
        for index in range(steps + 2):
            if index == 2:  # two warm-up steps
                synchronize(device)
                start = time.perf_counter()
            loss, tokens = model.caption_loss({**batch, **inputs})
            (loss / tokens).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return (time.perf_counter() - start) / steps / batch_size * 1e3

    with_tower = timed({"pixel_values": pixels.to(device)})
    from_features = timed({"image_features": features})
    return {
        "micro_batch": batch_size,
        "llm": "tiny llama" if tiny else "llama-3-8b (random weights)",
        "with_tower_ms_per_sample": with_tower,
        "from_features_ms_per_sample": from_features,
        "saved_fraction": 1 - from_features / with_tower,
        "steps_timed": steps,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and few images: a CPU smoke test")
    parser.add_argument("--device", default=None, help="[cuda if available, else cpu]")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass [256; tiny 32]")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard [1024; tiny 64]")
    parser.add_argument("--shards-per-worker", type=int, default=2, help="shards = workers x this [2]")
    parser.add_argument("--num-workers", type=int, default=None, help="decode processes [5/8 of the cores]")
    parser.add_argument("--writer-threads", type=int, default=4)
    parser.add_argument("--forward-iterations", type=int, default=None, help="[20; tiny 3]")
    parser.add_argument("--step-iterations", type=int, default=None, help="timed stage-1 steps [10; tiny 2]")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where shards and features go [a temporary folder in /dev/shm, so that the job, not the "
        "local disk, is measured; name a folder on the training storage to include it]",
    )
    parser.add_argument("--skip-step", action="store_true", help="leave out the stage-1 step timing")
    args = parser.parse_args(argv)
    tiny = args.tiny
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.batch_size = args.batch_size or (32 if tiny else 256)
    args.shard_size = args.shard_size or (64 if tiny else 1024)
    args.num_workers = args.num_workers if args.num_workers is not None else (1 if tiny else default_num_workers())
    iterations = args.forward_iterations or (3 if tiny else 20)
    step_iterations = args.step_iterations or (2 if tiny else 10)
    num_shards = max(1, args.num_workers) * args.shards_per_worker
    needed_bytes = 2 * num_shards * args.shard_size * (30e3 if tiny else 560e3) + 2e9
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > needed_bytes else None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="feature_cache_bench_", dir=shm))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = load_config(ROOT / "configs" / ("toy.yaml" if tiny else "stage1_8b.yaml"))
        clip = save_clip(work, tiny)
        vision = VisionConfig(
            model=str(clip),
            feature_layer=config.model.vision.feature_layer,
            dtype="float32" if tiny and device.type == "cpu" else "bfloat16",
        )
        image_size = 64 if tiny else 224
        shards = write_jpeg_shards(work / "shards", num_shards, args.shard_size, (86, 64) if tiny else (341, 256))
        bare = bare_forward(vision, device, args.batch_size, image_size, iterations)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        job = whole_job(vision, shards, work / "features", device, args)
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "cpus": len(os.sched_getaffinity(0)),
            "tiny": tiny,
            "model": "tiny clip 64px" if tiny else "clip vit-l/14 224px (random weights)",
            "tower_dtype": vision.dtype,
            "feature_layer": vision.feature_layer,
            "batch_size": args.batch_size,
            "bare_forward_images_per_s": bare["images_per_s"],
            "job_images_per_s": job["steady_images_per_s"],
            "job_to_bare_ratio": job["steady_images_per_s"] / bare["images_per_s"],
            "job": job,
            "work_dir": str(work),
        }
        if not args.skip_step:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["stage1_step"] = stage1_step(config, vision, device, tiny, step_iterations)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
