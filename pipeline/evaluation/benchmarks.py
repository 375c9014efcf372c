"""The standard benchmarks: reading their annotation files, prompting for them, writing and scoring predictions.

Captioning reads Karpathy's `dataset_coco.json` (one split of it, "test" by default) or any COCO-format
`captions_*.json` (nocaps and Flickr30k in COCO format too). VQA reads three layouts:
  - the VQA format (VQAv2, OK-VQA): a questions file plus an annotations file; without the annotations (test-dev)
    only predictions are written;
  - TextVQA's single file ({"data": [...]}, ten answer strings per question);
  - VizWiz's single file (a list keyed by image name, which is also its submission key).
All four are scored by the rules of VQAv2's official evaluation script (`vqa_metric`, whose docstring says how
TextVQA's and VizWiz's own evaluators differ); their servers score the raw `predictions.json` themselves.

Each benchmark writes `predictions.json` in its submission format (captions: [{"image_id", "caption"}];
VQA: [{"question_id", "answer"}]; VizWiz: [{"image", "answer"}]), `metrics.json`, and for VQA `answers.jsonl`
with each question's answer and accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common.files import write_text_atomic
from pipeline.evaluation.caption_metrics import CAPTION_METRICS, caption_scores
from pipeline.evaluation.runner import GenerateFn, GenerationItem, generate_all
from pipeline.evaluation.vqa_metric import vqa_scores
from pipeline.inference.answering import PROMPT_TEMPLATES

DEFAULT_VQA_IMAGE_PATTERN = "COCO_{data_subtype}_{image_id:012d}.jpg"


@dataclass
class CaptionBenchmark:
    name: str  # "coco_karpathy" or "coco_format"
    image_paths: dict  # image_id -> image file
    references: dict  # image_id -> [reference caption, ...]


@dataclass
class VQABenchmark:
    name: str  # "vqa", "textvqa" or "vizwiz"; also the key of its prompt template
    id_field: str  # the key its submission format uses: "question_id", or "image" for VizWiz
    image_paths: dict  # question key -> image file
    questions: dict  # question key -> question text
    answers: dict | None  # question key -> human answers; None for splits without them (test)
    answer_types: dict | None = None
    question_types: dict | None = None
    files: list[str] = field(default_factory=list)


def read_caption_benchmark(annotations: str | Path, images_dir: str | Path, split: str = "test") -> CaptionBenchmark:
    """Karpathy's dataset_coco.json (the images of `split`) or a COCO-format captions file."""
    data = _read_json(annotations)
    images_dir = Path(images_dir)
    if isinstance(data, dict) and data.get("images") and "sentences" in data["images"][0]:
        chosen = [image for image in data["images"] if image.get("split") == split]
        if not chosen:
            found = sorted({image.get("split") for image in data["images"]})
            raise ValueError(f"{annotations} has no images in split '{split}'; its splits are {found} (--split)")
        image_paths, references = {}, {}
        for image in chosen:
            image_id = image.get("cocoid", image.get("imgid"))
            image_paths[image_id] = str(images_dir / image.get("filepath", "") / image["filename"])
            references[image_id] = [sentence["raw"] for sentence in image["sentences"]]
        name = "coco_karpathy"
    elif isinstance(data, dict) and "annotations" in data and "images" in data:
        image_paths = {image["id"]: str(images_dir / image["file_name"]) for image in data["images"]}
        references: dict = {}
        for annotation in data["annotations"]:
            references.setdefault(annotation["image_id"], []).append(annotation["caption"])
        # Images without a caption (COCO-format files may list them) cannot be scored.
        image_paths = {image_id: path for image_id, path in image_paths.items() if image_id in references}
        name = "coco_format"
    else:
        raise ValueError(f"{annotations} is neither Karpathy's dataset_coco.json nor a COCO-format captions file")
    _require_images(image_paths.values(), "--images")
    return CaptionBenchmark(name, image_paths, references)


def read_vqa_benchmark(
    images_dir: str | Path,
    questions: str | Path | None = None,
    annotations: str | Path | None = None,
    image_pattern: str | None = None,
) -> VQABenchmark:
    """A VQA-format pair (questions, annotations optional), or TextVQA's or VizWiz's single annotation file.

    `image_pattern` names an image file from its record's fields (`image_id`, `data_subtype`); the defaults are
    "COCO_{data_subtype}_{image_id:012d}.jpg" (VQAv2, OK-VQA), "{image_id}.jpg" (TextVQA) and "{image}" (VizWiz).
    """
    images_dir = Path(images_dir)
    if questions is not None:
        benchmark = _read_vqa_format(questions, annotations, images_dir, image_pattern or DEFAULT_VQA_IMAGE_PATTERN)
    elif annotations is None:
        raise ValueError("give --questions (VQAv2, OK-VQA) or --annotations (TextVQA, VizWiz)")
    else:
        data = _read_json(annotations)
        if isinstance(data, dict) and "data" in data:
            benchmark = _read_textvqa(data["data"], images_dir, image_pattern or "{image_id}.jpg")
        elif isinstance(data, list) and data and "image" in data[0]:
            benchmark = _read_vizwiz(data, images_dir, image_pattern or "{image}")
        else:
            raise ValueError(f"{annotations} is neither TextVQA nor VizWiz; for VQAv2 or OK-VQA also pass --questions")
    benchmark.files = [str(path) for path in (questions, annotations) if path is not None]
    _require_images(benchmark.image_paths.values(), "--images and --image-pattern")
    return benchmark


def _read_vqa_format(questions, annotations, images_dir: Path, pattern: str) -> VQABenchmark:
    data = _read_json(questions)
    subtype = data.get("data_subtype", "")
    records = {q["question_id"]: q for q in data["questions"]}
    benchmark = VQABenchmark(
        "vqa",
        "question_id",
        {key: str(images_dir / pattern.format(data_subtype=subtype, **q)) for key, q in records.items()},
        {key: q["question"] for key, q in records.items()},
        None,
    )
    if annotations is not None:
        by_question = {a["question_id"]: a for a in _read_json(annotations)["annotations"]}
        missing = [key for key in records if key not in by_question]
        if missing:
            raise ValueError(f"{annotations} lacks {len(missing)} questions of {questions} (first: {missing[0]})")
        # In the annotation file's order, the order in which the official script sums the questions' accuracies.
        scored = [key for key in by_question if key in records]
        benchmark.answers = {key: [a["answer"] for a in by_question[key]["answers"]] for key in scored}
        benchmark.answer_types = {key: by_question[key].get("answer_type", "") for key in records}
        benchmark.question_types = {key: by_question[key].get("question_type", "") for key in records}
    return benchmark


def _read_textvqa(records: list[dict], images_dir: Path, pattern: str) -> VQABenchmark:
    return _read_keyed_records("textvqa", "question_id", records, images_dir, pattern, lambda r: list(r["answers"]))


def _read_vizwiz(records: list[dict], images_dir: Path, pattern: str) -> VQABenchmark:
    return _read_keyed_records(
        "vizwiz",
        "image",
        records,
        images_dir,
        pattern,
        lambda r: [a["answer"] for a in r["answers"]],
        with_answer_types=True,
    )


def _read_keyed_records(
    name: str,
    key: str,
    records: list[dict],
    images_dir: Path,
    pattern: str,
    answers_of,
    with_answer_types: bool = False,
) -> VQABenchmark:
    """A benchmark whose records each hold their image, question and (when released) answers, keyed by `key`."""
    answered = all("answers" in r for r in records)
    return VQABenchmark(
        name,
        key,
        {r[key]: str(images_dir / pattern.format(**r)) for r in records},
        {r[key]: r["question"] for r in records},
        {r[key]: answers_of(r) for r in records} if answered else None,
        answer_types={r[key]: r.get("answer_type", "") for r in records} if answered and with_answer_types else None,
    )


def take_first(benchmark: CaptionBenchmark | VQABenchmark, count: int):
    """The same benchmark cut to its first `count` images or questions (for quick checks)."""
    keys = list(benchmark.image_paths)[:count]
    cut = {
        f.name: {key: getattr(benchmark, f.name)[key] for key in keys}
        for f in dataclasses.fields(benchmark)
        if isinstance(getattr(benchmark, f.name), dict)
    }
    return dataclasses.replace(benchmark, **cut)


def evaluate_captions(
    benchmark: CaptionBenchmark,
    generate: GenerateFn,
    out_dir: str | Path,
    *,
    batch_size: int,
    part_size: int = 1024,
    fingerprint: dict | None = None,
    metrics: tuple[str, ...] = CAPTION_METRICS,
) -> dict | None:
    """Caption every image, then write predictions.json and metrics.json; returns the metrics on rank 0."""
    out_dir = Path(out_dir)
    prompt = PROMPT_TEMPLATES["caption"] if getattr(generate, "uses_prompts", True) else ""
    items = [GenerationItem(key, path, prompt) for key, path in benchmark.image_paths.items()]
    outputs = generate_all(
        items, generate, out_dir / "parts", batch_size=batch_size, part_size=part_size, fingerprint=fingerprint
    )
    if outputs is None:
        return None
    captions = {key: first_line(text) for key, text in outputs.items()}
    write_json(out_dir / "predictions.json", [{"image_id": key, "caption": text} for key, text in captions.items()])
    scores = caption_scores(benchmark.references, captions, metrics)
    result = {"task": "caption", "benchmark": benchmark.name, "n": len(captions), **scores, "prompt": prompt}
    write_json(out_dir / "metrics.json", result | {"fingerprint": fingerprint or {}})
    return result


def evaluate_vqa(
    benchmark: VQABenchmark,
    generate: GenerateFn,
    out_dir: str | Path,
    *,
    batch_size: int,
    part_size: int = 1024,
    fingerprint: dict | None = None,
) -> dict | None:
    """Answer every question, then write predictions.json, answers.jsonl and metrics.json (rank 0 returns it)."""
    if not getattr(generate, "uses_prompts", True):
        raise ValueError("VQA needs a model that follows prompts (stage 2); this generator captions from the image")
    out_dir = Path(out_dir)
    template = PROMPT_TEMPLATES[benchmark.name]
    items = [
        GenerationItem(key, benchmark.image_paths[key], template.format(question=question))
        for key, question in benchmark.questions.items()
    ]
    outputs = generate_all(
        items, generate, out_dir / "parts", batch_size=batch_size, part_size=part_size, fingerprint=fingerprint
    )
    if outputs is None:
        return None
    answers = {key: first_line(text) for key, text in outputs.items()}
    write_json(out_dir / "predictions.json", [{benchmark.id_field: k, "answer": a} for k, a in answers.items()])
    result = {"task": "vqa", "benchmark": benchmark.name, "n": len(answers), "prompt_template": template}
    records = [{benchmark.id_field: k, "question": benchmark.questions[k], "answer": a} for k, a in answers.items()]
    if benchmark.answers is not None:
        scores = vqa_scores(answers, benchmark.answers, benchmark.answer_types, benchmark.question_types)
        for record in records:
            key = record[benchmark.id_field]
            record |= {"accuracy": scores["per_question"][key], "human_answers": benchmark.answers[key]}
        result |= {name: value for name, value in scores.items() if name != "per_question"}
    write_text_atomic(out_dir / "answers.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    write_json(out_dir / "metrics.json", result | {"files": benchmark.files, "fingerprint": fingerprint or {}})
    return result


def first_line(text: str) -> str:
    """The generated answer or caption: its first non-empty line, stripped (models may go on after it)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def write_json(path: str | Path, value) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def _read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    with path.open() as file:
        return json.load(file)


def _require_images(paths, option: str) -> None:
    """Fail before any generation when images are missing: one directory listing per folder, not one stat each."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if name not in listings[folder]:
            missing.append(path)
    if missing:
        raise FileNotFoundError(f"{len(missing)} images are missing, first {missing[0]}; check {option}")
