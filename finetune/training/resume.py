"""Resuming an interrupted training run: only the run it belongs to, only from a checkpoint that is whole, with its
curves continued.

A checkpoint folder carries the fingerprint of its run: the params sections the run reads, a digest of every input
file and folder (data, base model, adapters, pairs) and of the code that trains. A run of any other fingerprint
discards the folder, saying why in one line, so a sweep never resumes another experiment's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.core.files import atomic_path

RUN_FILE = "run.json"  # the fingerprint, in the checkpoint folder
CURVES_DIR = "curves"  # inside each checkpoint: the DVCLive curves as they were when it was saved
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # finetune/
STAGES_DIR = PACKAGE_DIR.parent / "stages"
# The library code a training run's result depends on (an edit to, say, the model card does not discard checkpoints).
TRAINING_CODE = ("core", "overrides.py", "data", "model", "training", "layout", "preferences", "embedded")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


def digest(path: str | Path) -> str:
    """BLAKE2b of a file, or of a folder's relative paths and contents; "absent" for a path that does not exist
    (a hub id, whose revision is in the settings)."""
    path = Path(path)
    if not path.exists():
        return "absent"
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    total = hashlib.blake2b(digest_size=16)
    for file in files:
        total.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            total.update(hashlib.file_digest(handle, "blake2b").digest())
    return total.hexdigest()


def run_fingerprint(settings: dict[str, Any], inputs: Iterable[str | Path], stage: str) -> dict[str, Any]:
    """What a run's result depends on: its params `settings`, its `inputs` and the code that trains (the stage's
    script and TRAINING_CODE)."""
    code = hashlib.blake2b(digest_size=16)
    for path in (*(PACKAGE_DIR / name for name in TRAINING_CODE), STAGES_DIR / f"{stage}.py"):
        code.update(digest(path).encode())
    return {
        "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
        "inputs": {str(path): digest(path) for path in inputs},
        "code": code.hexdigest(),
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The parts of two fingerprints that differ, named as a user would look for them."""
    changed = [f"params {key}" for key in sorted({*old.get("settings", {}), *new["settings"]})
               if old.get("settings", {}).get(key) != new["settings"].get(key)]  # fmt: skip
    changed += [f"input {key}" for key in sorted({*old.get("inputs", {}), *new["inputs"]})
                if old.get("inputs", {}).get(key) != new["inputs"].get(key)]  # fmt: skip
    if old.get("code") != new["code"]:
        changed.append("code")
    return changed


def unusable(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a kill or a full disk while it was saved), or None if it can."""
    try:
        int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its trainer_state.json is missing or unreadable"
    if not (checkpoint / CURVES_DIR).is_dir():  # copied in last, after the Trainer's own files
        return "its curves were not saved with it"
    weights = [checkpoint / name for name in WEIGHT_FILES if (checkpoint / name).is_file()]
    if not weights and not any(checkpoint.glob("pytorch_model_fsdp_*")):
        return "it holds no weights"
    from safetensors import SafetensorError, safe_open

    for path in weights:
        try:
            with safe_open(str(path), "pt") as weights_file:
                weights_file.keys()
        except (SafetensorError, OSError, ValueError) as error:
            return f"{path.name} cannot be read ({error})"
    return None


def checkpoint_to_resume(output_dir: str, fingerprint: dict[str, Any]) -> str | None:
    """The newest whole checkpoint of an interrupted run with this fingerprint, if any. Checkpoints of another run
    are removed, and so are broken ones (the previous checkpoint is tried instead)."""
    from finetune.training.launch import is_main_process, wait_for_everyone

    folder = Path(output_dir)
    run_file = folder / RUN_FILE
    if is_main_process():  # the other processes read the folder once it is settled
        if folder.is_dir():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, ValueError):
                old = None
            changed = ["an unknown run"] if not isinstance(old, dict) else differences(old, fingerprint)
            if changed:
                if any(folder.glob("checkpoint-*")):
                    print(f"{folder}: not resuming, the checkpoints are of a run with other {', '.join(changed)}")
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(fingerprint, sort_keys=True))
    wait_for_everyone()
    numbered = [path for path in folder.glob("checkpoint-*") if path.name.split("-")[-1].isdigit()]
    for path in sorted(numbered, key=lambda path: int(path.name.split("-")[-1]), reverse=True):
        reason = unusable(path)
        if reason is None:
            print(f"resuming from {path}")
            return str(path)
        if is_main_process():
            print(f"{path}: skipped, {reason}")
            shutil.rmtree(path, ignore_errors=True)
    return None


def finish_run(output_dir: str) -> None:
    """Drop the checkpoints of a finished run: the next run must start afresh, and the adapter is saved."""
    from finetune.training.launch import is_main_process, wait_for_everyone

    wait_for_everyone()
    if is_main_process():
        shutil.rmtree(output_dir, ignore_errors=True)


class KeepCurvesWithCheckpoints(TrainerCallback):
    """Copy the DVCLive curves into each checkpoint as it is saved: DVC deletes a stage's outputs (its curves among
    them) before it reruns the stage, and a resumed run continues the curves from this copy.

    The copy lands last and whole (a rename), so a checkpoint without it was cut short and is not resumed: a kill
    between the Trainer's save and this one would otherwise resume with the curves before the checkpoint lost."""

    def __init__(self, metrics_dir: str):
        self.metrics_dir = Path(metrics_dir)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            return
        with atomic_path(checkpoint / CURVES_DIR) as partial:
            if self.metrics_dir.is_dir():
                shutil.copytree(self.metrics_dir, partial)
            else:  # nothing logged yet
                partial.mkdir()


def restore_curves(checkpoint: str | None, metrics_dir: str) -> None:
    """Put back the curves saved with `checkpoint`, cut to its step, so that the resumed run appends to them."""
    if checkpoint is None or not (Path(checkpoint) / CURVES_DIR).is_dir():
        return
    step = int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
    target = Path(metrics_dir)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(Path(checkpoint) / CURVES_DIR, target)
    for curve in target.rglob("*.tsv"):
        lines = curve.read_text(encoding="utf-8").splitlines(keepends=True)
        header, rows = lines[:1], lines[1:]
        column = header[0].rstrip("\n").split("\t").index("step") if header else None
        if column is not None:
            kept = [row for row in rows if int(row.split("\t")[column]) <= step]
            curve.write_text("".join(header + kept), encoding="utf-8")
