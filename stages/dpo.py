"""dpo: direct preference optimisation of the SFT adapter with TRL's DPOTrainer, the SFT model as reference.

Reads params `model`, `dpo`, `distributed` and `paths`, paths.sft_adapter and paths.prepared/preferences_train.jsonl
(or, with `dpo.source: generated`, all of paths.preference_data/pairs.jsonl); writes the adapter to
paths.dpo_adapter and curves (loss, rewards, margins, accuracies) to paths.dpo_metrics.

    dvc repro dpo            # or: python -m stages.dpo
"""

from __future__ import annotations

import sys

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.training.dpo import train_dpo
from finetune.training.launch import relaunch


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    launched = relaunch("stages.dpo", [params_path], cfg.distributed)
    if launched is not None:
        sys.exit(launched)
    train_dpo(cfg)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
