"""Stage-2 data: the LLaVA converter (bad records reported and counted, never a crash), the toy instruction data
that goes through it, and the toy VQA files scored by the evaluation harness."""

import json
import random
from pathlib import Path

import pytest

from pipeline.data.conversations import ConversationDecoder
from pipeline.data.shards import iter_shard_records
from pipeline.prep.instruct_shards import convert
from pipeline.toy import instruct, world


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    world.write_toy_world(root, n_train=60, n_val=12, seed=0)
    return root


def test_converter_reports_and_counts_bad_records(tmp_path, toy_world):
    turns = [{"from": "human", "value": "<image>\nwhat shape is it ?"}, {"from": "gpt", "value": "a star"}]
    (toy_world / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = open(toy_world / "images/train/000000.jpg", "rb").read()
    (toy_world / "images" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    records = [
        {"id": "a.1/x", "image": "images/train/000000.jpg", "conversations": turns},
        {"id": "missing", "image": "images/train/999999.jpg", "conversations": turns},
        {"id": "broken", "image": "images/broken.jpg", "conversations": turns},
        {"id": "truncated", "image": "images/truncated.jpg", "conversations": turns},
        {"id": "text-only", "conversations": turns},
        {"id": "no turns", "image": "images/train/000001.jpg", "conversations": []},
        "not a record",
        {"id": "b", "image": "images/train/000002.jpg", "conversations": turns},
        {"id": "c", "image": "images/train/000003.jpg", "conversations": turns},
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records))
    stats = convert(source, toy_world, tmp_path / "shards", shard_size=2, workers=2)
    assert stats == {
        "records": 9,
        "written": 3,
        "shards": 2,
        "skipped": {"missing_image": 1, "unreadable_image": 2, "no_image": 1, "bad_record": 2},
    }
    assert json.loads((tmp_path / "shards" / "stats.json").read_text()) == stats
    skipped = [json.loads(line) for line in (tmp_path / "shards" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["index"], s["reason"]) for s in skipped] == [
        (1, "missing_image"),
        (2, "unreadable_image"),
        (3, "unreadable_image"),
        (4, "no_image"),
        (5, "bad_record"),
        (6, "bad_record"),
    ]
    samples = [
        sample
        for shard in ("00000.tar", "00001.tar")
        for sample in iter_shard_records(str(tmp_path / "shards" / shard))
    ]
    assert [key for key, _ in samples] == ["000000000", "000000007", "000000008"]
    key, members = samples[0]
    assert members["jpg"] == good and json.loads(members["json"]) == {
        "id": "a.1/x",
        "image": "images/train/000000.jpg",
        "conversations": turns,
    }
    assert not list((tmp_path / "shards").glob("*.tmp"))


def test_converter_cli_fails_with_one_line_on_a_wrong_path(tmp_path):
    from pipeline.prep.instruct_shards import main

    assert main(["--json", str(tmp_path / "nope.json"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_toy_instruction_data_goes_through_the_converter(tmp_path, toy_world, tiny_models):
    source = instruct.write_llava_json(toy_world, "train", tmp_path / "llava_train.json")
    records = json.loads(source.read_text())
    assert len(records) == 60
    lengths = [len(record["conversations"]) for record in records]
    assert set(lengths) == {2, 4, 6} and 0.2 < sum(n > 2 for n in lengths) / len(lengths) < 0.5
    questions = [turn["value"] for record in records for turn in record["conversations"] if turn["from"] == "human"]
    assert all(record["conversations"][0]["value"].startswith("<image>\n") for record in records)
    assert sum("<image>" in question for question in questions) == 60
    single = [record["conversations"] for record in records if len(record["conversations"]) == 2]
    short = [turns for turns in single if turns[0]["value"].endswith(instruct.SHORT_ANSWER)]
    assert 0.3 < len(short) / len(single) < 0.7 and all(len(turns[1]["value"].split()) == 1 for turns in short)
    multi = [turn["value"] for r in records if len(r["conversations"]) > 2 for turn in r["conversations"]]
    assert multi and not any(instruct.SHORT_ANSWER in text for text in multi)
    held_out = {q for kind in instruct.questions(world.sample_attributes(random.Random(0))).values() for q in kind[1]}
    asked = {q.removeprefix("<image>\n").split("\n")[0] for q in questions}
    assert len(held_out) == 10 and len(asked) == 17 and not asked & held_out

    stats = convert(source, toy_world, tmp_path / "shards", shard_size=25)
    assert stats["written"] == 60 and stats["shards"] == 3
    decoder = ConversationDecoder(str(tiny_models / "clip"), str(tiny_models / "llm"), 8, 128)
    tokenizer = decoder.tokenizer
    for key, members in iter_shard_records(str(tmp_path / "shards" / "00000.tar")):
        sample = decoder(members, key)
        answers = [t["value"] for t in json.loads(members["json"])["conversations"] if t["from"] == "gpt"]
        supervised = sample["text_labels"][sample["text_labels"] != -100].tolist()
        assert tokenizer.decode(supervised) == " ".join(f"{answer} <|eot_id|>" for answer in answers)
        assert tokenizer.unk_token_id not in sample["text_ids"].tolist()


def test_toy_vqa_files_score_with_the_harness(tmp_path, toy_world):
    from pipeline.evaluation.benchmarks import evaluate_vqa, read_vqa_benchmark

    files = instruct.write_vqa_files(toy_world, "val", tmp_path / "vqa", per_image=2)
    benchmark = read_vqa_benchmark(files["images"], files["questions"], files["annotations"], files["image_pattern"])
    assert len(benchmark.questions) == 24 and set(benchmark.answer_types.values()) <= {"yes/no", "number", "other"}
    prompts = []
    truth = [benchmark.answers[key][0] for key in benchmark.questions]  # one process: items come in order
    remaining = iter(truth)

    def oracle(images, batch_prompts):  # the humans' answer, with the whitespace a model may add around it
        prompts.extend(batch_prompts)
        return [f" {next(remaining)}\n" for _ in batch_prompts]

    result = evaluate_vqa(benchmark, oracle, tmp_path / "out", batch_size=5)
    assert result["n"] == 24 and result["accuracy"] == 100.0
    assert [prompt.split("\n")[0] for prompt in prompts] == list(benchmark.questions.values())
    assert all(prompt.endswith("\nAnswer the question using a single word or phrase.") for prompt in prompts)

    # The ten human answers of a toy question agree, so the official script compares the prediction as it is:
    # the right answer capitalised or with a final period scores 0.
    dressed = iter(truth)

    def dressed_up(images, batch_prompts):
        return [f"{next(dressed).title()}." for _ in batch_prompts]

    assert evaluate_vqa(benchmark, dressed_up, tmp_path / "dressed", batch_size=5)["accuracy"] == 0.0

    def wrong(images, batch_prompts):
        return ["purple" for _ in batch_prompts]

    result = evaluate_vqa(benchmark, wrong, tmp_path / "wrong", batch_size=5)
    assert result["accuracy"] == round(100 * truth.count("purple") / len(truth), 2) > 0  # the harness rounds to 0.01
