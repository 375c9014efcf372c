"""The sbatch launch path on a real Slurm: two virtual nodes on this host (tests/slurm_cluster.py), one CPU rank each.

The tests submit the real `launch/stage1.sbatch` on the toy world. The first runs to the end; the second gets the
pre-time-limit warning mid-run (`scancel --signal=USR1 --batch`, what `#SBATCH --signal=B:USR1@600` delivers), so
the batch script must have the trainer checkpoint, requeue the job, and the requeued job must resume and finish
exactly where the uninterrupted run does; the third sends SIGTERM to the training step, which must checkpoint and
stop without a requeue. Skipped, with the reason, only where Slurm cannot be installed or started (set
PIPELINE_REQUIRE_SLURM=1 to make that a failure).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_caption_shards
from slurm_cluster import SlurmCluster, SlurmUnavailable, slurm_binary

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 40
JOB_TIMEOUT_S = 420
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}

pytestmark = pytest.mark.slow


def skip_or_fail(reason: str) -> None:
    """Skip where Slurm is unavailable, unless PIPELINE_REQUIRE_SLURM=1 (CI, and machines where these must run)."""
    if os.environ.get("PIPELINE_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason} (PIPELINE_REQUIRE_SLURM=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if slurm_binary("slurmctld") is None:
        install = subprocess.run(["bash", str(ROOT / "launch" / "install_slurm.sh")], capture_output=True, text=True)
        if install.returncode != 0:
            why = install.stderr.strip().splitlines()[-1] if install.stderr.strip() else f"exit {install.returncode}"
            skip_or_fail(f"Slurm is not installed and launch/install_slurm.sh could not install it: {why}")
    try:
        running = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as err:
        skip_or_fail(f"the local Slurm cluster did not start: {err}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_caption_shards(root, n_shards=4, per_shard=32)
    return root


def submit_stage1(cluster: SlurmCluster, run_dir: Path, models: Path, shards: Path) -> int:
    overrides = [
        f"run_dir={run_dir}",
        f"model.vision.model={models}/clip",
        f"model.llm.model={models}/llm",
        f"data.sources=[{{shards: '{shards}/*.tar'}}]",
        "data.val_shards=",
        "data.num_workers=1",
        "data.shuffle_buffer=20",
        "train.micro_batch_size=8",
        "train.global_batch_size=16",
        f"train.max_steps={MAX_STEPS}",
        "train.log_every_steps=1",
        "train.save_every_steps=1000",
        "train.eval_every_steps=0",
        "optim.warmup_steps=5",
        "optim.lr=0.003",
        "logging.wandb_mode=disabled",
    ]
    env = {
        # The venv first on PATH, as `make test` has it: the same `deepspeed` and the same `ninja` (a different
        # ninja version rebuilds DeepSpeed's cached op).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}",
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only
        "STOP_RESEND_S": "5",
    }
    options = (f"--partition={cluster.partition}", "--gpus-per-node=0", f"--output={run_dir.parent}/%x-%j.out")
    return cluster.sbatch(
        ROOT / "launch" / "stage1.sbatch", "configs/toy.yaml", *overrides, options=options, cwd=ROOT, env=env
    )


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) in the order metrics.jsonl has them; a requeued run appends to the same file."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def job_log(run_dir: Path, job_id: int) -> str:
    return (run_dir.parent / f"anymal-stage1-{job_id}.out").read_text()


def finished_job(cluster: SlurmCluster, job_id: int, run_dir: Path) -> dict[str, str]:
    record = cluster.wait_for_job(job_id, FINAL_STATES, JOB_TIMEOUT_S)
    assert record["JobState"] == "COMPLETED", (
        f"job {job_id}: {record['JobState']}; log:\n" + job_log(run_dir, job_id)[-4000:]
    )
    return record


@pytest.fixture(scope="module")
def straight_run(cluster, tiny_models, toy_shards, tmp_path_factory) -> tuple[Path, int, dict[str, str]]:
    """The uninterrupted reference run: 2 nodes x 1 CPU rank to MAX_STEPS."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    job_id = submit_stage1(cluster, run_dir, tiny_models, toy_shards)
    return run_dir, job_id, finished_job(cluster, job_id, run_dir)


def test_stage1_sbatch_trains_on_two_nodes(straight_run):
    run_dir, job_id, record = straight_run
    assert record["ExitCode"] == "0:0" and record["Restarts"] == "0"
    assert record["NodeList"] == "n[1-2]", record["NodeList"]

    log = job_log(run_dir, job_id)
    # One deepspeed launcher per node (srun --label prefixes each node's lines), each starting its one rank.
    for node_rank in (0, 1):
        assert re.search(rf"^{node_rank}: .*nnodes=2, num_local_procs=1, node_rank={node_rank}", log, re.M), node_rank
        assert re.search(rf"^{node_rank}: .*Process \d+ exits successfully", log, re.M), node_rank
    for rank in (0, 1):
        rank_log = (run_dir / "logs" / f"rank_{rank:05d}.log").read_text()
        assert f"rank{rank} INFO pipeline.train: stopped at step {MAX_STEPS}: max_steps" in rank_log, rank_log

    losses = dict(read_losses(run_dir))
    assert [step for step, _ in read_losses(run_dir)] == list(range(1, MAX_STEPS + 1))
    first, last = losses[1], sum(losses[s] for s in range(MAX_STEPS - 4, MAX_STEPS + 1)) / 5
    assert last < first - 0.15, f"loss did not fall: step 1 {first:.4f}, last five steps {last:.4f}"
    assert (run_dir / "FINISHED").read_text().strip() == str(MAX_STEPS), "FINISHED marks the end of the run"


def wait_for_training(cluster: SlurmCluster, job_id: int, run_dir: Path, steps: int = 2) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ((run_dir / "metrics.jsonl").is_file() and len(read_losses(run_dir)) >= steps):
        record = cluster.job(job_id)
        assert record["JobState"] in {"PENDING", "RUNNING"}, job_log(run_dir, job_id)[-4000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)


def test_stop_warning_checkpoints_requeues_and_resumes(cluster, tiny_models, toy_shards, straight_run, tmp_path):
    straight_dir = straight_run[0]
    run_dir = tmp_path / "run"
    job_id = submit_stage1(cluster, run_dir, tiny_models, toy_shards)

    # The warning, as `#SBATCH --signal=B:USR1@...` delivers it: to the batch shell only, once training is under way.
    wait_for_training(cluster, job_id, run_dir)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))

    record = finished_job(cluster, job_id, run_dir)
    assert record["Restarts"] == "1", record
    log = job_log(run_dir, job_id)
    stopped = re.search(r"stopped at step (\d+): signal 10", log)
    assert stopped, log[-4000:]
    stop_step = int(stopped.group(1))
    assert 2 <= stop_step < MAX_STEPS
    assert f"requeueing job {job_id} (restart 1)" in log
    assert f"job {job_id} (anymal-stage1) restart 1 on n1,n2" in log
    assert (run_dir / "checkpoints" / f"step_{stop_step:08d}" / "COMPLETE").is_file()
    for rank in (0, 1):
        rank_log = (run_dir / "logs" / f"rank_{rank:05d}.log").read_text()
        assert f"resumed from {run_dir}/checkpoints/step_{stop_step:08d} at step {stop_step}" in rank_log
        assert f"stopped at step {MAX_STEPS}: max_steps" in rank_log

    # Same steps, same losses as the uninterrupted run: nothing lost or repeated across the requeue.
    straight, resumed = read_losses(straight_dir), read_losses(run_dir)
    assert [step for step, _ in resumed] == list(range(1, MAX_STEPS + 1))
    assert resumed[-1] == straight[-1], f"final (step, loss): resumed {resumed[-1]}, uninterrupted {straight[-1]}"
    assert resumed == straight


def test_sigterm_checkpoints_and_stops_without_requeue(cluster, tiny_models, toy_shards, tmp_path):
    """SIGTERM to every process of the training step (`scancel --signal=TERM`, not the batch shell): the ranks
    checkpoint and stop, and the job is not requeued."""
    run_dir = tmp_path / "run"
    job_id = submit_stage1(cluster, run_dir, tiny_models, toy_shards)
    wait_for_training(cluster, job_id, run_dir)
    cluster.run("scancel", "--signal=TERM", str(job_id))

    record = cluster.wait_for_job(job_id, FINAL_STATES, JOB_TIMEOUT_S)
    assert record["Restarts"] == "0", "SIGTERM must not requeue: a user's scancel has to stop the job"
    log = job_log(run_dir, job_id)
    stopped = re.search(r"stopped at step (\d+): signal 15", log)
    assert stopped, log[-4000:]
    stop_step = int(stopped.group(1))
    assert (run_dir / "checkpoints" / f"step_{stop_step:08d}" / "COMPLETE").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stop_step:08d}"
    assert not (run_dir / "FINISHED").exists()
