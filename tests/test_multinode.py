"""distributed.engine ray on a real two-node Ray cluster on this machine: a head node and a worker node, each started
by `ray start` with one CPU, so that Ray Train puts one of the two workers on each. sft trains on the tiny project
with the two CPU workers (gloo), and the test checks that

- its per-step losses are a one-process run's (LOSS_TOLERANCE);
- a run killed after its first checkpoint (SIGKILL of the stage, its Ray driver and both workers, as when the
  machines are lost) resumes from it when rerun;
- the adapter is written once, into the stage's output on the driver's side, and loads;
- no Ray process is left behind.

The cluster's processes are ended by their ids (each `ray start --block` ends the processes it started when it
gets SIGTERM), not by `ray stop --force`, which would end every Ray process of the machine, other users' too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from finetune.core.config import load_config
from stages import sft

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter
STARTED = "Ray runtime started"  # what `ray start` prints once its node has joined
# Two workers sum the same examples' gradients in another order than one process (and gloo's all-reduce adds the
# halves), so the float32 losses may differ in their last bits; the data order and the updates are the same.
LOSS_TOLERANCE = 1e-4  # relative, per step
MAX_STEPS = 12  # a checkpoint every 2 steps: the kill lands after the first with steps to go
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} from {process.args} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> dict[str, str]:
    """The environment of the cluster and the stage: the code as it is now, copied. The code is part of a run's
    fingerprint (finetune.training.resume), so an edit to the working tree during the test would otherwise make the
    rerun another run, which starts afresh."""
    folder = tmp_path_factory.mktemp("code")
    for name in ("finetune", "stages"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return {**os.environ, **ENV, "PYTHONPATH": str(folder)}


@dataclass
class Cluster:
    address: str
    nodes: list[subprocess.Popen]  # the `ray start --block` processes

    def processes(self) -> list[psutil.Process]:
        """Every process the nodes started: Ray's own, and the workers of the runs."""
        family = []
        for node in self.nodes:
            try:
                family += psutil.Process(node.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return family


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, code):
    """A two-node Ray cluster (head + worker node, one CPU each), torn down after the module's tests."""
    logs = tmp_path_factory.mktemp("ray_logs")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    address = f"127.0.0.1:{free_port()}"
    node = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--node-ip-address=127.0.0.1",
            "--disable-usage-stats", "--block"]  # fmt: skip
    head = [*RAY, "start", "--head", f"--port={address.split(':')[1]}", f"--temp-dir={temp}",
            "--include-dashboard=false", *node]  # fmt: skip
    worker = [*RAY, "start", f"--address={address}", *node]
    processes = []
    try:
        for name, command in (("head", head), ("worker", worker)):
            log = logs / f"{name}.log"
            with open(log, "w") as out:
                processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=code))
            wait_for_line(log, STARTED, processes[-1])
        yield Cluster(address, processes)
    finally:
        stop_cluster(Cluster(address, processes), temp)


def stop_cluster(cluster: Cluster, temp: str) -> None:
    """SIGTERM to each `ray start --block` (which ends the node's processes), then check by their ids that every
    process of the cluster is gone; any left is killed, and the test fails."""
    family = cluster.processes()
    for process in reversed(cluster.nodes):  # the worker node first
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    # Started by this cluster but not from its `ray start` processes: anything naming its temp folder.
    for candidate in psutil.process_iter(["cmdline"]):
        if temp in " ".join(candidate.info["cmdline"] or []) and candidate not in alive:
            alive.append(candidate)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    shutil.rmtree(temp, ignore_errors=True)
    assert not alive, f"Ray processes left running: {[(p.pid, p.name()) for p in alive]}"


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def losses(metrics_dir: str) -> dict[int, float]:
    lines = (Path(metrics_dir) / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    steps = [int(row[0]) for row in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {int(row[0]): float(row[1]) for row in rows}


def wait_for_ray_checkpoint(storage: Path, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Until Ray has registered a checkpoint of the run (its snapshot lists one) while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snapshot in storage.glob("sft-*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return
            except (OSError, ValueError):
                pass  # being written
        if process.poll() is not None:
            pytest.fail(f"sft exited ({process.returncode}) before its first checkpoint:\n{log.read_text()[-5000:]}")
        time.sleep(0.05)
    pytest.fail(f"no checkpoint within {timeout} s:\n{log.read_text()[-5000:]}")


def fine_tuning(params: dict) -> None:
    """Both runs: a checkpoint every 2 steps, and no LoRA dropout (its random masks differ between one process and
    two, which would hide what is compared)."""
    params["sft"]["trainer"].update(max_steps=MAX_STEPS, save_steps=2, save_total_limit=1, disable_tqdm=True)
    params["lora"]["dropout"] = 0.0


@pytest.mark.slow
def test_sft_on_two_ray_nodes_logs_one_process_losses_and_resumes(tiny_project, code, ray_cluster, tmp_path):
    one_path = tiny_project.variant("one_process", fine_tuning)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_project.root)
        started = time.monotonic()
        sft.main(str(one_path))
        one_seconds = time.monotonic() - started
    one = load_config(one_path)
    expected = losses(one.paths.sft_metrics)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))

    def on_ray(params: dict) -> None:
        fine_tuning(params)
        params["distributed"].update(processes=2, engine="ray")
        params["distributed"]["ray"].update(address=ray_cluster.address, gpus_per_worker=0, cpus_per_worker=1)

    ray_path = tiny_project.variant("ray", on_ray)
    cfg = load_config(ray_path)
    storage = Path(cfg.paths.checkpoints) / "ray"
    command = [sys.executable, "-m", "stages.sft", str(ray_path)]

    # Killed after its first checkpoint, every process of the run at once (the stage, its Ray driver and the two
    # workers), with no chance to clean up: as when the machines are lost.
    killed_log = tmp_path / "killed.log"
    with open(killed_log, "w") as out:
        process = subprocess.Popen(command, cwd=tiny_project.root, env=code, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_ray_checkpoint(storage, process, killed_log)
            workers = [p for p in ray_cluster.processes() if "RayTrainWorker" in command_line(p)]
            stage = psutil.Process(process.pid)
            for part in (*workers, *stage.children(recursive=True), stage):
                with contextlib.suppress(psutil.NoSuchProcess):
                    part.kill()
            assert len(workers) == 2
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not Path(cfg.paths.sft_adapter).exists() and not Path(cfg.paths.sft_metrics).exists()

    started = time.monotonic()
    rerun = subprocess.run(command, cwd=tiny_project.root, env=code, capture_output=True, text=True, timeout=900)
    ray_seconds = time.monotonic() - started
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-5000:]
    print(f"one process: {one_seconds:.1f} s; two Ray workers, resumed run: {ray_seconds:.1f} s")

    # Both workers, one per node, resumed from a checkpoint of the killed run.
    assert "a cluster of 2 nodes (2 CPUs, 0 GPUs)" in out, out[-5000:]
    nodes = dict(re.findall(r"sft: worker (\d) of 2 on node (\w+)", out))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], out[-5000:]
    assert "sft: speed as_written" in out and "batch 2 x accumulation 1" in out  # each takes half of every step
    resumed = {line for line in out.splitlines() if "resuming from" in line and "checkpoint-" in line}
    assert len(resumed) == 2, out[-5000:]  # one line per worker
    resumed_step = int(next(iter(resumed)).rsplit("checkpoint-", 1)[1].split()[0])
    assert 2 <= resumed_step < MAX_STEPS
    print(f"killed after the checkpoint of step {resumed_step} of {MAX_STEPS}, and resumed from it")

    # Every step's loss, from the killed part and the resumed one, once each, as one process logged it.
    got = losses(cfg.paths.sft_metrics)
    assert sorted(got) == sorted(expected)
    worst = max(abs(got[step] - expected[step]) / abs(expected[step]) for step in expected)
    print(f"largest relative difference of a step's loss: {worst:.2e}")
    assert worst <= LOSS_TOLERANCE, (got, expected)
    assert all(math.isfinite(value) for value in got.values())
    assert json.loads((Path(cfg.paths.sft_metrics) / "metrics.json").read_text())["step"] == MAX_STEPS

    # The adapter: written once (one copy under the variant's folder, none half-written, the Ray run deleted), loads,
    # and holds what one process trained.
    adapter = Path(cfg.paths.sft_adapter)
    copies = list((tiny_project.root / "ray").rglob("adapter_model.safetensors"))
    assert copies == [adapter / "adapter_model.safetensors"]
    assert not adapter.with_name(adapter.name + ".partial").exists()
    run = re.search(r"checkpoints in \S+/(sft-\w+)", out).group(1)
    assert not (storage / run).exists()  # the finished run's checkpoints are deleted
    assert not list(Path(tempfile.gettempdir()).glob(f"finetune-ray-{run}-rank*"))  # and the workers' scratch
    assert_same_adapter(adapter, Path(one.paths.sft_adapter), one)


def assert_same_adapter(adapter: Path, reference: Path, cfg) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path), str(adapter))
    assert any("lora_B" in name for name, _ in model.named_parameters())
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-3, atol=1e-5), name
