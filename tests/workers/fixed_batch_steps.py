"""One rank of a short stage-1 run on a FIXED global batch sequence, for the update-equivalence test.

Usage (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test):
    python tests/workers/fixed_batch_steps.py MODEL_DIR OUT_PT MICRO GLOBAL STEPS

Every configuration sees the same global batches; only the split over ranks and micro batches differs. Rank r
takes micro-batch chunks r, r + W, r + 2W, ... of each global batch. Captions have different lengths, so any
per-micro-batch averaging of the loss would change the update.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.model.anymal import build_anymal  # noqa: E402
from pipeline.training.distributed import device_for, init_distributed  # noqa: E402
from pipeline.training.metrics import MetricsLogger  # noqa: E402
from pipeline.training.trainer import Trainer  # noqa: E402


def global_batches(steps: int, global_size: int, vocab: int, image_size: int, eos: int):
    generator = torch.Generator().manual_seed(7)
    for step in range(steps):
        lengths = torch.randint(2, 12, (global_size,), generator=generator)
        samples = []
        for i in range(global_size):
            ids = torch.randint(5, vocab, (int(lengths[i]),), generator=generator)
            ids[-1] = eos
            samples.append({"key": f"s{step}_{i}", "pixel_values": torch.randn(3, image_size, image_size,
                                                                                generator=generator),
                            "caption_ids": ids})
        yield samples


class FixedLoader:
    def __init__(self, batches, rank, world, micro):
        self.micro_batches = []
        for samples in batches:
            chunks = [samples[i : i + micro] for i in range(0, len(samples), micro)]
            for chunk in chunks[rank::world]:
                self.micro_batches.append({
                    "keys": [s["key"] for s in chunk],
                    "pixel_values": torch.stack([s["pixel_values"] for s in chunk]),
                    "caption_ids": torch.cat([s["caption_ids"] for s in chunk]),
                    "caption_lengths": torch.tensor([len(s["caption_ids"]) for s in chunk]),
                })

    def __iter__(self):
        return iter(self.micro_batches)

    def state_dict(self):
        return {}

    def skip_counts(self):
        return {}


def main():
    model_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    micro, global_size, steps = (int(a) for a in sys.argv[3:6])
    run_dir = out_path.parent / (out_path.stem + "_run")
    config = load_config(ROOT / "configs/toy.yaml", [
        f"run_dir={run_dir}", f"model.vision.model={model_dir}/clip", f"model.llm.model={model_dir}/llm",
        f"train.micro_batch_size={micro}", f"train.global_batch_size={global_size}", f"train.max_steps={steps}",
        "train.save_every_steps=1000", "train.log_every_steps=1", "optim.warmup_steps=1", "data.shuffle_buffer=0",
    ])
    dist_env = init_distributed("gloo")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.llm.model)
    torch.manual_seed(0)
    model = build_anymal(config.model, tokenizer)
    image_size = model.vision.clip.config.image_size
    batches = list(global_batches(steps, global_size, len(tokenizer), image_size, tokenizer.eos_token_id))
    trainer = Trainer(config, model, lambda state: FixedLoader(batches, dist_env.rank, dist_env.world_size, micro),
                      dist_env, device_for(dist_env))
    trainer.maybe_resume()
    losses, grad_norms, grads = [], [], []
    initial = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    engine_step = trainer.engine.step

    def step_recording_gradients():
        # The full averaged gradient, read at the accumulation boundary just before the optimizer consumes it.
        if trainer.engine.is_gradient_accumulation_boundary():
            from deepspeed.utils import safe_get_full_grad

            grads.append({n: safe_get_full_grad(p).detach().double().clone()
                          for n, p in trainer.engine.module.named_parameters()})
        engine_step()

    trainer.engine.step = step_recording_gradients

    class Recorder(MetricsLogger):
        def log(self, step, metrics, console=True):
            losses.append(metrics["loss"])
            grad_norms.append(metrics["grad_norm"])

    trainer.fit(Recorder(run_dir, False, None, {}))
    if dist_env.rank == 0:
        updates = {n: (p.detach() - initial[n]).double() for n, p in trainer.engine.module.named_parameters()}
        torch.save({"losses": losses, "grad_norms": grad_norms, "updates": updates, "grads": grads,
                    "accumulation": trainer.accumulation}, out_path)


if __name__ == "__main__":
    main()
