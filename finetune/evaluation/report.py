"""The evaluate stage's result: each variant scored, compared and tabulated, plus the tables and charts of reports/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import DataError
from finetune.data.rows import read_jsonl
from finetune.evaluation.comparison import VARIANTS, by_category, compare, preference_accuracy, win_rate
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


# The pairwise comparisons of the win rates: (first, second), the rate being how often `second` wins.
MATCHES = {"dpo_vs_sft": ("sft", "dpo"), "sft_vs_base": ("base", "sft")}


def win_rates(cfg: Config, answers: dict[str, list[dict]], held_out: list[int]) -> dict[str, Any]:
    """For each held-out prompt, which variant's answer the ranker of preference_data prefers (what DPO's pairs were
    made with): the win rate of each match with its 95% interval. A self-judge (judge with no model of its own) is
    the base model, which none of the variants trained."""
    from finetune.preferences.pairs import free_memory, load_ranker, rank_candidates

    settings = cfg.preference_data.ranker
    policy = None
    if settings.name == "judge" and settings.model is None:
        from finetune.evaluation.generation import load_variant

        policy = load_variant(cfg.model, None)
    ranker = load_ranker(settings, cfg.model, policy=policy)
    rows = [answers["base"][i] for i in held_out]
    prompts = [[{"role": "user", "content": row["instruction"]}] for row in rows]
    references = [row["reference"] for row in rows]
    result: dict[str, Any] = {"ranker": settings.name, "n": len(rows)}
    for name, (first, second) in MATCHES.items():
        pairs = [[answers[first][i]["prediction"], answers[second][i]["prediction"]] for i in held_out]
        ranking = rank_candidates(settings, ranker, prompts, pairs, references, cfg.evaluate.seed)
        firsts, seconds = zip(*ranking.scores) if ranking.scores else ((), ())
        result[name] = win_rate(firsts, seconds, cfg.evaluate.bootstrap_samples, cfg.evaluate.seed)
    del ranker, policy
    free_memory()
    return result


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
    held_out = [i for i, row in enumerate(answers["base"]) if row["source"] == settings.split]
    result = {"split": settings.split}
    result |= compare(subset(scores, held_out), subset(answers, held_out), settings.bootstrap_samples, settings.seed)
    result["categories"] = by_category(scores, answers, settings.bootstrap_samples, settings.seed)
    pairs = read_generations(folder, "_preferences")
    beta = cfg.dpo.trainer.get("beta", DPOConfig.beta)
    result["preferences"] = {
        "n": len(pairs["base"]),
        "sft": preference_accuracy(pairs["sft"], pairs["base"], beta),  # SFT's reference: the base model
        "dpo": preference_accuracy(pairs["dpo"], pairs["sft"], beta),  # DPO's reference: the SFT model
    }
    result["win_rate"] = win_rates(cfg, answers, held_out)
    result["bertscore_settings"] = bertscore_description(settings.bertscore)
    return rounded(result), side_by_side(answers, scores)
