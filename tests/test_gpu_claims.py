"""One GPU per queued experiment: `dvc queue start -j N` on an N-GPU machine runs N stages side by side, each on a
GPU of its own (finetune.training.devices). Simulated on the CPU: each stage process fakes its GPU count, and the
test reads which GPU each one's relaunched process saw (tests/gpu_claim_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.training.devices import claim_gpus, visible_gpus

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "gpu_claim_worker.py"


def start_stage(gpus: int, claims: Path, record: Path, log: Path, visible: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible  # the user's choice of GPUs
    with open(log, "w") as out:
        command = [sys.executable, str(WORKER), str(gpus), str(claims), str(record)]
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, processes, logs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(process.poll() not in (None, 0) for process in processes):
            pytest.fail("\n".join(log.read_text()[-2000:] for log in logs))
        time.sleep(0.1)


def test_queued_stages_wait_for_a_free_gpu_and_never_share_one(tmp_path):
    claims, record = tmp_path / "claims", tmp_path / "record.jsonl"
    # The user shows the experiments GPUs 5 and 7 only. While this test holds both (as two running experiments
    # would), three more stages start: all wait.
    held = claim_gpus(2, ["5", "7"], str(claims), "test")
    logs = [tmp_path / f"stage{index}.log" for index in range(3)]
    stages = [start_stage(2, claims, record, log, visible="5,7") for log in logs]
    try:
        wait_for(lambda: all("waiting for 1 of GPUs 5,7" in log.read_text() for log in logs), stages, logs)
        assert not record.exists()  # none ran on a GPU that another run holds
        held.release()
        for stage in stages:
            stage.wait(timeout=120)
    finally:
        for stage in stages:
            if stage.poll() is None:
                stage.kill()
                stage.wait()
    assert [stage.returncode for stage in stages] == [0, 0, 0], [log.read_text()[-2000:] for log in logs]

    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(runs) == 3 and {run["device"] for run in runs} <= {"5", "7"}  # one GPU each, of the user's
    assert all(run["held"] for run in runs)  # each held its GPU's lock while it ran
    for device in ("5", "7"):  # never two at once on one GPU
        spans = sorted((run["start"], run["end"]) for run in runs if run["device"] == device)
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans
    print(f"GPUs of the 3 queued stages: {sorted(run['device'] for run in runs)}")


def test_side_by_side_stages_each_get_their_own_gpu(tmp_path):
    claims, record = tmp_path / "claims", tmp_path / "record.jsonl"
    logs = [tmp_path / f"stage{index}.log" for index in range(3)]
    stages = [start_stage(3, claims, record, log, visible=None) for log in logs]
    for stage in stages:
        stage.wait(timeout=120)
    assert [stage.returncode for stage in stages] == [0, 0, 0], [log.read_text()[-2000:] for log in logs]
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    # Whatever overlapped ran on different GPUs (run alone, a stage may take a GPU another stage used before it).
    for first in runs:
        for second in runs:
            if first is not second and first["start"] < second["end"] and second["start"] < first["end"]:
                assert first["device"] != second["device"], runs
    assert {run["device"] for run in runs} <= {"0", "1", "2"}


def test_a_claim_is_all_or_none_and_ends_with_its_holder(tmp_path):
    folder = str(tmp_path)
    one = claim_gpus(1, ["0", "1", "2"], folder, "first")
    assert one.devices == ("0",)
    two = claim_gpus(2, ["0", "1", "2"], folder, "second")
    assert two.devices == ("1", "2")
    one.release()  # as when the first run exits
    again = claim_gpus(1, ["0", "1", "2"], folder, "third")
    assert again.devices == ("0",)
    assert (tmp_path / "0.lock").read_text().startswith(f"pid {os.getpid()}: third")  # who holds it, for `cat`
    for claim in (two, again):
        claim.release()


def test_visible_gpus_are_the_users_choice_or_every_index(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus(3) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, GPU-bb")
    assert visible_gpus(2) == ["GPU-aa", "GPU-bb"]
