"""self_rewarding_dpo@NAME: DPO trains round NAME's model M_t+1 from M_t on the round's pairs, then scores it.

The reference policy is M_t (`self_rewarding.reference: previous`) or the SFT model (`sft`); the trainer settings are
self_rewarding.trainer (trl.DPOConfig keywords). Then M_t+1 answers the first self_rewarding.eval_prompts held-out
prompts as generate@sft answered them, and both are scored. Reads params `self_rewarding`, `model`, `dpo`,
`evaluate` and `paths`; writes the adapter to paths.rounds/NAME, curves to paths.round_metrics/NAME/ and the pair
statistics, training summary, scores and paired-bootstrap delta against SFT to paths.round_metrics/NAME.json.

    dvc repro self_rewarding_dpo@NAME        # or: python -m stages.self_rewarding_dpo NAME
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.core.files import write_json
from finetune.core.process import process_cost
from finetune.preferences.rounds import evaluate_round, round_summary, train_round


@exit_on_error
def main(name: str, params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    train_round(cfg, name)
    summary = round_summary(cfg, name, evaluate_round(cfg, name)) | {"cost": process_cost()}
    write_json(Path(cfg.paths.round_metrics) / f"{name}.json", summary)
    delta = summary["eval"]["delta_vs_sft"]["f1"]
    print(
        f"self_rewarding {name}: held-out F1 {summary['eval']['round']['f1']:.3f} vs SFT "
        f"{summary['eval']['sft']['f1']:.3f} (delta {delta['mean']:+.3f}, 95% CI {delta['low']:+.3f} to "
        f"{delta['high']:+.3f})"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
