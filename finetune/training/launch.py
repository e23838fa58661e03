"""Running a stage on several GPUs: the same stage script, re-run under `accelerate launch`, one process per GPU.

`dvc repro sft` always runs `python -m stages.sft`; with `distributed.processes: N > 1` that process starts N copies
of itself through accelerate and exits with their status. Inside them, RANK/WORLD_SIZE are set and only rank 0
writes metrics, adapters and checkpoints' bookkeeping. `distributed.strategy` picks data parallelism with a whole
model per GPU (ddp) or with the weights sharded across the GPUs (fsdp: finetune.layout.speed.FSDP_SETTINGS for the
Trainer). On a machine with GPUs the stage first claims its GPUs (finetune.training.devices), so that runs side by side
(`dvc queue start -j N`) never share one. With `distributed.engine: ray`, sft and dpo train on a Ray cluster instead
(finetune.training.ray_engine), where Ray hands out the GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys

from finetune.core.config import DistributedConfig
from finetune.core.errors import ConfigError
from finetune.core.process import die_with_parent
from finetune.training.devices import claim_gpus, visible_gpus


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


RAY_STAGES = {"stages.sft": "sft", "stages.dpo": "dpo"}  # what engine ray trains; generation stays on this machine


def ray_command(stage: str, params_path: str) -> list[str]:
    """The command that trains `stage` on a Ray cluster: it drives the run from this machine (ray_engine)."""
    return [sys.executable, "-m", "finetune.training.ray_engine", stage, params_path]


def relaunch(module: str, args: list[str], settings: DistributedConfig) -> int | None:
    """Run this stage where params say, unless this process is already one of the launched ones.

    With engine ray, sft and dpo re-run as the driver of a Ray Train run (args: the params file). Otherwise, with GPUs,
    the stage claims distributed.processes GPUs that no other run holds (waiting for them if need be) and re-runs
    itself on them, under accelerate for several; with a single GPU it goes on here, holding its claim until it exits.
    Returns the exit status of what ran, or None when the caller should simply go on in this process.
    """
    if local_rank() is not None:
        return None
    if settings.engine == "ray" and module in RAY_STAGES:
        command = ray_command(RAY_STAGES[module], args[-1])
        print(f"{module}: {settings.processes} Ray Train workers: {' '.join(command)}", flush=True)
        return subprocess.run(command, check=False, preexec_fn=die_with_parent).returncode
    import torch

    gpus = torch.cuda.device_count()
    if settings.processes > 1 and gpus < settings.processes:
        raise ConfigError(
            f"distributed.processes: {settings.processes} processes need {settings.processes} GPUs; "
            f"this machine has {gpus}"
        )
    if gpus == 0:
        return None
    claim = claim_gpus(settings.processes, visible_gpus(gpus), settings.gpu_claims, f"{module} in {os.getcwd()}")
    if gpus == 1:
        return None  # the one GPU this process sees is claimed; the lock file stays open until the process exits
    # One process, one GPU: with more visible, the Trainer would wrap the model in DataParallel (which TRL refuses).
    # The libraries have counted the GPUs by now, so the stage re-runs seeing only those it claimed.
    devices = ",".join(claim.devices)
    if settings.processes == 1:
        print(f"{module}: distributed.processes is 1, so one process on GPU {devices}", flush=True)
        command = [sys.executable, "-m", module, *args]
    else:
        command = launch_command(module, args, settings)
        print(f"{module}: {settings.processes} processes ({settings.strategy}) on GPUs {devices}: {' '.join(command)}",
              flush=True)  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
    try:  # the launched processes inherit the locked files: the claim holds as long as any of them runs
        # preexec_fn: the launched processes end with this one (finetune.core.process.die_with_parent).
        run = subprocess.run(command, env=env, pass_fds=claim.descriptors, check=False, preexec_fn=die_with_parent)
        return run.returncode
    finally:
        claim.release()


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
