"""Each shipped config on one GPU through the real entry points: its throughput and peak memory, as a user runs it.

    python benchmarks/card_configs.py --out $OUT/card_configs_h200.json --copy-logs

in one device call on one H200, with .venv/llama3_tokenizer carried (the tokenizer files); `--budget-s` (default
540 s) bounds the whole script, so that a 10-minute call keeps room for installing wheels before it, and
`--copy-logs` puts each run's log beside the JSON, where the call brings it back.

Unlike the step benchmarks (`stage1_throughput.py`, `stage2_throughput.py`), which time the step in one process on
cached features, this runs `python -m pipeline.train` / `python -m pipeline.train_stage2` as subprocesses, so every
run includes what a real one has: the config file as shipped, preflight, the image loader workers decoding JPEGs, the
frozen CLIP tower, DeepSpeed, the start-up memory plan and `train.gpu_memory_gib`'s cap. What it builds once under
`--work` (default /tmp/cards) and reuses when present:

- models/: a random-weight CLIP ViT-L/14 vision tower (`CLIPVisionModel`, bf16) with the real ViT-L/14
  preprocessing at 224 px, and a random-weight LLaMA-3-8B (`pipeline.model.reference`'s published configs), built on
  the GPU in bf16 and saved with `save_pretrained` (safetensors, ~1 GB shards, so the host never holds more than one),
  with the LLaMA-3 tokenizer files (`--tokenizer`, default .venv/llama3_tokenizer) given Llama-3-8B-Instruct's EOS
  (<|eot_id|>) and chat template;
- shards/stage1: img2dataset-layout image-caption shards (KEY.jpg, KEY.txt, KEY.json): random smooth 256 px JPEGs
  (~21 KB) and LAION-like captions of random words from the tokenizer's vocabulary, log-normal in length (mean ~12
  words, ~18 LLaMA-3 tokens with EOS); 16 shards x 1000;
- shards/stage2: LLaVA-Instruct-like conversations (1-4 turns, a human question then an answer of 20-120 words;
  ~180 text tokens through the chat template, plus the 64 image tokens) about such images, written as a LLaVA JSON
  plus an image folder and converted by `pipeline.prep.instruct_shards` (what data_prep/llava_to_shards.sh runs);
  16 shards x 500.
The result's "build" records the data's measured lengths and how long building took.

Runs (`--runs`, in order; a name below, or NAME=CONFIG[@GIB] for another config; the config's `stage` picks the
entry point):
  stage1-recipe   configs/stage1_8b.yaml         no memory cap
  stage1-24gb     configs/stage1_8b_24gb.yaml    capped by the config's own train.gpu_memory_gib (a 24 GB card's)
  stage2-recipe   configs/stage2_8b.yaml         no memory cap
  stage2-24gb     configs/stage2_8b_24gb.yaml    capped likewise
NAME=CONFIG@GIB sets train.gpu_memory_gib=GIB for that run.
Each run keeps its config's micro batch and trains `--steps` steps of a smaller global batch (`--global-batch-stage1`,
`--global-batch-stage2`, rounded up to a multiple of the micro batch), logging every step, with no validation,
samples, wandb or checkpoint before the last step; stage 2 starts from a fresh resampler (model.stage1_resampler="").
`--set [NAME:]KEY=VALUE` adds an override to every run or to one. Each run gets a fresh run directory under runs/ and
a wall-clock limit (`--timeout-per-run`, and what is left of `--budget-s`, counted from the script's start); its
output goes to logs/NAME.log.

Reported per run, from its metrics.jsonl with the first `--warmup-logged-steps` logged steps dropped (compilation):
mean samples/s, tokens/s (LLM tokens), MFU and data-wait fraction, the highest peak_mem_gb (torch's peak allocated
memory, GiB), the loss of every step, the start-up memory estimate (run_dir/memory_plan.json and the log's memory
line) and, for a run that failed or ran out of time, its exit code and the end of its log. The JSON (`--out`) is
rewritten after every run, so a call cut short keeps the finished runs.

`--smoke` runs the same flow on the CPU with a 2-layer LLaMA and a 2-layer CLIP of the same configs (same tokenizer,
same preprocessing) saved and loaded by path: gloo, SDPA, no compiled layers, micro batch 2, 3 steps, one loader
worker. It checks the script before spending GPU time; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STARTED = time.monotonic()  # --budget-s counts from here: the heavy imports below are part of the call's time
# Run as a script, whether or not the package is installed; the entry points run in ROOT, where it is importable.
sys.path.insert(0, str(ROOT))

from pipeline.common.labels import IGNORE_INDEX  # noqa: E402
from pipeline.config import ConfigError, TrainConfig, load_config  # noqa: E402
from pipeline.data.conversations import chat_messages, encode_conversation  # noqa: E402
from pipeline.model.reference import clip_vit_l14_config, llama3_8b_config  # noqa: E402
from pipeline.prep.instruct_shards import convert  # noqa: E402


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One measured run: a config file, optionally capped at a GPU memory size, plus its own overrides."""

    config: str
    gpu_memory_gib: float | None = None
    overrides: tuple[str, ...] = ()


# The 24 GB configs name their own train.gpu_memory_gib (a 24 GB card less its CUDA context), which caps those runs.
DEFAULT_RUNS = {
    "stage1-recipe": RunSpec("configs/stage1_8b.yaml"),
    "stage1-24gb": RunSpec("configs/stage1_8b_24gb.yaml"),
    "stage2-recipe": RunSpec("configs/stage2_8b.yaml"),
    "stage2-24gb": RunSpec("configs/stage2_8b_24gb.yaml"),
}

# --smoke: the same configs made CPU-sized. Every other setting (quantization, activation checkpointing, LoRA, the
# DeepSpeed JSON) stays as the config has it.
SMOKE_OVERRIDES = (
    "train.distributed_backend=gloo",
    "model.llm.compile_layers=false",
    "model.llm.attn_implementation=sdpa",
    "train.micro_batch_size=2",
    "data.num_workers=1",
    "data.shuffle_buffer=16",
    "model.resampler.num_latents=8",
    "model.resampler.depth=2",
    "model.max_sequence_tokens=512",
)
SMOKE_LLM = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
SMOKE_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=32)

# Meta-Llama-3-8B-Instruct ends a turn (and so a caption) with <|eot_id|>; the packaged tokenizer files are the base
# model's, whose EOS is <|end_of_text|> and which have no chat template.
INSTRUCT_EOS = "<|eot_id|>"
IMAGE_SIDE_PX = 256
CAPTION_WORDS_MEAN, CAPTION_WORDS_SIGMA = 12.0, 0.6
# LLaVA-Instruct-150K's three kinds: (share, turns, mean answer words). Multi-turn conversations (58K) with shorter
# answers, detailed descriptions (23K) and complex reasoning (77K) in one turn. Answers are log-normal, clipped to
# ANSWER_WORDS.
LLAVA_KINDS = {"conversation": (0.37, (2, 4), 50.0), "detail": (0.15, (1, 1), 100.0), "reasoning": (0.48, (1, 1), 90.0)}
ANSWER_WORDS, ANSWER_WORDS_SIGMA = (20, 120), 0.4


# -- synthetic text and images ----------------------------------------------------------------------------------------


def vocabulary_words(tokenizer) -> list[str]:
    """Lower-case words of 3-12 letters that the tokenizer has as one space-prefixed token: real words, mostly
    English (capitals, punctuation and numbers then bring a caption to LAION's ~1.5 tokens per word)."""
    return sorted({token[1:] for token in tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,12}", token)})


def log_normal_count(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma))))


def laion_caption(rng: random.Random, words: list[str]) -> str:
    """Alt-text-like: title-cased words here and there, commas, separators and numbers, as LAION's captions have."""
    out = []
    for _ in range(log_normal_count(rng, CAPTION_WORDS_MEAN, CAPTION_WORDS_SIGMA, 1, 60)):
        word = rng.choice(words)
        out.append(word.capitalize() if rng.random() < 0.35 else word)
        draw = rng.random()
        if draw < 0.06:
            out[-1] += ","
        elif draw < 0.09:
            out.append(rng.choice(("-", "|", "&")))
        elif draw < 0.12:
            out.append(str(rng.randint(1, 2024)))
    return " ".join(out)


def prose(rng: random.Random, words: list[str], count: int, end: str = ".") -> str:
    """`count` words as sentences of 6-20 words."""
    sentences, left = [], count
    while left > 0:
        length = min(left, rng.randint(6, 20))
        chosen = [rng.choice(words) for _ in range(length)]
        for index in range(1, length - 1):
            if rng.random() < 0.07:
                chosen[index] += ","
        sentences.append(" ".join(chosen).capitalize() + end)
        left -= length
    return " ".join(sentences)


def llava_conversation(rng: random.Random, words: list[str]) -> list[dict]:
    """LLaVA turns: human questions of 5-15 words, the first with the image, and answers of 20-120 words."""
    kinds = list(LLAVA_KINDS.values())
    _, (fewest, most), answer_mean = rng.choices(kinds, [share for share, _, _ in kinds])[0]
    turns = []
    for turn in range(rng.randint(fewest, most)):
        question = prose(rng, words, rng.randint(5, 15), end="?")
        if turn == 0:  # LLaVA puts the image before or after the first question
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        answer = prose(rng, words, log_normal_count(rng, answer_mean, ANSWER_WORDS_SIGMA, *ANSWER_WORDS))
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return turns


def random_jpeg(rng: np.random.Generator, side: int = IMAGE_SIDE_PX) -> bytes:
    """Smooth colour fields with film grain: JPEGs of a photo's size (~21 KB at 256 px), not of noise's (~100 KB)."""
    cells = int(rng.integers(2, 9))
    coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.integers(-10, 11, (side, side, 1), dtype=np.int16), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_caption_shard(path: Path, shard: int, per_shard: int, words: list[str], seed: int) -> None:
    """One img2dataset shard: KEY.jpg, KEY.txt (the caption) and KEY.json (img2dataset's metadata), renamed into
    place when complete."""
    text_rng, pixel_rng = random.Random(f"{seed}/{shard}"), np.random.default_rng([seed, shard])
    partial = path.with_name(f".{path.name}.tmp")
    with tarfile.open(partial, "w") as tar:
        for index in range(per_shard):
            key = f"{shard:05d}{index:04d}"
            caption = laion_caption(text_rng, words)
            metadata = {
                "url": f"https://synthetic.invalid/{key}.jpg",
                "caption": caption,
                "key": key,
                "status": "success",
                "error_message": None,
                "width": IMAGE_SIDE_PX,
                "height": IMAGE_SIDE_PX,
                "original_width": IMAGE_SIDE_PX,
                "original_height": IMAGE_SIDE_PX,
            }
            members = {"jpg": random_jpeg(pixel_rng), "txt": caption.encode(), "json": json.dumps(metadata).encode()}
            for extension, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    os.replace(partial, path)


def write_images(folder: Path, names: list[str], seed: int) -> None:
    pixel_rng = np.random.default_rng([seed, int(names[0].split(".")[0])])
    for name in names:
        (folder / name).write_bytes(random_jpeg(pixel_rng))


# -- what is built once -----------------------------------------------------------------------------------------------


def find_tokenizer(path: Path) -> Path:
    """The folder holding tokenizer.json: `path` itself or the first one below it (a pip --target install)."""
    if (path / "tokenizer.json").is_file():
        return path
    found = sorted(path.rglob("tokenizer.json")) if path.is_dir() else []
    if not found:
        raise SystemExit(f"error: no tokenizer.json in or under --tokenizer {path}; run `make setup` or give the path")
    return found[0].parent


def instruct_tokenizer(source: Path):
    """The LLaMA-3 tokenizer as Meta-Llama-3-8B-Instruct ships it: EOS <|eot_id|> and the Instruct chat template."""
    from transformers import AutoTokenizer

    from pipeline.toy.models import LLAMA3_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(find_tokenizer(source))
    tokenizer.eos_token = INSTRUCT_EOS
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def is_built(folder: Path, recipe: dict) -> bool:
    marker = folder / "BUILT.json"
    return marker.is_file() and json.loads(marker.read_text()) == recipe


def mark_built(folder: Path, recipe: dict) -> None:
    """Written last: a folder without it (an interrupted build) is built again."""
    (folder / "BUILT.json").write_text(json.dumps(recipe, indent=2) + "\n")


def build_data(data_dir: Path, tokenizer, args) -> dict:
    """Both stages' shards, reused when built with the same counts; returns what was built and the data's lengths in
    tokens as training encodes them. Runs before anything touches CUDA: the writers are forked processes."""
    recipe = {
        "stage1": {"shards": args.stage1_shards, "per_shard": args.stage1_per_shard},
        "stage2": {"shards": args.stage2_shards, "per_shard": args.stage2_per_shard},
        "seed": args.seed,
    }
    words = vocabulary_words(tokenizer)
    started = time.monotonic()
    reused = is_built(data_dir, recipe) and not args.rebuild
    if not reused:
        shutil.rmtree(data_dir, ignore_errors=True)
        stage1_dir, stage2_dir, llava_dir = data_dir / "stage1", data_dir / "stage2", data_dir / "llava"
        for folder in (stage1_dir, stage2_dir, llava_dir / "images"):
            folder.mkdir(parents=True)
        rng = random.Random(f"{args.seed}/llava")
        records = [
            {"id": f"{index:012d}", "image": f"{index:012d}.jpg", "conversations": llava_conversation(rng, words)}
            for index in range(args.stage2_shards * args.stage2_per_shard)
        ]
        (llava_dir / "llava_synthetic.json").write_text(json.dumps(records))
        names = [record["image"] for record in records]
        workers = min(16, os.cpu_count() or 1)
        per_job = math.ceil(len(names) / workers)
        with ProcessPoolExecutor(workers) as pool:
            jobs = [
                pool.submit(
                    write_caption_shard, stage1_dir / f"{shard:05d}.tar", shard, args.stage1_per_shard, words, args.seed
                )
                for shard in range(args.stage1_shards)
            ]
            jobs += [
                pool.submit(write_images, llava_dir / "images", names[start : start + per_job], args.seed)
                for start in range(0, len(names), per_job)
            ]
            for job in jobs:
                job.result()
        stats = convert(
            llava_dir / "llava_synthetic.json", llava_dir / "images", stage2_dir, args.stage2_per_shard, workers
        )
        if stats["written"] != len(records) or stats["shards"] != args.stage2_shards:
            raise SystemExit(
                f"error: the LLaVA converter wrote {stats}; expected {len(records)} records in "
                f"{args.stage2_shards} shards"
            )
        shutil.rmtree(llava_dir / "images")  # the shards hold the image bytes
        mark_built(data_dir, recipe)
    seconds = round(time.monotonic() - started, 1)
    return {"reused": reused, "seconds": seconds, **recipe, **data_lengths(tokenizer, words, args.seed)}


def data_lengths(tokenizer, words: list[str], seed: int, count: int = 500) -> dict:
    """Mean caption and conversation lengths in LLaMA-3 tokens, encoded as the training decoders encode them (a
    caption with its EOS; a conversation through the chat template, without the 64 image tokens)."""
    rng = random.Random(f"{seed}/lengths")
    captions = [laion_caption(rng, words) for _ in range(count)]
    caption_tokens = [len(ids) + 1 for ids in tokenizer(captions, add_special_tokens=False).input_ids]
    conversations = [llava_conversation(rng, words) for _ in range(count)]
    encoded = [encode_conversation(tokenizer, chat_messages(turns), 64, 10**6) for turns in conversations]
    return {
        "caption_words_mean": mean([len(caption.split()) for caption in captions]),
        "caption_tokens_mean": mean(caption_tokens),
        "conversation_turns_mean": mean([len(turns) / 2 for turns in conversations]),
        "conversation_text_tokens_mean": mean([len(e.input_ids) for e in encoded]),
        "conversation_supervised_tokens_mean": mean(
            [sum(label != IGNORE_INDEX for label in e.labels) for e in encoded]
        ),
    }


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def clip_image_processor():
    """openai/clip-vit-large-patch14's preprocessing: shortest edge to 224 (bicubic), centre crop 224, CLIP's mean
    and std. The PIL backend, as pipeline.toy.models builds it (torchvision is not a dependency); it is saved as
    CLIPImageProcessor, as OpenAI's is."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def build_models(models_dir: Path, tokenizer, smoke: bool, rebuild: bool) -> tuple[Path, Path, dict]:
    """The random-weight tower and LLM (reused when present), built on the GPU in bf16 when there is one: an 8B model
    initialised there takes seconds, where the CPU takes minutes and 32 GB of host memory for fp32."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    suffix = "-tiny" if smoke else ""
    vision_dir, llm_dir = models_dir / f"clip-vit-l14{suffix}", models_dir / f"llama3-8b{suffix}"
    recipe = {"smoke": smoke, "eos": INSTRUCT_EOS, "tokenizer_size": len(tokenizer)}
    started = time.monotonic()
    reused = is_built(models_dir, recipe) and not rebuild
    info = {"reused": reused, "vision": str(vision_dir), "llm": str(llm_dir)}
    if not reused:
        shutil.rmtree(models_dir, ignore_errors=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            tower = AutoModel.from_config(clip_vit_l14_config(**(SMOKE_CLIP if smoke else {})), dtype=torch.bfloat16)
        tower.save_pretrained(vision_dir)
        clip_image_processor().save_pretrained(vision_dir)
        del tower
        with torch.device(device):
            llm = AutoModelForCausalLM.from_config(
                llama3_8b_config(**(SMOKE_LLM if smoke else {})), dtype=torch.bfloat16
            )
        info["llm_parameters"] = llm.num_parameters()
        built = time.monotonic()
        # ~1 GB files: saving copies one file's tensors to the host at a time.
        llm.save_pretrained(llm_dir, max_shard_size="1GB")
        tokenizer.save_pretrained(llm_dir)
        info["build_s"], info["save_s"] = round(built - started, 1), round(time.monotonic() - built, 1)
        del llm
        if device == "cuda":
            torch.cuda.empty_cache()
        mark_built(models_dir, recipe)
    info["seconds"] = round(time.monotonic() - started, 1)
    return vision_dir, llm_dir, info


# -- the runs ---------------------------------------------------------------------------------------------------------


def parse_runs(items: list[str], settings: list[str]) -> dict[str, RunSpec]:
    """`--runs` (default names, or NAME=CONFIG[@GIB]) with `--set [NAME:]KEY=VALUE` overrides added."""
    runs = {}
    for item in items:
        name, is_custom, spec = item.partition("=")
        if is_custom:
            config, _, gib = spec.partition("@")
            try:
                runs[name] = RunSpec(config, float(gib) if gib else None)
            except ValueError:
                raise SystemExit(
                    f"error: run '{item}': the memory cap after @ must be GiB, e.g. {name}={config}@24"
                ) from None
        elif name in DEFAULT_RUNS:
            runs[name] = DEFAULT_RUNS[name]
        else:
            raise SystemExit(f"error: unknown run '{item}'; use one of {', '.join(DEFAULT_RUNS)} or NAME=CONFIG[@GIB]")
    for setting in settings:
        # Config keys hold no ':', so one before the first '=' names a run.
        target, _, override = setting.partition(":") if ":" in setting.split("=", 1)[0] else ("", "", setting)
        if "=" not in override:
            raise SystemExit(f"error: --set '{setting}' must read KEY=VALUE or NAME:KEY=VALUE")
        if target and target not in runs:
            raise SystemExit(f"error: --set '{setting}' names run '{target}', which is not in --runs")
        for name in [target] if target else list(runs):
            runs[name] = dataclasses.replace(runs[name], overrides=(*runs[name].overrides, override))
    return runs


def read_yaml(config: str) -> dict:
    path = ROOT / config  # a relative path is the repository's, as the entry points run there
    if not path.is_file():
        raise ConfigError(f"config file '{config}' does not exist")
    return yaml.safe_load(path.read_text()) or {}


def global_batch(raw: dict, overrides: list[str], wanted: int) -> int:
    """`wanted` rounded up to a multiple of the run's micro batch (the config's, or an override's), so that a config
    with an unexpected micro batch still runs, at the nearest larger global batch."""
    micro = (raw.get("train") or {}).get("micro_batch_size", TrainConfig().micro_batch_size)
    for override in overrides:
        if override.startswith("train.micro_batch_size="):
            micro = int(override.partition("=")[2])
    return micro * max(1, math.ceil(wanted / micro))


def run_overrides(name: str, spec: RunSpec, raw: dict, vision: Path, llm: Path, work: Path, args) -> list[str]:
    """What every run sets (local models and shards, no evaluation, samples, wandb or checkpoint before the end,
    every step logged, the smaller global batch), then --smoke's sizes, then the run's own overrides."""
    stage = raw.get("stage", 1)
    shards = work / "shards" / f"stage{stage}"
    count = args.stage1_shards if stage == 1 else args.stage2_shards
    overrides = [
        f"run_dir={work / 'runs' / name}",
        f"model.vision.model={vision}",
        f"model.llm.model={llm}",
        f'data.sources=[{{shards: "{shards}/{{00000..{count - 1:05d}}}.tar"}}]',  # quoted: YAML reads braces
        "data.val_shards=",
        "logging.sample_every_steps=0",
        "logging.sample_shards=",
        "logging.wandb_mode=disabled",
        "train.eval_every_steps=0",
        f"train.max_steps={args.steps}",
        "train.log_every_steps=1",
        # A checkpoint only after the measured steps (the last step always saves).
        f"train.save_every_steps={10 * args.steps}",
    ]
    if stage == 2:
        overrides.append("model.stage1_resampler=")  # a fresh resampler: the step costs the same
    if spec.gpu_memory_gib is not None:
        overrides.append(f"train.gpu_memory_gib={spec.gpu_memory_gib:g}")
    later = [*(SMOKE_OVERRIDES if args.smoke else ()), *spec.overrides]
    wanted = args.global_batch_stage1 if stage == 1 else args.global_batch_stage2
    overrides.append(f"train.global_batch_size={global_batch(raw, later, wanted)}")
    return [*overrides, *later]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # As launch/common.sh: the loader workers and the trainer share the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    # The venv's ninja first, as the tests do, for DeepSpeed's op build.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def launch(command: list[str], log_path: Path, timeout_s: float) -> tuple[int, bool, float]:
    """Run `command` in its own process group, output to `log_path`; on timeout the whole group (loader workers
    included) is killed. Returns (exit code, timed out, seconds)."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait(timeout=timeout_s), False, time.monotonic() - started
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait(), True, time.monotonic() - started
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise


def summarize_metrics(run_dir: Path, warmup_logged_steps: int, global_batch: int) -> dict:
    """Means over the logged steps after the warm-up ones, the highest peak memory, every step's loss."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    steps = [record for record in records if "samples_per_s" in record]
    measured = steps[warmup_logged_steps:]
    out = {"steps_logged": len(steps), "steps_measured": len(measured)}
    for key in ("samples_per_s", "tokens_per_s", "mfu", "data_wait_frac"):
        out[key] = mean(record.get(key) for record in measured)
    out["step_s"] = round(global_batch / out["samples_per_s"], 3) if out["samples_per_s"] else None
    out["peak_mem_gb"] = max((record["peak_mem_gb"] for record in steps if "peak_mem_gb" in record), default=None)
    out["loss"] = {record["step"]: round(record["loss"], 4) for record in steps if "loss" in record}
    out["skipped_samples"] = steps[-1].get("skipped") if steps else None
    return out


def memory_log_line(log_text: str) -> str | None:
    """The start-up memory plan's line, or failing that the first line that speaks of memory."""
    lines = [line.strip() for line in log_text.splitlines() if "memory" in line.lower()]
    plan = [line for line in lines if "memory plan" in line]
    return (plan or lines or [None])[0]


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def measure_run(name: str, spec: RunSpec, vision: Path, llm: Path, work: Path, args, timeout_s: float) -> dict:
    row: dict = {"config": spec.config, "extra_overrides": list(spec.overrides)}
    try:
        raw = read_yaml(spec.config)
        overrides = run_overrides(name, spec, raw, vision, llm, work, args)
        config = load_config(ROOT / spec.config, overrides)
    except (ConfigError, yaml.YAMLError, ValueError) as error:
        return {**row, "error": f"config: {error}"}
    train, llm_config = config.train, config.model.llm
    entry = "pipeline.train_stage2" if config.stage == 2 else "pipeline.train"
    row |= {
        "entry_point": entry,
        "gpu_memory_gib": train.gpu_memory_gib,  # the config's or the run's @GIB
        "micro_batch_size": train.micro_batch_size,
        "global_batch_size": train.global_batch_size,
        "accumulation": train.global_batch_size // train.micro_batch_size,
        "quantization": llm_config.quantization,
        "activation_checkpointing": llm_config.activation_checkpointing,
        "attn_implementation": llm_config.attn_implementation,
        "compile_layers": llm_config.compile_layers,
    }
    run_dir = Path(config.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path = work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", entry, "--config", spec.config, *overrides]
    row |= {"command": shlex.join(["python", *command[1:]]), "log": str(log_path), "timeout_s": round(timeout_s)}
    print(f"\n== {name}: {entry} --config {spec.config} (limit {timeout_s:.0f} s)", flush=True)
    exit_code, timed_out, seconds = launch(command, log_path, timeout_s)
    log_text = log_path.read_text(errors="replace")
    row |= {"exit_code": exit_code, "timed_out": timed_out, "wall_s": round(seconds, 1)}
    row |= summarize_metrics(run_dir, args.warmup_logged_steps, train.global_batch_size)
    plan = run_dir / "memory_plan.json"
    row["memory_plan"] = json.loads(plan.read_text()) if plan.is_file() else None
    row["memory_log"] = memory_log_line(log_text)
    if exit_code != 0 or timed_out:
        row["failure_tail"] = tail(log_text, 60)
    if args.copy_logs:
        copy = Path(args.out).with_name(f"{Path(args.out).stem}_logs") / log_path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, copy)
    print(tail(log_text, args.print_lines), flush=True)
    return row


# -- the report -------------------------------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def card_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def save(results: dict, out: Path) -> None:
    """Written after every run, through a temporary file, so a call cut short leaves the finished runs readable."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, out)


SHOWN = ("exit_code", "timed_out", "wall_s", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb", "error")


def print_table(results: dict) -> None:
    print(f"\n{results['card']}, torch {results['torch']}, transformers {results['transformers']}")
    columns = ("exit_code", "wall_s", "micro_batch_size", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gb")
    print(" | ".join(["run", *columns, "planned GiB", "loss first -> last"]))
    for name, row in results["runs"].items():
        if "error" in row or "skipped" in row:
            print(f"{name} | {row.get('error') or row.get('skipped')}")
            continue
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns]
        planned = (row.get("memory_plan") or {}).get("peak_gib")
        losses = list(row["loss"].values())
        trajectory = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "-"
        print(" | ".join([name, *cells, f"{planned:.1f}" if planned is not None else "-", trajectory]))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", help="where models, shards, runs and logs go (default /tmp/cards, smoke /tmp/cards_smoke)"
    )
    parser.add_argument("--out", help="result JSON (default WORK/card_configs.json)")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="names, or NAME=CONFIG[@GIB]")
    parser.add_argument("--set", action="append", default=[], metavar="[NAME:]KEY=VALUE", help="an extra override")
    parser.add_argument("--steps", type=int, help="train.max_steps of every run (default 8, smoke 3)")
    parser.add_argument("--warmup-logged-steps", type=int, default=2, help="logged steps left out of the means")
    parser.add_argument("--global-batch-stage1", type=int, help="default 512 (smoke 4)")
    parser.add_argument("--global-batch-stage2", type=int, help="default 64 (smoke 4)")
    parser.add_argument("--timeout-per-run", type=float, default=150.0, help="seconds")
    parser.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole script, from its start")
    parser.add_argument("--tokenizer", default=str(ROOT / ".venv" / "llama3_tokenizer"), help="LLaMA-3 tokenizer files")
    parser.add_argument("--stage1-shards", type=int, help="default 16 (smoke 2)")
    parser.add_argument("--stage1-per-shard", type=int, help="default 1000 (smoke 32)")
    parser.add_argument("--stage2-shards", type=int, help="default 16 (smoke 2)")
    parser.add_argument("--stage2-per-shard", type=int, help="default 500 (smoke 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-lines", type=int, default=6, help="log lines printed after each run")
    parser.add_argument("--copy-logs", action="store_true", help="also copy each run's log to OUT_STEM_logs/NAME.log")
    parser.add_argument("--rebuild", action="store_true", help="build models and shards even where they exist")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models of the same configs")
    args = parser.parse_args(argv)
    defaults = {
        "work": ("/tmp/cards", "/tmp/cards_smoke"),
        "steps": (8, 3),
        "global_batch_stage1": (512, 4),
        "global_batch_stage2": (64, 4),
        "stage1_shards": (16, 2),
        "stage1_per_shard": (1000, 32),
        "stage2_shards": (16, 2),
        "stage2_per_shard": (500, 16),
    }
    for key, (full, smoke) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    args.out = args.out or str(Path(args.work) / "card_configs.json")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = parse_runs(args.runs, args.set)
    work, out = Path(args.work).resolve(), Path(args.out)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the shard writers fork after the tokenizer loads
    tokenizer = instruct_tokenizer(Path(args.tokenizer))
    print(f"data under {work / 'shards'} ...", flush=True)
    data = build_data(work / "shards", tokenizer, args)
    print(f"data: {json.dumps(data)}", flush=True)
    print(f"models under {work / 'models'} ...", flush=True)
    vision, llm, models = build_models(work / "models", tokenizer, args.smoke, args.rebuild)
    print(f"models: {json.dumps(models)}", flush=True)
    import torch
    import transformers

    results = {
        "benchmark": "card_configs",
        "commit": git_commit(),
        "command": shlex.join(["python", "benchmarks/card_configs.py", *argv]),
        "card": card_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
        "settings": {
            "steps": args.steps,
            "warmup_logged_steps": args.warmup_logged_steps,
            "global_batch_stage1": args.global_batch_stage1,
            "global_batch_stage2": args.global_batch_stage2,
            "timeout_per_run_s": args.timeout_per_run,
            "budget_s": args.budget_s,
        },
        "build": {"data": data, "models": models},
        "runs": {},
    }
    save(results, out)
    for name, spec in runs.items():
        left = args.budget_s - (time.monotonic() - STARTED)
        if left < 30:
            results["runs"][name] = {"config": spec.config, "skipped": f"--budget-s: {left:.0f} s left"}
        else:
            row = measure_run(name, spec, vision, llm, work, args, min(args.timeout_per_run, left - 5))
            results["runs"][name] = row
            print(f"{name}: {json.dumps({key: row[key] for key in SHOWN if row.get(key) is not None})}", flush=True)
        save(results, out)
    results["wall_s"] = round(time.monotonic() - STARTED, 1)
    save(results, out)
    print_table(results)
    print(f"\nwrote {out}")
    succeeded = all(row.get("exit_code") == 0 and row.get("steps_measured") for row in results["runs"].values())
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
