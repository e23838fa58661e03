"""The start of an sft or dpo run: resume or start afresh, lay the run out on the GPU, build the trainer arguments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.layout.speed import SpeedPlan, layout
from finetune.training.launch import is_main_process, shards_weights
from finetune.training.records import write_layout
from finetune.training.resume import checkpoint_to_resume, restore_curves
from finetune.training.runs import trainer_args


@dataclass(frozen=True)
class RunStart:
    """What a training stage has before it builds its trainer (start_run)."""

    output_dir: str  # the run's checkpoints
    resume_from: str | None  # the checkpoint to resume, or None for a fresh run
    args: Any  # the TRL config
    speed: SpeedPlan
    install: Callable | None  # applies the plan to the loaded model


def start_run(cfg, stage: str, section, config_cls: type, fingerprint: dict, metrics_dir: str) -> RunStart:
    """The sft or dpo stage's run: the checkpoint of an interrupted run of this fingerprint, the GPU layout within
    the section's memory budget, and the trainer arguments; the resumed curves restored and the layout recorded."""
    output_dir = str(Path(cfg.paths.checkpoints) / stage)
    resume_from = checkpoint_to_resume(output_dir, fingerprint)
    trainer_kwargs, speed, install = layout(
        cfg.model, stage, section.trainer, section.speed, sharded=shards_weights(cfg.distributed),
        budget_gib=section.memory_budget_gib, lora_cfg=cfg.lora,
    )  # fmt: skip
    args = trainer_args(config_cls, stage, trainer_kwargs, output_dir)
    if is_main_process():
        restore_curves(resume_from, metrics_dir)
        write_layout(speed, metrics_dir)
    return RunStart(output_dir, resume_from, args, speed, install)
