"""Where the GPU waits: the idle gaps between kernels in a torch profiler trace, and what the CPU's main thread was
doing meanwhile.

A training step bound by the CPU leaves the GPU idle whenever Python has not issued the next kernel yet. This reads a
trace written by finetune.training.runs.ProfileSteps (trace_rankN.json.gz; with STAGES_PROFILE_STACKS=1 it holds Python
frames too), finds every stretch with no kernel, copy or memset running, and credits each operator, annotation and
Python frame of the main thread with the idle time that fell inside it (a frame is credited for its callees too).

    python benchmarks/idle_gaps.py PROFILE_FOLDER/trace_rank0.json.gz [--top 40] [--min-gap-us 20]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import sys
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "user_annotation", "python_function")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as trace:
        return [event for event in json.load(trace)["traceEvents"] if event.get("ph") == "X"]


def idle_gaps(events: list[dict], min_gap_us: float) -> tuple[list[tuple[float, float]], float, float]:
    """(gaps longer than min_gap_us between the first and last GPU activity, span, busy time), in microseconds."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES)
    if not spans:
        return [], 0.0, 0.0
    gaps, busy = [], 0.0
    start, end = spans[0]
    for begin, finish in spans[1:]:
        if begin > end:
            busy += end - start
            if begin - end >= min_gap_us:
                gaps.append((end, begin))
            start, end = begin, finish
        else:
            end = max(end, finish)
    busy += end - start
    return gaps, spans[-1][1] - spans[0][0] if len(spans) > 1 else 0.0, busy


def main_thread_events(events: list[dict]) -> list[dict]:
    cpu = [e for e in events if e.get("cat") in CPU_CATEGORIES]
    if not cpu:
        return []
    main_thread = collections.Counter(e["tid"] for e in cpu if e.get("cat") == "cpu_op").most_common(1)
    tid = main_thread[0][0] if main_thread else cpu[0]["tid"]
    return [e for e in cpu if e["tid"] == tid]


def idle_outside_operators(events: list[dict], gaps: list[tuple[float, float]]) -> float:
    """Idle time during which the main thread ran no operator or annotation: plain Python (logging, data loading
    in the training process, the Trainer's bookkeeping), or waiting on something the profiler does not record."""
    covered, start, end = 0.0, None, None
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in main_thread_events(events) if e["cat"] != "python_function")
    merged = []
    for begin, finish in spans:
        if end is None or begin > end:
            if end is not None:
                merged.append((start, end))
            start, end = begin, finish
        else:
            end = max(end, finish)
    if end is not None:
        merged.append((start, end))
    starts = [begin for begin, _ in merged]
    for gap_start, gap_end in gaps:
        index = max(bisect.bisect_right(starts, gap_start) - 1, 0)
        while index < len(merged) and merged[index][0] < gap_end:
            covered += max(0.0, min(gap_end, merged[index][1]) - max(gap_start, merged[index][0]))
            index += 1
    return sum(end - start for start, end in gaps) - covered


def idle_time_inside(events: list[dict], gaps: list[tuple[float, float]]) -> collections.Counter:
    """For each main-thread event name, the idle time that fell within its occurrences."""
    cpu = main_thread_events(events)
    if not cpu or not gaps:
        return collections.Counter()
    gap_ends = [end for _, end in gaps]
    credited: collections.Counter = collections.Counter()
    for event in cpu:
        begin, finish = event["ts"], event["ts"] + event["dur"]
        index = bisect.bisect_right(gap_ends, begin)
        while index < len(gaps) and gaps[index][0] < finish:
            credited[f"{event['cat'][:6]:<6} {event['name']}"] += min(finish, gaps[index][1]) - max(
                begin, gaps[index][0]
            )
            index += 1
    return credited


def report(path: Path, top: int = 40, min_gap_us: float = 20.0) -> str:
    events = load_events(path)
    gaps, span, busy = idle_gaps(events, min_gap_us)
    if not span:
        return f"{path}: no GPU activity in the trace\n"
    idle = sum(end - start for start, end in gaps)
    lines = [
        f"{path.name}: {span / 1e3:.1f} ms from the first to the last GPU activity, kernels {busy / 1e3:.1f} ms, "
        f"idle {idle / 1e3:.1f} ms ({idle / span:.0%}) in {len(gaps)} gaps of {min_gap_us:g} us or more",
        f"{idle_outside_operators(events, gaps) / 1e3:.1f} ms of it outside every main-thread operator "
        "(Python between operators: logging, the Trainer's bookkeeping, collating in the training process)",
        f"idle time inside each main-thread operator, annotation or Python frame (top {top}):",
    ]
    for name, micros in idle_time_inside(events, gaps).most_common(top):
        lines.append(f"{micros / 1e3:9.2f} ms  {name[:160]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--min-gap-us", type=float, default=20.0)
    args = parser.parse_args(argv)
    sys.stdout.write(report(args.trace, args.top, args.min_gap_us))
    return 0


if __name__ == "__main__":
    sys.exit(main())
