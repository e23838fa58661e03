"""Run by tests/test_gpu_claims.py, several at once, as `dvc queue start -j N` runs experiments: a stage's process
on a machine that seems to have GPUS GPUs (torch.cuda.device_count is faked: the test runs on a CPU).

    python tests/gpu_claim_worker.py GPUS CLAIMS RECORD   # the stage: finetune.training.launch.relaunch
    python -m gpu_claim_worker child RECORD               # what relaunch re-runs on the claimed GPU

The child appends what it saw to RECORD: its CUDA_VISIBLE_DEVICES, when it ran, and whether the GPU's lock file
was held by someone while it ran (its own claim, inherited from the stage).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

HOLD_SECONDS = 1.5  # how long each child keeps its GPU


def stage(gpus: str, claims: str, record: str) -> int:
    import torch

    from finetune.tools.dry_run import default_section
    from finetune.training.launch import relaunch

    torch.cuda.device_count = lambda: int(gpus)
    settings = default_section("distributed", processes=1, gpu_claims=claims)  # the rest as conf/ has it
    return relaunch("gpu_claim_worker", ["child", record, claims], settings)


def child(record: str, claims: str) -> None:
    started = time.time()
    device = os.environ["CUDA_VISIBLE_DEVICES"]
    Path(claims).mkdir(parents=True, exist_ok=True)  # (absent if the stage claimed nothing)
    probe = os.open(Path(claims) / f"{device}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = False  # nobody holds this GPU's lock: a claim was lost
    except BlockingIOError:
        held = True
    finally:
        os.close(probe)
    time.sleep(HOLD_SECONDS)
    seen = {"pid": os.getpid(), "device": device, "start": started, "end": time.time(), "held": held}
    with open(record, "a") as out:
        fcntl.flock(out, fcntl.LOCK_EX)  # one line per child, whole
        out.write(json.dumps(seen) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(*sys.argv[2:])
    else:
        sys.exit(stage(*sys.argv[1:]))
