"""preference_data: the policy's own preference pairs, K sampled answers per instruction ranked best vs worst.

    python -m stages.preference_data [PARAMS]      # dvc repro preference_data

Reads params `preference_data`, `model` and `paths`; a deterministic sample (preference_data.seed) of
preference_data.prompts instructions from paths.prepared/sft_train.jsonl; the base model, plus paths.sft_adapter when
preference_data.policy is sft. Samples preference_data.candidates answers per instruction and scores them with
preference_data.ranker (reference: F1 + ROUGE-L against the gold answer; pairrm; reward_model; judge), through
finetune.preferences.pairs, the code the self-rewarding rounds use too. Writes to paths.preference_data:
  pairs.jsonl       UltraFeedback-binarized pairs (chosen = best, rejected = worst), all candidates and scores
  candidates.jsonl  every prompt with its candidates, scores (judge: verdicts) and outcome: pair, tie or invalid
  metrics.json      pairs, ties dropped, tie rate, mean score, chosen-rejected gap, answer length, judge parse failures
DPO trains on the pairs with `dpo.source: generated`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from finetune.core.config import Config, load_config
from finetune.core.errors import DataError, exit_on_error
from finetune.core.process import process_cost
from finetune.data.rows import GENERATED_PAIRS, SFT_TRAIN, read_jsonl
from finetune.preferences.pairs import generate_pairs, select_prompts, write_pairs


def make_pairs(cfg: Config) -> dict[str, Any]:
    """Generate, rank and write the pairs and metrics; returns the metrics."""
    settings = cfg.preference_data
    rows = read_jsonl(Path(cfg.paths.prepared) / SFT_TRAIN)
    if not rows:
        raise DataError(f"{Path(cfg.paths.prepared) / SFT_TRAIN}: no rows to take instructions from")
    chosen_rows = select_prompts(rows, settings.prompts, settings.seed)
    from finetune.evaluation.generation import sampling

    gen = sampling(settings, settings.seed)
    adapter = cfg.paths.sft_adapter if settings.policy == "sft" else None
    ranker = settings.ranker
    pairs, records, metrics = generate_pairs(cfg.model, adapter, chosen_rows, settings.candidates, gen, ranker)
    metrics = {"policy": settings.policy, **metrics, "cost": process_cost()}
    write_pairs(cfg.paths.preference_data, pairs, records, metrics)
    return metrics


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    metrics = make_pairs(cfg)
    print(
        f"preference_data: {metrics['pairs']} pairs from {metrics['prompts']} prompts x {metrics['candidates']} "
        f"candidates ranked by {metrics['ranker']} ({metrics['ties_dropped']} ties dropped) -> "
        f"{Path(cfg.paths.preference_data) / GENERATED_PAIRS}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
