"""What one frozen decoder layer really keeps for its backward, per token, against the memory plan's meta-device trace.

The memory plan (`pipeline/training/memory.py`) counts the tensors autograd saves when one layer of the LLM's shapes
runs eagerly on the meta device. Compiled layers (`model.llm.compile_layers`) keep less: inductor recomputes cheap
elementwise results in the backward instead of saving them. This script measures the real figure on a GPU for each
setting the recipes use (bf16 or NF4 weights, with or without stage 2's LoRA adapters in training mode, eager or
compiled), as the growth of allocated memory across one layer's forward over a packed row of 128-token samples,
between two row lengths (so that weights and workspaces cancel), and prints it beside the trace; the ratio is what the
plan applies to compiled layers (`COMPILED_LAYER_FRACTION`). Rows with activation checkpointing
(`pipeline.model.llm.checkpoint_layers`, then compiled, as training does) show what a checkpointed layer keeps.

    python benchmarks/layer_memory.py --shapes llama3-8b llama3-70b --out layer_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import quantize_nf4
from transformers import AutoModelForCausalLM

from pipeline.config import LoRAConfig
from pipeline.model import reference
from pipeline.model.attention import register_varlen, varlen_kwargs
from pipeline.model.llm import checkpoint_layers
from pipeline.training.memory import one_layer_config, trace_llm_layer

SHAPES = {"llama3-8b": reference.llama3_8b_config, "llama3-70b": reference.llama3_70b_config}
LORA = LoRAConfig(r=64, alpha=16, dropout=0.05, target_modules=["all-linear"])
SAMPLE_TOKENS = 128


def build_layer(config, quantized: bool, lora: bool):
    one_layer = one_layer_config(config)
    one_layer._attn_implementation = "varlen"
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(one_layer, dtype=torch.bfloat16)
    model.requires_grad_(False)
    if quantized:
        quantize_nf4(model.get_decoder().layers[0])
    if lora:
        from pipeline.model.lora import add_lora

        model = add_lora(model, LORA)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    model.train(lora)
    return model


def kept_bytes(model, tokens: int) -> int:
    """Allocated memory that one layer's forward over `tokens` leaves behind for its backward (the output excluded)."""
    decoder = model.get_decoder()
    layer = decoder.layers[0]
    states = torch.randn(1, tokens, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = (torch.arange(tokens, device="cuda") % SAMPLE_TOKENS)[None]
    bounds = torch.arange(0, tokens + 1, SAMPLE_TOKENS, device="cuda", dtype=torch.int32)
    rotary = decoder.rotary_emb(states, positions)
    kwargs = varlen_kwargs(bounds, SAMPLE_TOKENS)
    for _ in range(2):  # compile and warm the allocator at this size
        layer(states, position_ids=positions, position_embeddings=rotary, **kwargs).float().sum().backward()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = layer(states, position_ids=positions, position_embeddings=rotary, **kwargs)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    out.float().sum().backward()
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["llama3-8b"])
    parser.add_argument("--tokens", type=int, nargs=2, default=[4096, 8192])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    register_varlen()
    small, large = args.tokens
    results = {
        "command": " ".join(sys.argv),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "card": torch.cuda.get_device_name(),
        "rows": [],
    }
    for shape in args.shapes:
        config = SHAPES[shape]()
        for quantized in (False, True):
            # The 70B LLM is for stage 1: no adapters.
            for lora in (False, True) if shape == "llama3-8b" else (False,):
                traced = trace_llm_layer(config, LORA if lora else None, training=lora).bytes_per_token
                for compiled, checkpointed in ((False, False), (True, False), (True, True)):
                    model = build_layer(config, quantized, lora)
                    if checkpointed:
                        checkpoint_layers(model, compile_layers=compiled)
                    elif compiled:
                        model.get_decoder().layers[0].compile(dynamic=True)
                    try:
                        measured = (kept_bytes(model, large) - kept_bytes(model, small)) / (large - small)
                    except Exception as error:  # one failing setting must not hide the others' rows
                        measured = float("nan")
                        print(f"{shape} nf4={quantized} lora={lora} compiled={compiled}: {error!r}"[:2000], flush=True)
                    row = {
                        "shape": shape,
                        "weights": "nf4" if quantized else "bf16",
                        "lora": lora,
                        "compiled": compiled,
                        "checkpointed": checkpointed,
                        "measured_bytes_per_token": measured,
                        "traced_bytes_per_token": traced,
                        "ratio": measured / traced,
                    }
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    del model
                    torch.cuda.empty_cache()
                    torch._dynamo.reset()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
