"""preference_data: the policy's own preference pairs, K sampled answers per instruction ranked best vs worst.

    python -m stages.preference_data [PARAMS]      # dvc repro preference_data

Reads params `preference_data`, `model` and `paths`; a deterministic sample (preference_data.seed) of
preference_data.prompts instructions from paths.prepared/sft_train.jsonl; the base model, plus paths.sft_adapter when
preference_data.policy is sft. Samples preference_data.candidates answers per instruction, scores them with the
ranker (reference: mean of token F1 and ROUGE-L against the instruction's gold answer), and writes
paths.preference_data/pairs.jsonl in the UltraFeedback-binarized schema (chosen = best, rejected = worst; ties and
rows the UltraFeedback reader would reject are dropped and counted) and paths.preference_data/metrics.json.
DPO trains on the pairs with `dpo.source: generated`.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path
from typing import Any

from stages.config import Config, GenerationConfig, load_config
from stages.data import GENERATED_PAIRS, SFT_TRAIN, read_jsonl, write_jsonl
from stages.errors import DataError, exit_on_error
from stages.formats import InvalidRow, from_ultrafeedback
from stages.ranking import build_pair, reference_scores

METRICS_FILE = "metrics.json"


def select_prompts(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """n rows drawn by `seed` (all of them if there are fewer), in their file order."""
    if len(rows) <= n:
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def rank(candidates: list[str], reference: str, ranker: str) -> list[float | None]:
    """One score per candidate; an empty answer is not ranked (None), as no pair may hold an empty turn."""
    if ranker != "reference":  # the config admits only working rankers; this guards direct calls
        raise ValueError(f"unknown ranker {ranker!r}")
    scores = reference_scores(candidates, reference)
    return [score if candidate.strip() else None for candidate, score in zip(candidates, scores)]


def pair_row(row: dict[str, Any], candidates: list[str], scores: list[float | None], pair: dict) -> dict[str, Any]:
    """An UltraFeedback-binarized row: prompt string, chosen/rejected conversations, scores, all candidates."""
    turns = row["prompt"]
    return {
        "prompt_id": row["id"],
        "prompt": turns[-1]["content"],
        "chosen": [*turns, {"role": "assistant", "content": pair["chosen"]}],
        "rejected": [*turns, {"role": "assistant", "content": pair["rejected"]}],
        "score_chosen": pair["chosen_score"],
        "score_rejected": pair["rejected_score"],
        "all_generated_responses": candidates,
        "all_scores": scores,
        "margin": pair["margin"],
        "category": row["category"],
    }


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def make_pairs(cfg: Config) -> dict[str, Any]:
    """Generate, rank and write the pairs and metrics; returns the metrics."""
    from stages.generation import load_variant, render_prompt, sample_candidates

    settings = cfg.preference_data
    rows = read_jsonl(Path(cfg.paths.prepared) / SFT_TRAIN)
    if not rows:
        raise DataError(f"{Path(cfg.paths.prepared) / SFT_TRAIN}: no rows to take instructions from")
    chosen_rows = select_prompts(rows, settings.prompts, settings.seed)

    adapter = cfg.paths.sft_adapter if settings.policy == "sft" else None
    model, tokenizer = load_variant(cfg.model, adapter)
    gen = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
    )
    texts = [render_prompt(tokenizer, row["prompt"]) for row in chosen_rows]
    samples = sample_candidates(model, tokenizer, texts, settings.candidates, gen)

    pairs, ties, invalid, empty, words = [], 0, 0, 0, []
    for row, answers in zip(chosen_rows, samples):
        candidates = [answer["prediction"] for answer in answers]
        empty += sum(not candidate.strip() for candidate in candidates)
        words += [len(candidate.split()) for candidate in candidates]
        scores = rank(candidates, row["completion"][-1]["content"], settings.ranker)
        pair = build_pair(candidates, scores)
        if pair is None:
            ties += 1
            continue
        record = pair_row(row, candidates, scores, pair)
        try:
            from_ultrafeedback(record)  # exactly the check dpo applies when it reads the file
        except InvalidRow:
            invalid += 1
            continue
        pairs.append(record)

    out_dir = Path(cfg.paths.preference_data)
    write_jsonl(out_dir / GENERATED_PAIRS, pairs, drop=())
    metrics = {
        "policy": settings.policy,
        "ranker": settings.ranker,
        "prompts": len(chosen_rows),
        "candidates": settings.candidates,
        "pairs": len(pairs),
        "ties_dropped": ties,
        "tie_rate": ties / len(chosen_rows),
        "invalid_dropped": invalid,
        "empty_candidates": empty,
        "mean_score_chosen": _mean([p["score_chosen"] for p in pairs]),
        "mean_score_rejected": _mean([p["score_rejected"] for p in pairs]),
        "mean_gap": _mean([p["margin"] for p in pairs]),
        "mean_response_words": _mean([float(n) for n in words]),
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    metrics = make_pairs(cfg)
    print(
        f"preference_data: {metrics['pairs']} pairs from {metrics['prompts']} prompts x {metrics['candidates']} "
        f"candidates ({metrics['ties_dropped']} ties dropped) -> {Path(cfg.paths.preference_data) / GENERATED_PAIRS}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
