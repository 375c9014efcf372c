"""The frozen LLaMA-3-8B layer's projections at stage 1's packed token count: time and TFLOP/s of each GEMM
(forward plus the backward to the input only, as the frozen LLM runs them), separate against fused weights.

    python benchmarks/llm_projections.py [--tokens 10586] [--repeats 20]

`--tokens` defaults to micro batch 128 x 82.7 tokens (BOS + 64 image tokens + a mean caption of 17.7). Separate
q/k/v (and gate/up) projections read the same input and their input gradients are summed; fused ones are one GEMM
each way over the concatenated weight. Per step = per layer x 32 layers. This measures whether fusing the frozen
projections would pay before any model code is written for it.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

WIDTH, KV_WIDTH, FFN = 4096, 1024, 14336
LAYERS = 32


def timed_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def separate_projections(x, weights, grads) -> None:
    """Each weight's forward GEMM, then the input gradients summed (what autograd does for a shared input)."""
    for weight in weights:
        x @ weight.t()
    total = grads[0] @ weights[0]
    for grad, weight in zip(grads[1:], weights[1:], strict=True):
        total = total + grad @ weight


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10586)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02

    t = args.tokens
    groups = {  # name: (input width, output widths)
        "qkv": (WIDTH, [WIDTH, KV_WIDTH, KV_WIDTH]),
        "o": (WIDTH, [WIDTH]),
        "gate_up": (WIDTH, [FFN, FFN]),
        "down": (FFN, [WIDTH]),
    }
    rows = {}
    for name, (width_in, widths_out) in groups.items():
        x = rand(t, width_in)
        weights = [rand(w, width_in) for w in widths_out]
        grads = [rand(t, w) for w in widths_out]
        fused_weight, fused_grad = torch.cat(weights), torch.cat(grads, dim=1)
        flops = 2 * 2 * t * width_in * sum(widths_out)  # forward + input gradient

        separate = functools.partial(separate_projections, x, weights, grads)
        fused = functools.partial(separate_projections, x, [fused_weight], [fused_grad])
        for kind, fn in (("separate", separate), ("fused", fused)):
            if kind == "fused" and len(widths_out) == 1:
                continue
            ms = timed_ms(fn, args.repeats)
            rows[f"{name}_{kind}"] = {
                "ms_per_layer": round(ms, 4),
                "ms_per_step": round(ms * LAYERS, 2),
                "tflops": round(flops / ms / 1e9, 1),
            }
    square = rand(8192, 8192)
    rows["peak_8192_cube"] = {"tflops": round(2 * 8192**3 / timed_ms(lambda: square @ square, args.repeats) / 1e9, 1)}
    print(json.dumps({"device": torch.cuda.get_device_name(), "tokens": t, "gemms": rows}, indent=1))


if __name__ == "__main__":
    main()
