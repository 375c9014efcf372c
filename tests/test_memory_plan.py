"""The start-up memory plan: what it counts, how it moves with each setting, the one-line refusal of a run that would
not fit (naming the micro batch that would), the plan saved with a run that fits, the `pipeline.memory_plan`
command, and activation checkpointing of the frozen LLM, which must not change the loss or the gradients."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_module, three_step_overrides, write_caption_shards
from transformers import AutoTokenizer

from pipeline.config import load_config
from pipeline.model.reference import llama3_8b_config
from pipeline.training.memory import GIB, HEADROOM, MemoryPlanner, saved_bytes, trace_llm_layer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan_shards")
    write_caption_shards(root, n_shards=2, per_shard=16)
    return root


def toy_config(tiny_models, shards, tmp_path, *extra):
    overrides = three_step_overrides(tmp_path / "run", tiny_models, shards, "train.global_batch_size=16", *extra)
    return load_config("configs/toy.yaml", overrides)


def planner_for(config, budget=None, world_size=1):
    return MemoryPlanner(config, AutoTokenizer.from_pretrained(config.model.llm.model), world_size, budget)


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return run_module("pipeline.train", "--config", "configs/toy.yaml", *args)


def test_the_meta_trace_counts_what_a_real_layer_saves():
    """On the CPU, one LLaMA-3-8B-shaped layer's trace matches the closed form of what autograd keeps per token with
    frozen weights: no Linear input (the weights need no gradient), but norms, attention and MLP activations."""
    traced = trace_llm_layer(llama3_8b_config(), None, training=False)
    hidden, kv, inner = 4096, 1024, 14336
    # Tensors that must be kept, in bf16 unless stated: the two norms' inputs and fp32 rsqrt (per token 1 value
    # each), query/key/value/output for the attention kernel and its fp32 log-sum-exp (32 heads), the gate and up
    # projections' outputs and the SiLU's output.
    lower_bound = 2 * (2 * hidden) + 2 * (hidden + 2 * kv + hidden) + 3 * (2 * inner)
    assert lower_bound <= traced.bytes_per_token <= 1.5 * lower_bound
    assert traced.linear_weights == 4 * hidden * hidden // 4 * 2 + 2 * hidden * kv + 3 * hidden * inner
    assert traced.adapter_parameters == 0
    assert saved_bytes(lambda: None) == 0


def test_plan_moves_with_each_setting(tiny_models, shards, tmp_path):
    """More micro batch, more memory; NF4 shrinks the LLM's weights; checkpointing shrinks the LLM's activations;
    ZeRO-2's split of fp32 state over more ranks shrinks the trainable state."""
    base = planner_for(toy_config(tiny_models, shards, tmp_path))
    plans = [base.plan(micro) for micro in (1, 4, 16)]
    assert plans[0].peak_gib < plans[1].peak_gib < plans[2].peak_gib
    assert plans[1].lengths_from.startswith("lengths of 16 samples of 00000.tar")
    # Toy captions: BOS + the 8 image latents + the caption and EOS.
    assert 1 + 8 + 2 <= plans[0].tokens_per_micro_batch <= 1 + 8 + 16
    nf4 = planner_for(toy_config(tiny_models, shards, tmp_path, "model.llm.quantization=nf4")).plan(4)
    assert nf4.parts_gib["LLM weights"] < plans[1].parts_gib["LLM weights"]
    ckpt = planner_for(toy_config(tiny_models, shards, tmp_path, "model.llm.activation_checkpointing=true")).plan(16)
    assert ckpt.parts_gib["LLM activations"] < plans[2].parts_gib["LLM activations"]
    eight = planner_for(toy_config(tiny_models, shards, tmp_path), world_size=8).plan(4)
    assert eight.parts_gib["trainable state"] < plans[1].parts_gib["trainable state"]


def test_largest_fitting_micro_batch_divides_the_global_batch(tiny_models, shards, tmp_path):
    config = toy_config(tiny_models, shards, tmp_path, "train.micro_batch_size=16")
    free = planner_for(config)
    budget = (free.plan(4).peak_gib + free.plan(8).peak_gib) / 2 / HEADROOM
    planner = planner_for(config, budget=budget)
    assert planner.largest_fitting_micro_batch() == 4
    assert planner_for(config, budget=free.plan(1).peak_gib / 2).largest_fitting_micro_batch() is None


def test_a_run_that_will_not_fit_stops_at_start_up_naming_the_micro_batch(tiny_models, shards, tmp_path):
    """train.gpu_memory_gib below the plan: exit 2, one line, nothing trained; with memory_check off it runs."""
    config = toy_config(tiny_models, shards, tmp_path, "train.micro_batch_size=16")
    free = planner_for(config)
    budget = (free.plan(4).peak_gib + free.plan(8).peak_gib) / 2 / HEADROOM
    overrides = three_step_overrides(
        tmp_path / "run", tiny_models, shards, "train.global_batch_size=16", "train.micro_batch_size=16"
    )
    proc = run_train([*overrides, f"train.gpu_memory_gib={budget!r}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.micro_batch_size=16 needs ~"), lines
    assert "use train.micro_batch_size=4 (accumulation 4, same global batch)" in lines[0]
    assert "model.llm.quantization=nf4 and model.llm.activation_checkpointing=true" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_that_fits_logs_and_saves_its_plan(tiny_models, shards, tmp_path):
    """A budget the plan fits: the run trains, logs the plan's line and saves it as memory_plan.json."""
    overrides = three_step_overrides(tmp_path / "run", tiny_models, shards, "train.max_steps=1")
    proc = run_train([*overrides, "train.gpu_memory_gib=64"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = json.loads((tmp_path / "run" / "memory_plan.json").read_text())
    assert plan["fits"] and plan["budget_gib"] == 64 and plan["micro_batch_size"] == 4
    assert 1 < plan["peak_gib"] < 1.1  # the fixed allowance, and little else for models this small
    assert "memory plan: peak ~" in proc.stdout


def test_memory_plan_command_tables_micro_batches(tiny_models, shards, tmp_path):
    overrides = three_step_overrides(tmp_path / "run", tiny_models, shards, "train.global_batch_size=16")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.memory_plan", "--config", "configs/toy.yaml", "--gpu-memory-gib", "1e-4"]
        + overrides,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # the configured micro batch does not fit 100 KiB
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [int(row[0]) for row in rows] == [1, 2, 4, 8, 16]
    assert [int(row[1]) for row in rows] == [16, 8, 4, 2, 1]
    assert {row[-1] for row in rows} == {"no"}
    assert proc.stdout.startswith("memory plan: peak ~") and "(over 92% of 0.0 GiB)" in proc.stdout


def test_activation_checkpointing_keeps_loss_and_gradients(tiny_models, shards, tmp_path):
    """The caption loss and the resampler's gradients of the same model with and without recomputing each decoder
    layer in the backward: the same operations run on the same inputs, so they agree to float32 rounding."""
    from pipeline.data.loaders import caption_decoder
    from pipeline.model.anymal import build_anymal
    from pipeline.model.llm import checkpoint_layers

    config = toy_config(tiny_models, shards, tmp_path, "model.llm.dtype=float32", "model.vision.dtype=float32")
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(0)
    model = build_anymal(config.model, tokenizer)
    model.freeze_for_stage1()
    decoder = caption_decoder(config)
    from pipeline.data.captions import collate_captions
    from pipeline.data.shards import iter_shard_records

    samples = [decoder(members, key) for key, members in list(iter_shard_records(str(shards / "00000.tar")))[:4]]
    batch = collate_captions(samples)

    def loss_and_grads():
        model.resampler.zero_grad(set_to_none=True)
        loss, _ = model.caption_loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.resampler.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    checkpoint_layers(model.llm)
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert torch.allclose(plain_loss, ckpt_loss, rtol=1e-6)
    for plain, ckpt in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(plain, ckpt, rtol=1e-5, atol=1e-7)
    assert GIB == 2**30


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict:
    from families import build_family_models

    return build_family_models(tmp_path_factory.mktemp("plan_family_models"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("stage", [1, 2])
def test_every_supported_family_is_planned(family_models, shards, tmp_path, family, stage):
    """The trace runs whatever decoder transformers builds for the family (Qwen3's q/k norms, Mistral's window)
    behind a SigLIP tower; stage 2 counts the LoRA adapters on every projection as trainable state."""
    from pipeline.model.anymal import build_resampler

    config = load_config(
        "configs/toy.yaml",
        [
            f"run_dir={tmp_path}/run",
            f"stage={stage}",
            f"model.llm.model={family_models[family]}",
            f"model.vision.model={family_models['siglip']}",
            f"data.sources=[{{shards: '{shards}/*.tar'}}]",
            "data.val_shards=",
        ],
    )
    planner = planner_for(config)
    plan = planner.plan(4)
    assert plan.parts_gib["LLM activations"] > 0 and plan.parts_gib["LLM weights"] > 0
    assert planner.shapes.layer_bytes_per_token > 0
    resampler = build_resampler(config.model, 96, planner.shapes.hidden)
    adapters = planner.shapes.trainable_parameters - sum(p.numel() for p in resampler.parameters())
    assert (adapters > 0) == (stage == 2)


def test_a_damaged_first_shard_plans_from_the_samples_before_the_damage(tiny_models, shards, tmp_path):
    """A tar cut short: the plan keeps the lengths it read (as the loader keeps the records before the damage)."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    data = (shards / "00000.tar").read_bytes()
    (damaged / "00000.tar").write_bytes(data[: len(data) // 2 + 100])
    config = load_config(
        "configs/toy.yaml", three_step_overrides(tmp_path / "run", tiny_models, damaged, "train.global_batch_size=16")
    )
    plan = planner_for(config).plan(4)
    assert plan.lengths_from.startswith("lengths of ") and not plan.lengths_from.startswith("lengths of 16 ")


def test_unknown_data_lengths_only_warn(tiny_models, tmp_path, caplog):
    """Shards that cannot be read where the run starts: the plan assumes the longest samples, says so, and lets the run
    go on however small the budget, instead of refusing runs that may well fit."""
    from pipeline.training.memory import LENGTHS_UNKNOWN, check_memory

    overrides = three_step_overrides(
        tmp_path / "run", tiny_models, tmp_path, "train.gpu_memory_gib=1e-6", "train.distributed_backend=gloo"
    )
    overrides = [o for o in overrides if not o.startswith("data.sources")]
    config = load_config("configs/toy.yaml", [*overrides, "data.sources=[{shards: 'pipe:exit 1'}]"])
    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    with caplog.at_level("WARNING"):
        plan = check_memory(config, tokenizer, world_size=1, local_rank=0)
    assert not plan.fits and plan.lengths_from.startswith(LENGTHS_UNKNOWN)
    assert "the data's lengths are unknown, so the run goes on" in caplog.text
