"""Running a stage on several GPUs: the same stage script, re-run under `accelerate launch`, one process per GPU.

`dvc repro sft` always runs `python -m stages.sft`; with `distributed.processes: N > 1` that process starts N copies
of itself through accelerate and exits with their status. Inside them, RANK/WORLD_SIZE are set and only rank 0
writes metrics, adapters and checkpoints' bookkeeping. `distributed.strategy` picks data parallelism with a whole
model per GPU (ddp) or with the weights sharded across the GPUs (fsdp: finetune.layout.speed.FSDP_SETTINGS for the Trainer).
"""

from __future__ import annotations

import os
import subprocess
import sys

from finetune.config import DistributedConfig
from finetune.errors import ConfigError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int | None:
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def is_main_process() -> bool:
    return rank() == 0


def wait_for_everyone() -> None:
    """A barrier across the launched processes (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def launch_command(module: str, args: list[str], settings: DistributedConfig) -> list[str]:
    """The `accelerate launch` command that runs `python -m module args` once per GPU."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes", str(settings.processes),
        "--num_machines", "1",
        "--mixed_precision", "no",  # the trainer's own bf16 setting decides
        "--dynamo_backend", "no",
        "-m", module, *args,
    ]  # fmt: skip


def relaunch(module: str, args: list[str], settings: DistributedConfig) -> int | None:
    """Run this stage under accelerate when params ask for several processes and we are not inside one yet.

    Returns the launched run's exit status, or None when the caller should simply go on in this process.
    """
    if local_rank() is not None:
        return None
    if settings.processes <= 1:
        import torch

        if torch.cuda.device_count() <= 1:
            return None
        # One process, one GPU: with more visible, the Trainer would wrap the model in DataParallel (which TRL
        # refuses). The libraries have counted the GPUs by now, so the stage re-runs seeing only the first one.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        first = visible.split(",")[0].strip() if visible else "0"
        print(f"{module}: distributed.processes is 1, so one process on GPU {first}", flush=True)
        command = [sys.executable, "-m", module, *args]
        return subprocess.run(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": first}, check=False).returncode
    import torch

    gpus = torch.cuda.device_count()
    if gpus < settings.processes:
        raise ConfigError(
            f"distributed.processes: {settings.processes} processes need {settings.processes} GPUs; "
            f"this machine has {gpus}"
        )
    command = launch_command(module, args, settings)
    print(f"{module}: {settings.processes} processes ({settings.strategy}): {' '.join(command)}", flush=True)
    return subprocess.run(command, check=False).returncode


def join_processes() -> None:
    """Join the launched processes' group, for stages that have no Trainer to do it (generation)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState()  # initialises torch.distributed from the launcher's environment and picks this GPU


def shards_weights(settings: DistributedConfig) -> bool:
    """Whether this process trains with FSDP: asked for, and launched as one of several processes."""
    return settings.strategy == "fsdp" and world_size() > 1


def sharding_summary(model) -> str | None:
    """How FSDP split the model into units (each gathered whole while it runs), or None when it is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    from finetune.model.loading import decoder_layers

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not units:
        return None
    layers = decoder_layers(model)
    sharded_layers = sum(isinstance(layer, FSDPModule) for layer in layers)
    return (
        f"{len(units)} FSDP units across {world_size()} processes; {sharded_layers} of {len(layers)} decoder layers "
        "are units of their own"
    )
