"""dpo: direct preference optimisation of the SFT adapter with TRL's DPOTrainer.

The policy starts from the SFT adapter, and the reference policy is the SFT model: TRL freezes a copy of the loaded
adapter as "ref" (not the bare base model, the usual PEFT trap; tests/test_training.py checks it).

Reads params `model`, `dpo` and `paths`, paths.sft_adapter and paths.prepared/preferences_train.jsonl; writes the
adapter to paths.dpo_adapter and curves (loss, rewards, margins, accuracies) to paths.dpo_metrics.

    dvc repro dpo            # or: python -m stages.dpo
"""

from __future__ import annotations

import sys

from dataclasses import asdict
from pathlib import Path

from stages.config import Config, load_config
from stages.data import PREFERENCES_TRAIN, load_split
from stages.errors import exit_on_error
from stages.modeling import load_model, load_tokenizer
from stages.training import (
    checkpoint_to_resume,
    finish_run,
    live_callbacks,
    save_atomically,
    trainer_args,
    truncate_prompt,
)


def build_trainer(cfg: Config, args, resume: bool):
    """DPOTrainer over the SFT adapter (trainable), with no separate reference model.

    Given a PeftModel and ref_model=None, TRL 1.16 freezes a copy of the loaded adapter as the "ref" adapter, so
    the reference is the SFT model. (A fresh peft_config would instead make the adapter-free base the reference.)
    """
    from peft import PeftModel
    from trl import DPOTrainer

    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, for_training=True, gradient_checkpointing=args.activation_checkpointing)
    model = PeftModel.from_pretrained(base, cfg.paths.sft_adapter, is_trainable=True)
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


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    from trl import DPOConfig

    cfg = load_config(params_path)
    output_dir = str(Path(cfg.paths.checkpoints) / "dpo")
    args = trainer_args(DPOConfig, "dpo", cfg.dpo.trainer, output_dir)
    resume_from = checkpoint_to_resume(output_dir, {"model": asdict(cfg.model), "dpo": asdict(cfg.dpo)})
    trainer = build_trainer(cfg, args, resume=resume_from is not None)
    trainer.train(resume_from_checkpoint=resume_from)

    def save(folder: str) -> None:
        trainer.model.save_pretrained(folder, selected_adapters=["default"])  # not the frozen "ref" copy
        trainer.processing_class.save_pretrained(folder)

    save_atomically(save, cfg.paths.dpo_adapter)
    finish_run(output_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
