"""benchmarks/idle_gaps.py: idle stretches of the GPU in a profiler trace, and what the CPU was doing meanwhile."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("idle_gaps", REPO / "benchmarks" / "idle_gaps.py")
idle_gaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(idle_gaps)


def span(cat: str, name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}


# Kernels busy 0-100 and 300-400 and 400-450 (back to back), 470-500: gaps of 200 us and 20 us.
# Main thread: an operator over 90-200 (100 us of the first gap inside it), Python alone over 200-300.
TRACE = [
    span("kernel", "gemm", 0, 100, tid=7),
    span("kernel", "gemm", 300, 100, tid=7),
    span("gpu_memset", "memset", 400, 50, tid=7),
    span("kernel", "add", 470, 30, tid=7),
    span("cpu_op", "aten::index_put_", 90, 110),
    span("cpu_op", "aten::nonzero", 150, 30),
    span("cpu_op", "aten::mm", 455, 5),
    span("python_function", "trainer.py(1): log", 210, 80),
]


def test_gaps_between_gpu_activity_and_the_operators_they_fall_in(tmp_path):
    gaps, total, busy = idle_gaps.idle_gaps(TRACE, min_gap_us=10)
    assert gaps == [(100, 300), (450, 470)] and (total, busy) == (500, 280)
    credited = idle_gaps.idle_time_inside(TRACE, gaps)
    assert credited["cpu_op aten::index_put_"] == 100
    assert credited["cpu_op aten::nonzero"] == 30  # nested: credited to both
    assert credited["cpu_op aten::mm"] == 5
    assert credited["python trainer.py(1): log"] == 80
    # 200-300 ran no operator (the Python frame does not count as one), and 450-455 and 460-470 neither.
    assert idle_gaps.idle_outside_operators(TRACE, gaps) == 100 + 15
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": TRACE}, handle)
    report = idle_gaps.report(path, min_gap_us=10)
    assert "idle 0.2 ms (44%) in 2 gaps" in report and "0.1 ms of it outside every main-thread operator" in report
    assert idle_gaps.idle_gaps(TRACE, min_gap_us=50)[0] == [(100, 300)]
