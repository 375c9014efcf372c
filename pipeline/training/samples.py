"""What the model says about real images during training: a wandb table plus a JSONL and HTML report.

Rank 0 keeps a fixed set of held-out images (the first `logging.num_samples` valid records of the sample shards) and
captions them greedily every `logging.sample_every_steps`, in exactly the training format. Each round goes to
  <run_dir>/samples/step_XXXXXXXX.jsonl    key, reference and generated caption
  <run_dir>/samples/index.html             every round, newest first, images from samples/images/
  wandb                                    a table "samples" with the image, reference and generation
so users without wandb see the same thing.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import torch

from pipeline.data.captions import CaptionDecoder, collate_captions
from pipeline.data.shards import expand_shards, iter_shard_records
from pipeline.data.stream import SkipSample

log = logging.getLogger(__name__)
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def read_sample_records(shards: list[str], count: int) -> list[tuple[str, dict]]:
    """The first `count` records that have an image and a caption, in shard order."""
    records = []
    for shard in shards:
        try:
            for key, members in iter_shard_records(shard):
                if "txt" in members and any(ext in members for ext in IMAGE_MEMBERS):
                    records.append((key, members))
                    if len(records) == count:
                        return records
        except Exception as err:  # a bad sample shard must not stop training
            log.warning("sample shard %s unreadable (%s); using what was read", shard, err)
    return records


class SampleLogger:
    def __init__(self, config, model, run_dir: Path, metrics):
        self.config, self.model, self.metrics = config, model, metrics
        self.out_dir = run_dir / "samples"
        spec = config.logging.sample_shards or (config.data.val_shards if config.data.input == "images" else "")
        self.enabled = bool(spec) and config.logging.sample_every_steps > 0 and config.logging.num_samples > 0
        self.records: list[tuple[str, dict]] = []
        self.batch: dict | None = None
        self.references: list[str] = []
        if not self.enabled:
            return
        shards = expand_shards(spec, "logging.sample_shards")
        decoder = CaptionDecoder(config.model.vision.model, config.model.llm.model, config.model.max_caption_tokens)
        decoded = []
        for key, members in read_sample_records(shards, config.logging.num_samples):
            try:
                decoded.append(decoder(members, key))
                self.records.append((key, members))
            except SkipSample:
                continue
        if not decoded:
            log.warning("no usable sample images in %s; sample logging is off", spec)
            self.enabled = False
            return
        self.batch = collate_captions(decoded)
        self.references = [members["txt"].decode("utf-8", "replace").strip() for _, members in self.records]
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

    @torch.no_grad()
    def log_round(self, step: int, tokenizer) -> None:
        if not self.enabled:
            return
        self._vision()
        device = next(self.model.resampler.parameters()).device
        generated_ids = self.model.generate_captions({"pixel_values": self.batch["pixel_values"].to(device)})
        generated = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated_ids]
        rows = [
            {"step": step, "key": key, "image": f"images/{key}.{next(e for e in IMAGE_MEMBERS if e in members)}",
             "reference": reference, "generated": text}
            for (key, members), reference, text in zip(self.records, self.references, generated, strict=True)
        ]
        (self.out_dir / f"step_{step:08d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._write_html()
        if self.metrics.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", "key", "image", "reference", "generated"])
            for row in rows:
                table.add_data(step, row["key"], wandb.Image(str(self.out_dir / row["image"])), row["reference"],
                               row["generated"])
            self.metrics.wandb_run.log({"samples": table}, step=step)

    def _write_html(self) -> None:
        sections = []
        for path in sorted(self.out_dir.glob("step_*.jsonl"), reverse=True):
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            cells = "".join(
                f"<tr><td><img src='{html.escape(r['image'])}' width=96></td><td>{html.escape(r['key'])}</td>"
                f"<td>{html.escape(r['reference'])}</td><td>{html.escape(r['generated'])}</td></tr>"
                for r in rows
            )
            sections.append(f"<h2>step {rows[0]['step']}</h2><table border=1><tr><th>image</th><th>key</th>"
                            f"<th>reference</th><th>generated</th></tr>{cells}</table>")
        page = "<html><head><meta charset='utf-8'><title>samples</title></head><body>" + "".join(sections)
        (self.out_dir / "index.html").write_text(page + "</body></html>\n")
