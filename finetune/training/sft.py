"""SFT with TRL's SFTTrainer: a fresh LoRA adapter on the base model, loss on completions only."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from finetune.core.config import Config
from finetune.data.rows import SFT_TRAIN, SFT_VALIDATION, load_split
from finetune.layout.speed import BALANCED_SHARES, SpeedPlan, layout, speed_record
from finetune.model.loading import build_lora_config, load_model, load_tokenizer
from finetune.training.launch import is_main_process, shards_weights
from finetune.training.records import write_layout
from finetune.training.resume import checkpoint_to_resume, finish_run, restore_curves, run_fingerprint
from finetune.training.runs import eval_split, live_callbacks, save_adapter, trainer_args


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
    # TRL 1.16 refuses padding_free with max_length unless it packs (its guard predates its own truncation of
    # unpacked data), so the trainer is built without max_length and the examples are cut here the way TRL cuts them.
    max_length = args.max_length if args.padding_free and not args.packing else None
    if max_length is not None:
        args.max_length = None
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg.lora),
        callbacks=[*live_callbacks(cfg.paths.sft_metrics, resume=resume, params=speed_record(speed)), *callbacks],
    )
    if max_length is not None:
        args.max_length = max_length
        trainer.train_dataset = truncate_examples(trainer.train_dataset, max_length, args.truncation_mode)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = truncate_examples(trainer.eval_dataset, max_length, args.truncation_mode)
    if speed is not None and speed.shares == BALANCED_SHARES:
        from finetune.layout.balance import balance_shares

        balance_shares(trainer)
    return trainer


def truncate_examples(dataset, max_length: int, mode: str):
    """Tokenized examples cut to max_length tokens (`keep_start` or `keep_end`), dropping any left with no label."""
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    dataset = dataset.map(lambda row: {"input_ids": row["input_ids"][cut], "labels": row["labels"][cut]})
    return dataset.filter(lambda row: any(label != -100 for label in row["labels"]))


def sft_fingerprint(cfg: Config) -> dict:
    """What an interrupted sft run must share with this one to be resumed."""
    settings = {name: asdict(getattr(cfg, name)) for name in ("model", "lora", "sft", "distributed")}
    return run_fingerprint(settings, [Path(cfg.paths.prepared) / SFT_TRAIN, cfg.model.name_or_path], "sft")


def train_sft(cfg: Config, callbacks=()) -> None:
    """Train (resuming an interrupted run of this fingerprint) and save the adapter to paths.sft_adapter.
    `callbacks`: more Trainer callbacks, after the stage's own (finetune.training.ray_engine reports checkpoints)."""
    from trl import SFTConfig

    output_dir = str(Path(cfg.paths.checkpoints) / "sft")
    resume_from = checkpoint_to_resume(output_dir, sft_fingerprint(cfg))
    sharded = shards_weights(cfg.distributed)
    trainer_kwargs, speed, install = layout(
        cfg.model, "sft", cfg.sft.trainer, cfg.sft.speed, sharded=sharded, budget_gib=cfg.sft.memory_budget_gib
    )
    args = trainer_args(SFTConfig, "sft", trainer_kwargs, output_dir)
    if is_main_process():
        restore_curves(resume_from, cfg.paths.sft_metrics)
        write_layout(speed, cfg.paths.sft_metrics)
    trainer = build_trainer(cfg, args, resume_from is not None, speed, install, callbacks)
    trainer.train(resume_from_checkpoint=resume_from)
    save_adapter(trainer, cfg.paths.sft_adapter)
    finish_run(output_dir)
