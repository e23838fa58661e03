"""evaluate: what SFT bought over the base model and what DPO bought over SFT.

Reads params `evaluate`, `dpo.trainer.beta` and `paths`, and the generate stages' files. Writes
  paths.eval_metrics            base/sft/dpo F1, ROUGE-L, BERTScore on the held-out split, lengths, the deltas with
                                paired-bootstrap 95% intervals, the same per category (probe categories included),
                                and held-out preference accuracy and reward margin of sft and dpo
  paths.reports/side_by_side.*  every prompt with its reference, the three answers and their scores (Markdown, CSV)
  paths.reports/plots/*.csv     chart data for `dvc plots show`
and prints ten unseen instructions with the base, SFT and DPO answers side by side.

    dvc repro evaluate       # or: python -m stages.evaluate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune.config import load_config
from finetune.data.rows import read_jsonl
from finetune.errors import DataError, exit_on_error
from finetune.evaluation.comparison import by_category, compare, preference_accuracy
from finetune.evaluation.generation import VARIANTS
from finetune.evaluation.metrics import METRICS, bertscore_description, score_rows


def _read_generations(folder: Path, suffix: str) -> dict[str, list[dict[str, Any]]]:
    """Each variant's rows, checked to cover the same items in the same order."""
    rows = {variant: read_jsonl(folder / f"{variant}{suffix}.jsonl") for variant in VARIANTS}
    ids = [row["id"] for row in rows["base"]]
    for variant in VARIANTS[1:]:
        if [row["id"] for row in rows[variant]] != ids:
            raise DataError(f"{folder / f'{variant}{suffix}.jsonl'}: not the same prompts as base; re-run dvc repro")
    return rows


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded in a nested result: BERTScore on a CPU varies in the ninth decimal between runs, which
    `dvc metrics diff` would otherwise report as a change of the base model's scores."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    return value


def _subset(table: dict[str, list], index: list[int]) -> dict[str, list]:
    return {variant: [rows[i] for i in index] for variant, rows in table.items()}


def side_by_side(answers: dict[str, list[dict]], scores: dict[str, list[dict]]):
    """One row per prompt: instruction, reference, each variant's answer and its three scores."""
    import pandas as pd

    table = []
    for i, row in enumerate(answers["base"]):
        record = {key: row[key] for key in ("id", "source", "category", "instruction", "reference")}
        for variant in VARIANTS:
            record[variant] = answers[variant][i]["prediction"]
            record |= {f"{variant}_{metric}": round(scores[variant][i][metric], 4) for metric in METRICS}
        table.append(record)
    return pd.DataFrame(table)


def _markdown(frame) -> str:
    """The table as Markdown; newlines and pipes inside answers would break its rows."""
    cells = frame.map(lambda v: str(v).replace("|", "\\|").replace("\n", "<br>") if isinstance(v, str) else v)
    return cells.to_markdown(index=False) + "\n"


def chart_data(result: dict[str, Any]):
    """(variants, categories) tables for the bar charts."""
    import pandas as pd

    variants = pd.DataFrame([{"variant": v} | {m: result[v][m] for m in METRICS} for v in VARIANTS])
    categories = pd.DataFrame(
        [
            {"category": name, "variant": v, "label": f"{name} / {v}"} | {m: summary[v][m] for m in METRICS}
            for name, summary in result["categories"].items()
            for v in VARIANTS
        ]
    )
    return variants, categories


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    import pandas as pd
    from trl import DPOConfig

    cfg = load_config(params_path)
    settings = cfg.evaluate
    folder = Path(cfg.paths.generations)
    answers = _read_generations(folder, "")
    scores = {
        variant: score_rows(
            [row["prediction"] for row in rows], [row["reference"] for row in rows], settings.bertscore
        )
        for variant, rows in answers.items()
    }

    test = [i for i, row in enumerate(answers["base"]) if row["source"] == "test"]
    result = compare(_subset(scores, test), _subset(answers, test), settings.bootstrap_samples, settings.seed)
    result["categories"] = by_category(scores, answers, settings.bootstrap_samples, settings.seed)
    pairs = _read_generations(folder, "_preferences")
    beta = cfg.dpo.trainer.get("beta", DPOConfig.beta)
    result["preferences"] = {
        "n": len(pairs["base"]),
        "sft": preference_accuracy(pairs["sft"], pairs["base"], beta),  # SFT's reference: the base model
        "dpo": preference_accuracy(pairs["dpo"], pairs["sft"], beta),  # DPO's reference: the SFT model
    }
    result["bertscore_settings"] = bertscore_description(settings.bertscore)
    result = rounded(result)
    metrics_path = Path(cfg.paths.eval_metrics)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    reports = Path(cfg.paths.reports)
    (reports / "plots").mkdir(parents=True, exist_ok=True)
    table = side_by_side(answers, scores)
    table.to_csv(reports / "side_by_side.csv", index=False)
    (reports / "side_by_side.md").write_text(_markdown(table), encoding="utf-8")
    variants, categories = chart_data(result)
    variants.to_csv(reports / "plots" / "variants.csv", index=False)
    categories.to_csv(reports / "plots" / "categories.csv", index=False)

    unseen = table.loc[table["source"] == "test", ["instruction", "base", "sft", "dpo"]].head(10)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(unseen.apply(lambda column: column.str.replace("\n", " / ").str.slice(0, 56)).to_string(index=False))
    for name in ("sft_vs_base", "dpo_vs_sft"):
        delta = result["delta"][name]["f1"]
        print(f"{name}: F1 {delta['mean']:+.3f} (95% CI {delta['low']:+.3f} to {delta['high']:+.3f})")
    prefs = result["preferences"]
    print(f"held-out preference accuracy: sft {prefs['sft']['accuracy']:.3f}, dpo {prefs['dpo']['accuracy']:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
