"""sft: supervised fine-tuning of a LoRA adapter (QLoRA on CUDA) with TRL's SFTTrainer, loss on completions only.

Reads params `model`, `lora`, `sft` and `paths`, and paths.prepared/sft_train.jsonl; writes the adapter and
tokenizer to paths.sft_adapter and curves to paths.sft_metrics. An interrupted run resumes from its last checkpoint.

    dvc repro sft            # or: python -m stages.sft
"""

from __future__ import annotations

import sys

from dataclasses import asdict
from pathlib import Path

from stages.config import Config, load_config
from stages.data import SFT_TRAIN, load_split
from stages.errors import exit_on_error
from stages.modeling import build_lora_config, load_model, load_tokenizer
from stages.training import checkpoint_to_resume, finish_run, live_callbacks, save_atomically, trainer_args


def build_trainer(cfg: Config, args, resume: bool):
    """SFTTrainer over the base model with a fresh LoRA adapter, on the prepared SFT train split."""
    from trl import SFTTrainer

    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, for_training=True, gradient_checkpointing=args.activation_checkpointing)
    train = load_split(cfg.paths.prepared, SFT_TRAIN, columns=("prompt", "completion"))
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg.lora),
        callbacks=live_callbacks(cfg.paths.sft_metrics, resume=resume),
    )


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    from trl import SFTConfig

    cfg = load_config(params_path)
    output_dir = str(Path(cfg.paths.checkpoints) / "sft")
    args = trainer_args(SFTConfig, "sft", cfg.sft.trainer, output_dir)
    settings = {"model": asdict(cfg.model), "lora": asdict(cfg.lora), "sft": asdict(cfg.sft)}
    resume_from = checkpoint_to_resume(output_dir, settings)
    trainer = build_trainer(cfg, args, resume=resume_from is not None)
    trainer.train(resume_from_checkpoint=resume_from)
    save_atomically(trainer.save_model, cfg.paths.sft_adapter)
    finish_run(output_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
