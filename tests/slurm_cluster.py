"""A throw-away Slurm cluster on loopback for the launch tests: one slurmctld and two virtual nodes on this host.

`SlurmCluster(root).start()` writes its own slurm.conf under `root` (auth/none, cred/none, linuxproc process
tracking, no task plugin, nodes `n1` and `n2` at 127.0.0.1 on their own ports), starts `slurmctld -D` and one
`slurmd -D -N <node>` per node as child processes, and waits until both nodes are idle. Every client call goes
through `SLURM_CONF`, so a system Slurm on the same machine is neither read nor touched. `stop()` cancels the jobs,
then ends exactly the processes this cluster started or ran (by PID: the daemons, plus any process whose
environment names this cluster's slurm.conf or that holds a file in its spool), never by process name.

Raises `SlurmUnavailable` with a one-line reason when Slurm is missing or the cluster does not come up.
"""

from __future__ import annotations

import getpass
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
DAEMON_POLL_S = 0.2


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed here or the local cluster could not be started."""


def slurm_binary(name: str) -> str | None:
    """Path of a Slurm command; the daemons live in sbin, which a non-root PATH often lacks."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def parse_record(text: str) -> dict[str, str]:
    """`scontrol show ... -o` output (Key=Value pairs on one line) as a dict; values may contain spaces only at
    the end of the line (Command=, Reason=), which this ignores."""
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", text))


class SlurmCluster:
    def __init__(
        self,
        root: Path,
        nodes: tuple[str, ...] = ("n1", "n2"),
        cpus_per_node: int = 2,
        partition: str = "debug",
        kill_wait_s: int = 10,
        cred_expire_s: int = 8,
    ):
        self.root = Path(root)
        self.nodes, self.cpus_per_node, self.partition = nodes, cpus_per_node, partition
        self.kill_wait_s, self.cred_expire_s = kill_wait_s, cred_expire_s
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.daemons: dict[str, subprocess.Popen] = {}
        self.binaries = {
            name: slurm_binary(name)
            for name in ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo", "srun")
        }
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS]),
        }
        # Settings of a surrounding allocation (tests run inside a CI job that is itself a Slurm job) or of the
        # test process's own rank must not leak into the jobs of this cluster.
        for name in list(self.env):
            if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
                del self.env[name]
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(name, None)

    # -- bring-up ----------------------------------------------------------------------------------------------

    def write_config(self) -> None:
        missing = [name for name, path in self.binaries.items() if path is None]
        if missing:
            raise SlurmUnavailable(
                f"Slurm is not installed ({', '.join(missing)} not found); run "
                "launch/install_slurm.sh (Debian: apt-get install slurmctld slurmd slurm-client)"
            )
        for sub in ("etc", "state", "log", "tmp", *(f"spool/{node}" for node in self.nodes)):
            # slurmd does not create its spool directory itself.
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        user = getpass.getuser()
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=pipelinetest",
            # Job ids, and so the launch scripts' rendezvous ports (derived from them), differ between clusters
            # that run on one machine at the same time.
            f"FirstJobId={random.randrange(1000, 19000)}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd.%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={self.root}/etc/plugstack.conf",
            f"TmpFS={self.root}/tmp",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            # Start a requeued job as soon as its BeginTime passes, not at the next minute's scheduling pass.
            "SchedulerParameters=sched_interval=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobRequeue=1",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            f"KillWait={self.kill_wait_s}",
            "MinJobAge=600",
            "InactiveLimit=0",
            "MailProg=/bin/true",
            # A requeued job waits cred_expire seconds (default 120) before it may start again.
            f"AuthInfo=cred_expire={self.cred_expire_s}",
        ]
        for node, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(lines) + "\n")
        (self.root / "etc" / "plugstack.conf").write_text("")

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        self.write_config()
        try:
            self._spawn("slurmctld", [self.binaries["slurmctld"], "-D", "-i", "-f", str(self.conf)])
            self._wait_for(
                lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
                timeout_s,
                "slurmctld did not answer 'scontrol ping'",
            )
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [self.binaries["slurmd"], "-D", "-N", node, "-f", str(self.conf)])
            self._wait_for(self._nodes_idle, timeout_s, "the nodes did not become idle")
        except (OSError, subprocess.SubprocessError) as err:
            self.stop()
            raise SlurmUnavailable(f"starting the Slurm daemons failed: {err}; {self._log_tail()}") from err
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "w")  # closed in stop()
        self.daemons[name] = subprocess.Popen(
            argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        return all(states.get(node, "").startswith("idle") for node in self.nodes)

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with code {proc.returncode}; {self._log_tail(name)}")
            if ready():
                return
            time.sleep(DAEMON_POLL_S)
        raise SlurmUnavailable(f"{what} within {timeout_s:.0f} s; {self._log_tail()}")

    def _log_tail(self, name: str | None = None) -> str:
        logs = sorted(self.log_dir.glob("*.log")) + sorted(self.log_dir.glob("*.stdout"))
        if name is not None:
            logs = [p for p in logs if name.replace("-", ".") in p.name or name in p.name]
        tails = []
        for path in logs:
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                tails.append(f"{path.name}: {lines[-1]}")
        return " | ".join(tails) or f"no daemon logs in {self.log_dir}"

    # -- clients -----------------------------------------------------------------------------------------------

    def run(self, tool: str, *args: str, check: bool = True, timeout_s: float = 30, **kwargs):
        proc = subprocess.run(
            [self.binaries[tool] or tool, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(
        self,
        script: str | Path,
        *args: str,
        options: tuple[str, ...] = (),
        cwd: Path | None = None,
        env: dict | None = None,
    ) -> int:
        proc = subprocess.run(
            [self.binaries["sbatch"], "--parsable", *options, str(script), *args],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        return parse_record(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def wait_for_job(self, job_id: int, states: set[str], timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Poll until the job is in one of `states` (e.g. {"COMPLETED", "FAILED"}); returns its record."""
        deadline = time.monotonic() + timeout_s
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if record.get("JobState") in states:
                return record
            time.sleep(poll_s)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: "
            f"state {record.get('JobState')}, reason {record.get('Reason')}"
        )

    # -- tear-down ---------------------------------------------------------------------------------------------

    def stop(self) -> None:
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", f"--partition={self.partition}", check=False)
            deadline = time.monotonic() + self.kill_wait_s + 5
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(DAEMON_POLL_S)
        for proc in reversed(list(self.daemons.values())):
            _end(proc.pid, proc)
        for pid in self._leftover_pids():
            _end(pid)
        for proc in self.daemons.values():
            if proc.stdout is not None:
                proc.stdout.close()
        self.daemons.clear()

    def _leftover_pids(self) -> list[int]:
        """Processes of this cluster that outlived its daemons: slurmstepd holds files in our spool, and job
        processes carry our SLURM_CONF in their environment."""
        marker = f"SLURM_CONF={self.conf}".encode()
        root = str(self.root)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
                    continue
                for fd in (entry / "fd").iterdir():
                    if os.readlink(fd).startswith(root):
                        found.append(int(entry.name))
                        break
            except OSError:
                continue
        return found


def _end(pid: int, proc: subprocess.Popen | None = None, grace_s: float = 5) -> None:
    """SIGTERM, then SIGKILL after grace_s; only the given PID."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        else:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        proc.wait(timeout=grace_s)
