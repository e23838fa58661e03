"""evaluate: what SFT bought over the base model and what DPO bought over SFT.

Reads params `evaluate`, `dpo.trainer.beta`, `preference_data.ranker`, `model` and `paths`, and the generate
stages' files. Writes
  paths.eval_metrics            base/sft/dpo F1, ROUGE-L, BERTScore on the held-out split (evaluate.split), lengths,
                                the deltas with paired-bootstrap 95% intervals, the same per category (probe
                                categories included), held-out preference accuracy and reward margin of sft and dpo,
                                and the win rates of sft over base and dpo over sft under preference_data's ranker
  paths.reports/side_by_side.*  every prompt with its reference, the three answers and their scores (Markdown, CSV)
  paths.reports/plots/*.csv     chart data for `dvc plots show`
and prints ten unseen instructions with the base, SFT and DPO answers side by side.

    dvc repro evaluate       # or: python -m stages.evaluate
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.core.files import write_csv, write_json, write_text
from finetune.core.process import process_cost
from finetune.evaluation.report import chart_data, evaluate_variants, to_markdown


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    import pandas as pd

    cfg = load_config(params_path)
    result, table = evaluate_variants(cfg)
    write_json(cfg.paths.eval_metrics, result | {"cost": process_cost()})
    reports = Path(cfg.paths.reports)
    write_csv(reports / "side_by_side.csv", table)
    write_text(reports / "side_by_side.md", to_markdown(table))
    variants, categories = chart_data(result)
    write_csv(reports / "plots" / "variants.csv", variants)
    write_csv(reports / "plots" / "categories.csv", categories)

    unseen = table.loc[table["source"] == cfg.evaluate.split, ["instruction", "base", "sft", "dpo"]].head(10)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(unseen.apply(lambda column: column.str.replace("\n", " / ").str.slice(0, 56)).to_string(index=False))
    for name in ("sft_vs_base", "dpo_vs_sft"):
        delta = result["delta"][name]["f1"]
        print(f"{name}: F1 {delta['mean']:+.3f} (95% CI {delta['low']:+.3f} to {delta['high']:+.3f})")
    for name, match in result["win_rate"].items():
        if isinstance(match, dict):
            print(f"{name}: win rate {match['rate']:.3f} (95% CI {match['low']:.3f} to {match['high']:.3f}; "
                  f"{match['wins']} wins, {match['ties']} ties, {match['losses']} losses, ranker "
                  f"{result['win_rate']['ranker']})")  # fmt: skip
    prefs = result["preferences"]
    print(f"held-out preference accuracy: sft {prefs['sft']['accuracy']:.3f}, dpo {prefs['dpo']['accuracy']:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
