"""Evaluation harness: the official VQA accuracy worked by hand, caption metrics against pycocoevalcap's own
scoring, benchmark files in and submission files out, and the generation runner's split, gather and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from pipeline.evaluation import benchmarks, caption_metrics
from pipeline.evaluation.runner import GenerationItem, generate_all
from pipeline.evaluation.vqa_metric import normalize_answer, vqa_accuracy, vqa_scores

# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy, worked by hand from the official script's rules. With k of 10 answer records matching, leaving out a
# matching record leaves k - 1 matches and leaving out another leaves k; each subset scores min(matches / 3, 1):
# k = 0 -> 0, 1 -> 9 * (1/3) / 10 = 0.3, 2 -> (2 * (1/3) + 8 * (2/3)) / 10 = 0.6, 3 -> (3 * (2/3) + 7) / 10 = 0.9,
# k >= 4 -> 1. "Split" humans do not all give the same answer (after whitespace cleaning): then both sides are
# normalised; "unanimous" humans all give one answer: then the prediction is only whitespace-cleaned.

VQA_CASES = {
    # Unanimous versus split humans
    "unanimous: case is not folded": ("Yes", ["yes"] * 10, 0.0),
    "unanimous: exact answer": ("yes", ["yes"] * 10, 1.0),
    "unanimous: hyphen compared as is": ("t-shirt", ["t-shirt"] * 10, 1.0),
    "unanimous: no punctuation processing": ("t shirt", ["t-shirt"] * 10, 0.0),
    "split: case folded, 9 match": ("Yes", ["yes"] * 9 + ["no"], 1.0),
    "split: hyphen spaced on both sides, 5 match": ("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5, 1.0),
    # Whitespace in human answers: cleaned first, so it decides unanimity
    "human spaces stripped: 6 of 10 'yes'": ("yes", [" yes"] * 6 + ["no"] * 4, 1.0),
    "human tab and newline stripped: unanimous, so case is not folded": ("Yes", ["yes\n"] * 5 + ["\tyes"] * 5, 0.0),
    "prediction and humans stripped, unanimous": (" yes\t", [" yes "] * 10, 1.0),
    # Number words
    "split: 'two' -> '2', 2 match": ("two", ["2"] * 2 + ["3"] * 8, 0.6),
    "unanimous: 'two' is not '2'": ("two", ["2"] * 10, 0.0),
    "split: human number words too, 3 match": ("2", ["two"] * 3 + ["three"] * 7, 0.9),
    "split: 'None' -> '0', 1 matches": ("None", ["0"] + ["1"] * 9, 0.3),
    # Articles
    "split: prediction's article dropped, 4 match": ("a dog", ["dog"] * 4 + ["cat"] * 6, 1.0),
    "split: human's article dropped, 1 matches": ("dog", ["the dog"] + ["cat"] * 9, 0.3),
    "unanimous: article kept": ("apple", ["an apple"] * 10, 0.0),
    # Contractions
    "split: 'dont' gets its apostrophe, 3 match": ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9),
    "split: human 'dont' too, 2 match": ("don't", ["dont"] * 2 + ["yes"] * 8, 0.6),
    "split: the table's 'Im' never matches a lower-cased word": ("Im", ["i'm"] * 5 + ["no"] * 5, 0.0),
    # Punctuation, periods in decimals, commas in numbers
    "unanimous: final period kept": ("yes.", ["yes"] * 10, 0.0),
    "split: final period removed": ("yes.", ["yes"] * 9 + ["no"], 1.0),
    "split: '!' spaced, then dropped by the split, 3 match": ("Yes!", ["yes"] * 3 + ["no"] * 7, 0.9),
    "split: period before a digit kept, 2 match": ("2.5", ["2.5"] * 2 + ["3"] * 8, 0.6),
    "split: final period of a decimal removed, 1 matches": ("2.5.", ["2.5"] + ["3"] * 9, 0.3),
    "split: digit,digit removes every mark, 3 match": ("1,000", ["1000"] * 3 + ["100"] * 7, 0.9),
    "split: human '1,000' -> '1000', 2 match": ("1000", ["1,000"] * 2 + ["100"] * 8, 0.6),
    "split: comma between letters becomes a space, 2 match": ("red,white", ["red white"] * 2 + ["red"] * 8, 0.6),
    "split: marks touching a space are deleted": ("red , white", ["red white", "red, white", *["red"] * 8], 0.6),
    "split: slash becomes a space, 4 match": ("black/white", ["black white"] * 4 + ["gray"] * 6, 1.0),
    "split: apostrophe is not punctuation": ("dog's", ["dogs"] * 5 + ["dog"] * 5, 0.0),
    # Empty prediction
    "empty prediction, unanimous humans": ("", ["yes"] * 10, 0.0),
    "empty prediction, split humans": ("", ["yes"] * 5 + ["no"] * 5, 0.0),
    "empty prediction matches humans who answered an article, 3 match": ("", ["the"] * 3 + ["no"] * 7, 0.9),
    # The leave-one-out mean is over the records there are
    "two records: leave 'yes' out -> 0, leave 'no' out -> 1/3": ("yes", ["yes", "no"], 1 / 6),
    "no human gave it": ("blue", ["red"] * 10, 0.0),
    # Python 2 semantics of the official script
    "Arabic-Indic digits are not \\d: the comma becomes a space": ("١,٢", ["١ ٢"] * 2 + ["x"] * 8, 0.6),
    "Arabic-Indic digit after a period: the period goes": ("٣.٥", ["٣٥"] * 3 + ["x"] * 7, 0.9),
    "'İ' lower-cases to 'i'": ("İstanbul", ["istanbul"] * 3 + ["ankara"] * 7, 0.9),
    "a final 'Σ' lower-cases to 'σ'": ("ΟΔΟΣ", ["οδοσ"] * 3 + ["x"] * 7, 0.9),
    "U+180E is whitespace to strip": ("yes\u180e", ["yes"] * 10, 1.0),
}


@pytest.mark.parametrize("name", list(VQA_CASES))
def test_vqa_accuracy_matches_hand_worked_values(name):
    """Each case's expected accuracy follows from the official rules as worked out in its name and above."""
    prediction, humans, expected = VQA_CASES[name]
    assert vqa_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("  Two\tdogs\n", "2 dogs"),
        ("isnt it?", "isn't it"),  # "?" touches no space: spaced, then dropped by the split
        ("A (big) dog", "big dog"),  # " (" and ") " touch spaces: both deleted; "a" dropped
        ("ten o'clock.", "10 o'clock"),  # "'" is not punctuation here; the final period goes
        ("3.14", "3.14"),
        ("1,000.5 (approx)", "1000.5 approx"),  # "digit,digit" deletes every mark, the brackets included
        ("." * 40 + "x", "." * 8 + "x"),  # the official script removes at most 32 periods
    ],
)
def test_answer_normalisation_when_humans_disagree(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_scores_average_and_group_per_type():
    answers = {1: ["yes"] * 10, 2: ["2", "2", *["3"] * 8], 3: ["red"] * 10}
    predictions = {1: "yes", 2: "two", 3: "Red"}  # 1.0, 0.6, 0.0 (unanimous humans: case is not folded)
    scores = vqa_scores(
        predictions,
        answers,
        answer_types={1: "yes/no", 2: "number", 3: "other"},
        question_types={1: "is", 2: "how many", 3: "what color"},
    )
    assert scores["accuracy"] == 53.33  # 100 * 1.6 / 3 = 53.333...
    assert scores["per_answer_type"] == {"number": 60.0, "other": 0.0, "yes/no": 100.0}
    assert scores["per_question_type"] == {"how many": 60.0, "is": 100.0, "what color": 0.0}
    assert scores["per_question"] == pytest.approx({1: 1.0, 2: 0.6, 3: 0.0})
    with pytest.raises(ValueError, match="no predicted answer"):
        vqa_scores({1: "yes"}, answers)


def test_vqa_scores_round_halves_away_from_zero_as_python2_does():
    """497 of 800 right is exactly 62.125 percent: Python 2's round gives 62.13, Python 3's 62.12."""
    answers = {key: ["yes"] * 10 for key in range(800)}
    predictions = {key: "yes" if key < 497 else "no" for key in range(800)}
    assert vqa_scores(predictions, answers)["accuracy"] == 62.13
    assert round(62.125, 2) == 62.12  # what a Python 3 round would have reported
    predictions = {key: "yes" if key < 499 else "no" for key in range(800)}  # 62.375 -> 62.38
    assert vqa_scores(predictions, answers)["accuracy"] == 62.38


# ---------------------------------------------------------------------------------------------------------------
# Caption metrics

CAPTION_REFERENCES = {
    391895: [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    522418: [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman marking a cake with the back of a chef's knife.",
    ],
    184613: [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
    ],
    318219: [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
    ],
}
CAPTION_PREDICTIONS = {
    391895: "A man riding a motorcycle on a dirt road.",
    522418: "A woman is cutting a cake with a knife!",
    184613: "A boy holding an umbrella next to a cow.",
    318219: "A dog sitting on a couch.",
}


def _reference_scores(references: dict, predictions: dict, meteor) -> dict:
    """pycocoevalcap's own scoring, set up as its COCOEvalCap.evaluate does (without SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    scores = {}
    for scorer, names in [
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (meteor, "METEOR"),
        (Rouge(), "ROUGE_L"),
        (Cider(), "CIDEr"),
    ]:
        score, _ = scorer.compute_score(gts, res)
        scores.update(zip(names, score, strict=True) if isinstance(names, list) else {names: score})
    return scores


def test_caption_metrics_equal_pycocoevalcap(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    # A METEOR JVM takes ~10 s to load its paraphrase table, so one serves both sides: the reference scoring first,
    # then ours, which stops it when done.
    shared_meteor = meteor_module.Meteor()
    theirs = _reference_scores(CAPTION_REFERENCES, CAPTION_PREDICTIONS, shared_meteor)
    monkeypatch.setattr(meteor_module, "Meteor", lambda: shared_meteor)
    ours = caption_metrics.caption_scores(CAPTION_REFERENCES, CAPTION_PREDICTIONS)
    assert shared_meteor.meteor_p.poll() is not None  # our scoring stopped the JVM
    assert list(ours) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)
    # Not a trivial fixture: no score is perfect or zero, and the BLEU orders differ.
    assert all(0.05 < ours[name] < 0.95 for name in ours if name != "CIDEr") and 0.1 < ours["CIDEr"] < 3
    assert ours["Bleu_1"] > ours["Bleu_2"] > ours["Bleu_3"] > ours["Bleu_4"]


def test_caption_metrics_check_their_inputs():
    with pytest.raises(ValueError, match="same keys"):
        caption_metrics.caption_scores({1: ["a cat"]}, {2: "a cat"}, ["CIDEr"])
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_metrics.caption_scores({1: ["a cat"]}, {1: "a cat"}, ["SPICE"])


def test_missing_java_names_the_fix(monkeypatch):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(caption_metrics.JavaNotFound, match="apt-get install default-jre-headless"):
        caption_metrics.require_java()


# ---------------------------------------------------------------------------------------------------------------
# Generation runner: parts, resume, split across ranks


class CountingGenerator:
    """A stand-in model: the answer names the prompt and the image's colour; can fail on its Nth call."""

    def __init__(self, fail_on_call: int | None = None):
        self.prompts: list[str] = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.prompts.extend(prompts)
        return [f"{p} -> {image.getpixel((0, 0))[0]}\nand more" for image, p in zip(images, prompts, strict=True)]


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.png"
        Image.new("RGB", (8, 8), (index * 10, 0, 0)).save(path)
        paths.append(path)
    return paths


def make_items(folder: Path, count: int = 10) -> list[GenerationItem]:
    return [GenerationItem(1000 + i, str(path), f"q{i}") for i, path in enumerate(write_images(folder, count))]


def test_runner_resumes_without_redoing_finished_parts(tmp_path):
    items = make_items(tmp_path / "images")  # 10 items, parts of 4 -> parts of 4, 4, 2 items; batches of 2
    parts_dir = tmp_path / "out" / "parts"
    crashing = CountingGenerator(fail_on_call=3)  # part 0 takes calls 1-2; call 3 is part 1's first batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_all(items, crashing, parts_dir, batch_size=2, part_size=4)
    assert sorted(p.name for p in parts_dir.glob("part_*")) == ["part_00000.jsonl"]

    resumed = CountingGenerator()
    outputs = generate_all(items, resumed, parts_dir, batch_size=2, part_size=4)
    assert resumed.calls == 3  # parts 1 (2 batches) and 2 (1 batch); part 0 is read back, not generated
    assert resumed.prompts == [f"q{i}" for i in range(4, 10)]
    assert list(outputs) == [item.key for item in items]
    assert outputs[1003] == "q3 -> 30\nand more"

    again = CountingGenerator()
    assert generate_all(items, again, parts_dir, batch_size=2, part_size=4) == outputs
    assert again.calls == 0

    changed = [GenerationItem(item.key, item.image_path, "other prompt") for item in items]
    with pytest.raises(ValueError, match="different evaluation"):
        generate_all(changed, CountingGenerator(), parts_dir, batch_size=2, part_size=4)


def _two_rank_worker(rank: int, init_file: str, items: list, parts_dir: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        generator = CountingGenerator()
        outputs = generate_all(items, generator, parts_dir, batch_size=2, part_size=4)
        record = {"prompts": generator.prompts, "outputs": None if outputs is None else list(outputs.items())}
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def test_runner_splits_parts_across_ranks_and_gathers_on_rank0(tmp_path):
    items = make_items(tmp_path / "images")
    parts_dir = tmp_path / "out" / "parts"
    # One process finishes part 0, then two ranks share the two parts left and rank 0 gathers all ten outputs.
    with pytest.raises(RuntimeError):
        generate_all(items, CountingGenerator(fail_on_call=3), parts_dir, batch_size=2, part_size=4)
    # fork, not spawn: the workers need no fresh interpreter, and spawn costs seconds of imports per rank.
    mp.start_processes(
        _two_rank_worker,
        args=(str(tmp_path / "init"), items, str(parts_dir), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["prompts"] == ["q4", "q5", "q6", "q7"] and rank1["prompts"] == ["q8", "q9"]
    assert rank1["outputs"] is None
    assert [key for key, _ in rank0["outputs"]] == [item.key for item in items]
    assert dict(rank0["outputs"])[1009] == "q9 -> 90\nand more"


# ---------------------------------------------------------------------------------------------------------------
# Benchmark files in, submission files out


def test_vqa_formats_read_and_write_submissions(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg", "7.jpg", "VizWiz_val_0001.jpg"):
        Image.new("RGB", (8, 8), (200, 0, 0)).save(images / name)
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "How many?", "question_id": 420},
            {"image_id": 7, "question": "What colour?", "question_id": 70},
        ],
    }
    annotations = {
        "annotations": [
            {
                "question_id": 420,
                "answer_type": "number",
                "question_type": "how many",
                "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(["2", "2", *["3"] * 8])],
            },
            {
                "question_id": 70,
                "answer_type": "other",
                "question_type": "what color",
                "answers": [{"answer": "red", "answer_id": i} for i in range(10)],
            },
        ]
    }
    textvqa = {"data": [{"image_id": "7", "question_id": 5, "question": "What word?", "answers": ["stop"] * 10}]}
    vizwiz = [
        {
            "image": "VizWiz_val_0001.jpg",
            "question": "What is it?",
            "answer_type": "unanswerable",
            "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
        }
    ]
    for name, value in [("q.json", questions), ("a.json", annotations), ("t.json", textvqa), ("v.json", vizwiz)]:
        (tmp_path / name).write_text(json.dumps(value))

    def answer(images_, prompts):
        return ["Two." if "How many" in p else " unanswerable" if "insufficient" in p else "Red" for p in prompts]

    vqa = benchmarks.read_vqa_benchmark(images, tmp_path / "q.json", tmp_path / "a.json")
    metrics = benchmarks.evaluate_vqa(vqa, answer, tmp_path / "vqa", batch_size=2)
    # Split humans: "Two." -> "2", 2 of 10 -> 0.6. Ten "red": "Red" is compared as it is -> 0.0. Mean 30.0.
    assert metrics["accuracy"] == 30.0 and metrics["per_answer_type"] == {"number": 60.0, "other": 0.0}
    assert metrics["per_question_type"] == {"how many": 60.0, "what color": 0.0}
    # Submissions hold the answers as generated (first line, stripped), not as the metric normalises them.
    submission = json.loads((tmp_path / "vqa" / "predictions.json").read_text())
    assert submission == [{"question_id": 420, "answer": "Two."}, {"question_id": 70, "answer": "Red"}]
    assert vqa.image_paths[420].endswith("COCO_val2014_000000000042.jpg")

    text = benchmarks.read_vqa_benchmark(images, annotations=tmp_path / "t.json")
    assert benchmarks.evaluate_vqa(text, answer, tmp_path / "text", batch_size=2)["accuracy"] == 0.0  # "Red"
    viz = benchmarks.read_vqa_benchmark(images, annotations=tmp_path / "v.json")
    assert benchmarks.evaluate_vqa(viz, answer, tmp_path / "viz", batch_size=2)["accuracy"] == 100.0
    submission = json.loads((tmp_path / "viz" / "predictions.json").read_text())
    assert submission == [{"image": "VizWiz_val_0001.jpg", "answer": "unanswerable"}]

    with pytest.raises(FileNotFoundError, match="--image-pattern"):
        benchmarks.read_vqa_benchmark(images, tmp_path / "q.json", image_pattern="{image_id:012d}.jpg")


def test_caption_formats_read_and_write_submissions(tmp_path):
    write_images(tmp_path / "coco" / "val2014", 3)
    karpathy = {
        "images": [
            {
                "filepath": "val2014",
                "filename": f"{i:04d}.png",
                "cocoid": 500 + i,
                "split": split,
                "sentences": [{"raw": f"A red square number {i}."}, {"raw": "a red image"}],
            }
            for i, split in enumerate(["test", "test", "val"])
        ]
    }
    coco_format = {
        "images": [{"id": 9, "file_name": "0002.png"}, {"id": 8, "file_name": "0001.png"}],
        "annotations": [{"image_id": 9, "caption": "A red square."}],
    }
    (tmp_path / "karpathy.json").write_text(json.dumps(karpathy))
    (tmp_path / "coco.json").write_text(json.dumps(coco_format))

    test_split = benchmarks.read_caption_benchmark(tmp_path / "karpathy.json", tmp_path / "coco")
    assert list(test_split.references) == [500, 501]
    assert test_split.references[501] == ["A red square number 1.", "a red image"]
    # Image 8 has no caption to score against and is left out.
    coco = benchmarks.read_caption_benchmark(tmp_path / "coco.json", tmp_path / "coco" / "val2014")
    assert coco.references == {9: ["A red square."]}

    generator = CountingGenerator()
    metrics = benchmarks.evaluate_captions(test_split, generator, tmp_path / "out", batch_size=4, metrics=("CIDEr",))
    assert generator.prompts == [benchmarks.PROMPT_TEMPLATES["caption"]] * 2
    assert metrics["n"] == 2 and metrics["CIDEr"] >= 0
    submission = json.loads((tmp_path / "out" / "predictions.json").read_text())
    # Only the first line of a generation is kept.
    assert submission == [
        {"image_id": 500, "caption": f"{generator.prompts[0]} -> 0"},
        {"image_id": 501, "caption": f"{generator.prompts[0]} -> 10"},
    ]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["CIDEr"] == metrics["CIDEr"]


def test_eval_refuses_vqa_on_a_stage1_run(tmp_path, capsys):
    from pipeline import eval as eval_entry

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "export" / "resampler.safetensors").write_bytes(b"")
    (tmp_path / "a.json").write_text(json.dumps({"data": []}))
    code = eval_entry.main(
        [
            "--run",
            str(run),
            "--task",
            "vqa",
            "--annotations",
            str(tmp_path / "a.json"),
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and "instruction-tuned (stage 2)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def make_stage1_run(tiny_models: Path, run: Path) -> Path:
    """A run directory as training leaves it (config.yaml, export/) around an untrained resampler."""
    from transformers import CLIPVisionConfig

    from pipeline.config import load_config, save_config, to_dict
    from pipeline.inference.export import export_resampler
    from pipeline.model.anymal import build_resampler

    config = load_config(
        Path(__file__).parents[1] / "configs/toy.yaml",
        [f"run_dir={run}", f"model.vision.model={tiny_models / 'clip'}", f"model.llm.model={tiny_models / 'llm'}"],
    )
    run.mkdir(parents=True)
    save_config(config, run / "config.yaml")
    torch.manual_seed(0)
    vision_width = CLIPVisionConfig.from_pretrained(config.model.vision.model).hidden_size
    resampler = build_resampler(config.model, vision_width, llm_width=64)
    export_resampler(resampler, run / "export", to_dict(config.model), step=0)
    return run


def test_eval_entry_point_on_a_tiny_stage1_run(tiny_models, tmp_path):
    from conftest import write_caption_shards

    from pipeline import eval as eval_entry

    run = make_stage1_run(tiny_models, tmp_path / "run")
    shards = write_caption_shards(tmp_path / "shards", n_shards=1, per_shard=6)
    toy_out = tmp_path / "toy"
    assert (
        eval_entry.main(
            [
                "--run",
                str(run),
                "--task",
                "toy_caption",
                "--shards",
                str(shards[0]),
                "--out",
                str(toy_out),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    toy = json.loads((toy_out / "metrics.json").read_text())
    assert toy["n"] == 6 and {"caption_accuracy", "shape_accuracy", "CIDEr", "Bleu_4", "ROUGE_L"} <= set(toy)
    assert len(json.loads((toy_out / "predictions.json").read_text())) == 6

    write_images(tmp_path / "images", 3)
    coco = {
        "images": [{"id": i, "file_name": f"{i:04d}.png"} for i in range(3)],
        "annotations": [
            {"image_id": i, "id": i, "caption": "a small red circle on a blue background"} for i in range(3)
        ],
    }
    (tmp_path / "captions_val.json").write_text(json.dumps(coco))
    args = [
        "--run",
        str(run),
        "--task",
        "coco_caption",
        "--annotations",
        str(tmp_path / "captions_val.json"),
        "--images",
        str(tmp_path / "images"),
        "--out",
        str(tmp_path / "coco"),
        "--metrics",
        "CIDEr",
        "--batch-size",
        "2",
        "--part-size",
        "2",
        "--max-new-tokens",
        "4",
    ]
    assert eval_entry.main(args) == 0
    predictions = json.loads((tmp_path / "coco" / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [0, 1, 2]
    manifest = json.loads((tmp_path / "coco" / "parts" / "manifest.json").read_text())
    assert manifest["items"] == 3 and len(manifest["resampler_sha256"]) == 64
    part_times = [p.stat().st_mtime_ns for p in sorted((tmp_path / "coco" / "parts").glob("part_*"))]
    assert len(part_times) == 2
    assert eval_entry.main(args) == 0  # resumes: both parts are finished, so nothing is generated again
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "coco" / "parts").glob("part_*"))] == part_times
    assert json.loads((tmp_path / "coco" / "predictions.json").read_text()) == predictions
