"""prepare: clean, length-filter and split the SFT and preference sources.

Reads params `data` and `paths`; writes paths.prepared/{sft,preferences}_{train,validation,test}.jsonl in TRL's
conversational formats (validation: data.validation_size of the train rows), and paths.data_metrics (rows read,
kept, dropped and relabelled per reason, categories, lengths).

    dvc repro prepare        # or: python -m stages.prepare
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.core.config import load_config
from finetune.core.errors import DataError, exit_on_error
from finetune.core.files import write_json
from finetune.core.process import process_cost
from finetune.data.formats import PREFERENCE_FORMATS, SFT_FORMATS
from finetune.data.rows import (
    PREFERENCES_TEST,
    PREFERENCES_TRAIN,
    PREFERENCES_VALIDATION,
    SFT_TEST,
    SFT_TRAIN,
    SFT_VALIDATION,
    clean_rows,
    read_rows,
    split_train_validation_test,
    summarize,
    write_jsonl,
)


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    out_dir = Path(cfg.paths.prepared)
    summary = {}
    jobs = (
        ("sft", cfg.data.sft, SFT_FORMATS, SFT_TRAIN, SFT_VALIDATION, SFT_TEST),
        ("preferences", cfg.data.preferences, PREFERENCE_FORMATS, PREFERENCES_TRAIN, PREFERENCES_VALIDATION,
         PREFERENCES_TEST),
    )  # fmt: skip
    for name, source, formats, train_file, validation_file, test_file in jobs:
        rows = read_rows(source.source, source.split, source.revision)
        cleaned = clean_rows(rows, formats[source.format], cfg.data.max_chars, source.system_prompt)
        if not cleaned.examples:
            dropped = ", ".join(f"{reason} {n}" for reason, n in cleaned.dropped.most_common()) or "nothing"
            raise DataError(
                f"data.{name}.source {source.source}: no usable rows "
                f"(read {cleaned.rows_read}; dropped: {dropped})"
            )
        train, validation, test = split_train_validation_test(
            cleaned.examples, cfg.data.test_size, cfg.data.validation_size, cfg.data.seed
        )
        write_jsonl(out_dir / train_file, train)
        write_jsonl(out_dir / validation_file, validation)
        write_jsonl(out_dir / test_file, test)
        summary[name] = summarize(cleaned, train, test, validation)
        print(
            f"{name}: read {cleaned.rows_read}, kept {len(cleaned.examples)} (train {len(train)}, "
            f"validation {len(validation)}, test {len(test)}), dropped {summary[name]['dropped']}"
        )
    write_json(cfg.paths.data_metrics, summary | {"cost": process_cost()})


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
