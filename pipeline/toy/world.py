"""A synthetic captioned image world for end-to-end tests and demos of the training pipeline.

Each 64x64 RGB JPEG shows one shape (circle, square, triangle, star or cross) in a named colour, small or
large, on a background of a different named colour; its caption reads "a small red circle on a blue
background". Shapes sit exactly at the centre of the image: a randomly initialised CLIP tower with 8 px patches
loses the shape of off-centre objects, and even offsets of a pixel or two cost accuracy (the measurements:
docs/performance.md, "Toy world design"). Images with equal attributes still differ, in the shades of their colours.

`write_toy_world` writes the images and one JSONL index per split; `write_url_parquet` turns a split into a
LAION-style parquet of URLs (served by `pipeline.toy.http_server`) that img2dataset downloads like LAION.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

IMAGE_SIZE_PX = 64
# Shapes are drawn this many times larger and box-filtered down, which antialiases their edges.
SUPERSAMPLE = 4
# Radius of the circle that circumscribes the shape, in output pixels.
SIZE_RADIUS_PX = {"small": 12.0, "large": 24.0}
# Each channel of a drawn colour varies by up to this much so that two images with the same attributes differ.
SHADE_VARIATION = 12
JPEG_QUALITY = 95

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

ATTRIBUTES: dict[str, list[str]] = {
    "size": list(SIZE_RADIUS_PX),
    "colour": list(COLOUR_RGB),
    "shape": ["circle", "square", "triangle", "star", "cross"],
    "background": list(COLOUR_RGB),
}

SPLITS = ("train", "val")

# Words of questions the toy world can answer now (one centred shape) or later (positions, counts).
QUESTION_WORDS = [
    *["what", "where", "how", "many", "is", "are", "there", "it", "this", "the", "a", "an", "of", "on", "in"],
    *["colour", "color", "shape", "shapes", "size", "image", "picture", "object"],
    *["left", "right", "top", "bottom", "centre", "center", "middle"],
    *["zero", "one", "two", "three", "four", "five", "yes", "no", "?", ".", ","],
    # The short-answer instruction of the VQA prompt (pipeline.inference.answering.PROMPT_TEMPLATES).
    *["Answer", "question", "using", "single", "word", "or", "phrase"],
]

_CAPTION_PATTERN = re.compile(r"a (\w+) (\w+) (\w+) on a (\w+) background")


def caption_for(attrs: dict) -> str:
    """The caption of an image with these attributes, e.g. "a small red circle on a blue background"."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} on a {attrs['background']} background"


def parse_caption(text: str) -> dict | None:
    """The attributes a caption states, or None when it is not a well-formed toy caption.

    Case, surrounding whitespace, repeated spaces and one trailing full stop are tolerated, since decoded
    model output may carry them; any unknown word makes the caption unparseable.
    """
    normalised = " ".join(text.lower().split()).removesuffix(".").strip()
    match = _CAPTION_PATTERN.fullmatch(normalised)
    if match is None:
        return None
    attrs = dict(zip(("size", "colour", "shape", "background"), match.groups(), strict=True))
    if any(value not in ATTRIBUTES[name] for name, value in attrs.items()):
        return None
    return attrs


def question_answer_pairs(attrs: dict, rng: random.Random) -> list[tuple[str, str]]:
    """Simple one-word-answer questions about an image, for instruction-style text.

    Yes/no questions ask about the true value or a random other value with equal probability, so that
    "yes" and "no" are equally likely answers.
    """
    asked_colour = rng.choice([attrs["colour"], rng.choice([c for c in ATTRIBUTES["colour"] if c != attrs["colour"]])])
    asked_shape = rng.choice([attrs["shape"], rng.choice([s for s in ATTRIBUTES["shape"] if s != attrs["shape"]])])
    return [
        ("what colour is the shape ?", attrs["colour"]),
        ("what color is the shape ?", attrs["colour"]),
        ("what shape is it ?", attrs["shape"]),
        ("what size is the shape ?", attrs["size"]),
        ("what colour is the background ?", attrs["background"]),
        ("how many shapes are there ?", "one"),
        ("where is the shape ?", "centre"),
        (f"is the shape {asked_colour} ?", "yes" if asked_colour == attrs["colour"] else "no"),
        (f"is it a {asked_shape} ?", "yes" if asked_shape == attrs["shape"] else "no"),
    ]


def vocabulary() -> list[str]:
    """Every word the toy world's captions, attributes and questions use, plus ":" for attribute prompts."""
    words = ["a", "on", "background", ":"] + QUESTION_WORDS
    for values in ATTRIBUTES.values():
        words.extend(values)
    words.extend(str(digit) for digit in range(10))
    return list(dict.fromkeys(words))


def sample_attributes(rng: random.Random) -> dict:
    """Draw one image's attributes uniformly; the background always differs from the shape's colour."""
    colour = rng.choice(ATTRIBUTES["colour"])
    return {
        "size": rng.choice(ATTRIBUTES["size"]),
        "colour": colour,
        "shape": rng.choice(ATTRIBUTES["shape"]),
        "background": rng.choice([c for c in ATTRIBUTES["background"] if c != colour]),
    }


def _shaded_rgb(name: str, rng: random.Random) -> tuple[int, int, int]:
    return tuple(
        min(255, max(0, channel + rng.randint(-SHADE_VARIATION, SHADE_VARIATION))) for channel in COLOUR_RGB[name]
    )


def _regular_polygon(cx: float, cy: float, radius: float, corners: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(math.radians(start_deg + 360 * k / corners)),
            cy + radius * math.sin(math.radians(start_deg + 360 * k / corners)),
        )
        for k in range(corners)
    ]


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    outer = _regular_polygon(cx, cy, radius, 5, -90)
    inner = _regular_polygon(cx, cy, radius * 0.45, 5, -90 + 36)
    return [point for pair in zip(outer, inner, strict=True) for point in pair]


def _centre_bounding_box(points: list[tuple[float, float]], cx: float, cy: float) -> list[tuple[float, float]]:
    # Triangles and stars are drawn around their circumcentre, which lies above the middle of their extent;
    # moving their bounding box to the centre keeps every shape's mass where the others' is.
    xs, ys = [x for x, _ in points], [y for _, y in points]
    dx, dy = cx - (min(xs) + max(xs)) / 2, cy - (min(ys) + max(ys)) / 2
    return [(x + dx, y + dy) for x, y in points]


def render_image(attrs: dict, rng: random.Random) -> Image.Image:
    """Draw the 64x64 image of these attributes; `rng` supplies the shades of the two colours."""
    canvas_px = IMAGE_SIZE_PX * SUPERSAMPLE
    image = Image.new("RGB", (canvas_px, canvas_px), _shaded_rgb(attrs["background"], rng))
    draw = ImageDraw.Draw(image)
    fill = _shaded_rgb(attrs["colour"], rng)
    cx = cy = canvas_px / 2
    radius = SIZE_RADIUS_PX[attrs["size"]] * SUPERSAMPLE
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        draw.polygon(_regular_polygon(cx, cy, radius, 4, 45), fill=fill)
    elif shape == "triangle":
        draw.polygon(_centre_bounding_box(_regular_polygon(cx, cy, radius, 3, -90), cx, cy), fill=fill)
    elif shape == "star":
        draw.polygon(_centre_bounding_box(_star(cx, cy, radius), cx, cy), fill=fill)
    elif shape == "cross":
        # Two bars whose ends touch the circumscribed circle.
        half_bar = radius * 0.3
        reach = math.sqrt(radius**2 - half_bar**2)
        draw.rectangle([cx - reach, cy - half_bar, cx + reach, cy + half_bar], fill=fill)
        draw.rectangle([cx - half_bar, cy - reach, cx + half_bar, cy + reach], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {ATTRIBUTES['shape']}")
    return image.resize((IMAGE_SIZE_PX, IMAGE_SIZE_PX), Image.Resampling.BOX)


def _write_split(out_dir: Path, split: str, count: int, seed: int) -> Path:
    # Each split has its own random stream: val draws are independent of train draws, and n_train does not change val.
    rng = random.Random(f"toy-world/{seed}/{split}")
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / f"{split}.jsonl"
    with index_path.open("w") as index:
        for image_id in range(count):
            attrs = sample_attributes(rng)
            relative_path = f"images/{split}/{image_id:06d}.jpg"
            render_image(attrs, rng).save(out_dir / relative_path, "JPEG", quality=JPEG_QUALITY)
            record = {"id": image_id, "path": relative_path, "caption": caption_for(attrs), "attrs": attrs}
            index.write(json.dumps(record) + "\n")
    return index_path


def write_toy_world(out_dir: str | Path, n_train: int, n_val: int, seed: int) -> dict:
    """Write `out_dir/images/{split}/{id:06d}.jpg` and `out_dir/{split}.jsonl` for the train and val splits.

    Each JSONL line is {"id", "path" (relative to out_dir), "caption", "attrs"}. The output is a pure
    function of (n_train, n_val, seed). Also writes `out_dir/world.json` describing the world; returns the
    same description.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": n_train, "val": n_val}
    summary = {
        "seed": seed,
        "image_size_px": IMAGE_SIZE_PX,
        "attributes": ATTRIBUTES,
        "splits": {
            split: {"count": count, "index": str(_write_split(out_dir, split, count, seed).relative_to(out_dir))}
            for split, count in counts.items()
        },
    }
    (out_dir / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"root": str(out_dir), **summary}


def read_records(world_dir: str | Path, split: str) -> list[dict]:
    """The records of one split of a world written by `write_toy_world`."""
    index_path = Path(world_dir) / f"{split}.jsonl"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist; write the world first with write_toy_world")
    with index_path.open() as index:
        return [json.loads(line) for line in index]


def write_url_parquet(out_dir: str | Path, split: str, base_url: str, parquet_path: str | Path) -> Path:
    """Write a LAION-style parquet listing one split's images as URLs under `base_url`.

    `base_url` must serve `out_dir` (see `pipeline.toy.http_server.serve_directory`). Columns: `url`,
    `caption`, `id` (int) and `attrs` (the attributes as a JSON string). img2dataset reads it with
    `--input_format parquet --url_col url --caption_col caption`, and `--save_additional_columns
    '["id","attrs"]'` copies id and attrs into each sample's .json.
    """
    records = read_records(out_dir, split)
    base_url = base_url.rstrip("/")
    table = pa.table(
        {
            "url": [f"{base_url}/{record['path']}" for record in records],
            "caption": [record["caption"] for record in records],
            "id": pa.array([record["id"] for record in records], type=pa.int64()),
            "attrs": [json.dumps(record["attrs"], sort_keys=True) for record in records],
        }
    )
    parquet_path = Path(parquet_path)
    parquet_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, parquet_path)
    return parquet_path
