"""One rank of a short stage-1 or stage-2 run on a FIXED global batch sequence, for the update-equivalence tests.

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test):
    python tests/workers/fixed_batch_steps.py MODEL_DIR OUT_PT MICRO GLOBAL STEPS [STAGE]

Stage 2 trains the resampler and LoRA adapters (dropout 0, B initialised at random so that A gets gradients from
the first step) on conversations whose labels cover only some tokens and whose image sits at varying offsets.

Every configuration sees the same global batches; only the split over ranks and micro batches differs. Rank r
takes micro-batch chunks r, r + W, r + 2W, ... of each global batch. Captions have different lengths, so any
per-micro-batch averaging of the loss would change the update.
"""

import sys
from pathlib import Path

import torch

from pipeline.common.labels import IGNORE_INDEX
from pipeline.config import load_config
from pipeline.model.anymal import build_anymal
from pipeline.training.distributed import device_for, init_distributed
from pipeline.training.metrics import MetricsLogger
from pipeline.training.stages import stage_for
from pipeline.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def global_batches(steps: int, global_size: int, vocab: int, image_size: int, eos: int):
    generator = torch.Generator().manual_seed(7)
    for step in range(steps):
        lengths = torch.randint(2, 12, (global_size,), generator=generator)
        samples = []
        for i in range(global_size):
            ids = torch.randint(5, vocab, (int(lengths[i]),), generator=generator)
            ids[-1] = eos
            samples.append(
                {
                    "key": f"s{step}_{i}",
                    "pixel_values": torch.randn(3, image_size, image_size, generator=generator),
                    "caption_ids": ids,
                }
            )
        yield samples


def conversation_batches(steps: int, global_size: int, vocab: int, image_size: int, bos: int):
    """Texts of BOS + random tokens, about a third of them supervised, the image after token 1, 2 or 3."""
    generator = torch.Generator().manual_seed(8)
    for step in range(steps):
        samples = []
        for i in range(global_size):
            length = int(torch.randint(6, 20, (1,), generator=generator))
            ids = torch.randint(5, vocab, (length,), generator=generator)
            ids[0] = bos
            supervised = torch.rand(length, generator=generator) < 0.35
            supervised[0], supervised[-1] = False, True
            samples.append(
                {
                    "key": f"s{step}_{i}",
                    "pixel_values": torch.randn(3, image_size, image_size, generator=generator),
                    "text_ids": ids,
                    "text_labels": ids.masked_fill(~supervised, IGNORE_INDEX),
                    "image_offset": int(torch.randint(1, 4, (1,), generator=generator)),
                }
            )
        yield samples


class FixedLoader:
    def __init__(self, batches, rank, world, micro, collate):
        self.micro_batches = []
        for samples in batches:
            chunks = [samples[i : i + micro] for i in range(0, len(samples), micro)]
            self.micro_batches += [collate(chunk) for chunk in chunks[rank::world]]

    def __iter__(self):
        return iter(self.micro_batches)

    def state_dict(self):
        return {}

    def skip_counts(self):
        return {}


def main():
    model_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    micro, global_size, steps = (int(a) for a in sys.argv[3:6])
    stage = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    run_dir = out_path.parent / (out_path.stem + "_run")
    stage2 = ["stage=2", "model.lora.r=4", "model.lora.dropout=0.0", "model.stage1_resampler="] if stage == 2 else []
    config = load_config(
        ROOT / ("configs/toy_stage2.yaml" if stage == 2 else "configs/toy.yaml"),
        [
            *stage2,
            f"run_dir={run_dir}",
            f"model.vision.model={model_dir}/clip",
            f"model.llm.model={model_dir}/llm",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={global_size}",
            f"train.max_steps={steps}",
            "train.save_every_steps=1000",
            "train.log_every_steps=1",
            "optim.warmup_steps=1",
            "data.shuffle_buffer=0",
            "optim.weight_decay=0.0",
            "train.eval_every_steps=0",
            # AdamW divides each element by its own gradient magnitude; with the default eps (1e-8) an element whose
            # gradient is ~1e-8 turns 1e-7 fp32 noise into a visible change of its update. eps 1e-3 keeps the same code
            # path well-conditioned. And an update is the difference of fp32 parameters of magnitude ~1, exact only to
            # ~1e-7: a step of lr 0.1 keeps that rounding below 1e-5 of the update, so updates compare element-wise.
            "optim.eps=1e-3",
            "optim.lr=0.1",
        ],
    )
    dist_env = init_distributed("gloo")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(0)
    model = build_anymal(config.model, tokenizer)
    image_size = model.vision.clip.config.image_size
    stage_parts = stage_for(model, config)
    if stage == 2:
        from pipeline.data.conversations import collate_conversations

        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        batches = list(conversation_batches(steps, global_size, len(tokenizer), image_size, tokenizer.bos_token_id))
        collate = collate_conversations
    else:
        from pipeline.data.captions import collate_captions

        batches = list(global_batches(steps, global_size, len(tokenizer), image_size, tokenizer.eos_token_id))
        collate = collate_captions
    trainer = Trainer(
        config,
        stage_parts,
        lambda state: FixedLoader(batches, dist_env.rank, dist_env.world_size, micro, collate),
        dist_env,
        device_for(dist_env),
    )
    trainer.maybe_resume()
    losses, grad_norms, grads = [], [], []
    initial = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    engine_step = trainer.engine.step

    def step_recording_gradients():
        # The full averaged gradient, read at the accumulation boundary just before the optimizer consumes it.
        if trainer.engine.is_gradient_accumulation_boundary():
            from deepspeed.utils import safe_get_full_grad

            grads.append(
                {
                    n: safe_get_full_grad(p).detach().double().clone()
                    for n, p in trainer.engine.module.named_parameters()
                }
            )
        engine_step()

    trainer.engine.step = step_recording_gradients

    class Recorder(MetricsLogger):
        def log(self, step, metrics, console=True):
            losses.append(metrics["loss"])
            grad_norms.append(metrics["grad_norm"])

    trainer.fit(Recorder(run_dir, False, None, {}))
    if dist_env.rank == 0:
        updates = {n: (p.detach() - initial[n]).double() for n, p in trainer.engine.module.named_parameters()}
        torch.save(
            {
                "losses": losses,
                "grad_norms": grad_norms,
                "updates": updates,
                "grads": grads,
                "accumulation": trainer.accumulation,
            },
            out_path,
        )


if __name__ == "__main__":
    main()
