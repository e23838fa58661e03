"""A stage process's life: it ends with the `dvc` process that started it, and stops cleanly when asked to."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies, so that a `kill -9` of `dvc` leaves no stage
    running on, writing outputs after DVC's lock is released. Also usable as a subprocess preexec_fn."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def stop_on_sigterm() -> None:
    """SIGTERM raises SystemExit in the main thread, so `finally` blocks run and half-written outputs are removed."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
