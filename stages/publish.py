"""publish: the model card, the adapters and the preference data, written as a folder and pushed to the Hub on request.

Reads params `publish`, `recipe`, `model`, `lora`, `sft`, `dpo`, `data`, `preference_data` and `paths`, the adapters,
the prepared preference pairs, paths.eval_metrics and paths.data_metrics. Always writes paths.publish, exactly what a
push sends:
  model/     README.md (the model card), sft/ and dpo/ (adapter, tokenizer, chat template)    -> publish.model_repo
  dataset/   README.md (the dataset card), preferences_{train,test}.jsonl                     -> publish.dataset_repo
With publish.push: true it also pushes model/ (and dataset/, if publish.dataset_repo is set) with huggingface_hub,
using the token in the HF_TOKEN environment variable (never written or printed), and records the commits in
paths.publish/published.json.

    dvc repro publish        # or: python -m stages.publish
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune.cards.hub import check_push_settings, git_commit, push, write_folder, write_published
from finetune.core.config import load_config
from finetune.core.errors import exit_on_error


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    token = check_push_settings(cfg.publish, dict(os.environ)) if cfg.publish.push else None  # fail before any work
    files = write_folder(cfg, git_commit())
    folder = Path(cfg.paths.publish)
    for part, names in files.items():
        print(f"publish: {folder / part}/: {', '.join(names)}")
    if token is None:
        print(f"publish: dry run (publish.push is false): {folder} is what a push would send; nothing was pushed")
        return
    write_published(folder, push(cfg.publish, folder, token))


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
