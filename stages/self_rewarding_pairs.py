"""self_rewarding_pairs@NAME: round NAME's model samples answers to fresh instructions, ranked into DPO pairs.

M_t, the model at the round's `start` adapter, samples self_rewarding.candidates answers to self_rewarding.prompts
instructions of paths.prepared/sft_train.jsonl that no earlier round drew; the ranker (self_rewarding.ranker) scores
them, best vs worst. Reads params `self_rewarding`, `model` and `paths`; writes paths.round_data/NAME/
{pairs,candidates}.jsonl and metrics.json.

    dvc repro self_rewarding_pairs@NAME      # or: python -m stages.self_rewarding_pairs NAME
"""

from __future__ import annotations

import sys

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.preferences.rounds import format_value, make_round_pairs


@exit_on_error
def main(name: str, params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    metrics = make_round_pairs(cfg, name)
    print(
        f"self_rewarding {name}: {metrics['pairs']} pairs from {metrics['prompts']} prompts x "
        f"{metrics['candidates']} candidates ranked by {metrics['ranker']} "
        f"(tie rate {format_value(metrics['tie_rate'])})"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
