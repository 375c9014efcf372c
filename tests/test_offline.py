"""With HF_HUB_OFFLINE=1 and local model paths, toy stage 1 runs with every network call refused.

The proof is tests/network_guard: on PYTHONPATH it is the interpreter's `sitecustomize`, which refuses any
non-loopback connect, datagram or name lookup before it happens and records it. The training run must succeed
with an empty record; a control shows, inside the same kind of guarded interpreter, that real attempts (a raw
connect, DNS, urllib, the Hub client and transformers) are refused and recorded without a socket ever connecting.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import three_step_overrides, write_caption_shards

from pipeline.prep.offline import enforce_offline

ROOT = Path(__file__).resolve().parents[1]
GUARD_DIR = Path(__file__).parent / "network_guard"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def guarded_env(log: Path, **overrides: str) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", *OFFLINE_VARIABLES)
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(GUARD_DIR), str(ROOT)]),
        NETWORK_GUARD_LOG=str(log),
        OMP_NUM_THREADS="1",
        **overrides,
    )
    return env


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_enforce_offline_only_when_every_model_is_local(tmp_path, monkeypatch, caplog):
    import huggingface_hub.constants

    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    (tmp_path / "clip").mkdir()
    (tmp_path / "llm").mkdir()
    caplog.set_level(logging.INFO, logger="pipeline.prep.offline")

    assert not enforce_offline([str(tmp_path / "clip"), "meta-llama/Meta-Llama-3-8B-Instruct"])
    assert not any(name in os.environ for name in OFFLINE_VARIABLES)
    assert "meta-llama/Meta-Llama-3-8B-Instruct" in caplog.text and "fetch_weights.sh" in caplog.text
    assert not enforce_offline([])

    assert enforce_offline([str(tmp_path / "clip"), str(tmp_path / "llm")])
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    # huggingface_hub was imported before the call; its frozen copy of the variable is switched too.
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE=1" in caplog.text


CONTROL = textwrap.dedent("""
    import json, os, socket, sys, threading, time, urllib.request
    if not getattr(socket, "network_guard_installed", False):
        sys.exit("the guard is not installed; not attempting anything")  # never risk a real connection
    from sitecustomize import NetworkGuardError
    time.sleep = lambda seconds: None  # the Hub client backs off for 30 s between its retries
    outcome = {}

    def attempt(name, action):
        try:
            action()
            outcome[name] = "allowed"
        except BaseException as err:  # each library wraps the refusal its own way; find it in the chain
            chain = [err]
            while chain[-1].__cause__ or chain[-1].__context__ or getattr(chain[-1], "reason", None):
                nxt = chain[-1].__cause__ or chain[-1].__context__ or chain[-1].reason
                if not isinstance(nxt, BaseException) or nxt in chain:
                    break
                chain.append(nxt)
            outcome[name] = "refused" if any(isinstance(e, NetworkGuardError) for e in chain) else repr(err)

    raw = socket.socket()
    attempt("connect", lambda: raw.connect(("203.0.113.7", 443)))  # TEST-NET-3: documentation only
    try:
        raw.getpeername()
        outcome["socket_connected"] = True
    except OSError:
        outcome["socket_connected"] = False
    attempt("connect_ex", lambda: socket.socket().connect_ex(("203.0.113.7", 80)))
    attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("203.0.113.7", 53)))
    attempt("dns", lambda: socket.getaddrinfo("huggingface.co", 443))
    attempt("urllib", lambda: urllib.request.urlopen("https://huggingface.co/api/models", timeout=2))
    clip = "openai/clip-vit-large-patch14"
    attempt("hub", lambda: __import__("huggingface_hub").HfApi().model_info(clip))
    attempt("transformers", lambda: __import__("transformers").AutoConfig.from_pretrained(clip))

    # Loopback stays open: a listener on 127.0.0.1 accepts a connection.
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: listener.accept()[0].close(), daemon=True).start()
    attempt("loopback", lambda: socket.create_connection(listener.getsockname(), timeout=2).close())
    print(json.dumps(outcome))
""")


def test_guard_refuses_non_loopback_attempts_before_they_happen(tmp_path):
    log = tmp_path / "guard.jsonl"
    env = guarded_env(
        log,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    proc = subprocess.run(
        [sys.executable, "-c", CONTROL], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("connect", "connect_ex", "udp", "dns", "urllib", "hub", "transformers"):
        assert outcome[name] == "refused", (name, outcome[name])
    assert outcome["socket_connected"] is False, "the refused socket never connected"
    assert outcome["loopback"] == "allowed"

    refused = read_jsonl(log)
    targets = {(r["call"], r["target"]) for r in refused}
    assert ("connect", "('203.0.113.7', 443)") in targets and ("connect_ex", "('203.0.113.7', 80)") in targets
    assert ("sendto", "('203.0.113.7', 53)") in targets and ("getaddrinfo", "'huggingface.co'") in targets
    assert all("127.0.0.1" not in r["target"] for r in refused), "loopback is never refused"
    assert [r["pid"] for r in read_jsonl(Path(f"{log}.installed"))] == [refused[0]["pid"]]


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("offline_shards")
    write_caption_shards(root, n_shards=2, per_shard=16)
    return root


@pytest.mark.slow
def test_toy_stage1_trains_with_every_network_call_refused(tiny_models, caption_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "guard.jsonl"
    env = guarded_env(log, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    overrides = three_step_overrides(run_dir, tiny_models, caption_shards)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", "configs/toy.yaml", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert read_jsonl(log) == [], "non-loopback network attempts during training"
    assert "all models are local directories" in proc.stdout, "pipeline.train calls enforce_offline"
    installed = read_jsonl(Path(f"{log}.installed"))
    assert any("pipeline.train" in entry["argv"] for entry in installed), "the guard ran in the training process"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (run_dir / "export" / "resampler.safetensors").is_file()
