"""Chat about an image with an instruction-tuned (stage 2) model: `python -m pipeline.chat RUN_OR_EXPORT --image IMG`.

    python -m pipeline.chat runs/demo/stage2 --image runs/demo/world/images/val/000000.jpg --question "what shape?"
    python -m pipeline.chat runs/stage2_8b/export --image photo.jpg          # multi-turn: one question per line

RUN_OR_EXPORT is a stage-2 run directory, its export/ or a merged directory (`python -m pipeline.merge`). The answer
streams to stdout as it is generated, greedily, and stops at any of the model's terminators (EOS, the family's
end-of-turn token such as <|eot_id|> or <|im_end|>, and its generation config's EOS ids) or --max-new-tokens. What you
type is text: special-token strings in it, such as "<|eot_id|>", are not control tokens. With --question the command
answers once and exits; without it, it reads questions from the terminal, keeps the conversation (the image stays in the
first turn) and ends on an empty line or end of input.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="RUN_OR_EXPORT", help="stage-2 run directory, its export/, or a merged dir")
    parser.add_argument("--image", required=True, help="the image to talk about")
    parser.add_argument("--question", help="ask this once and exit; without it, a multi-turn prompt opens")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--system-prompt", help="override the system prompt the model was trained with")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--quantization", choices=("none", "nf4"), help="base LLM weights (default: as in training)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from PIL import Image, UnidentifiedImageError

    from pipeline.inference.loading import read_manifest

    try:
        _, manifest = read_manifest(args.model)
        with Image.open(args.image) as image:
            image = image.convert("RGB")
    except (ConfigError, FileNotFoundError, UnidentifiedImageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import torch
    from transformers import TextStreamer

    from pipeline.data.captions import load_image_processor
    from pipeline.inference.answering import InstructAnswerer
    from pipeline.inference.loading import load_instruct

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, manifest = load_instruct(args.model, device, quantization=args.quantization)
    system_prompt = manifest["system_prompt"] if args.system_prompt is None else args.system_prompt
    answerer = InstructAnswerer(
        model,
        tokenizer,
        load_image_processor(manifest["vision_model"]),
        args.max_new_tokens,
        system_prompt,
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    turns: list[dict] = []
    interactive = args.question is None
    while True:
        question = args.question
        if interactive:
            try:
                question = input("> ").strip()
            except EOFError:
                question = ""
            if not question:
                return 0
        turns.append({"from": "human", "value": question})
        (answer,) = answerer.answer([image], [turns], streamer=streamer)
        turns.append({"from": "gpt", "value": answer})
        if not interactive:
            return 0


if __name__ == "__main__":
    sys.exit(main())
