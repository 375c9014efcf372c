"""A broken run ends promptly with one line, never hangs; hostile images and tars are skipped, counted and contained.

The runs go through the real entry points (`python -m pipeline.train`, `launch/stage1_local.sh`) on tiny models
saved with `save_pretrained`. Time bounds are generous: only a hang, or a rank that waits out a grace period,
breaks them. The seconds each case took are printed (`pytest -s`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import add_member, run_module, single_process_env, three_step_overrides, write_caption_shards
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
CAPTION = b"a small red circle on a blue background"


def run_train(overrides: list[str], timeout_s: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = run_module("pipeline.train", "--config", "configs/toy.yaml", *overrides, timeout=timeout_s)
    return proc, time.monotonic() - started


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(text in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def jpeg(mode: str = "RGB", color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (64, 64), color).save(out, "JPEG")
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def write_records(path: Path, records: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A webdataset tar of `records`; returns its bytes."""
    with tarfile.open(path, "w") as tar:
        for key, members in records:
            for extension, data in members.items():
                add_member(tar, f"{key}.{extension}", data)
    return path.read_bytes()


def member_offset(data: bytes, name: str) -> int:
    """Byte offset of the header of member `name` in a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return next(info.offset for info in tar.getmembers() if info.name == name)


@pytest.fixture(scope="module")
def bomb_jpeg() -> bytes:
    """A 12000 x 12000 JPEG (144 Mpixel, 4 MB): decoded whole it takes about 0.4 GB as RGB."""
    image = Image.new("L", (12000, 12000), 90)
    draw = ImageDraw.Draw(image)
    for x in range(0, 12000, 500):
        draw.line([(x, 0), (12000 - x, 12000)], fill=200, width=40)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


# -- a rank that fails ends at once --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mismatched_models(tiny_models, tmp_path_factory) -> Path:
    """The tiny CLIP and a tiny Llama whose vocabulary is smaller than its tokenizer's: the first forward fails."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("mismatched")
    shutil.copytree(tiny_models / "clip", out / "clip")
    shutil.copytree(tiny_models / "llm", out / "llm")
    config = LlamaConfig.from_pretrained(tiny_models / "llm")
    config.vocab_size = 8
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    LlamaForCausalLM(config).save_pretrained(out / "llm")
    return out


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("caption_shards")
    write_caption_shards(root, n_shards=4, per_shard=8)
    return root


def test_exception_in_training_with_live_workers_exits_with_one_line(mismatched_models, caption_shards, tmp_path):
    """An exception in the training step, with two loader workers alive, ends the process with status 1, one error
    line naming the exception and the log file that holds the traceback, and no worker left behind."""
    run_dir = tmp_path / "run"
    overrides = [*three_step_overrides(run_dir, mismatched_models, caption_shards), "data.num_workers=2"]
    proc, seconds = run_train([*overrides, "logging.sample_every_steps=0"])
    print(f"exception with 2 live workers: exit {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "IndexError" in lines[0] and "rank_00000.log" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Traceback" in (run_dir / "logs" / "rank_00000.log").read_text()
    assert seconds < 120
    assert not processes_mentioning(str(run_dir)), "loader workers outlived their rank"


def test_data_error_in_a_worker_exits_with_one_line(tiny_models, tmp_path):
    """Shards whose every image is corrupt: the reader gives up after its limit of consecutive skips, and the
    worker's DataError ends the run with status 2 and its own one-line message, not a hang."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        write_records(
            shards / f"{index:05d}.tar",
            [(f"s{index}_{i}", {"jpg": b"\xff\xd8 not", "txt": CAPTION}) for i in range(30)],
        )
    run_dir = tmp_path / "run"
    proc, seconds = run_train([*three_step_overrides(run_dir, tiny_models, shards), "data.num_workers=2"])
    print(f"data error in a worker: exit {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "skipped 1000 samples in a row" in lines[0] and "corrupt_image" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert seconds < 120
    assert not processes_mentioning(str(run_dir))


def start_local_job(models: Path, shards: Path, run_dir: Path) -> subprocess.Popen:
    """Two CPU ranks of a long toy stage-1 run under launch/stage1_local.sh, returned once training has begun."""
    from pipeline.common.dist_env import free_port

    overrides = three_step_overrides(run_dir, models, shards, global_batch=8)
    overrides += ["data.num_workers=2", "train.max_steps=100000", "train.save_every_steps=100000"]
    launcher = subprocess.Popen(
        ["bash", "launch/stage1_local.sh", "configs/toy.yaml", *overrides],
        cwd=ROOT,
        env=single_process_env(NPROC="2", MASTER_PORT=str(free_port())),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        if launcher.poll() is not None or time.monotonic() > deadline:
            os.killpg(launcher.pid, signal.SIGKILL)
            pytest.fail("training did not start: " + launcher.stdout.read()[-3000:])
        time.sleep(0.5)
    return launcher


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank` (not one of its loader workers, which share its command line)."""
    for process in psutil.Process(launcher.pid).children(recursive=True):
        if "pipeline.train" in " ".join(process.cmdline()) and process.environ().get("RANK") == str(rank):
            if "deepspeed.launcher.launch" in " ".join(process.parent().cmdline()):
                return process
    raise AssertionError(f"no rank {rank} under the launcher")


@pytest.mark.slow
def test_killed_rank_ends_the_local_job(tiny_models, caption_shards, tmp_path):
    """`kill -9` of one of two ranks under launch/stage1_local.sh: the other rank and every loader worker are gone
    and the launcher has exited non-zero within seconds, instead of waiting out its 30 s grace period."""
    launcher = start_local_job(tiny_models, caption_shards, tmp_path / "run")
    try:
        job = psutil.Process(launcher.pid).children(recursive=True)
        killed = time.monotonic()
        rank_process(launcher, 1).send_signal(signal.SIGKILL)
        returncode = launcher.wait(timeout=120)
        seconds = time.monotonic() - killed
        gone, alive = psutil.wait_procs(job, timeout=5)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    output = launcher.stdout.read()
    print(f"kill -9 of rank 1: launcher exited {returncode} after {seconds:.1f} s")
    assert returncode != 0
    assert seconds < 20, output[-3000:]
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert "Traceback" not in output


@pytest.mark.slow
def test_stopping_the_local_launcher_checkpoints_both_ranks(tiny_models, caption_shards, tmp_path):
    """SIGTERM to the deepspeed launcher (as a scheduler stops it): its SIGTERM reaches the ranks while both live, so
    they agree on a step, checkpoint it and stop cleanly; neither takes it for a failed sibling."""
    run_dir = tmp_path / "run"
    launcher = start_local_job(tiny_models, caption_shards, run_dir)
    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
        next(p for p in children if "deepspeed.launcher.launch" in " ".join(p.cmdline())).send_signal(signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    output = launcher.stdout.read()
    stopped = [int(step) for step in re.findall(r"stopped at step (\d+): signal 15", output)]
    assert stopped and len(set(stopped)) == 1, output[-3000:]
    assert (run_dir / "checkpoints" / f"step_{stopped[0]:08d}" / "COMPLETE").is_file()
    assert "error:" not in output and "Traceback" not in output, output[-3000:]


# -- hostile images and tars ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_shards(tmp_path_factory, bomb_jpeg) -> Path:
    """Shards holding odd but valid images (kept), bad samples of every kind (skipped) and three broken tars."""
    root = tmp_path_factory.mktemp("hostile")
    good = [(f"good{i}", {"jpg": jpeg(color=(20 * i, 100, 30)), "txt": CAPTION}) for i in range(8)]
    palette = Image.new("P", (64, 64), 3)
    palette.info["transparency"] = 3
    odd = [
        ("cmyk", {"jpg": jpeg("CMYK", color=(0, 200, 200, 0)), "txt": CAPTION}),
        ("gray", {"jpg": jpeg("L", 120), "txt": CAPTION}),
        ("rgba", {"png": png(Image.new("RGBA", (64, 48), (200, 30, 30, 0))), "txt": CAPTION}),
        ("gray_alpha", {"png": png(Image.new("LA", (40, 64), (90, 128))), "txt": CAPTION}),
        ("palette", {"png": png(palette), "txt": CAPTION}),
        ("one_pixel", {"png": png(Image.new("RGB", (1, 1), (1, 2, 3))), "txt": CAPTION}),
        ("sixteen_bit", {"png": png(Image.new("I;16", (64, 64), 40000)), "txt": CAPTION}),
        ("bomb_jpeg", {"jpg": bomb_jpeg, "txt": CAPTION}),
    ]
    bad = [
        ("bomb_png", {"png": png(Image.new("RGB", (8000, 8000), (10, 200, 30))), "txt": CAPTION}),
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": CAPTION}),
        ("latin1", {"jpg": jpeg(), "txt": "caf\xe9 on a blue background".encode("latin-1")}),
        ("empty", {"jpg": jpeg(), "txt": b"   "}),
        ("half", {"jpg": jpeg()}),
    ]
    write_records(root / "00000.tar", [*good[:4], *odd])
    write_records(root / "00001.tar", [*good[4:], *bad])
    # Three broken copies of a shard of good records: cut inside a header, cut where a header starts (no
    # end-of-archive block), and followed by garbage. The records before the damage are still read.
    for index, name in enumerate(("cut_header", "cut_boundary", "garbage")):
        records = [(f"{name}x{i}", {"jpg": jpeg(color=(9, 9, 9 * i)), "txt": CAPTION}) for i in range(6)]
        data = write_records(root / f"{index + 2:05d}.tar", records)
        offset = member_offset(data, f"{name}x4.jpg")
        damaged = {
            "cut_header": data[: offset + 200],
            "cut_boundary": data[:offset],
            "garbage": data + b"trailing bytes that are not a tar" * 10,
        }[name]
        (root / f"{index + 2:05d}.tar").write_bytes(damaged)
    return root


@pytest.mark.slow
def test_hostile_shards_train_to_the_end(tiny_models, hostile_shards, tmp_path):
    """Training over the hostile shards finishes; every odd-but-valid image is trained on, every bad sample is
    skipped and counted by its reason, and each broken tar counts as bad_tar after its intact records."""
    run_dir = tmp_path / "run"
    overrides = three_step_overrides(run_dir, tiny_models, hostile_shards, global_batch=8)
    overrides += ["data.num_workers=2", "train.max_steps=14", "train.record_sample_keys=true", "data.shuffle_buffer=4"]
    proc, seconds = run_train(overrides)
    print(f"hostile shards: 14 steps in {seconds:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 14
    for reason in ("oversized_image", "corrupt_image", "bad_caption", "empty_caption", "missing_member"):
        assert final[f"skipped/{reason}"] >= 1, (reason, final)
    assert final["skipped/bad_tar"] >= 3, final
    keys = set()
    for line in (run_dir / "logs" / "keys_rank_00000.jsonl").read_text().splitlines():
        keys.update(json.loads(line)["keys"])
    kept = {"cmyk", "gray", "rgba", "gray_alpha", "palette", "one_pixel", "sixteen_bit", "bomb_jpeg"}
    assert kept <= keys, kept - keys
    assert not keys & {"bomb_png", "corrupt", "latin1", "empty", "half"}
    for name in ("cut_header", "cut_boundary", "garbage"):
        assert f"{name}x0" in keys, name
    assert "cut_headerx4" not in keys and "cut_boundaryx4" not in keys


def test_worker_memory_stays_bounded_on_a_decompression_bomb(tiny_models, bomb_jpeg, tmp_path):
    """Decoding the 144-Mpixel JPEG costs a loader process little memory (the decoder's draft scale) and is kept;
    an 8000 x 8000 PNG, which has no draft scale, is refused before it is decoded."""
    (tmp_path / "bomb.jpg").write_bytes(bomb_jpeg)
    (tmp_path / "bomb.png").write_bytes(png(Image.new("RGB", (8000, 8000), (10, 200, 30))))
    script = f"""
import json, time
from PIL import Image
from pipeline.data.captions import ImageDecoder
from pipeline.data.skips import SkipSample

def peak_mb_of(work):
    # Reset the kernel's high-water mark of this process's resident memory, then read it after the work.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    before = int(status["VmRSS"].split()[0])
    result = work()
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return result, (int(status["VmHWM"].split()[0]) - before) / 1024

decoder = ImageDecoder({str(tiny_models / "clip")!r})
decoder.load()
jpeg, png = open({str(tmp_path / "bomb.jpg")!r}, "rb").read(), open({str(tmp_path / "bomb.png")!r}, "rb").read()
started = time.perf_counter()
pixels, jpeg_mb = peak_mb_of(lambda: decoder(jpeg)["pixel_values"])
seconds = time.perf_counter() - started
def refuse():
    try:
        decoder(png)
        return "decoded"
    except SkipSample as skip:
        return skip.reason
png_reason, png_mb = peak_mb_of(refuse)
def whole():
    with Image.open({str(tmp_path / "bomb.jpg")!r}) as image:
        return image.convert("RGB").size
_, whole_mb = peak_mb_of(whole)
print(json.dumps({{"shape": list(pixels.shape), "seconds": round(seconds, 3), "jpeg_peak_mb": jpeg_mb,
                  "png": png_reason, "png_peak_mb": png_mb, "whole_decode_peak_mb": whole_mb}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"decompression bomb: {result}")
    assert result["shape"] == [3, 64, 64]
    assert result["png"] == "oversized_image"
    # The same JPEG decoded whole, as PIL does by default, for scale: about 0.4 GB.
    assert result["whole_decode_peak_mb"] > 300, result
    assert result["jpeg_peak_mb"] < 50 and result["png_peak_mb"] < 50, result


def test_demo_without_java_stops_before_any_work(tmp_path):
    """`python -m pipeline.demo` on a machine without Java says how to install it before it writes anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    out = tmp_path / "demo"
    proc = subprocess.run(
        [str(bin_dir / "python"), "-m", "pipeline.demo", "--out", str(out)],
        cwd=ROOT,
        env={**single_process_env(), "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: caption metrics need Java (pycocoevalcap's tokenizer and METEOR): install a Java runtime, "
        "e.g. `apt-get install default-jre-headless`"
    ]
    assert not out.exists()
