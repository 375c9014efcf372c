"""Stage 1 over a 4-bit (NF4) frozen LLM: it trains and resumes through the entry point, and its loss and resampler
gradients are those of the same LLM with its 4-bit weights dequantized to bf16."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_module, three_step_overrides, write_caption_shards
from transformers import AutoTokenizer

from pipeline.config import load_config
from pipeline.model.anymal import build_anymal

ROOT = Path(__file__).resolve().parents[1]
NF4 = ["model.llm.quantization=nf4", "model.llm.dtype=bfloat16"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nf4_shards")
    write_caption_shards(root, n_shards=2, per_shard=16)
    return root


def train(overrides: list[str], resume: Path | None = None) -> None:
    args = ["--resume", str(resume)] if resume else ["--config", "configs/toy.yaml"]
    proc = run_module("pipeline.train", *args, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_stage1_trains_and_resumes_over_an_nf4_llm(tiny_models, shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = three_step_overrides(run_dir, tiny_models, shards, *NF4, "train.max_steps=4")
    train([*overrides, "train.stop_after_steps=2"])
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    train(["train.stop_after_steps=0"], resume=run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert (run_dir / "export" / "resampler.safetensors").is_file() and (run_dir / "FINISHED").is_file()
    assert "nf4 weights" in (run_dir / "logs" / "rank_00000.log").read_text()


def dequantized(llm):
    """A copy of `llm` whose 4-bit Linear layers are plain Linear layers holding the dequantized weights."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Linear4bit

    copied = copy.deepcopy(llm)
    for module in list(copied.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear4bit):
                weight = bnb_functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.data.to(torch.bfloat16), requires_grad=False)
                setattr(module, child_name, linear)
    assert not any(isinstance(m, Linear4bit) for m in copied.modules())
    return copied


def test_nf4_loss_and_gradients_match_the_dequantized_llm(tiny_models):
    """Both compute in bf16 from the same weights (the 4-bit kernel dequantizes to bf16 before its matmul), so they
    can differ only in the order of bf16 operations (on the CPU they agree exactly; GPU kernels may sum in another
    order): a relative 2e-2 bound on the loss and on each resampler gradient allows bf16's rounding (2^-8 = 4e-3)
    accumulated over the layers and the head, and is far below what a wrong weight or a dropped layer gives."""
    models = [f"model.vision.model={tiny_models}/clip", f"model.llm.model={tiny_models}/llm"]
    config = load_config(ROOT / "configs/toy.yaml", [*models, *NF4])
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(0)
    quantized = build_anymal(config.model, tokenizer, device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.llm.modules())
    plain = copy.copy(quantized)
    plain.llm = dequantized(quantized.llm)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 9, 5, 12])
    batch = {
        "pixel_values": torch.randn(4, 3, 64, 64, generator=generator),
        "caption_ids": torch.randint(0, 40, (int(lengths.sum()),), generator=generator),
        "caption_lengths": lengths,
    }
    results = []
    for model in (quantized, plain):
        model.resampler.zero_grad()
        loss, _ = model.caption_loss(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.resampler.named_parameters()}))
    (q_loss, q_grads), (p_loss, p_grads) = results
    worst = max(((q_grads[n] - g).norm() / g.norm()).item() for n, g in p_grads.items())
    print(f"nf4 against dequantized bf16: loss {q_loss:.6f} vs {p_loss:.6f}, worst gradient difference {worst:.2e}")
    assert abs(q_loss - p_loss) / p_loss < 2e-2, (q_loss, p_loss)
    assert worst < 2e-2
