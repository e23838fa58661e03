"""Errors a user can fix, and the wrapper that shows them as one line instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar


class ProjectError(Exception):
    """A problem with the user's params, data or environment; its message names the key, file or line."""


class ConfigError(ProjectError):
    pass


class DataError(ProjectError):
    pass


F = TypeVar("F", bound=Callable[..., object])


def exit_on_error(main: F) -> F:
    """Run a stage's main(); a ProjectError becomes `error: ...` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ProjectError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
