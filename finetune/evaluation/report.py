"""The evaluate stage's result: every variant scored, compared and tabulated, plus the tables and charts of reports/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import Config
from finetune.data.rows import read_jsonl
from finetune.errors import DataError
from finetune.evaluation.comparison import VARIANTS, by_category, compare, preference_accuracy
from finetune.evaluation.metrics import METRICS, bertscore_description, score_rows


def read_generations(folder: Path, suffix: str) -> dict[str, list[dict[str, Any]]]:
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


def subset(table: dict[str, list], index: list[int]) -> dict[str, list]:
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


def to_markdown(frame) -> str:
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


def evaluate_variants(cfg: Config):
    """(metrics/eval.json's result, the side-by-side table) from the generate stages' files."""
    from trl import DPOConfig

    settings = cfg.evaluate
    folder = Path(cfg.paths.generations)
    answers = read_generations(folder, "")
    scores = {
        variant: score_rows(
            [row["prediction"] for row in rows], [row["reference"] for row in rows], settings.bertscore
        )
        for variant, rows in answers.items()
    }
    test = [i for i, row in enumerate(answers["base"]) if row["source"] == "test"]
    result = compare(subset(scores, test), subset(answers, test), settings.bootstrap_samples, settings.seed)
    result["categories"] = by_category(scores, answers, settings.bootstrap_samples, settings.seed)
    pairs = read_generations(folder, "_preferences")
    beta = cfg.dpo.trainer.get("beta", DPOConfig.beta)
    result["preferences"] = {
        "n": len(pairs["base"]),
        "sft": preference_accuracy(pairs["sft"], pairs["base"], beta),  # SFT's reference: the base model
        "dpo": preference_accuracy(pairs["dpo"], pairs["sft"], beta),  # DPO's reference: the SFT model
    }
    result["bertscore_settings"] = bertscore_description(settings.bertscore)
    return rounded(result), side_by_side(answers, scores)
