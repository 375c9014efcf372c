"""Toy-world instruction data for stage 2, in LLaVA's format, plus a VQA-format evaluation set.

`write_llava_json` writes one conversation per image of a split: questions about colour, shape, size, background,
position and count, about a third of them multi-turn. Like LLaVA-1.5's mix, half of the
single-turn questions carry the short-answer instruction of the VQA evaluation prompt and get a one-word answer;
the others get a short sentence. The JSON goes through the same converter as LLaVA-Instruct-150K
(`pipeline.prep.instruct_shards`).

Every question kind has phrasings used in training and phrasings held out from it (new combinations of the words
of the training phrasings: "what colour is the object ?" is held out, "what colour is the shape ?" and "what is the
colour of the object ?" are not). In training, neither spelling of colour and neither sentence form goes with only
one of the two colour questions, so only the noun (shape, object or background) tells them apart; if "what is the
color of ..." were only ever asked of the background, the held-out "what is the color of the shape ?" would be
answered with the background's colour (docs/performance.md).
`write_vqa_files` asks the held-out phrasings about held-out images, in the VQA
questions/annotations format that `pipeline.eval --task vqa` and `evaluate_vqa` read (ten identical human answers per
question, so an answer scores 1 or 0; with unanimous answers the official metric compares the prediction as
generated, so the short answers are taught in the annotations' form: lower case, counts as digits, as in VQAv2).

The world has one shape, always centred, so position and count questions have one answer ("centre", "1"): the
random vision tower cannot see the shape of off-centre objects (docs/performance.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.inference.answering import PROMPT_TEMPLATES
from pipeline.toy import world

SHORT_ANSWER = PROMPT_TEMPLATES["vqa"].split("\n", 1)[1]


# How often each kind is asked in training: the shape's colour and the background's colour share their answers, so
# telling them apart takes the most examples (the mixes compared: docs/performance.md); count and position always
# have the same answer.
TRAINING_WEIGHTS = {"colour": 6.0, "background": 6.0, "shape": 2.0, "size": 2.0, "count": 0.5, "position": 0.5}


def questions(attrs: dict) -> dict[str, tuple[list[str], list[str], str, str]]:
    """Per question kind: (training phrasings, held-out phrasings, one-word answer, sentence answer)."""
    colour, shape, size = attrs["colour"], attrs["shape"], attrs["size"]
    return {
        "colour": (
            [
                "what colour is the shape ?",
                "what is the colour of the object ?",
                "what color is it ?",
                "what color is the object ?",
                "what is the color of the object ?",
            ],
            ["what colour is the object ?", "what is the color of the shape ?"],
            colour,
            f"the shape is {colour} .",
        ),
        "shape": (
            ["what shape is it ?", "what shape is in the image ?", "what is the object ?"],
            ["what shape is this ?", "what is the shape in the picture ?"],
            shape,
            f"it is a {shape} .",
        ),
        "size": (
            ["what size is the shape ?", "what is the size of the object ?"],
            ["what size is the object ?", "what is the size of the shape ?"],
            size,
            f"the shape is {size} .",
        ),
        "background": (
            [
                "what colour is the background ?",
                "what color is the background ?",
                "what is the color of the background ?",
            ],
            ["what is the colour of the background ?"],
            attrs["background"],
            f"the background is {attrs['background']} .",
        ),
        "count": (
            ["how many shapes are there ?", "how many shapes are in the picture ?"],
            ["how many shapes are in the image ?"],
            "1",  # a short answer counts in digits, as VQAv2's annotations do (the metric compares them as typed)
            "there is one shape .",
        ),
        "position": (
            ["where is the shape ?", "where is the object in the image ?"],
            ["where is the object ?", "where is the shape in the picture ?"],
            "centre",
            "the shape is in the centre .",
        ),
    }


def conversation(attrs: dict, rng: random.Random, multi_turn_fraction: float = 0.35) -> list[dict]:
    """LLaVA turns for one training image: `<image>` in the first question, one to three question/answer pairs."""
    kinds = questions(attrs)
    turns_wanted = rng.choice([2, 3]) if rng.random() < multi_turn_fraction else 1
    asked: list[str] = []
    while len(asked) < turns_wanted:
        kind = rng.choices(list(TRAINING_WEIGHTS), weights=list(TRAINING_WEIGHTS.values()))[0]
        if kind not in asked:
            asked.append(kind)
    turns = []
    for kind in asked:
        phrasings, _, word, sentence = kinds[kind]
        question = rng.choice(phrasings)
        short = turns_wanted == 1 and rng.random() < 0.5
        if short:
            question = f"{question}\n{SHORT_ANSWER}"
        if not turns:
            question = f"<image>\n{question}"
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": word if short else sentence}]
    return turns


def write_llava_json(world_dir: str | Path, split: str, out_path: str | Path, seed: int = 0) -> Path:
    """One conversation per image of `split`; "image" paths are relative to `world_dir`."""
    rng = random.Random(f"toy-instruct/{seed}/{split}")
    records = [
        {"id": f"{split}-{record['id']}", "image": record["path"], "conversations": conversation(record["attrs"], rng)}
        for record in world.read_records(world_dir, split)
    ]
    out_path = Path(out_path)
    out_path.write_text(json.dumps(records) + "\n")
    return out_path


def write_vqa_files(
    world_dir: str | Path,
    split: str,
    out_dir: str | Path,
    per_image: int = 2,
    limit: int | None = None,
    seed: int = 0,
    phrasings: str = "held_out",
) -> dict:
    """VQA-format questions and annotations about `split`'s images, in held-out (or "training") phrasings.

    Returns {"questions", "annotations", "images", "image_pattern"} for `read_vqa_benchmark`.
    """
    rng = random.Random(f"toy-vqa/{seed}/{split}")
    questions_out, annotations = [], []
    for record in world.read_records(world_dir, split)[:limit]:
        kinds = questions(record["attrs"])
        for kind in rng.sample(sorted(kinds), per_image):
            training, held_out, answer, _ = kinds[kind]
            question_id = len(questions_out)
            asked = rng.choice(held_out if phrasings == "held_out" else training)
            questions_out.append({"image_id": record["id"], "question": asked, "question_id": question_id})
            answer_type = "number" if kind == "count" else "other"
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": record["id"],
                    "question_type": kind,
                    "answer_type": answer_type,
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
                }
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"questions": out_dir / "questions.json", "annotations": out_dir / "annotations.json"}
    paths["questions"].write_text(json.dumps({"data_subtype": split, "questions": questions_out}) + "\n")
    paths["annotations"].write_text(json.dumps({"data_subtype": split, "annotations": annotations}) + "\n")
    return {**paths, "images": Path(world_dir) / "images" / split, "image_pattern": "{image_id:06d}.jpg"}
