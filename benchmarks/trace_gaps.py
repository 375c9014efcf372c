"""Where a GPU sat idle during profiled steps, and what the host was doing then, from a torch.profiler trace.

    python benchmarks/trace_gaps.py TRACE.json[.gz] [--min-gap-us 20] [--top 15]

The device is busy during kernels, copies and memsets; everything between them is a gap. Each gap is charged to the
host code that launched the next device op (the innermost frames of the project or DeepSpeed on the launching
thread, from `with_stack` traces), and it is marked when a blocking host call (a stream or event synchronize, a
blocking copy) overlapped it: such gaps are the host waiting for the device, then the device waiting for the host.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
BLOCKING_CALLS = ("Synchronize", "cudaMemcpy ", "cudaMemcpy\0")
OWN_CODE = ("pipeline/", "deepspeed/", "benchmarks/", "torch/_dynamo", "torch/autograd")


def load_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return json.load(handle)["traceEvents"]


def _frames_at(stacks: dict, tid, ts: float) -> list[str]:
    """Names of the python_function events on `tid` that contain time `ts`, outermost first."""
    starts, events = stacks.get(tid, ([], []))
    index = bisect.bisect_right(starts, ts)
    return [e["name"] for e in events[:index] if e["ts"] <= ts <= e["ts"] + e["dur"]]


def _label(frames: list[str]) -> str:
    own = [frame for frame in frames if any(part in frame for part in OWN_CODE)]
    return " < ".join(reversed(own[-2:])) if own else (frames[-1] if frames else "?")


def idle_gaps(events: list[dict], min_gap_us: float = 20.0, top: int = 15) -> dict:
    """Summary of the device's idle time: total, by launching host code, and the longest gaps."""
    device = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"]
    )
    if not device:
        return {"error": "no device events in the trace"}
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
    launch_of = {e.get("args", {}).get("correlation"): e for e in runtime}
    blocking = sorted(
        (e for e in runtime if any(call in e["name"] + "\0" for call in BLOCKING_CALLS)), key=lambda e: e["ts"]
    )
    stacks: dict = {}
    for event in sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") == "python_function"), key=lambda e: e["ts"]
    ):
        starts, listed = stacks.setdefault(event["tid"], ([], []))
        starts.append(event["ts"])
        listed.append(event)
    gaps, busy_until = [], device[0]["ts"] + device[0]["dur"]
    for event in device[1:]:
        if event["ts"] - busy_until >= min_gap_us:
            gaps.append((busy_until, event))
        busy_until = max(busy_until, event["ts"] + event["dur"])
    span = busy_until - device[0]["ts"]
    by_label: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    rows = []
    for start, following in gaps:
        length = following["ts"] - start
        launch = launch_of.get(following.get("args", {}).get("correlation"))
        label = _label(_frames_at(stacks, launch["tid"], launch["ts"])) if launch else "?"
        waited = any(b["ts"] < following["ts"] and b["ts"] + b["dur"] > start for b in blocking)
        label = ("[after a host sync] " if waited else "") + label
        by_label[label][0] += length
        by_label[label][1] += 1
        rows.append((length, label, following["name"][:80]))
    rows.sort(reverse=True)
    idle = sum(length for length, _, _ in rows)
    return {
        "span_ms": span / 1e3,
        "idle_ms": idle / 1e3,
        "gaps": len(rows),
        "by_launching_code_ms": {
            k: round(v[0] / 1e3, 3) for k, v in sorted(by_label.items(), key=lambda kv: -kv[1][0])[:top]
        },
        "longest": [{"us": round(length, 1), "launched_by": label, "next": name} for length, label, name in rows[:top]],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(json.dumps(idle_gaps(load_trace(args.trace), args.min_gap_us, args.top), indent=2))


if __name__ == "__main__":
    main()
