"""What the step benchmarks share: run specs, timing, a kernel-time profile, an idle-gap trace, the layer compile and
error capture."""

from __future__ import annotations

import gc
import json
import tempfile
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


def parse_runs(specs: list[str]) -> list[tuple[str, int, int]]:
    """ "VARIANT@MICRO" or "VARIANT@MICROxACCUMULATION" strings into (variant, micro, accumulation) triples."""
    runs = []
    for spec in specs:
        variant, _, sizes = spec.partition("@")
        micro, _, accumulation = sizes.partition("x")
        if not micro.isdigit() or not (accumulation or "1").isdigit():
            raise SystemExit(
                f"error: run '{spec}' must read VARIANT@MICRO or VARIANT@MICROxACCUMULATION, "
                "e.g. pipeline+varlen@128 or pipeline+varlen@128x2"
            )
        runs.append((variant, int(micro), int(accumulation or 1)))
    return runs


def attention_of(variant: str, default: str) -> str:
    if "varlen" in variant:
        return "varlen"
    if "flex" in variant:
        return "flex_attention"
    return default


def deepspeed_config_of(variant: str, path: str) -> str:
    """The DeepSpeed JSON of a run: `path`, or a copy with DeepSpeed's defaults that the project's JSONs turn off put
    back (+overlap: ZeRO-2's overlap_comm, off for stage 1; +dstimers: the synchronizing throughput timer), or with
    +nooverflow: bf16's gradient overflow check off (it reads a flag on the host before every optimizer step), or
    +nogc: Python's automatic garbage collection off while the engine lives (DeepSpeed's disable_python_gc)."""
    changes = ("+overlap", "+dstimers", "+nooverflow", "+nogc")
    if not any(change in variant for change in changes):
        return path
    ds = json.loads(Path(path).read_text())
    if "+overlap" in variant:
        ds["zero_optimization"]["overlap_comm"] = True
    if "+dstimers" in variant:
        ds.pop("timers", None)
    if "+nooverflow" in variant:
        ds["bf16"]["check_grad_overflow"] = False
    if "+nogc" in variant:
        ds["disable_python_gc"] = True
    out = Path(tempfile.mkdtemp()) / "zero2_variant.json"
    out.write_text(json.dumps(ds))
    return str(out)


def free_memory(device: torch.device) -> None:
    """Release what the last run left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class GcTimer:
    """Python's garbage collections while it is on: how many and how long, per generation (`gc.callbacks`). A full
    collection walks every object the process holds, compiled graphs included, and stops the host meanwhile."""

    def __init__(self):
        self.started: float | None = None
        self.by_generation: dict[int, list[float]] = {}

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.by_generation.setdefault(info["generation"], []).append(time.perf_counter() - self.started)
            self.started = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {
            f"gen{generation}": {"count": len(times), "ms": round(sum(times) * 1e3, 2)}
            for generation, times in sorted(self.by_generation.items())
        }


def time_steps(
    step_fn, batches: list[dict], warmup: int, device: torch.device, warm_pass: bool = False
) -> tuple[float, list, dict]:
    """Seconds for the batches after `warmup`, every step's return value (e.g. its loss) as a number, and what the
    host saw meanwhile: when each step returned (ms from the start) and Python's garbage collections.

    A step may return a device tensor: it is read after the clock stops, so that timing does not add a host sync
    per step that the trainer does not have. The host runs ahead of the device, so a step's return time is when its
    work was queued, not done; an outlier there is a host stall (a collection, a sync). `warm_pass` first runs the
    timed batches once untimed, so that per-shape first-time costs (cuDNN attention plans, cuBLAS heuristics,
    compiled-shape guards) of a padded step whose length changes every batch are paid before timing, as they are
    after the first few thousand steps of a real run."""
    results = [step_fn(batch) for batch in batches[:warmup]]
    if warm_pass:
        for batch in batches[warmup:]:
            step_fn(batch)
    synchronize(device)
    returned = []
    with GcTimer() as collections:
        start = time.perf_counter()
        for batch in batches[warmup:]:
            results.append(step_fn(batch))
            returned.append(round((time.perf_counter() - start) * 1e3, 1))
        synchronize(device)
        seconds = time.perf_counter() - start
    host = {"step_returned_ms": returned, "gc": collections.summary()}
    return seconds, [float(r) if torch.is_tensor(r) else r for r in results], host


def extra_batches(profile: bool, trace: bool) -> int:
    """Batches `measure` needs beyond warm-up and timed steps: 2 for the profile, 2 for the trace."""
    return 2 * profile + 2 * trace


def measure(
    step_fn,
    batches: list[dict],
    warmup: int,
    steps: int,
    device: torch.device,
    *,
    profile: bool = False,
    trace: Path | None = None,
    warm_pass: bool = False,
) -> dict:
    """One run's timing: {"seconds", "losses"}, plus "profile" (kernel time by category) and "idle" (the device's
    idle gaps, from a trace written to `trace`) over extra batches after the timed ones."""
    timed_until = warmup + steps
    seconds, losses, host = time_steps(step_fn, batches[:timed_until], warmup, device, warm_pass=warm_pass)
    out = {"seconds": seconds, "losses": losses, "host": host}
    if profile:
        out["profile"] = profile_steps(step_fn, batches[timed_until : timed_until + 2], device)
    if trace is not None:
        out["idle"] = trace_steps(
            step_fn, batches[timed_until + 2 * profile : timed_until + 2 * profile + 2], device, trace
        )
    return out


def trace_steps(step_fn, batches: list[dict], device: torch.device, path: Path) -> dict:
    """Run `batches` under torch.profiler with host stacks, write the trace (gzip JSON) and summarise its gaps."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    from benchmarks.trace_gaps import idle_gaps, load_trace

    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        for batch in batches:
            step_fn(batch)
        synchronize(device)
    plain = path.with_suffix("")
    prof.export_chrome_trace(str(plain))
    with open(plain, "rb") as source, gzip.open(path, "wb") as target:
        target.write(source.read())
    plain.unlink()
    summary = idle_gaps(load_trace(path))
    summary["trace"] = str(path)
    return summary


def _category(name: str) -> str:
    lowered = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def profile_steps(step_fn, batches: list[dict], device: torch.device, top: int = 30) -> dict:
    """GPU kernel time per step by category and the top kernels, over `batches` run under torch.profiler.

    `idle_ms` is wall time minus summed kernel time (one stream, so overlap is small): launch gaps, host syncs and
    host-side work the GPU waits for."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
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
        "top_kernels": [
            {"name": name[:120], "ms_per_step": round(ms, 2), "calls_per_step": calls}
            for name, ms, calls in kernels[:top]
        ],
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


def record_failure(results: dict, name: str, exc: BaseException) -> None:
    """Keep a run that failed as its error row, and print it; the script goes on to the next run."""
    results["variants"][name] = error_row(exc)
    print(name, results["variants"][name]["error"], flush=True)


def save(results: dict, out: str) -> None:
    """Write the results so far (after every run, so a run cut short still leaves the finished ones)."""
    if out:
        Path(out).write_text(json.dumps(results, indent=2))


def record(results: dict, name: str, row: dict, out: str) -> None:
    """Add a finished run's row, print it (without its profile) and save the results so far. A repeated run is
    kept as NAME#2, NAME#3, ..."""
    key, repeat = name, 2
    while key in results["variants"]:
        key, repeat = f"{name}#{repeat}", repeat + 1
    name = key
    results["variants"][name] = row
    print(name, json.dumps({k: v for k, v in row.items() if k not in ("profile", "idle", "host")}), flush=True)
    for key in ("profile", "idle", "host"):
        if key in row:
            print(name, key, json.dumps(row[key]), flush=True)
    save(results, out)


def print_table(results: dict, columns: list[str]) -> None:
    """The runs as a short table, printed last so that it ends the output."""
    print(f"{results['device']}, torch {results['torch']}")
    print(" | ".join(["run", *columns]))
    for name, row in results["variants"].items():
        cells = (
            [row.get("error", "")[:60]]
            if "error" in row
            else [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        )
        print(" | ".join([name, *cells]))


def trace_path(directory: str, run: str) -> Path | None:
    """Where a run's trace goes: a file name of letters, digits, '.', '_' and '-' only."""
    if not directory:
        return None
    Path(directory).mkdir(parents=True, exist_ok=True)
    return Path(directory) / ("trace_" + "".join(c if c.isalnum() else "_" for c in run) + ".json.gz")


def check_varlen_kernel(device: torch.device) -> dict:
    """The varlen flash kernel against SDPA under the equivalent mask (bf16, random data) on a packed row of samples
    of unequal length. "agrees" is False when they differ beyond bf16 rounding; a kernel error is recorded, not
    raised."""
    from pipeline.model import attention

    generator = torch.Generator(device=device).manual_seed(0)
    errors = {}
    cu_seq_lens = torch.tensor([0, 83, 70, 129, 5], device=device).cumsum(0).to(torch.int32)
    query = torch.randn(int(cu_seq_lens[-1]), 32, 128, device=device, dtype=torch.bfloat16, generator=generator)
    key, value = (
        torch.randn(int(cu_seq_lens[-1]), 8, 128, device=device, dtype=torch.bfloat16, generator=generator)
        for _ in range(2)
    )
    try:
        fast = attention.attend_within_samples(query, key, value, cu_seq_lens, 129, 128**-0.5)
        reference = torch.nn.functional.scaled_dot_product_attention(
            query.float().transpose(0, 1)[None],
            key.float().transpose(0, 1)[None],
            value.float().transpose(0, 1)[None],
            attn_mask=attention._sample_mask(cu_seq_lens),
            scale=128**-0.5,
            enable_gqa=True,
        )[0].transpose(0, 1)
        errors["packed"] = ((fast.float() - reference).norm() / reference.norm()).item()
    except Exception as exc:  # noqa: BLE001 - reported with the benchmark's results
        errors["packed"] = f"{type(exc).__name__}: {exc}"[:300]
    return {"relative_error": errors, "agrees": all(isinstance(e, float) and e < 2e-2 for e in errors.values())}


def quantize_nf4(module: torch.nn.Module) -> None:
    """Replace the module's Linear layers by bitsandbytes NF4 ones on the weights' device, as transformers'
    BitsAndBytesConfig(load_in_4bit, nf4, double quantization, bf16 compute) loads them; the bf16 weights are freed."""
    import bitsandbytes as bnb

    for name, linear in list(module.named_modules()):
        if type(linear) is not torch.nn.Linear:
            continue
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=quantized
        )
        quantized.weight = weight.to(linear.weight.device)  # quantizes
        quantized.bias = linear.bias
        module.set_submodule(name, quantized)
