"""Errors a user can fix, and the wrapper that shows them as one line instead of a traceback."""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import TypeVar


class ProjectError(Exception):
    """A problem with the user's params, data or environment; its message names the key, file or line."""


class ConfigError(ProjectError):
    pass


class DataError(ProjectError):
    pass


F = TypeVar("F", bound=Callable[..., object])
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errno codes of a full disk or an exhausted quota


def recovery_hint(environ: Mapping[str, str]) -> str:
    """How to get back what DVC removed before the failed stage started, when DVC started it."""
    if "DVC_STAGE" not in environ:
        return ""
    if "DVC_EXP_BASELINE_REV" in environ:  # `dvc exp run` also rewrote params.yaml
        restore = "git checkout -- params.yaml metrics && dvc checkout"
        return f" (dvc exp run removed this stage's outputs before it started: `{restore}` brings them back)"
    restore = "git checkout -- metrics && dvc checkout"
    return f" (DVC removed this stage's outputs before it started: fix it and rerun, or `{restore}` brings them back)"


def exit_on_error(main: F) -> F:
    """Run a stage's main() as a process that ends with its parent (finetune.core.process); a ProjectError, or a full
    disk, becomes one line `error: ...` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from finetune.core.process import die_with_parent, stop_on_sigterm

        die_with_parent()
        stop_on_sigterm()
        try:
            return main(*args, **kwargs)
        except ProjectError as error:
            print(f"error: {error}{recovery_hint(os.environ)}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as error:
            if error.errno not in DISK_FULL:
                raise
            where = error.filename or "an output"
            print(f"error: {where}: no space left on the device{recovery_hint(os.environ)}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception:
            if main.__module__ != "__main__":  # called in-process (tests, tools): the caller handles it
                raise
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            # Skip interpreter shutdown: destructors of half-torn-down libraries (dulwich's repositories behind
            # DVCLive) would print pages of "sys.meta_path is None" after the one traceback that matters.
            os._exit(1)

    return wrapper  # type: ignore[return-value]
