"""sft and dpo on a Ray cluster (distributed.engine: ray): Ray Train runs the same TRL trainers, on
distributed.processes workers spread over the cluster's machines.

What runs where:
- The driver runs where the stage runs: `dvc repro sft` runs `python -m stages.sft`, which starts
  `python -m finetune.training.ray_engine sft params.yaml` (finetune.training.launch.relaunch). It joins the
  cluster (distributed.ray.address, else $RAY_ADDRESS, else the cluster last started on this machine), starts a
  TorchTrainer and waits; at the end it writes the adapter and the curves into the stage's outputs on its own
  machine, atomically, as a local run does.
- Each worker (one GPU each, or CPUs alone with gpus_per_worker 0: gloo instead of NCCL) changes to the driver's
  project folder, which must hold the stage's inputs at the same path on every node, and runs train_sft or
  train_dpo with RANK and WORLD_SIZE set by Ray: the Trainer's DDP or FSDP (distributed.strategy), each optimizer
  step split across the workers as under accelerate (finetune.layout.speed.plan), so the effective batch is one
  process's. Its checkpoints, and rank 0's curves and adapter, go to a scratch folder on its node.
- Checkpoints go through Ray's storage (distributed.ray.storage_path; every node must reach it: a shared folder or
  a bucket). At each save every worker reports its part of the Trainer's checkpoint (rank 0's holds the curves so
  far and the run's fingerprint), which Ray merges into one folder; at the end rank 0 reports the adapter and the
  curves, which the driver takes from there.
- Resuming: the Ray run is named after the stage and a hash of its fingerprint (finetune.training.resume: params,
  inputs, code). Rerun after a kill, Ray finds that run's latest checkpoint; every worker copies it into its
  scratch folder, and the Trainer and the curves resume from it there as on one machine. A run's folder is deleted
  once its outputs are written; interrupted runs of other fingerprints when a run starts, if the storage is the
  default one in paths.checkpoints (a storage_path of your own may be shared by experiments running at once).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from transformers import TrainerCallback

from finetune.core.config import Config, load_config
from finetune.core.errors import ProjectError, exit_on_error
from finetune.training.resume import RUN_FILE, differences
from finetune.training.runs import save_atomically

# The layout of a worker's scratch folder, and of every checkpoint it reports (so restoring one is a copy).
CHECKPOINTS, METRICS, ADAPTER = "checkpoints", "metrics", "adapter"
OUTPUTS = {"sft": ("sft_adapter", "sft_metrics"), "dpo": ("dpo_adapter", "dpo_metrics")}  # fields of cfg.paths


def train_on_ray(stage: str, params_path: str) -> int:
    """Train `stage` (sft or dpo) with the params at params_path on a Ray cluster; returns 0 once its outputs are
    written (a failed run raises)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    cfg = load_config(params_path)
    settings = cfg.distributed.ray
    storage = storage_path(cfg)
    fingerprint = run_fingerprint(stage, cfg)
    name = f"{stage}-{hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]}"
    resources = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker:
        resources["GPU"] = settings.gpus_per_worker
    ray.init(address=settings.address)
    try:
        workers = cfg.distributed.processes
        print(f"{stage}: {workers} Ray Train workers ({cfg.distributed.strategy}, {resources} each) on "
              f"{describe_cluster(ray.nodes())}; checkpoints in {storage}/{name}", flush=True)  # fmt: skip
        if settings.storage_path is None:  # this project's own folder; a storage_path may be shared by experiments
            drop_other_runs(storage, stage, keep=name)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=dict(stage=stage, run=name, cfg=cfg, project=os.getcwd(), fingerprint=fingerprint),
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=settings.gpus_per_worker > 0, resources_per_worker=resources
            ),
            run_config=RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as error:
            raise ProjectError(
                f"{stage}: training on Ray failed ({error}); rerun to resume from the last checkpoint in "
                f"{storage}/{name}"
            ) from error
        write_outputs(result.checkpoint, stage, cfg)
        delete_run(storage, name)
    finally:
        ray.shutdown()
    return 0


def storage_path(cfg: Config) -> str:
    """Where Ray keeps the run: distributed.ray.storage_path, else paths.checkpoints/ray; absolute, as Ray wants."""
    path = cfg.distributed.ray.storage_path or str(Path(cfg.paths.checkpoints) / "ray")
    return path if "://" in path else str(Path(path).resolve())


def run_fingerprint(stage: str, cfg: Config) -> dict:
    """What a run must share with an interrupted one to resume it (finetune.training.resume.run_fingerprint)."""
    if stage == "sft":
        from finetune.training.sft import sft_fingerprint

        return sft_fingerprint(cfg)
    from finetune.training.dpo import dpo_fingerprint

    return dpo_fingerprint(cfg)


def describe_cluster(nodes: list[dict]) -> str:
    alive = [node for node in nodes if node.get("Alive")]
    cpus = sum(node["Resources"].get("CPU", 0) for node in alive)
    gpus = sum(node["Resources"].get("GPU", 0) for node in alive)
    return f"a cluster of {len(alive)} nodes ({cpus:g} CPUs, {gpus:g} GPUs)"


def drop_other_runs(storage: str, stage: str, keep: str) -> None:
    """Delete this stage's runs of other settings: they can never be resumed (the settings changed)."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(storage)
    for entry in filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True)):
        if entry.type == fs.FileType.Directory and entry.base_name.startswith(f"{stage}-") and entry.base_name != keep:
            print(f"{stage}: deleting {entry.path}, an interrupted run of other settings", flush=True)
            filesystem.delete_dir(entry.path)


def delete_run(storage: str, name: str) -> None:
    """A finished run's folder: the next run must start afresh, and its outputs are written."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(storage)
    filesystem.delete_dir(f"{root}/{name}")


def write_outputs(checkpoint, stage: str, cfg: Config) -> None:
    """The adapter and curves of rank 0's last report, written atomically into the stage's outputs."""
    adapter, metrics = (getattr(cfg.paths, field) for field in OUTPUTS[stage])
    with checkpoint.as_directory() as folder:
        for name, destination in ((ADAPTER, adapter), (METRICS, metrics)):
            save_atomically(lambda partial, source=Path(folder) / name: shutil.copytree(source, partial), destination)
    print(f"{stage}: adapter -> {adapter}, curves -> {metrics}", flush=True)


# --- on each worker ---------------------------------------------------------------------------------------------


def train_worker(config: dict) -> None:
    """Ray Train's function on each worker: train the stage in a scratch folder, resuming Ray's latest checkpoint."""
    import ray
    import ray.train

    stage, cfg, project = config["stage"], config["cfg"], config["project"]
    context = ray.train.get_context()
    try:
        os.chdir(project)  # relative paths in params, as on the driver
    except FileNotFoundError:
        raise ProjectError(
            f"{stage}: {project} is not on node {context.get_node_rank()}; every node needs the project and the "
            "stage's inputs at the driver's path"
        ) from None
    node = ray.get_runtime_context().get_node_id()
    print(f"{stage}: worker {context.get_world_rank()} of {context.get_world_size()} on node {node}", flush=True)
    changed = differences(config["fingerprint"], run_fingerprint(stage, cfg))
    if changed:  # the workers would not agree on which checkpoint to resume
        raise ProjectError(f"{stage}: node {context.get_node_rank()} has other {', '.join(changed)} than the driver")
    use_own_gpu()
    # Named after the run and rank, so that a rerun on this node clears what a killed worker left.
    scratch = Path(tempfile.gettempdir()) / f"finetune-ray-{config['run']}-rank{context.get_world_rank()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(scratch))  # the Trainer's checkpoint, its run.json and the curves so far
        if not (scratch / ADAPTER).is_dir():  # else trained to the end already, but the driver stopped before writing
            local = scratch_config(cfg, stage, scratch)
            train = _training_function(stage)
            train(local, callbacks=[ReportCheckpoints(scratch)])
        report_outputs(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def use_own_gpu() -> None:
    """Make the GPU Ray gave this worker the current one (Ray may show a node's workers all of its GPUs)."""
    import torch

    if torch.cuda.is_available():
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())


def scratch_config(cfg: Config, stage: str, scratch: Path) -> Config:
    """cfg with the stage's checkpoints, adapter and curves in the worker's scratch folder."""
    adapter, metrics = OUTPUTS[stage]
    paths = {adapter: str(scratch / ADAPTER), metrics: str(scratch / METRICS)}
    return replace(cfg, paths=replace(cfg.paths, checkpoints=str(scratch / CHECKPOINTS), **paths))


def _training_function(stage: str):
    if stage == "sft":
        from finetune.training.sft import train_sft

        return train_sft
    from finetune.training.dpo import train_dpo

    return train_dpo


class ReportCheckpoints(TrainerCallback):
    """After each save, report this worker's part of the Trainer's checkpoint to Ray (every worker must report the
    same number of times); rank 0's part also holds the run's fingerprint and, inside the Trainer's checkpoint, the
    curves so far (finetune.training.resume.KeepCurvesWithCheckpoints, which runs before this callback)."""

    def __init__(self, scratch: Path):
        self.scratch = scratch

    def on_save(self, args, state, control, **kwargs):
        import ray.train
        from transformers.trainer_utils import get_last_checkpoint

        output_dir = Path(args.output_dir)
        saved = get_last_checkpoint(str(output_dir))
        with tempfile.TemporaryDirectory() as folder:
            part = Path(folder)
            if saved is not None:
                relative = output_dir.relative_to(self.scratch)
                shutil.copytree(saved, part / relative / Path(saved).name)
                if (output_dir / RUN_FILE).is_file():  # written by rank 0
                    shutil.copy(output_dir / RUN_FILE, part / relative / RUN_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder) if any(part.iterdir()) else None
            ray.train.report({"step": state.global_step}, checkpoint=checkpoint)


def report_outputs(scratch: Path) -> None:
    """Rank 0 reports the adapter and the curves as the run's last checkpoint; the others report nothing, once."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        for name in (ADAPTER, METRICS):
            shutil.copytree(scratch / name, Path(folder) / name)
        ray.train.report({"done": True}, checkpoint=ray.train.Checkpoint.from_directory(folder))


if __name__ == "__main__":  # finetune.training.launch.ray_command
    sys.exit(exit_on_error(train_on_ray)(*sys.argv[1:]))
