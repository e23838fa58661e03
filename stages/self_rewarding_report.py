"""self_rewarding_report: one row per self-rewarding round (round 0 = SFT) for `dvc plots show`.

Reads params `self_rewarding` and `paths`, and every round's paths.round_metrics/NAME.json; writes
paths.reports/plots/rounds.csv.

    dvc repro self_rewarding_report          # or: python -m stages.self_rewarding_report
"""

from __future__ import annotations

import sys

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.preferences.rounds import format_value, write_report


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    for row in write_report(cfg):
        print(
            f"round {row['round']} ({row['name']}): pairs {format_value(row.get('pairs'))}, tie rate "
            f"{format_value(row.get('tie_rate'))}, gap {format_value(row.get('mean_gap'))}, held-out F1 "
            f"{format_value(row['f1'])}, ROUGE-L {format_value(row['rougeL'])}, BERTScore "
            f"{format_value(row['bertscore_f1'])}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
