"""Export a trained model as a self-contained Hugging Face directory: `python -m pipeline.export_hf RUN --out DIR`.

    python -m pipeline.export_hf runs/demo/stage2 --out exports/toy-chat            # LoRA kept as a peft adapter
    python -m pipeline.export_hf runs/demo/stage2 --out exports/toy-chat --merge    # LoRA merged into the LLM
    python -m pipeline.export_hf runs/demo/stage1 --out exports/toy-captioner       # a stage-1 run: captions

RUN is a stage-1 run (or its export/), a stage-2 run (or its export/, or a `pipeline.merge` directory). DIR then
holds config.json with `auto_map`, the model's code (`pipeline/hf_export/`), the weights of the vision tower (cut
after the layer the resampler reads), the resampler and the LLM, the adapter in peft format unless merged,
generation_config.json (greedy, every terminator of the model), the tokenizer with its chat template, the tower's own
image processor (CLIP's, SigLIP's), processor_config.json (the prompt format: BOS or none, the chat template's
options, the system prompt) and a model card. The configs name the base models by the hub ids the run was trained
from; a base model loaded from a local directory is named by no path. Elsewhere, with only torch, transformers,
safetensors and pillow (and peft for an unmerged adapter):

    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    inputs = processor(images=image, text="what colour is the shape ?")
    answer = processor.decode_answers(model.generate(**inputs), inputs["input_ids"].shape[1])[0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import ConfigError

ADAPTER_DIR = "adapter"
CAPTION_MAX_NEW_TOKENS = 32  # what the pipeline's captioner generates by default
CHAT_MAX_NEW_TOKENS = 512  # pipeline.chat's default
AUTO_MAP = {
    "AutoConfig": "configuration_anymal.AnyMALConfig",
    "AutoModel": "modeling_anymal.AnyMALForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_anymal.AnyMALForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_anymal.AnyMALProcessor"}


@dataclass
class ExportSpec:
    """What the exported directory says about the model besides its weights."""

    task: str  # "chat" (stage 2) or "caption" (stage 1)
    image_token: str  # the string that marks the image's place in a rendered prompt; never tokenized
    stop_ids: list[int]
    bos_id: int | None  # None: the LLM has no BOS (Qwen), and captions start with the image
    pad_id: int
    vision_model: str  # the base models as the run's config names them: hub ids or local directories
    llm_model: str
    system_prompt: str = ""
    chat_template_options: dict = field(default_factory=dict)  # passed to the chat template, as in training
    card: dict = field(default_factory=dict)  # facts for the model card: source, stage, step, base models


def load_source(source: str | Path):
    """The pipeline's own model, tokenizer and image processor for `source`, and its `ExportSpec`.

    Every import of the pipeline's inference code is here, so the rest of this module deals only with modules and
    files. The stage-2 base LLM is loaded unquantized: the export holds plain weights (a QLoRA adapter was trained
    over NF4 weights; merged or not, the export computes with the unquantized base)."""
    from pipeline.data.captions import load_image_processor
    from pipeline.data.conversations import CHAT_TEMPLATE_OPTIONS, IMAGE_PLACEHOLDER
    from pipeline.inference.export import MANIFEST
    from pipeline.inference.loading import load_instruct, load_run

    source = Path(source)
    stage2 = any((candidate / MANIFEST).is_file() for candidate in (source, source / "export"))
    if stage2:
        model, tokenizer, manifest = load_instruct(source, "cpu", quantization="none")
        vision_model, system_prompt = manifest["vision_model"], manifest["system_prompt"]
        card = {
            "stage": 2,
            "step": manifest["step"],
            "vision_model": vision_model,
            "llm_model": manifest.get("base_llm_model", manifest["llm_model"]),
            "feature_layer": manifest["feature_layer"],
            "llm_quantization_in_training": manifest["llm_quantization_in_training"],
            "system_prompt": system_prompt,
        }
    else:
        run_dir = source.parent if source.name == "export" and not (source / "config.yaml").is_file() else source
        if not (run_dir / "export" / "resampler.json").is_file():
            raise ConfigError(
                f"{source} is neither a stage-2 run/export (manifest.json) nor a finished stage-1 run "
                "(config.yaml and export/resampler.json); point at a finished run"
            )
        model, tokenizer, config = load_run(run_dir, "cpu")
        meta = json.loads((run_dir / "export" / "resampler.json").read_text())
        vision_model, system_prompt = config.model.vision.model, ""
        card = {
            "stage": 1,
            "step": meta["step"],
            "vision_model": vision_model,
            "llm_model": config.model.llm.model,
            "feature_layer": config.model.vision.feature_layer,
        }
    card["source"] = str(source)
    spec = ExportSpec(
        task="chat" if stage2 else "caption",
        image_token=IMAGE_PLACEHOLDER,
        stop_ids=list(model.stop_ids),
        bos_id=model.bos_id,
        pad_id=model.pad_id,
        vision_model=card["vision_model"],
        llm_model=card["llm_model"],
        system_prompt=system_prompt,
        chat_template_options=dict(CHAT_TEMPLATE_OPTIONS),
        card=card,
    )
    return model, tokenizer, load_image_processor(vision_model), spec


def export(source: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """Write the HF directory of a trained run or export (see the module docstring)."""
    model, tokenizer, image_processor, spec = load_source(source)
    llm, adapter = model.llm, None
    if hasattr(llm, "peft_config"):  # an unmerged stage-2 adapter
        if merge:
            llm = llm.merge_and_unload()
        else:
            adapter = llm
            llm = llm.get_base_model()
    spec.card["merged"] = spec.task == "chat" and adapter is None
    tower = model.vision
    return write_hf_directory(
        out_dir,
        vision=tower.clip,
        vision_layers=tower.index,
        resampler=model.resampler,
        llm=llm,
        tokenizer=tokenizer,
        image_processor=image_processor,
        spec=spec,
        adapter=adapter,
    )


def write_hf_directory(
    out_dir: str | Path,
    *,
    vision,
    vision_layers: int,
    resampler,
    llm,
    tokenizer,
    image_processor,
    spec: ExportSpec,
    adapter=None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the directory from the parts: a CLIP or SigLIP vision model of which the first `vision_layers` layers
    are read, a resampler with the pipeline's parameter names and a `config` dict of its shape, a causal LM (the base
    model when `adapter`, a peft model over it, is given), the tokenizer and image processor. The parts' configs are
    renamed after the models the run was trained from (`published_name`) before anything is written.

    It is one function because it is a list of files written in order (weights, configs, tokenizer, processor,
    generation config, code, card), each a few lines that share the parts above."""
    from transformers import GenerationConfig

    from pipeline.hf_export import TEMPLATE_DIR, TEMPLATE_FILES
    from pipeline.hf_export.configuration_anymal import AnyMALConfig
    from pipeline.hf_export.modeling_anymal import AnyMALForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = llm.dtype
    # Loaded from local directories, the parts name those; the export names what they are (or nothing). The LLM's
    # own name also reaches the adapter's config and card, which peft writes from it.
    llm_name, vision_name = published_name(spec.llm_model), published_name(spec.vision_model)
    llm.config.name_or_path, llm.name_or_path = llm_name or "", llm_name or ""
    vision.config.name_or_path = vision_name or ""
    vision_config = vision.config.to_dict()
    vision_config["num_hidden_layers"] = vision_layers  # the layers after the feature layer are never read
    body = getattr(vision, "vision_model", vision)  # transformers 5 flattened some vision models, not all
    if hasattr(body, "use_head"):
        # SigLIP's pooling head reads the last layer, which the pipeline's tower drops along with the head; the
        # config says so in the key every release reads (older ones lack it in their defaults).
        vision_config["vision_use_head"] = bool(body.use_head)
    shape = resampler.config
    config = AnyMALConfig(
        vision_config=vision_config,
        text_config=llm.config.to_dict(),
        num_image_tokens=resampler.num_latents,
        resampler_depth=shape["depth"],
        resampler_heads=shape["heads"],
        resampler_head_dim=shape["head_dim"],
        resampler_width=shape["width"],
        resampler_ff_mult=shape["ff_mult"],
        image_token_id=image_token_id(llm),
        task=spec.task,
        adapter=ADAPTER_DIR if adapter is not None else None,
    )
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["AnyMALForConditionalGeneration"]
    config.dtype = dtype
    with torch.device("meta"):
        hf_model = AnyMALForConditionalGeneration(config)
    # The meta-device modules take the trained tensors themselves (assign): nothing is copied but dtype casts.
    parts = {"vision_tower": vision, "resampler": resampler, "language_model": llm}
    for name, module in parts.items():
        state = {key: value.to(dtype) for key, value in module.state_dict().items()}
        if name == "vision_tower":
            state = {key: value for key, value in state.items() if not _dropped_layer(key, vision_layers)}
        if name == "language_model":
            # An adapter's base model holds its LoRA layers; the base weights are their `base_layer`s.
            state = {key.replace(".base_layer.", "."): value for key, value in state.items() if "lora_" not in key}
        getattr(hf_model, name).load_state_dict(state, strict=True, assign=True)
    hf_model.generation_config = GenerationConfig(
        bos_token_id=spec.bos_id,
        eos_token_id=list(spec.stop_ids),
        pad_token_id=spec.pad_id,
        do_sample=False,
        max_new_tokens=CHAT_MAX_NEW_TOKENS if spec.task == "chat" else CAPTION_MAX_NEW_TOKENS,
    )
    hf_model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if adapter is not None:
        for adapter_config in adapter.peft_config.values():
            adapter_config.base_model_name_or_path = llm_name
        adapter.save_pretrained(out_dir / ADAPTER_DIR)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    processor_config = {
        "processor_class": "AnyMALProcessor",
        "auto_map": PROCESSOR_AUTO_MAP,
        "task": spec.task,
        "num_image_tokens": resampler.num_latents,
        "image_token": spec.image_token,
        "image_token_id": config.image_token_id,
        "bos_token_id": spec.bos_id,
        "stop_token_ids": list(spec.stop_ids),
        "chat_template_options": spec.chat_template_options,
        "system_prompt": spec.system_prompt,
    }
    (out_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    for name in TEMPLATE_FILES:
        shutil.copy2(TEMPLATE_DIR / name, out_dir / name)
    (out_dir / "README.md").write_text(model_card(spec, config, adapter is not None))
    return out_dir


def image_token_id(llm) -> int:
    """The id that stands for an image token in the export's `input_ids`: the first past the LLM's embedding rows,
    which no tokenizer of the model gives, so that no family needs an image token in its vocabulary."""
    return llm.get_input_embeddings().num_embeddings


def published_name(model: str | None) -> str | None:
    """`model` when it names a model anywhere (a hub id such as Qwen/Qwen3-8B), None when it is a local directory
    (it exists here, starts like a path or has more than one "/"), which means nothing on another machine."""
    if not model or Path(model).expanduser().exists():
        return None
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        return None
    return model


def _dropped_layer(key: str, kept_layers: int) -> bool:
    """Whether a vision state-dict key belongs to an encoder layer past the kept ones (none, for the pipeline's tower,
    which already dropped them; a full tower passed to `write_hf_directory` still has them)."""
    parts = key.split(".")
    if "layers" not in parts:
        return False
    index = parts.index("layers") + 1
    return index < len(parts) and parts[index].isdigit() and int(parts[index]) >= kept_layers


def model_card(spec: ExportSpec, config, unmerged_adapter: bool) -> str:
    """README.md of the export: what the model is, how it was trained and how to run it.

    Most of its length is the card's text itself, one template filled from the run's facts."""
    facts = spec.card
    stage = facts.get("stage")
    what = (
        "an instruction-tuned image chat model (stage 2: Perceiver Resampler and LoRA adapters trained on "
        "LLaVA-format conversations)"
        if spec.task == "chat"
        else "an image captioning model (stage 1: the Perceiver Resampler aligned on image-caption pairs)"
    )
    lora = (
        "The LoRA adapter is kept apart in `adapter/` (peft format) and put on the LLM at load time: install peft."
        if unmerged_adapter
        else ("The LoRA adapter is merged into the LLM weights." if spec.task == "chat" else "There is no adapter.")
    )
    example_inputs = (
        'processor(images=Image.open("photo.jpg"), text="What is in this image?")'
        if spec.task == "chat"
        else 'processor(images=Image.open("photo.jpg"))  # captions start from the image'
    )
    if spec.task == "chat":
        usage_note = (
            "A conversation is a list of messages: `text=[{'role': 'user', 'content': [{'type': 'image'}, "
            "{'type': 'text', 'text': '...'}]}, {'role': 'assistant', 'content': '...'}, ...]`. The image goes where "
            "it is marked, else at the start of the first user turn, as in training."
        )
        system = f"the system prompt `{spec.system_prompt}`" if spec.system_prompt else "no system prompt"
        options = ", ".join(f"`{key}={value}`" for key, value in spec.chat_template_options.items())
        format_note = (
            f"The tokenizer's chat template ({options or 'no options'}) with {system}; the image is "
            f"{config.num_image_tokens} image tokens at the start of the first user turn, followed by a newline, "
            "unless the conversation marks it with `<image>`. Message contents are tokenized as text: special-token "
            "strings in them are not control tokens."
        )
    else:
        usage_note = "Given `text`, the caption continues it."
        start = "BOS, then " if spec.bos_id is not None else "No BOS (the LLM has none): "
        format_note = f"{start}{config.num_image_tokens} image tokens, then the caption."
    lines = []
    for key, value in facts.items():
        if key == "source":
            continue
        if key in ("vision_model", "llm_model") and published_name(value) is None:
            lines.append(f"- {key}: a local checkpoint (`{Path(value).name}`)")  # its path means nothing elsewhere
        else:
            lines.append(f"- {key}: `{value}`")
    trained = "\n".join(lines)
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [anymal, perceiver-resampler, custom_code]
---

# AnyMAL image model ({spec.task})

This is {what}, exported from the AnyMAL image pipeline (stage {stage}). A frozen vision tower
(`{config.vision_config.model_type}`, {config.vision_config.num_hidden_layers} layers kept: the resampler reads the
last of them) feeds a Perceiver Resampler of {config.resampler_depth} blocks whose {config.num_image_tokens} output
tokens the LLM (`{config.text_config.model_type}`) reads in place of the image tokens of its prompt.
{lora}

## Training

{trained}

## Use

The model's code is in this directory, so load it with `trust_remote_code=True`. It needs torch, transformers,
safetensors, pillow{" and peft" if unmerged_adapter else ""}.

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("THIS_DIR", trust_remote_code=True)  # dtype=torch.bfloat16 too
processor = AutoProcessor.from_pretrained("THIS_DIR", trust_remote_code=True)
inputs = {example_inputs}
sequences = model.generate(**inputs)  # greedy, stops at every terminator: generation_config.json
print(processor.decode_answers(sequences, inputs["input_ids"].shape[1])[0])
```

{usage_note}

## Prompt format

{format_note}
Generation stops at any of the token ids {list(spec.stop_ids)}.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="RUN_OR_EXPORT", help="a finished stage-1 or stage-2 run, or its export/")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--merge", action="store_true", help="merge a stage-2 LoRA adapter into the LLM weights")
    args = parser.parse_args(argv)
    try:
        out = export(args.model, args.out, merge=args.merge)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Hugging Face model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
