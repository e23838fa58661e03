"""Sharing out one machine's GPUs among the runs on it: each run claims GPUs no other run holds.

`dvc queue start -j N` runs N experiments side by side on one machine. Each stage that trains or generates claims
its GPUs (as many as distributed.processes) by an exclusive lock on one file per GPU, in a folder every run on the
machine sees (distributed.gpu_claims), before any process of the run uses CUDA. The run then sees only those GPUs
(CUDA_VISIBLE_DEVICES) and keeps the locks until it exits; the operating system drops them when it does, however
it ends, so a killed run never leaves a GPU claimed. A run that finds too few GPUs free waits for them.

The GPUs are named as CUDA_VISIBLE_DEVICES names them when it is set (the user's choice of GPUs is kept: only those
are claimed), else by index. Runs that name the same GPU differently (an index in one, a UUID in another) do not see
each other's claims.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

WAIT_SECONDS = 2.0  # between two looks for free GPUs


@dataclass(frozen=True)
class Claim:
    devices: tuple[str, ...]  # for CUDA_VISIBLE_DEVICES
    descriptors: tuple[int, ...]  # the open, locked lock files; a child process given them holds the claim too

    def release(self) -> None:
        for descriptor in self.descriptors:
            os.close(descriptor)


def visible_gpus(count: int) -> list[str]:
    """The names of the `count` GPUs this process sees: CUDA_VISIBLE_DEVICES' entries, else their indices."""
    listed = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return listed[:count] if listed else [str(index) for index in range(count)]


def claim_gpus(wanted: int, candidates: list[str], folder: str, owner: str) -> Claim:
    """Lock `wanted` of the `candidates` GPUs that no other process holds, waiting until that many are free.

    All or none: a run that gets only some of the GPUs it needs lets them go before it waits, so two runs can never
    each hold a part of what the other needs.
    """
    if wanted > len(candidates):
        raise ValueError(f"{wanted} GPUs wanted of {len(candidates)}")
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    waiting_since = None
    while True:
        held: list[tuple[str, int]] = []
        for device in candidates:
            descriptor = _try_lock(root / f"{device.replace('/', '_')}.lock")
            if descriptor is not None:
                held.append((device, descriptor))
            if len(held) == wanted:
                for _, descriptor in held:  # who holds it, for anyone who looks (`cat FOLDER/0.lock`)
                    os.ftruncate(descriptor, 0)
                    os.pwrite(descriptor, f"pid {os.getpid()}: {owner}\n".encode(), 0)
                names = tuple(device for device, _ in held)
                if waiting_since is not None:
                    print(
                        f"{owner}: GPUs {','.join(names)} free after {time.monotonic() - waiting_since:.0f} s",
                        flush=True,
                    )
                return Claim(names, tuple(descriptor for _, descriptor in held))
        for _, descriptor in held:
            os.close(descriptor)
        if waiting_since is None:
            waiting_since = time.monotonic()
            print(
                f"{owner}: waiting for {wanted} of GPUs {','.join(candidates)}: other runs hold them ({folder})",
                flush=True,
            )
        time.sleep(WAIT_SECONDS)


def _try_lock(path: Path) -> int | None:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor
