"""What the step benchmarks share: run specs, timing, a kernel-time profile, the layer compile and error capture."""

from __future__ import annotations

import gc
import json
import time
import traceback
from pathlib import Path

import torch

# Kernel-name fragments (lower case) that put a kernel in a category of the profile; the first match wins.
KERNEL_CATEGORIES = [
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")),
    ("attention", ("flash", "fmha", "flex", "triton_tem", "attention")),
    ("copy", ("memcpy", "memset")),
    ("communication", ("nccl",)),
]


def parse_runs(specs: list[str]) -> list[tuple[str, int]]:
    """"variant@micro" strings into (variant, micro) pairs."""
    runs = []
    for spec in specs:
        variant, _, micro = spec.partition("@")
        if not micro.isdigit():
            raise SystemExit(f"error: run '{spec}' must read VARIANT@MICRO_BATCH, e.g. pipeline+varlen@128")
        runs.append((variant, int(micro)))
    return runs


def attention_of(variant: str, default: str) -> str:
    if "varlen" in variant:
        return "varlen"
    if "flex" in variant:
        return "flex_attention"
    return default


def free_memory(device: torch.device) -> None:
    """Release what the last run left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step_fn, batches: list[dict], warmup: int, device: torch.device, warm_pass: bool = False
               ) -> tuple[float, list]:
    """Seconds for the batches after `warmup`, and every step's return value (e.g. its loss).

    `warm_pass` first runs the timed batches once untimed, so that per-shape first-time costs (cuDNN attention
    plans, cuBLAS heuristics, compiled-shape guards) of a padded step whose length changes every batch are paid
    before timing, as they are after the first few thousand steps of a real run."""
    results = [step_fn(batch) for batch in batches[:warmup]]
    if warm_pass:
        for batch in batches[warmup:]:
            step_fn(batch)
    synchronize(device)
    start = time.perf_counter()
    results += [step_fn(batch) for batch in batches[warmup:]]
    synchronize(device)
    return time.perf_counter() - start, results


def _category(name: str) -> str:
    lowered = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def profile_steps(step_fn, batches: list[dict], device: torch.device, top: int = 15) -> dict:
    """GPU kernel time per step by category and the top kernels, over `batches` run under torch.profiler.

    `idle_ms` is wall time minus summed kernel time (one stream, so overlap is small): launch gaps, host syncs and
    host-side work the GPU waits for."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            step_fn(batch)
        synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / len(batches)
    kernels = []
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = getattr(event, "self_cuda_time_total", 0)
        if micros > 0:
            kernels.append((event.key, micros / 1e3 / len(batches), event.count / len(batches)))
    categories: dict[str, float] = {}
    for name, ms, _ in kernels:
        categories[_category(name)] = categories.get(_category(name), 0.0) + ms
    busy = sum(categories.values())
    kernels.sort(key=lambda row: -row[1])
    return {
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": busy,
        "idle_ms": wall_ms - busy,
        "by_category_ms": {k: round(v, 2) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:120], "ms_per_step": round(ms, 2), "calls_per_step": calls}
                        for name, ms, calls in kernels[:top]],
    }


def compile_decoder_layers(llm) -> None:
    """Compile each decoder layer once (dynamic shapes), in place, as `model.llm.compile_layers` does; variants that
    follow in the same run keep the compiled layers."""
    if getattr(llm, "_benchmark_layers_compiled", False):
        return
    for layer in llm.get_decoder().layers:
        layer.compile(dynamic=True)
    llm._benchmark_layers_compiled = True


def pinned(batch: dict) -> dict:
    """The batch in page-locked memory, as the training loader hands it over on a GPU."""
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


def error_row(exc: BaseException) -> dict:
    if isinstance(exc, torch.OutOfMemoryError):
        return {"error": "out of memory"}
    return {"error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-2000:]}


def save(results: dict, out: str) -> None:
    """Write the results so far (after every run, so a run cut short still leaves the finished ones)."""
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
