"""Tests of the toy world: images and captions, the loopback HTTP server, img2dataset shards, tiny models."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.toy import models, world
from pipeline.toy.http_server import serve_directory

ROOT = Path(__file__).resolve().parents[1]
# Requests to the loopback server must not go through a proxy configured in the environment.
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    world.write_toy_world(out, n_train=60, n_val=20, seed=7)
    return out


@pytest.fixture(scope="module")
def pretrained_llm(world_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("llm")
    tokenizer = models.build_tokenizer(out, models.toy_vocabulary())
    # A step budget rather than a time budget, so that the test does not depend on how busy the machine is.
    stats = models.build_tiny_llama(
        out, tokenizer, world.read_records(world_dir, "train"), seconds=60, seed=0, max_steps=80, batch_size=32
    )
    return out, stats


def test_world_records_match_images_and_captions(world_dir):
    summary = json.loads((world_dir / "world.json").read_text())
    assert summary["splits"] == {
        "train": {"count": 60, "index": "train.jsonl"},
        "val": {"count": 20, "index": "val.jsonl"},
    }
    for split, count in (("train", 60), ("val", 20)):
        records = world.read_records(world_dir, split)
        assert [record["id"] for record in records] == list(range(count))
        for record in records:
            assert record["path"] == f"images/{split}/{record['id']:06d}.jpg"
            assert record["caption"] == world.caption_for(record["attrs"])
            assert record["attrs"]["background"] != record["attrs"]["colour"]
            with Image.open(world_dir / record["path"]) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_world_is_deterministic_and_val_differs_from_train(world_dir, tmp_path):
    world.write_toy_world(tmp_path / "again", n_train=60, n_val=20, seed=7)
    world.write_toy_world(tmp_path / "other_seed", n_train=60, n_val=20, seed=8)
    for name in ("train.jsonl", "val.jsonl", "images/train/000059.jpg", "images/val/000000.jpg"):
        assert (tmp_path / "again" / name).read_bytes() == (world_dir / name).read_bytes()
    assert (tmp_path / "other_seed/train.jsonl").read_bytes() != (world_dir / "train.jsonl").read_bytes()
    train_images = {path.read_bytes() for path in (world_dir / "images/train").iterdir()}
    val_images = {path.read_bytes() for path in (world_dir / "images/val").iterdir()}
    assert len(train_images) == 60 and not train_images & val_images


def test_shapes_are_centred(world_dir):
    # The shape's bounding box, found as the pixels far from the background colour, is centred to within 1 px
    # (antialiased edges and JPEG noise move the thresholded box by up to that much).
    for record in world.read_records(world_dir, "val"):
        with Image.open(world_dir / record["path"]) as image:
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
        background = torch.tensor(world.COLOUR_RGB[record["attrs"]["background"]], dtype=torch.float32)
        rows, columns = torch.nonzero((pixels - background).abs().amax(dim=-1) > 60, as_tuple=True)
        for low, high in ((rows.min(), rows.max()), (columns.min(), columns.max())):
            assert abs((low + high).item() / 2 - 31.5) <= 1, record


def test_caption_parse_round_trip():
    combinations = itertools.product(*(world.ATTRIBUTES[name] for name in ("size", "colour", "shape", "background")))
    for size, colour, shape, background in combinations:
        attrs = {"size": size, "colour": colour, "shape": shape, "background": background}
        assert world.parse_caption(world.caption_for(attrs)) == attrs
    expected = {"size": "large", "colour": "red", "shape": "star", "background": "blue"}
    assert world.parse_caption("  A large  red star on a blue background. ") == expected
    for malformed in ("", "a large red star", "a huge red star on a blue background", "a large red star on blue"):
        assert world.parse_caption(malformed) is None


def test_question_answers_are_consistent_with_attributes():
    attrs = {"size": "small", "colour": "green", "shape": "cross", "background": "white"}
    pairs = dict(world.question_answer_pairs(attrs, random.Random(0)))
    assert pairs["what colour is the shape ?"] == "green"
    assert pairs["what shape is it ?"] == "cross"
    assert pairs["what colour is the background ?"] == "white"
    vocabulary = set(models.toy_vocabulary())
    for question, answer in pairs.items():
        assert set(question.split()) | {answer} <= vocabulary


def test_http_server_serves_files_until_stopped(world_dir):
    base_url, stop = serve_directory(world_dir)
    try:
        assert base_url.startswith("http://127.0.0.1:")
        with NO_PROXY_OPENER.open(f"{base_url}/images/val/000003.jpg", timeout=5) as response:
            assert response.read() == (world_dir / "images/val/000003.jpg").read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            NO_PROXY_OPENER.open(f"{base_url}/images/val/missing.jpg", timeout=5)
    finally:
        stop()
    with pytest.raises(urllib.error.URLError):
        NO_PROXY_OPENER.open(f"{base_url}/val.jsonl", timeout=5)


def test_http_server_command_writes_its_url(world_dir, tmp_path):
    port_file = tmp_path / "url"
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.toy.http_server", str(world_dir), "--port-file", str(port_file)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, "server exited or wrote no URL"
            time.sleep(0.05)
        base_url = port_file.read_text().strip()
        with NO_PROXY_OPENER.open(f"{base_url}/val.jsonl", timeout=5) as response:
            assert response.read() == (world_dir / "val.jsonl").read_bytes()
    finally:
        server.terminate()
        assert server.wait(timeout=10) == 0


def test_img2dataset_downloads_the_world_into_webdataset_shards(world_dir, tmp_path):
    base_url, stop = serve_directory(world_dir)
    try:
        parquet = world.write_url_parquet(world_dir, "val", base_url, tmp_path / "val.parquet")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        # One process: the spawned workers' imports dominate a 20-image job.
        command = [
            str(ROOT / "data_prep/img2dataset.sh"),
            "--input",
            str(parquet),
            "--output",
            str(tmp_path / "shards"),
        ]
        command += ["--image-size", "64", "--processes", "1", "--threads", "4", "--shard-size", "8"]
        command += ["--extra-columns", "id,attrs"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shard_dir = tmp_path / "shards"
    assert sorted(path.name for path in shard_dir.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    stats = [json.loads(path.read_text()) for path in sorted(shard_dir.glob("*_stats.json"))]
    assert [s["successes"] for s in stats] == [8, 8, 4] and [s["count"] for s in stats] == [8, 8, 4]

    records = {record["id"]: record for record in world.read_records(world_dir, "val")}
    seen_ids = set()
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        keys = {name.rsplit(".", 1)[0] for name in members}
        assert set(members) == {f"{key}.{extension}" for key in keys for extension in ("jpg", "txt", "json")}
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            record = records[meta["id"]]
            assert meta["status"] == "success" and meta["key"] == key
            assert members[f"{key}.txt"].decode() == record["caption"]
            assert json.loads(meta["attrs"]) == record["attrs"]
            with Image.open(io.BytesIO(members[f"{key}.jpg"])) as image:
                assert image.size == (64, 64)
            seen_ids.add(meta["id"])
    assert seen_ids == set(records)


def test_tokenizer_has_llama3_special_tokens_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    models.build_tokenizer(tmp_path, models.toy_vocabulary())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    for token in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert token in tokenizer.all_special_tokens
    special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert len(special_ids) == 4

    ids = tokenizer("what colour is the shape?")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["what", "colour", "is", "the", "shape", "?"]
    word_ids = tokenizer(" ".join(models.toy_vocabulary()))["input_ids"]
    assert tokenizer.unk_token_id not in word_ids and len(word_ids) == len(models.toy_vocabulary())
    assert tokenizer("Red")["input_ids"] == [tokenizer.unk_token_id]
    caption_ids = tokenizer("<|begin_of_text|>a small red circle<|eot_id|>")["input_ids"]
    assert caption_ids[0] == tokenizer.bos_token_id and caption_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(caption_ids, skip_special_tokens=True) == "a small red circle"

    messages = [
        {"role": "system", "content": "answer in one word ."},
        {"role": "user", "content": " what shape is it ? "},
        {"role": "assistant", "content": "star"},
        {"role": "user", "content": "what size is the shape ?"},
    ]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nanswer in one word .<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nwhat shape is it ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nstar<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nwhat size is the shape ?<|eot_id|>"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_tiny_clip_loads_like_openai_clip(world_dir, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    models.build_tiny_clip(tmp_path / "a", seed=0)
    models.build_tiny_clip(tmp_path / "b", seed=0)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    vision = CLIPVisionModel.from_pretrained(tmp_path / "a")
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "a")
    assert (
        json.loads((tmp_path / "a/preprocessor_config.json").read_text())["image_processor_type"]
        == "CLIPImageProcessor"
    )
    with Image.open(world_dir / "images/val/000000.jpg") as image:
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    with torch.no_grad():
        hidden = vision(pixel_values=pixel_values).last_hidden_state
    assert hidden.shape == (1, 65, 128)


def test_pretrained_llm_copies_attributes_into_its_caption(pretrained_llm, world_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm_dir, stats = pretrained_llm
    assert stats["steps"] == 80 and stats["final_loss"] < 1.0
    assert (llm_dir / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    assert llm.config.vocab_size == len(tokenizer) and not llm.config.tie_word_embeddings
    assert llm.config.max_position_embeddings >= 256

    attrs = {"size": "small", "colour": "red", "shape": "circle", "background": "blue"}
    prompt = tokenizer("<|begin_of_text|>small red circle blue :", return_tensors="pt")["input_ids"]
    generated = llm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    continuation = generated[0, prompt.shape[1] :].tolist()
    assert continuation[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(continuation, skip_special_tokens=True) == world.caption_for(attrs)
    held_out = [record["attrs"] for record in world.read_records(world_dir, "val")]
    assert models.caption_copy_accuracy(llm, tokenizer, held_out) >= 0.9


def test_build_toy_models_writes_loadable_clip_and_llm(world_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    built = models.build_toy_models(tmp_path, world_dir, lm_seconds=0.5, seed=0)
    assert built["clip"] == tmp_path / "clip" and built["llm"] == tmp_path / "llm"
    assert built["lm_stats"]["steps"] >= 1
    CLIPVisionModel.from_pretrained(built["clip"])
    AutoModelForCausalLM.from_pretrained(built["llm"])
    assert AutoTokenizer.from_pretrained(built["llm"]).bos_token == "<|begin_of_text|>"
