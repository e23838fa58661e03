"""Resuming: a killed run goes on from its own last whole checkpoint, with its curves continued; a checkpoint of
another run (other params, inputs or code) or a broken one is never resumed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.core.config import load_config
from finetune.training import sft as sft_training
from finetune.training.resume import (
    CURVES_DIR,
    KeepCurvesWithCheckpoints,
    checkpoint_to_resume,
    restore_curves,
    run_fingerprint,
    unusable,
)
from stages import sft
from test_training import curve_steps, read_metrics

REPO = Path(__file__).resolve().parents[1]


class RecordSteps:
    """Records the global steps a run trains, to tell a resumed run from a restarted one."""

    def __init__(self):
        from transformers import TrainerCallback

        record = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                record.steps.append(state.global_step)

        self.steps: list[int] = []
        self.resume_flags: list[bool] = []
        self.callback = Callback()


def wait_for_complete_checkpoint(folder: Path, process: subprocess.Popen, timeout: float = 240) -> Path:
    """The first checkpoint a rerun would resume from, polled while `process` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for checkpoint in sorted(folder.glob("checkpoint-*")):
            if unusable(checkpoint) is None:  # else still being written
                return checkpoint
        if process.poll() is not None:
            pytest.fail(f"sft exited ({process.returncode}) before a checkpoint could be caught; raise max_steps")
        time.sleep(0.01)
    pytest.fail("no checkpoint within the timeout")


@pytest.mark.slow
def test_sft_killed_mid_run_resumes_from_its_checkpoint_and_finishes(tiny_project, tmp_path, monkeypatch, capsys):
    max_steps = 12  # steps left after checkpoint-2 keep the process busy while the test kills it

    def edit(params):
        params["sft"]["trainer"].update(max_steps=max_steps, save_steps=2, disable_tqdm=True)

    params_path = tiny_project.variant("resume", edit)
    cfg = load_config(params_path)
    checkpoints = Path(cfg.paths.checkpoints) / "sft"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stages.sft", str(params_path)], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
        try:
            wait_for_complete_checkpoint(checkpoints, process)
            process.send_signal(signal.SIGKILL)  # no chance to clean up, like an OOM kill or a lost spot instance
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not Path(cfg.paths.sft_adapter).exists()
    killed_steps = curve_steps(cfg.paths.sft_metrics)
    assert killed_steps and killed_steps[-1] < max_steps
    shutil.rmtree(cfg.paths.sft_metrics)  # what `dvc repro` does to a stage's outputs before it reruns the stage

    # The rerun (in-process, to save an import of torch) records what it trains.
    record = RecordSteps()
    real_live_callbacks = sft_training.live_callbacks

    def live_callbacks(metrics_dir, resume, params=None):
        record.resume_flags.append(resume)
        return [*real_live_callbacks(metrics_dir, resume, params), record.callback]

    monkeypatch.setattr(sft_training, "live_callbacks", live_callbacks)
    sft.main(str(params_path))
    out = capsys.readouterr().out
    resumed = re.search(r"resuming from (\S+checkpoint-(\d+))", out)
    assert resumed, out[-3000:]
    resumed_step = int(resumed.group(2))
    assert 2 <= resumed_step < max_steps and resumed_step % 2 == 0
    assert record.resume_flags == [True]  # DVCLive appends to the killed run's curves
    assert record.steps == list(range(resumed_step + 1, max_steps + 1))  # went on, did not start over

    assert read_metrics(cfg.paths.sft_metrics)["step"] == max_steps
    steps = curve_steps(cfg.paths.sft_metrics)
    assert steps[0] == 1 and steps[-1] == max_steps and set(steps) == set(range(1, max_steps + 1))
    assert (Path(cfg.paths.sft_adapter) / "adapter_model.safetensors").is_file()
    assert not checkpoints.exists()


def fingerprint(tmp_path: Path, r: int = 16, data: str = "rows") -> dict:
    """A run's fingerprint with one input file, like sft's prepared split."""
    split = tmp_path / "inputs" / "sft_train.jsonl"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text(data)
    settings = {"lora": {"r": r, "alpha": 32}, "sft": {"trainer": {"learning_rate": 2e-3}}}
    return run_fingerprint(settings, [split], "sft")


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    from safetensors.torch import save_file

    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    save_file({"lora_A": torch.zeros(2, 2)}, str(checkpoint / "adapter_model.safetensors"))
    if complete:  # the Trainer writes trainer_state.json last, then KeepCurvesWithCheckpoints the curves
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (checkpoint / CURVES_DIR).mkdir()
    return checkpoint


def test_checkpoint_of_the_same_run_is_resumed(tmp_path, capsys):
    folder, run = tmp_path / "sft", fingerprint(tmp_path)
    assert checkpoint_to_resume(str(folder), run) is None  # a first run starts afresh
    fake_checkpoint(folder, 1)
    checkpoint = fake_checkpoint(folder, 3)
    assert checkpoint_to_resume(str(folder), fingerprint(tmp_path)) == str(checkpoint)
    assert f"resuming from {checkpoint}" in capsys.readouterr().out


def test_checkpoint_of_other_params_is_removed_and_the_run_starts_afresh(tmp_path, capsys):
    folder = tmp_path / "sft"
    checkpoint_to_resume(str(folder), fingerprint(tmp_path))
    fake_checkpoint(folder, 3)
    # `dvc exp run -S lora.r=8` after a killed r=16 run must not resume the r=16 adapter.
    other = fingerprint(tmp_path, r=8)
    assert checkpoint_to_resume(str(folder), other) is None
    assert not (folder / "checkpoint-3").exists()
    assert "not resuming, the checkpoints are of a run with other params lora" in capsys.readouterr().out
    fake_checkpoint(folder, 2)
    assert checkpoint_to_resume(str(folder), other) == str(folder / "checkpoint-2")  # the new run's own checkpoints


def test_checkpoint_of_other_input_data_is_not_resumed(tmp_path, capsys):
    # `dvc exp run -S data.seed=1 sft` after a killed run: same params sections of sft, another split.
    folder = tmp_path / "sft"
    checkpoint_to_resume(str(folder), fingerprint(tmp_path, data="split of seed 42"))
    fake_checkpoint(folder, 662)  # even a finished-looking checkpoint, left by a full disk
    assert checkpoint_to_resume(str(folder), fingerprint(tmp_path, data="split of seed 1")) is None
    out = capsys.readouterr().out
    assert "other input" in out and "sft_train.jsonl" in out


def test_checkpoint_of_another_start_adapter_is_not_resumed(tmp_path):
    # dpo after `-S sft.trainer.learning_rate=1e-3`: a different SFT adapter, the same dpo params.
    adapter = tmp_path / "models" / "sft"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter one")
    first = run_fingerprint({"dpo": {"beta": 0.1}}, [adapter], "dpo")
    folder = tmp_path / "dpo"
    checkpoint_to_resume(str(folder), first)
    fake_checkpoint(folder, 50)
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter two")
    assert checkpoint_to_resume(str(folder), run_fingerprint({"dpo": {"beta": 0.1}}, [adapter], "dpo")) is None


def test_the_dpo_fingerprint_covers_lora_and_the_adapter(tiny_project):
    from dataclasses import replace

    from finetune.training.dpo import dpo_fingerprint

    cfg = load_config(tiny_project.params_path)
    base = dpo_fingerprint(cfg)
    assert dpo_fingerprint(replace(cfg, lora=replace(cfg.lora, r=cfg.lora.r // 2)))["settings"] != base["settings"]
    assert cfg.paths.sft_adapter in base["inputs"]


def test_checkpoints_of_an_unknown_run_are_not_resumed(tmp_path):
    # A folder without the fingerprint (an older version, a copied folder) cannot be trusted.
    folder = tmp_path / "sft"
    fake_checkpoint(folder, 3)
    assert checkpoint_to_resume(str(folder), fingerprint(tmp_path)) is None
    assert not (folder / "checkpoint-3").exists()


def test_a_checkpoint_cut_short_while_saving_is_skipped_for_the_previous_one(tmp_path, capsys):
    # A kill during the save of checkpoint-4 leaves a folder without trainer_state.json; a full disk may leave one
    # cut short. Either would fail the resumed run at every rerun; the last whole checkpoint is the one to use.
    folder, run = tmp_path / "sft", fingerprint(tmp_path)
    checkpoint_to_resume(str(folder), run)
    complete = fake_checkpoint(folder, 2)
    fake_checkpoint(folder, 4, complete=False)
    truncated = fake_checkpoint(folder, 6)
    (truncated / "trainer_state.json").write_text('{"global_step": 6, "log_hi')
    cut_weights = fake_checkpoint(folder, 8)
    weights = cut_weights / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5])
    # Killed after the Trainer's save, before the curves were copied in: resumed, it would lose steps 1-10's curves.
    no_curves = fake_checkpoint(folder, 10)
    (no_curves / CURVES_DIR).rmdir()
    assert checkpoint_to_resume(str(folder), run) == str(complete)
    out = capsys.readouterr().out
    assert "checkpoint-6: skipped, its trainer_state.json is missing or unreadable" in out
    assert "checkpoint-8: skipped, adapter_model.safetensors cannot be read" in out
    assert "checkpoint-10: skipped, its curves were not saved with it" in out
    assert not truncated.exists() and not cut_weights.exists() and not no_curves.exists()


def test_curves_saved_with_a_checkpoint_are_restored_up_to_its_step(tmp_path):
    from transformers import TrainingArguments

    metrics = tmp_path / "metrics" / "sft"
    (metrics / "plots" / "metrics").mkdir(parents=True)
    curve = metrics / "plots" / "metrics" / "loss.tsv"
    curve.write_text("step\tloss\n1\t2.0\n2\t1.5\n")
    (metrics / "metrics.json").write_text(json.dumps({"step": 2, "loss": 1.5}))
    output = tmp_path / "checkpoints" / "sft"
    checkpoint = fake_checkpoint(output, 2)

    class State:
        global_step = 2

    KeepCurvesWithCheckpoints(str(metrics)).on_save(TrainingArguments(str(output), report_to="none"), State(), None)
    curve.write_text("step\tloss\n1\t2.0\n2\t1.5\n3\t1.2\n")  # the killed run went on past the checkpoint
    shutil.rmtree(metrics)  # and DVC removed the outputs before the rerun
    restore_curves(str(checkpoint), str(metrics))
    assert curve.read_text() == "step\tloss\n1\t2.0\n2\t1.5\n"
    assert read_metrics(metrics)["step"] == 2
