"""Faults leave nothing half-done: a full disk, bad trainer values, a dead `dvc` parent, an unexpected crash and a
param rejected under DVC each end in one clear line, with no half-written output and no process left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_params

from finetune.core.errors import ProjectError, exit_on_error, recovery_hint
from finetune.core.files import atomic_path, write_json
from finetune.training.runs import trainer_args

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def can_mount_tmpfs() -> bool:
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


def run_on_small_disk(folder: Path, size: str, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`command` with `folder` a tmpfs of `size` bytes, in a private mount namespace (nothing to unmount after)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} tmpfs "$0" && exec "$@"'
    wrapped = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder), *command]
    return subprocess.run(wrapped, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(path) for path in folder.rglob("*.partial"))


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes


def test_an_output_is_replaced_whole_or_left_as_it_was(tmp_path):
    path = tmp_path / "metrics" / "eval.json"
    write_json(path, {"f1": 0.5})
    with pytest.raises(RuntimeError), atomic_path(path) as partial:
        partial.write_text('{"f1": 0.')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"f1": 0.5}
    assert leftovers(tmp_path) == []


def test_a_full_disk_names_the_output_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "prepared" / "sft_train.jsonl"
    path.parent.mkdir()
    path.write_text("the previous run's rows\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ProjectError, match=r"sft_train\.jsonl: no space left on the device"), atomic_path(path) as p:
        p.write_text("half a row")
        monkeypatch.setattr(os, "replace", full)
    assert path.read_text() == "the previous run's rows\n"
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and tmpfs mounts in a user namespace")
def test_prepare_on_a_full_disk_fails_in_one_line_and_leaves_no_row_cut_short(tmp_path):
    from stages import embedded

    params = tiny_params(tmp_path)
    prepared = tmp_path / "small_disk"
    params["paths"]["prepared"] = str(prepared)
    params_path = tmp_path / "faults.yaml"
    params_path.write_text(yaml.safe_dump(params))
    embedded.main(str(params_path))
    run = run_on_small_disk(prepared, "48k", [sys.executable, "-m", "stages.prepare", str(params_path)], tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {prepared}/") and "no space left on the device" in error, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    # The mount is gone with its namespace: nothing was left in the folder beneath it either.
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare and tmpfs mounts in a user namespace")
def test_sft_on_a_full_disk_names_the_adapter_and_leaves_no_partial_adapter(tiny_project, tmp_path):
    adapter_disk = tmp_path / "models"

    def edit(params):
        params["paths"]["sft_adapter"] = str(adapter_disk / "sft")

    params_path = tiny_project.variant("full_disk", edit)
    run = run_on_small_disk(adapter_disk, "8k", [sys.executable, "-m", "stages.sft", str(params_path)], tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    error = run.stderr.strip().splitlines()[-1]
    assert error == f"error: {adapter_disk / 'sft'}: no space left on the device while writing it; nothing was written"
    assert leftovers(tiny_project.root / "full_disk") == []
    checkpoints = tiny_project.root / "full_disk" / "checkpoints" / "sft"
    # Only whole checkpoints stay: a rerun once there is room resumes from the last and just saves the adapter.
    assert all((path / "trainer_state.json").is_file() for path in checkpoints.glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------------------------------
# Trainer values


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("learning_rate", "abc", "sft.trainer.learning_rate: must be a number, got 'abc'"),
        ("learning_rate", -1, "sft.trainer.learning_rate: must be greater than 0, got -1"),
        ("per_device_train_batch_size", 0, "sft.trainer.per_device_train_batch_size: must be at least 1, got 0"),
        ("max_steps", 2.5, "sft.trainer.max_steps: must be an integer, got 2.5"),
        ("warmup_steps", -3, "sft.trainer.warmup_steps: must not be negative, got -3"),
    ],
)
def test_a_bad_trainer_value_is_one_line_naming_key_and_value(tmp_path, key, value, message):
    from trl import SFTConfig

    with pytest.raises(ProjectError) as raised:
        trainer_args(SFTConfig, "sft", {"max_steps": 3, key: value}, str(tmp_path))
    assert str(raised.value) == message


def test_a_bad_trainer_value_stops_the_stage_in_one_line(tiny_project, capsys):
    from stages import sft

    def edit(params):
        params["sft"]["trainer"]["learning_rate"] = "abc"

    with pytest.raises(SystemExit) as exited:
        sft.main(str(tiny_project.variant("bad_value", edit)))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: sft.trainer.learning_rate: must be a number, got 'abc'"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Under DVC: what a failed stage's user needs to get the workspace back


def test_under_dvc_exp_run_the_error_says_how_to_get_the_outputs_back():
    exp = {"DVC_STAGE": "sft", "DVC_EXP_BASELINE_REV": "abc123", "DVC_ROOT": "/repo"}
    assert "`git checkout -- params.yaml metrics && dvc checkout` brings them back" in recovery_hint(exp)
    assert "`git checkout -- metrics && dvc checkout` brings them back" in recovery_hint({"DVC_STAGE": "sft"})
    assert recovery_hint({}) == ""  # run by hand: DVC removed nothing


def test_a_rejected_param_under_dvc_ends_in_one_line_with_the_way_back(tiny_project, monkeypatch, capsys):
    from stages import sft

    def edit(params):
        params["lora"]["r"] = 0

    monkeypatch.setenv("DVC_STAGE", "sft")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with pytest.raises(SystemExit):
        sft.main(str(tiny_project.variant("rejected", edit)))
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert "lora.r: must be a positive integer, got 0" in line and line.endswith("dvc checkout` brings them back)")


# ---------------------------------------------------------------------------------------------------------------------
# Processes: none outlives the `dvc` that started it, and a crash prints one traceback


CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    from finetune.core.errors import exit_on_error

    @exit_on_error
    def main(out):
        print("started", flush=True)
        time.sleep(8)
        pathlib.Path(out).write_text("written after its parent died")

    main(sys.argv[1])
    """
)
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
    print(child.pid, flush=True)
    child.stdout.readline()  # "started": the child has asked to die with its parent
    print("ready", flush=True)
    time.sleep(60)
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def test_a_stage_stops_when_the_dvc_process_that_started_it_is_killed(tmp_path):
    out = tmp_path / "eval.json"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"
        parent.send_signal(signal.SIGKILL)  # like `kill -9` of dvc
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the stage outlived its parent"
    finally:
        parent.kill()
    time.sleep(0.5)
    assert not out.exists()


def test_an_unexpected_crash_prints_its_traceback_and_nothing_after_it(tmp_path):
    script = textwrap.dedent(
        """
        from dvclive import Live
        from finetune.core.errors import exit_on_error

        @exit_on_error
        def main():
            live = Live("metrics", dvcyaml=False, save_dvc_exp=False)
            live.log_metric("loss", 1.0)
            raise RuntimeError("an unexpected fault")

        main()
        """
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", *identity, "commit", "-q", "--allow-empty", "-m", "start"], cwd=tmp_path, check=True)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.count("Traceback") == 1
    assert run.stderr.rstrip().endswith("RuntimeError: an unexpected fault")


def test_every_stage_main_runs_under_exit_on_error():
    import importlib

    for script in sorted((REPO / "stages").glob("*.py")):
        if script.stem != "__init__":
            module = importlib.import_module(f"stages.{script.stem}")
            assert hasattr(module.main, "__wrapped__"), f"stages/{script.name}: main is not wrapped by exit_on_error"
            assert module.main.__code__ is exit_on_error(lambda: None).__code__, script.name
