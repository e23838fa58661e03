"""The base / sft / dpo comparison: scores per variant, paired deltas with intervals, categories, lengths, rewards.

Pure functions over per-row scores; stages/evaluate.py does the reading and writing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finetune.evaluation.metrics import METRICS, mean_scores, paired_bootstrap

VARIANTS = ("base", "sft", "dpo")  # in pipeline order

# (name, earlier variant, later variant): what each training step bought.
DELTAS = (("sft_vs_base", "base", "sft"), ("dpo_vs_sft", "sft", "dpo"), ("dpo_vs_base", "base", "dpo"))


def deltas(scores: dict[str, list[dict[str, float]]], samples: int, seed: int) -> dict[str, Any]:
    """For each step and metric, the mean paired difference and its 95% bootstrap interval."""
    return {
        name: {
            metric: paired_bootstrap(
                [row[metric] for row in scores[before]], [row[metric] for row in scores[after]], samples, seed
            )
            for metric in METRICS
        }
        for name, before, after in DELTAS
    }


def answer_lengths(answers: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean length in words, and the shares of empty answers and of answers cut off at max_new_tokens."""
    n = len(answers)
    return {
        "mean_words": sum(len(a["prediction"].split()) for a in answers) / n,
        "empty_rate": sum(not a["prediction"].strip() for a in answers) / n,
        "truncated_rate": sum(bool(a["hit_max_new_tokens"]) for a in answers) / n,
    }


def compare(
    scores: dict[str, list[dict[str, float]]], answers: dict[str, list[dict[str, Any]]], samples: int, seed: int
) -> dict[str, Any]:
    """Means, lengths and deltas; every variant answered the same prompts in the same order."""
    summary: dict[str, Any] = {"n": len(next(iter(answers.values())))}
    for variant in scores:
        summary[variant] = mean_scores(scores[variant]) | answer_lengths(answers[variant])
    summary["delta"] = deltas(scores, samples, seed)
    return summary


def by_category(
    scores: dict[str, list[dict[str, float]]], answers: dict[str, list[dict[str, Any]]], samples: int, seed: int
) -> dict[str, Any]:
    """`compare` within each category."""
    categories = [answer["category"] for answer in next(iter(answers.values()))]
    result = {}
    for category in sorted(set(categories)):
        index = [i for i, name in enumerate(categories) if name == category]
        result[category] = compare(
            {v: [rows[i] for i in index] for v, rows in scores.items()},
            {v: [rows[i] for i in index] for v, rows in answers.items()},
            samples,
            seed,
        )
    return result


def preference_accuracy(
    policy: Sequence[dict[str, float]], reference: Sequence[dict[str, float]], beta: float
) -> dict[str, float]:
    """DPO's implicit reward on held-out pairs, r = beta * (log pi(y|x) - log pi_ref(y|x)): how often the chosen
    answer out-rewards the rejected one, and the mean margin r(chosen) - r(rejected)."""
    margins = [
        beta * ((p["chosen_logp"] - r["chosen_logp"]) - (p["rejected_logp"] - r["rejected_logp"]))
        for p, r in zip(policy, reference, strict=True)
    ]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins)}


def pairwise_outcome(first: float | None, second: float | None) -> float:
    """1 if the second answer scores higher, 0.5 for a tie, 0 if lower; an unranked (empty) answer loses."""
    if first is None or second is None:
        return 0.5 if first is None and second is None else float(first is None)
    return 0.5 if abs(second - first) <= 1e-9 else float(second > first)


def win_rate(first: Sequence[float | None], second: Sequence[float | None], samples: int, seed: int) -> dict:
    """How often the second variant's answer beats the first's under the ranker (ties count half), with a 95%
    bootstrap interval over prompts and the counts of wins, ties and losses."""
    outcomes = [pairwise_outcome(a, b) for a, b in zip(first, second, strict=True)]
    interval = paired_bootstrap([0.0] * len(outcomes), outcomes, samples, seed)
    return {
        "rate": interval["mean"],
        "low": interval["low"],
        "high": interval["high"],
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
    }
