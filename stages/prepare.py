"""prepare: clean, length-filter and split the SFT and preference sources.

Reads params `data` and `paths`; writes paths.prepared/{sft,preferences}_{train,test}.jsonl in TRL's
conversational formats, and paths.data_metrics (rows read, kept, dropped per reason, categories, lengths).

    dvc repro prepare        # or: python -m stages.prepare
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.config import load_config
from finetune.data.formats import PREFERENCE_FORMATS, SFT_FORMATS
from finetune.data.rows import (
    PREFERENCES_TEST,
    PREFERENCES_TRAIN,
    SFT_TEST,
    SFT_TRAIN,
    clean_rows,
    read_rows,
    split_examples,
    summarize,
    write_jsonl,
)
from finetune.errors import DataError, exit_on_error
from finetune.files import write_json


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    out_dir = Path(cfg.paths.prepared)
    summary = {}
    jobs = (
        ("sft", cfg.data.sft, SFT_FORMATS, SFT_TRAIN, SFT_TEST),
        ("preferences", cfg.data.preferences, PREFERENCE_FORMATS, PREFERENCES_TRAIN, PREFERENCES_TEST),
    )
    for name, source, formats, train_file, test_file in jobs:
        rows = read_rows(source.source, source.split, source.revision)
        cleaned = clean_rows(rows, formats[source.format], cfg.data.max_chars, source.system_prompt)
        if not cleaned.examples:
            dropped = ", ".join(f"{reason} {n}" for reason, n in cleaned.dropped.most_common()) or "nothing"
            raise DataError(
                f"data.{name}.source {source.source}: no usable rows "
                f"(read {cleaned.rows_read}; dropped: {dropped})"
            )
        train, test = split_examples(cleaned.examples, cfg.data.test_size, cfg.data.seed)
        write_jsonl(out_dir / train_file, train)
        write_jsonl(out_dir / test_file, test)
        summary[name] = summarize(cleaned, train, test)
        print(
            f"{name}: read {cleaned.rows_read}, kept {len(cleaned.examples)} "
            f"(train {len(train)}, test {len(test)}), dropped {summary[name]['dropped']}"
        )
    write_json(cfg.paths.data_metrics, summary)


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
