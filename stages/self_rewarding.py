"""self_rewarding: iterative DPO as in "Self-Rewarding Language Models" (Yuan et al., 2024), one round at a time.

    python -m stages.self_rewarding pairs NAME [PARAMS]   # dvc repro self_rewarding_pairs@NAME
    python -m stages.self_rewarding train NAME [PARAMS]   # dvc repro self_rewarding_dpo@NAME
    python -m stages.self_rewarding report [PARAMS]       # dvc repro self_rewarding_report

Round NAME (params self_rewarding.rounds.NAME) goes from M_t, the model at its `start` adapter (the SFT adapter or
an earlier round's), to M_t+1:

- pairs: M_t samples self_rewarding.candidates answers to self_rewarding.prompts instructions of
  paths.prepared/sft_train.jsonl, drawn by the round's seed among those no earlier round used; the ranker scores them
  (judge with no model: M_t judges itself, as the paper; the offline default is `reference`); best vs worst. Writes
  paths.round_data/NAME/{pairs,candidates}.jsonl and metrics.json, with finetune.preferences.pairs (as preference_data).
- train: DPO trains M_t+1 from M_t on those pairs (self_rewarding.trainer, trl.DPOConfig keywords), the reference
  policy being M_t (`reference: previous`) or the SFT model (`sft`), with the dpo stage's training functions.
  Writes the adapter to paths.rounds/NAME and its curves to paths.round_metrics/NAME/. Then M_t+1 answers the first
  self_rewarding.eval_prompts held-out prompts as generate_sft answered them (evaluate.generation), both are scored
  with F1, ROUGE-L and BERTScore, and paths.round_metrics/NAME.json gets the pair statistics, the training summary,
  the scores and the paired-bootstrap delta against SFT.
- report: one row per round (round 0 = SFT) in paths.reports/plots/rounds.csv, for `dvc plots show`.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from finetune.config import Config, RoundConfig, load_config, round_adapter
from finetune.data.rows import GENERATED_PAIRS, SFT_TRAIN, evaluation_prompts, read_jsonl, write_jsonl
from finetune.errors import ConfigError, DataError, exit_on_error
from finetune.evaluation.comparison import answer_lengths
from finetune.evaluation.metrics import METRICS, mean_scores, paired_bootstrap, score_rows
from finetune.preferences.pairs import METRICS_FILE, generate_pairs, select_prompts, write_pairs

EVAL_FILE = "eval.jsonl"  # inside paths.round_data/NAME: the round model's held-out answers and scores
REPORT_FILE = "plots/rounds.csv"  # inside paths.reports
SFT_ANSWERS = "sft.jsonl"  # inside paths.generations: stage generate_sft's answers, the comparison's baseline
# Columns of the report, in order; round 0 (the SFT model) has no pair statistics.
PAIR_COLUMNS = ("pairs", "tie_rate", "mean_score", "mean_gap", "mean_response_words", "unparseable_rate")
REPORT_COLUMNS = ("round", "name", *PAIR_COLUMNS, *METRICS, "mean_words",
                  *(f"delta_{m}_vs_sft" for m in METRICS), *(f"delta_{m}_vs_previous" for m in METRICS))  # fmt: skip


def round_settings(cfg: Config, name: str) -> tuple[int, RoundConfig]:
    """(1-based position, settings) of round `name`."""
    names = list(cfg.self_rewarding.rounds)
    if name not in names:
        raise ConfigError(f"self_rewarding.rounds: no round {name!r} (rounds: {', '.join(names)})")
    return names.index(name) + 1, cfg.self_rewarding.rounds[name]


def round_prompts(cfg: Config, name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round `name`'s instructions: drawn by its seed among the rows no earlier round drew (fresh prompts per round,
    as in the paper). Depends only on params and the rows, so every round can recompute its predecessors' draws."""
    used: set[str] = set()
    for earlier, settings in cfg.self_rewarding.rounds.items():
        drawn = select_prompts(rows, cfg.self_rewarding.prompts, settings.seed, exclude=used)
        if earlier == name:
            return drawn
        used |= {row["id"] for row in drawn}
    raise ConfigError(f"self_rewarding.rounds: no round {name!r}")


def make_round_pairs(cfg: Config, name: str) -> dict[str, Any]:
    """Stage self_rewarding_pairs@NAME: M_t's candidates, ranked into pairs; returns the metrics."""
    index, settings = round_settings(cfg, name)
    section = cfg.self_rewarding
    rows = read_jsonl(Path(cfg.paths.prepared) / SFT_TRAIN)
    prompts = round_prompts(cfg, name, rows)
    if not prompts:
        raise DataError(f"{Path(cfg.paths.prepared) / SFT_TRAIN}: no instructions left for round {name}")
    from finetune.evaluation.generation import sampling

    gen = sampling(section, settings.seed)
    ranker = section.ranker
    pairs, records, metrics = generate_pairs(cfg.model, settings.start, prompts, section.candidates, gen, ranker)
    metrics = {"round": name, "index": index, "start": settings.start, **metrics}
    write_pairs(Path(cfg.paths.round_data) / name, pairs, records, metrics)
    return metrics


def reference_adapter(cfg: Config, settings: RoundConfig) -> str:
    """DPO's reference policy for a round: M_t itself (previous) or the SFT model (sft)."""
    return settings.start if cfg.self_rewarding.reference == "previous" else cfg.paths.sft_adapter


def train_round(cfg: Config, name: str) -> None:
    """DPO of M_t on the round's pairs into M_t+1, with the dpo stage's functions; resumable like dpo."""
    from trl import DPOConfig

    from finetune.training.runs import checkpoint_to_resume, trainer_args
    from stages.dpo import build_dpo_trainer, file_sha256, load_pairs, train_and_save

    _, settings = round_settings(cfg, name)
    pairs_path = Path(cfg.paths.round_data) / name / GENERATED_PAIRS
    train = load_pairs(pairs_path, f"run `dvc repro self_rewarding_pairs@{name}` first")
    output_dir = str(Path(cfg.paths.checkpoints) / "rounds" / name)
    args = trainer_args(DPOConfig, "self_rewarding", cfg.self_rewarding.trainer, output_dir)
    reference = reference_adapter(cfg, settings)
    resume = {
        "model": asdict(cfg.model),
        "trainer": cfg.self_rewarding.trainer,
        "start": settings.start,
        "reference": reference,
        "max_prompt_length": cfg.dpo.max_prompt_length,
        "pairs_sha256": file_sha256(pairs_path),
    }
    resume_from = checkpoint_to_resume(output_dir, resume)
    metrics_dir = str(Path(cfg.paths.round_metrics) / name)
    trainer = build_dpo_trainer(
        cfg.model, settings.start, train, cfg.dpo.max_prompt_length, args, metrics_dir,
        resume=resume_from is not None, reference_adapter=reference,
    )  # fmt: skip
    train_and_save(trainer, resume_from, round_adapter(cfg.paths, name), output_dir)


def held_out_prompts(cfg: Config) -> list[dict[str, Any]]:
    """The first self_rewarding.eval_prompts held-out test prompts, in the order generate_sft answered them."""
    rows = evaluation_prompts(cfg.paths.prepared, cfg.paths.probe_prompts)
    prompts = [row for row in rows if row["source"] == "test"]
    return prompts[: cfg.self_rewarding.eval_prompts]


def sft_answers(cfg: Config, prompts: list[dict[str, Any]], texts: list[str]) -> list[dict[str, Any]]:
    """generate_sft's answers to the same prompts, checked to be the same rendered prompts."""
    path = Path(cfg.paths.generations) / SFT_ANSWERS
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro generate_sft` first")
    by_id = {row["id"]: row for row in read_jsonl(path)}
    answers = []
    for prompt, text in zip(prompts, texts):
        row = by_id.get(prompt["id"])
        if row is None or row["prompt_text"] != text:
            raise DataError(f"{path}: not the answers to the current held-out prompts; run `dvc repro generate_sft`")
        answers.append(row)
    return answers


def evaluate_round(cfg: Config, name: str) -> dict[str, Any]:
    """M_t+1's greedy answers to the held-out prompts, scored and compared with the SFT model's: (summary, rows)."""
    from finetune.evaluation.generation import generate_answers, load_variant, render_prompt

    settings = cfg.evaluate
    prompts = held_out_prompts(cfg)
    model, tokenizer = load_variant(cfg.model, round_adapter(cfg.paths, name))
    texts = [render_prompt(tokenizer, row["prompt"]) for row in prompts]
    baseline = sft_answers(cfg, prompts, texts)
    answers = generate_answers(model, tokenizer, texts, settings.generation)
    references = [row["reference"] for row in prompts]
    scores = score_rows([a["prediction"] for a in answers], references, settings.bertscore)
    sft_scores = score_rows([row["prediction"] for row in baseline], references, settings.bertscore)
    rows = [
        {
            "id": prompt["id"],
            "category": prompt["category"],
            "instruction": prompt["instruction"],
            "reference": prompt["reference"],
            **answer,
            **score,
            "sft_prediction": sft["prediction"],
            **{f"sft_{metric}": value for metric, value in sft_score.items()},
        }
        for prompt, answer, score, sft, sft_score in zip(prompts, answers, scores, baseline, sft_scores)
    ]
    write_jsonl(Path(cfg.paths.round_data) / name / EVAL_FILE, rows, drop=())
    return {
        "n": len(rows),
        "round": mean_scores(scores) | answer_lengths(answers),
        "sft": mean_scores(sft_scores) | answer_lengths(baseline),
        "delta_vs_sft": {
            metric: paired_bootstrap(
                [row[metric] for row in sft_scores],
                [row[metric] for row in scores],
                settings.bootstrap_samples,
                settings.seed,
            )
            for metric in METRICS
        },
    }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro` for the rounds first")
    return json.loads(path.read_text(encoding="utf-8"))


def round_summary(cfg: Config, name: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """paths.round_metrics/NAME.json: the round's pairs, training and held-out evaluation in one place."""
    from stages.evaluate import rounded

    index, settings = round_settings(cfg, name)
    training = _read_json(Path(cfg.paths.round_metrics) / name / "metrics.json")
    return rounded(
        {
            "round": name,
            "index": index,
            "start": settings.start,
            "reference": cfg.self_rewarding.reference,
            "pairs": _read_json(Path(cfg.paths.round_data) / name / METRICS_FILE),
            "training": training,
            "eval": evaluation,
        }
    )


def report_rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round, round 0 being the SFT model (its held-out scores, no pairs), for the CSV and the plots.

    The delta against the previous round is the difference of the means (the bootstrap intervals are against SFT,
    in each round's metrics file).
    """
    if not summaries:
        return []
    sft = summaries[0]["eval"]["sft"]
    rows = [{"round": 0, "name": "sft", **{m: sft[m] for m in METRICS}, "mean_words": sft["mean_words"]}]
    for summary in summaries:
        evaluation, pairs, previous = summary["eval"], summary["pairs"], rows[-1]
        if evaluation["sft"] != sft:
            raise DataError(f"round {summary['round']}: evaluated against other SFT answers than the first round")
        row = {"round": summary["index"], "name": summary["round"]}
        row |= {column: pairs.get(column) for column in PAIR_COLUMNS}
        row |= {m: evaluation["round"][m] for m in METRICS} | {"mean_words": evaluation["round"]["mean_words"]}
        row |= {f"delta_{m}_vs_sft": evaluation["delta_vs_sft"][m]["mean"] for m in METRICS}
        row |= {f"delta_{m}_vs_previous": row[m] - previous[m] for m in METRICS}
        rows.append(row)
    return rows


def write_report(cfg: Config) -> list[dict[str, Any]]:
    """Stage self_rewarding_report: paths.reports/plots/rounds.csv from every round's metrics file."""
    from stages.evaluate import rounded

    summaries = [_read_json(Path(cfg.paths.round_metrics) / f"{name}.json") for name in cfg.self_rewarding.rounds]
    rows = [rounded(row) for row in report_rows(summaries)]
    path = Path(cfg.paths.reports) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({column: row.get(column) for column in REPORT_COLUMNS} for row in rows)
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


@exit_on_error
def main(command: str, *args: str) -> None:
    if command == "report":
        cfg = load_config(*args[:1])
        for row in write_report(cfg):
            print(
                f"round {row['round']} ({row['name']}): pairs {_fmt(row.get('pairs'))}, tie rate "
                f"{_fmt(row.get('tie_rate'))}, gap {_fmt(row.get('mean_gap'))}, held-out F1 {_fmt(row['f1'])}, "
                f"ROUGE-L {_fmt(row['rougeL'])}, BERTScore {_fmt(row['bertscore_f1'])}"
            )
        return
    if command not in ("pairs", "train") or not args:
        raise ConfigError("usage: python -m stages.self_rewarding pairs|train NAME [PARAMS] | report [PARAMS]")
    name, params = args[0], args[1:2]
    cfg = load_config(*params)
    if command == "pairs":
        metrics = make_round_pairs(cfg, name)
        print(
            f"self_rewarding {name}: {metrics['pairs']} pairs from {metrics['prompts']} prompts x "
            f"{metrics['candidates']} candidates ranked by {metrics['ranker']} (tie rate {_fmt(metrics['tie_rate'])})"
        )
        return
    train_round(cfg, name)
    summary = round_summary(cfg, name, evaluate_round(cfg, name))
    path = Path(cfg.paths.round_metrics) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    delta = summary["eval"]["delta_vs_sft"]["f1"]
    print(
        f"self_rewarding {name}: held-out F1 {summary['eval']['round']['f1']:.3f} vs SFT "
        f"{summary['eval']['sft']['f1']:.3f} (delta {delta['mean']:+.3f}, 95% CI {delta['low']:+.3f} to "
        f"{delta['high']:+.3f})"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m stages.self_rewarding pairs|train NAME [PARAMS] | report [PARAMS]", file=sys.stderr)
        raise SystemExit(2)
    main(*sys.argv[1:])
