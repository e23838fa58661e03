"""DPO with TRL's DPOTrainer from a LoRA adapter, the reference policy being the starting model.

Given the SFT adapter as a trainable PeftModel and no ref_model, TRL freezes a copy of the loaded adapter as "ref",
so the reference is the SFT model, not the bare base (the usual PEFT trap; tests/test_training.py checks it). The
self-rewarding rounds train with the same functions.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from finetune.core.config import Config, ModelConfig
from finetune.core.errors import ConfigError, DataError
from finetune.data.formats import InvalidRow, from_ultrafeedback
from finetune.data.rows import GENERATED_PAIRS, PREFERENCES_TRAIN, PREFERENCES_VALIDATION, load_split, read_jsonl
from finetune.layout.speed import SpeedPlan, speed_record
from finetune.model.loading import load_model, load_tokenizer
from finetune.overrides import reference_adapter_name
from finetune.training.launch import shards_weights
from finetune.training.resume import finish_run, run_fingerprint
from finetune.training.runs import (
    eval_split,
    live_callbacks,
    save_adapter,
    truncate_prompt,
)
from finetune.training.start import start_run


def load_pairs(path: str | Path, missing_hint: str):
    """Generated pairs as a `datasets.Dataset` of prompt/chosen/rejected, validated as prepare validates
    UltraFeedback rows; a bad row stops the stage naming its file and line."""
    from datasets import Dataset

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; {missing_hint}")
    examples = []
    for number, row in enumerate(read_jsonl(path), start=1):
        try:
            example = from_ultrafeedback(row)
        except InvalidRow as error:
            raise DataError(f"{path}:{number}: {error}") from None
        examples.append({key: example[key] for key in ("prompt", "chosen", "rejected")})
    if not examples:
        raise DataError(f"{path}: no preference pairs to train on")
    return Dataset.from_list(examples)


def load_generated_pairs(preference_dir: str):
    """All of stage preference_data's pairs (dpo.source: generated)."""
    hint = "dpo.source is generated, so run `dvc repro preference_data` first"
    return load_pairs(Path(preference_dir) / GENERATED_PAIRS, hint)


def use_reference_adapter(model, folder: str) -> None:
    """Load the LoRA adapter at `folder` into TRL's frozen "ref" adapter, making it DPO's reference policy.

    TRL 1.16 makes "ref" a copy of the adapter being trained; this replaces the copy's weights. The two adapters
    must have the same shape (rank, targets), which holds for adapters trained from one another.
    """
    from peft import PeftConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    reference = reference_adapter_name(model)
    theirs, ours = PeftConfig.from_pretrained(folder), model.peft_config["default"]
    for key in ("r", "lora_alpha", "target_modules"):
        if getattr(theirs, key, None) != getattr(ours, key, None):
            raise ConfigError(
                f"{folder}: as DPO's reference its LoRA {key} must match the trained adapter's "
                f"({getattr(theirs, key, None)!r} vs {getattr(ours, key, None)!r})"
            )
    weights = load_peft_weights(folder, device="cpu")
    result = set_peft_model_state_dict(model, weights, adapter_name=reference)
    loaded = [key for key in model.state_dict() if f".{reference}." in key]
    if result.unexpected_keys or len(loaded) != len(weights):
        raise RuntimeError(f"use_reference_adapter: {folder} does not fit the {reference!r} adapter ({result})")


def build_dpo_trainer(
    model_cfg: ModelConfig,
    start_adapter: str,
    train,
    max_prompt_length: int,
    args,
    metrics_dir: str,
    resume: bool,
    reference_adapter: str | None = None,
    speed: SpeedPlan | None = None,
    install=None,
    sharded: bool = False,
    callbacks=(),
    validation=None,
):
    """DPOTrainer over the adapter at `start_adapter` (trainable), with no separate reference model.

    Given a PeftModel and ref_model=None, TRL 1.16 freezes a copy of the loaded adapter as the "ref" adapter, so
    the reference is the starting model. (A fresh peft_config would instead make the adapter-free base the
    reference.) With `reference_adapter`, that adapter's weights replace the copy: the reference is that model.
    `sharded`: the trainer runs FSDP (finetune.training.launch.shards_weights). `callbacks`: more Trainer callbacks.
    `validation`: pairs to evaluate on every eval_steps (eval loss, rewards, accuracies), or None.
    """
    from peft import PeftModel
    from trl import DPOTrainer

    tokenizer = load_tokenizer(model_cfg)
    base = load_model(
        model_cfg, for_training=True, gradient_checkpointing=args.activation_checkpointing, sharded=sharded
    )
    if install is not None:
        install(base)
    model = PeftModel.from_pretrained(base, start_adapter, is_trainable=True)
    def cut(pairs):
        return pairs.map(lambda row: {"prompt": truncate_prompt(row["prompt"], tokenizer, max_prompt_length)})

    train = cut(train)
    validation = cut(validation) if validation is not None else None
    other_reference = reference_adapter is not None and os.path.normpath(reference_adapter) != os.path.normpath(
        start_adapter
    )
    if other_reference and args.precompute_ref_log_probs:
        # TRL precomputes while it builds the trainer, before the reference adapter can be swapped in.
        print("dpo: precompute_ref_log_probs is off: the reference adapter is loaded after the trainer is built")
        args.precompute_ref_log_probs = False
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        callbacks=[*live_callbacks(metrics_dir, resume=resume, params=speed_record(speed)), *callbacks],
    )
    if other_reference:
        use_reference_adapter(trainer.model, reference_adapter)
    return trainer


def build_trainer(cfg: Config, args, resume: bool, speed: SpeedPlan | None = None, install=None, callbacks=()):
    """The dpo stage's trainer: the SFT adapter on the dataset's pairs or the generated ones (dpo.source)."""
    if cfg.dpo.source == "generated":  # checked before any model is loaded
        train = load_generated_pairs(cfg.paths.preference_data)
    else:
        train = load_split(cfg.paths.prepared, PREFERENCES_TRAIN, columns=("prompt", "chosen", "rejected"))
    # The validation pairs of the dataset, whatever dpo.source: held out from every training row either way.
    validation = eval_split(args, "dpo", cfg.paths.prepared, PREFERENCES_VALIDATION, ("prompt", "chosen", "rejected"))
    return build_dpo_trainer(
        cfg.model,
        cfg.paths.sft_adapter,
        train,
        cfg.dpo.max_prompt_length,
        args,
        cfg.paths.dpo_metrics,
        resume,
        speed=speed,
        install=install,
        sharded=shards_weights(cfg.distributed),
        callbacks=callbacks,
        validation=validation,
    )


def train_and_save(trainer, resume_from: str | None, adapter_dir: str, output_dir: str) -> None:
    """Train, save only the trained adapter (not the frozen "ref" copy) atomically, drop the checkpoints."""
    trainer.train(resume_from_checkpoint=resume_from)
    save_adapter(trainer, adapter_dir, adapters=["default"])
    finish_run(output_dir)


def dpo_fingerprint(cfg: Config) -> dict:
    """What an interrupted dpo run must share with this one to be resumed."""
    settings = {name: asdict(getattr(cfg, name)) for name in ("model", "lora", "dpo", "distributed")}
    if cfg.dpo.source == "generated":
        pairs = Path(cfg.paths.preference_data) / GENERATED_PAIRS
    else:
        pairs = Path(cfg.paths.prepared) / PREFERENCES_TRAIN
    return run_fingerprint(settings, [pairs, cfg.paths.sft_adapter, cfg.model.name_or_path], "dpo")


def train_dpo(cfg: Config, callbacks=()) -> None:
    """Train from the SFT adapter (resuming an interrupted run of this fingerprint) and save to paths.dpo_adapter.
    `callbacks`: more Trainer callbacks, after the stage's own (finetune.training.ray_engine reports checkpoints)."""
    from trl import DPOConfig

    run = start_run(cfg, "dpo", cfg.dpo, DPOConfig, dpo_fingerprint(cfg), cfg.paths.dpo_metrics)
    trainer = build_trainer(cfg, run.args, run.resume_from is not None, run.speed, run.install, callbacks)
    train_and_save(trainer, run.resume_from, cfg.paths.dpo_adapter, run.output_dir)
