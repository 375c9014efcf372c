"""What the model says about real images during training: a wandb table plus a JSONL and HTML report.

Rank 0 keeps a fixed set of held-out images (the first `logging.num_samples` valid records of the sample shards) and
every `logging.sample_every_steps`, in exactly the training format, captions them greedily (stage 1) or answers
the first question of their conversation (stage 2, the reference being the first answer). Each round goes to
  <run_dir>/samples/step_XXXXXXXX.jsonl    key, prompt (stage 2), reference and generated text
  <run_dir>/samples/index.html             every round, newest first, images from samples/images/
  <run_dir>/report.html                    the run report (pipeline.reporting), refreshed after each round
  wandb                                    a table "samples" with the image, reference and generation
so users without wandb see the same thing.
"""

from __future__ import annotations

import html
import io
import json
import logging
from pathlib import Path

import torch
from PIL import Image

from pipeline.data.captions import IMAGE_MEMBERS, CaptionDecoder, collate_captions
from pipeline.data.shards import expand_shards, iter_shard_records
from pipeline.data.skips import SkipSample
from pipeline.training.metrics import refresh_report

log = logging.getLogger(__name__)


def read_sample_records(shards: list[str], count: int, text_member: str = "txt") -> list[tuple[str, dict]]:
    """The first `count` records that have an image and a text member (caption or conversation), in shard order."""
    records = []
    for shard in shards:
        try:
            for key, members in iter_shard_records(shard):
                if text_member in members and any(ext in members for ext in IMAGE_MEMBERS):
                    records.append((key, members))
                    if len(records) == count:
                        return records
        except Exception as err:  # a bad sample shard must not stop training
            log.warning("sample shard %s unreadable (%s); using what was read", shard, err)
    return records


class SampleLogger:
    def __init__(self, config, model, run_dir: Path, metrics, tokenizer):
        self.config, self.model, self.metrics, self.tokenizer = config, model, metrics, tokenizer
        self.run_dir = Path(run_dir)
        self.out_dir = self.run_dir / "samples"
        spec = config.logging.sample_shards or (config.data.val_shards if config.data.input == "images" else "")
        self.enabled = bool(spec) and config.logging.sample_every_steps > 0 and config.logging.num_samples > 0
        self.records: list[tuple[str, dict]] = []
        self.batch: dict | None = None
        self.prompts: list[str] = []
        self.references: list[str] = []
        if not self.enabled:
            return
        shards = expand_shards(spec, "logging.sample_shards")
        if config.stage == 2:
            self._read_conversations(shards)
        else:
            self._read_captions(shards)
        if not self.records:
            log.warning("no usable sample images in %s; sample logging is off", spec)
            self.enabled = False
            return
        self.out_dir.joinpath("images").mkdir(parents=True, exist_ok=True)
        for key, members in self.records:
            ext = next(e for e in IMAGE_MEMBERS if e in members)
            self.out_dir.joinpath("images", f"{key}.{ext}").write_bytes(members[ext])

    def _vision(self):
        # Training from cached features does not load the tower; captioning images needs it, on rank 0 only.
        if self.model.vision is None:
            from pipeline.model.vision import load_vision_tower

            device = next(self.model.resampler.parameters()).device
            self.model.vision = load_vision_tower(self.config.model.vision).to(device)
        return self.model.vision

    def _read_captions(self, shards: list[str]) -> None:
        config = self.config
        decoder = CaptionDecoder(config.model.vision.model, config.model.llm.model, config.model.max_caption_tokens)
        decoded = []
        for key, members in read_sample_records(shards, config.logging.num_samples):
            try:
                decoded.append(decoder(members, key))
                self.records.append((key, members))
            except SkipSample:
                continue
        if decoded:
            self.batch = collate_captions(decoded)
        self.references = [members["txt"].decode("utf-8", "replace").strip() for _, members in self.records]
        self.prompts = [""] * len(self.records)

    def _read_conversations(self, shards: list[str]) -> None:
        for key, members in read_sample_records(shards, self.config.logging.num_samples, text_member="json"):
            try:
                turns = json.loads(members["json"])["conversations"]
                question, answer = turns[0]["value"], turns[1]["value"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            self.records.append((key, members))
            self.prompts.append(question.replace("<image>", "").strip())
            self.references.append(answer)

    @torch.no_grad()
    def _generate(self) -> list[str]:
        if self.config.stage == 1:
            device = next(self.model.resampler.parameters()).device
            generated_ids = self.model.generate_captions({"pixel_values": self.batch["pixel_values"].to(device)})
            return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated_ids]
        from pipeline.data.captions import load_image_processor
        from pipeline.inference.answering import InstructAnswerer

        answerer = InstructAnswerer(
            self.model,
            self.tokenizer,
            load_image_processor(self.config.model.vision.model),
            system_prompt=self.config.model.system_prompt,
        )
        images = []
        for _, members in self.records:
            with Image.open(io.BytesIO(members[next(e for e in IMAGE_MEMBERS if e in members)])) as image:
                images.append(image.convert("RGB"))
        with self.model.evaluating():  # no adapter dropout while answering
            return answerer(images, self.prompts)

    def log_round(self, step: int) -> None:
        if not self.enabled:
            return
        self._vision()
        generated = self._generate()
        rows = [
            {
                "step": step,
                "key": key,
                "image": f"images/{key}.{next(e for e in IMAGE_MEMBERS if e in members)}",
                "prompt": prompt,
                "reference": reference,
                "generated": text,
            }
            for (key, members), prompt, reference, text in zip(
                self.records, self.prompts, self.references, generated, strict=True
            )
        ]
        (self.out_dir / f"step_{step:08d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._write_html()
        if self.metrics.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", "key", "image", "prompt", "reference", "generated"])
            images = []
            for row in rows:
                path = str(self.out_dir / row["image"])
                table.add_data(step, row["key"], wandb.Image(path), row["prompt"], row["reference"], row["generated"])
                images.append(wandb.Image(path, caption=f"{row['key']}: {row['generated']} (ref: {row['reference']})"))
            # wandb keeps a table's images in an artifact outside the run directory; the image panel's media land
            # in <run>/files/media/images, so an offline run directory holds every sample it shows.
            self.metrics.wandb_run.log({"samples": table, "sample_images": images}, step=step)
        refresh_report(self.run_dir)

    def _write_html(self) -> None:
        sections = []
        for path in sorted(self.out_dir.glob("step_*.jsonl"), reverse=True):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            cells = "".join(
                f"<tr><td><img src='{html.escape(r['image'])}' width=96></td><td>{html.escape(r['key'])}</td>"
                f"<td>{html.escape(r.get('prompt', ''))}</td><td>{html.escape(r['reference'])}</td>"
                f"<td>{html.escape(r['generated'])}</td></tr>"
                for r in rows
            )
            sections.append(
                f"<h2>step {rows[0]['step']}</h2><table border=1><tr><th>image</th><th>key</th>"
                f"<th>prompt</th><th>reference</th><th>generated</th></tr>{cells}</table>"
            )
        page = "<html><head><meta charset='utf-8'><title>samples</title></head><body>" + "".join(sections)
        (self.out_dir / "index.html").write_text(page + "</body></html>\n")
