"""sft: supervised fine-tuning of a LoRA adapter (QLoRA on CUDA) with TRL's SFTTrainer, loss on completions only.

Reads params `model`, `lora`, `sft`, `distributed` and `paths`, and paths.prepared/sft_train.jsonl; writes the
adapter and tokenizer to paths.sft_adapter and curves to paths.sft_metrics. An interrupted run resumes from its last
checkpoint.

    dvc repro sft            # or: python -m stages.sft
"""

from __future__ import annotations

import sys

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.training.launch import relaunch
from finetune.training.sft import train_sft


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    launched = relaunch("stages.sft", [params_path], cfg.distributed)
    if launched is not None:
        sys.exit(launched)
    train_sft(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
