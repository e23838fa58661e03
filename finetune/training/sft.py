"""SFT with TRL's SFTTrainer: a fresh LoRA adapter on the base model, loss on completions only."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from finetune.core.config import Config
from finetune.data.rows import SFT_TRAIN, SFT_VALIDATION, load_split
from finetune.layout.speed import BALANCED_SHARES, SpeedPlan, speed_record
from finetune.model.loading import build_lora_config, load_model, load_tokenizer
from finetune.overrides import padding_free_sft_trainer
from finetune.training.launch import shards_weights
from finetune.training.resume import finish_run, run_fingerprint
from finetune.training.runs import eval_split, live_callbacks, save_adapter
from finetune.training.start import start_run


def build_trainer(cfg: Config, args, resume: bool, speed: SpeedPlan | None = None, install=None, callbacks=()):
    """SFTTrainer over the base model with a fresh LoRA adapter, on the prepared SFT train split.

    `speed` (recorded with the curves; it may split steps across GPUs by tokens) and `install` (applies the plan to
    the model) come from finetune.layout.speed.layout.
    """
    from trl import SFTTrainer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(
        cfg.model,
        for_training=True,
        gradient_checkpointing=args.activation_checkpointing,
        sharded=shards_weights(cfg.distributed),
    )
    if install is not None:
        install(model)
    columns = ("prompt", "completion")
    train = load_split(cfg.paths.prepared, SFT_TRAIN, columns=columns)
    validation = eval_split(args, "sft", cfg.paths.prepared, SFT_VALIDATION, columns)
    trainer = padding_free_sft_trainer(
        lambda: SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
            peft_config=build_lora_config(cfg.lora),
            callbacks=[*live_callbacks(cfg.paths.sft_metrics, resume=resume, params=speed_record(speed)), *callbacks],
        ),
        args,
    )
    if speed is not None and speed.shares == BALANCED_SHARES:
        from finetune.layout.balance import balance_shares

        balance_shares(trainer)
    return trainer


def sft_fingerprint(cfg: Config) -> dict:
    """What an interrupted sft run must share with this one to be resumed."""
    settings = {name: asdict(getattr(cfg, name)) for name in ("model", "lora", "sft", "distributed")}
    return run_fingerprint(settings, [Path(cfg.paths.prepared) / SFT_TRAIN, cfg.model.name_or_path], "sft")


def train_sft(cfg: Config, callbacks=()) -> None:
    """Train (resuming an interrupted run of this fingerprint) and save the adapter to paths.sft_adapter.
    `callbacks`: more Trainer callbacks, after the stage's own (finetune.training.ray_engine reports checkpoints)."""
    from trl import SFTConfig

    run = start_run(cfg, "sft", cfg.sft, SFTConfig, sft_fingerprint(cfg), cfg.paths.sft_metrics)
    trainer = build_trainer(cfg, run.args, run.resume_from is not None, run.speed, run.install, callbacks)
    trainer.train(resume_from_checkpoint=run.resume_from)
    save_adapter(trainer, cfg.paths.sft_adapter)
    finish_run(run.output_dir)
