"""How a failing rank ends: at once, non-zero, with one line on the console and the traceback in its log file.

A training process must never outlive its failure. Left to Python's normal exit, a rank that raised would wait
forever: its data-loader workers ignore SIGTERM (so that a stop signal reaches only the trainer), and the
interpreter's exit handler stops child processes with SIGTERM and then joins them. Its launcher would never see
it exit, and the job would sit on its GPUs until the time limit. So a rank that fails kills its own workers and
leaves with `os._exit`; the deepspeed launcher (or srun) then sees the exit status and ends the other ranks.

The other ranks notice in one of two ways. A collective with a dead peer fails (gloo at once; NCCL when the
process group times out), which is a failure like any other. And under the deepspeed launcher, the SIGTERM it
sends after a rank died would otherwise be taken for a stop request, whose checkpoint can never complete:
`LauncherWatch` ends the rank instead when a sibling rank is gone, from a thread, so that it works even while the
main thread is blocked in a GPU wait.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
from typing import NoReturn

from pipeline.config import ConfigError
from pipeline.data.shards import DataError

log = logging.getLogger(__name__)

# What gloo and NCCL say when the other end of a collective has gone away.
_PEER_LOST = re.compile(
    r"connection closed by peer|connection reset by peer|broken pipe|remote process exited|"
    r"communicator was aborted|connection refused|socket timeout",
    re.IGNORECASE,
)


class PeerLost(RuntimeError):
    """Another rank of the job has exited, so this one cannot go on."""


def describe_failure(error: BaseException) -> tuple[str, bool]:
    """(one line saying what went wrong, whether it is the user's to fix without a traceback)."""
    text = str(error)
    name = type(error).__name__
    if "Original Traceback" in text:
        # Re-raised from a data-loader worker: the worker's own last line names the real error and its message.
        last = [line for line in text.splitlines() if line.strip()][-1]
        qualified, _, text = last.partition(": ")
        name = qualified.rsplit(".", 1)[-1]
    else:
        text = text.strip().splitlines()[0] if text.strip() else ""
    if isinstance(error, (ConfigError, DataError)) or name in ("ConfigError", "DataError"):
        return text, True
    if isinstance(error, PeerLost):
        return text, False
    if _PEER_LOST.search(text):
        return (
            f"lost contact with another rank ({name}: {text[:160]}); it has probably failed: see its error line "
            "and logs/rank_*.log in the run directory",
            False,
        )
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", True
    return f"{name}: {text[:300]}", False


def exit_after_failure(error: BaseException, rank: int, world_size: int) -> NoReturn:
    """Log the traceback to the rank's log file, print one line, stop this rank's workers, exit at once."""
    line, users_to_fix = describe_failure(error)
    log_files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    exc_info = (type(error), error, error.__traceback__)
    record = logging.LogRecord("pipeline.train", logging.ERROR, __file__, 0, "rank %d failed", (rank,), exc_info)
    for handler in log_files:
        handler.handle(record)
    if not users_to_fix:
        if log_files:
            line += f" (traceback: {log_files[0].baseFilename})"
        else:  # failed before the log file existed: the console is the only place left for the traceback
            import traceback

            traceback.print_exception(*exc_info, file=sys.stderr)
    prefix = f"rank {rank}: " if world_size > 1 else ""
    print(f"error: {prefix}{line}", file=sys.stderr, flush=True)
    stop_workers()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(130 if isinstance(error, KeyboardInterrupt) else 2 if users_to_fix else 1)


def stop_workers() -> None:
    """Kill this process's data-loader workers: they ignore SIGTERM, and nothing else would end them now."""
    for child in multiprocessing.active_children():
        try:
            child.kill()
        except OSError:  # already gone
            pass


class LauncherWatch:
    """Under the deepspeed launcher: end this rank when a stop signal arrives and a sibling rank has died.

    The launcher answers a rank's death by sending SIGTERM to the others, then waits 30 s before killing them.
    A signal sets only a flag in Python's handler, which runs when the main thread next runs Python code; the
    thread here sees the signal through `signal.set_wakeup_fd`, which the interpreter writes to from the C handler.
    Call `start` from the main thread once every rank is up (after the process group), after the Python handlers
    for the stop signals are installed.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.siblings: list = []
        self.armed = True

    def disarm(self) -> None:
        """Stop acting: the ranks have agreed to stop (or have finished), so a sibling that exits now has done its
        part, and the launcher's SIGTERM that may follow is no sign of failure."""
        self.armed = False

    def start(self) -> bool:
        """Start watching; returns False (and does nothing) when the parent is not the deepspeed launcher."""
        import psutil  # a dependency of deepspeed

        try:
            parent = psutil.Process(os.getppid())
            if "deepspeed.launcher.launch" not in " ".join(parent.cmdline()):
                return False
            self.siblings = [child for child in parent.children() if child.pid != os.getpid()]
        except psutil.Error:
            return False
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_end,), name="launcher-watch", daemon=True).start()
        return True

    def dead_siblings(self) -> list[int]:
        import psutil

        dead = []
        for sibling in self.siblings:
            try:
                if not sibling.is_running() or sibling.status() == psutil.STATUS_ZOMBIE:
                    dead.append(sibling.pid)
            except psutil.NoSuchProcess:
                dead.append(sibling.pid)
        return dead

    def _watch(self, read_end: int) -> None:
        while True:
            received = os.read(read_end, 64)
            if signal.SIGTERM in received and self.armed and (dead := self.dead_siblings()):
                error = PeerLost(
                    f"another rank on this node exited (pid {dead[0]}) and the launcher is stopping the job; "
                    "see that rank's error line"
                )
                exit_after_failure(error, self.rank, self.world_size)
