"""embedded: write the offline default data, generated from a seed by finetune/embedded/corpus.py.

Reads params `embedded` and `paths`; writes paths.embedded/ with
  dolly.jsonl          instruction rows in the databricks-dolly-15k schema (incl. some too long and invalid rows)
  ultrafeedback.jsonl  preference pairs in the HuggingFaceH4/ultrafeedback_binarized schema
  pretrain.txt         plain prose about the same world, for pre-training the tiny base model

    dvc repro embedded       # or: python -m stages.embedded
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.core.files import write_text
from finetune.embedded.corpus import make_dolly_rows, make_pretraining_text, make_ultrafeedback_rows
from finetune.embedded.files import DOLLY_FILE, PRETRAIN_FILE, ULTRAFEEDBACK_FILE, write_rows


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    out_dir = Path(cfg.paths.embedded)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.embedded.seed
    write_rows(out_dir / DOLLY_FILE, make_dolly_rows(seed, cfg.embedded.sft_rows))
    write_rows(out_dir / ULTRAFEEDBACK_FILE, make_ultrafeedback_rows(seed, cfg.embedded.preference_rows))
    write_text(out_dir / PRETRAIN_FILE, "\n\n".join(make_pretraining_text(seed)) + "\n")
    print(
        f"embedded: wrote {cfg.embedded.sft_rows} instruction rows and {cfg.embedded.preference_rows} pairs "
        f"to {out_dir}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
