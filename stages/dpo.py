"""dpo: direct preference optimisation of the SFT adapter with TRL's DPOTrainer.

The policy starts from the SFT adapter, and the reference policy is the SFT model: TRL freezes a copy of the loaded
adapter as "ref" (not the bare base model, the usual PEFT trap; tests/test_training.py checks it).

Reads params `model`, `dpo` and `paths`, paths.sft_adapter and paths.prepared/preferences_train.jsonl; writes the
adapter to paths.dpo_adapter and curves (loss, rewards, margins, accuracies) to paths.dpo_metrics. With
`dpo.source: generated` it trains on all of paths.preference_data/pairs.jsonl (stage preference_data) instead, read
through the UltraFeedback adapter of stages.formats.

    dvc repro dpo            # or: python -m stages.dpo
"""

from __future__ import annotations

import hashlib
import sys

from dataclasses import asdict
from pathlib import Path

from stages.config import Config, load_config
from stages.data import GENERATED_PAIRS, PREFERENCES_TRAIN, load_split, read_jsonl
from stages.errors import DataError, exit_on_error
from stages.formats import InvalidRow, from_ultrafeedback
from stages.modeling import load_model, load_tokenizer
from stages.training import (
    checkpoint_to_resume,
    finish_run,
    live_callbacks,
    save_atomically,
    trainer_args,
    truncate_prompt,
)


def load_generated_pairs(preference_dir: str):
    """All generated pairs as a `datasets.Dataset` of prompt/chosen/rejected, validated as prepare validates
    UltraFeedback rows; a bad row stops the stage naming its file and line."""
    from datasets import Dataset

    path = Path(preference_dir) / GENERATED_PAIRS
    if not path.is_file():
        raise DataError(f"{path}: not found; dpo.source is generated, so run `dvc repro preference_data` first")
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


def build_trainer(cfg: Config, args, resume: bool):
    """DPOTrainer over the SFT adapter (trainable), with no separate reference model.

    Given a PeftModel and ref_model=None, TRL 1.16 freezes a copy of the loaded adapter as the "ref" adapter, so
    the reference is the SFT model. (A fresh peft_config would instead make the adapter-free base the reference.)
    """
    from peft import PeftModel
    from trl import DPOTrainer

    generated = load_generated_pairs(cfg.paths.preference_data) if cfg.dpo.source == "generated" else None
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, for_training=True, gradient_checkpointing=args.activation_checkpointing)
    model = PeftModel.from_pretrained(base, cfg.paths.sft_adapter, is_trainable=True)
    if generated is not None:  # checked before any model is loaded
        train = generated
    else:
        train = load_split(cfg.paths.prepared, PREFERENCES_TRAIN, columns=("prompt", "chosen", "rejected"))
    train = train.map(lambda row: {"prompt": truncate_prompt(row["prompt"], tokenizer, cfg.dpo.max_prompt_length)})
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=live_callbacks(cfg.paths.dpo_metrics, resume=resume),
    )


def resume_settings(cfg: Config) -> dict:
    """What an interrupted run must share with this one to be resumed; for generated pairs, their content too."""
    settings = {"model": asdict(cfg.model), "dpo": asdict(cfg.dpo)}
    pairs = Path(cfg.paths.preference_data) / GENERATED_PAIRS
    if cfg.dpo.source == "generated" and pairs.is_file():
        settings["pairs_sha256"] = hashlib.sha256(pairs.read_bytes()).hexdigest()
    return settings


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    from trl import DPOConfig

    cfg = load_config(params_path)
    output_dir = str(Path(cfg.paths.checkpoints) / "dpo")
    args = trainer_args(DPOConfig, "dpo", cfg.dpo.trainer, output_dir)
    resume_from = checkpoint_to_resume(output_dir, resume_settings(cfg))
    trainer = build_trainer(cfg, args, resume=resume_from is not None)
    trainer.train(resume_from_checkpoint=resume_from)

    def save(folder: str) -> None:
        trainer.model.save_pretrained(folder, selected_adapters=["default"])  # not the frozen "ref" copy
        trainer.processing_class.save_pretrained(folder)

    save_atomically(save, cfg.paths.dpo_adapter)
    finish_run(output_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
