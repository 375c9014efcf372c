"""Serve a model over an OpenAI-compatible API and a chat page: `python -m pipeline.serve MODEL --port 8000`.

    python -m pipeline.serve exports/toy-chat --host 127.0.0.1 --port 8000      # an exported HF directory
    python -m pipeline.serve runs/demo/stage2 --port 8000                         # a run: exported to a temp dir first
    python -m pipeline.serve runs/stage2_8b --merge --export-dir exports/8b-chat  # keep the export, LoRA merged

MODEL is a directory written by `python -m pipeline.export_hf`, or a finished run (or its export/), which is exported
first, so that the server always runs the model through transformers alone. Then open http://HOST:PORT/ to chat in
the browser, or call POST /v1/chat/completions with the `openai` client (base_url http://HOST:PORT/v1).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from pipeline.config import ConfigError


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="MODEL", help="an exported HF directory, or a finished run or its export/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests generated together at most")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for company")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="default and ceiling of max_tokens")
    parser.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    parser.add_argument("--allow-local-images", metavar="DIR", help="let image_url name files under DIR")
    parser.add_argument("--merge", action="store_true", help="a run: merge its LoRA adapter when exporting it")
    parser.add_argument("--export-dir", help="a run: write its HF export here and keep it (default: a temp dir)")
    return parser.parse_args(argv)


def is_hf_export(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "anymal"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = Path(args.model)
    with tempfile.TemporaryDirectory(prefix="anymal-serve-") as scratch:
        model_dir = source
        if not is_hf_export(source):
            from pipeline.export_hf import export

            model_dir = Path(args.export_dir) if args.export_dir else Path(scratch) / "model"
            try:
                export(source, model_dir, merge=args.merge)
            except (ConfigError, FileNotFoundError) as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
        serve(model_dir, args, args.model_name or source.resolve().name)
    return 0


def serve(model_dir: Path, args, model_name: str) -> None:
    import torch
    import uvicorn

    from pipeline.serve.api import ServerLimits, create_app
    from pipeline.serve.engine import Engine, load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load(str(model_dir), device, args.dtype)
    engine = Engine(model, processor, args.max_batch_size, args.batch_window_ms / 1000)
    limits = ServerLimits(
        max_new_tokens=args.max_new_tokens,
        max_image_bytes=args.max_image_bytes,
        local_image_dir=Path(args.allow_local_images).resolve() if args.allow_local_images else None,
    )
    engine.start()
    try:
        uvicorn.run(create_app(engine, model_name, limits), host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()


if __name__ == "__main__":
    sys.exit(main())
