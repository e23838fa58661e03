"""Files written whole or not at all: every stage output goes to a temporary name beside it, then renamed over it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.core.errors import DISK_FULL, DataError, ProjectError


def partial_path(path: str | Path) -> Path:
    """Where `path` is written before it is complete (in the same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (file or folder) for `path`; rename it over `path` if the block succeeds, remove it if
    not. A full disk becomes one line naming `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(final)
    remove(partial)
    try:
        yield partial
        if final.is_dir() and partial.is_dir():
            shutil.rmtree(final)
        os.replace(partial, final)
    except BaseException as error:
        remove(partial)
        if is_disk_full(error):
            raise ProjectError(f"{final}: no space left on the device while writing it; nothing was written") from None
        raise


def is_disk_full(error: BaseException) -> bool:
    """A full disk, as an OSError or as what a library made of one (safetensors reports it in its message)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    return "No space left on device" in str(error)


def read_json(path: str | Path, stage: str) -> Any:
    """A stage's JSON output; a missing or broken file is one line naming the stage that writes it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run dvc repro {stage}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}); run dvc repro {stage}") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_json(path: str | Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_csv(path: str | Path, frame) -> None:
    """A pandas DataFrame as CSV, without its index."""
    with atomic_path(path) as partial:
        frame.to_csv(partial, index=False)
