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


def process_cost() -> dict[str, float]:
    """What this stage process has cost so far, for the metrics it writes (`dvc exp show` compares runs by it):
    `wall_s`, the seconds since the process started (imports and loading included), and, when it used CUDA,
    `peak_gpu_memory_gib`, the most GPU memory its tensors held at once on its current device."""
    import time

    import psutil

    cost = {"wall_s": round(time.time() - psutil.Process().create_time(), 1)}
    torch = sys.modules.get("torch")  # never imported here: a stage that did not use torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cost["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return cost
