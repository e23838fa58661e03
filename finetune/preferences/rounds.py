"""Self-rewarding rounds (iterative DPO, Yuan et al. 2024): each round's prompts, pairs, training and evaluation.

Round NAME (params self_rewarding.rounds.NAME) goes from M_t, the model at its `start` adapter (the SFT adapter or
an earlier round's), to M_t+1: M_t samples answers to fresh training instructions, the ranker turns them into pairs,
DPO trains M_t+1 from M_t on them (the reference being M_t or the SFT model), and M_t+1's held-out answers are scored
against the SFT model's.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from finetune.core.config import Config, RoundConfig, round_adapter
from finetune.core.errors import ConfigError, DataError
from finetune.core.files import atomic_path
from finetune.core.process import process_cost
from finetune.data.rows import GENERATED_PAIRS, SFT_TRAIN, evaluation_prompts, read_jsonl, write_jsonl
from finetune.evaluation.comparison import answer_lengths
from finetune.evaluation.metrics import METRICS, mean_scores, paired_bootstrap, score_rows
from finetune.evaluation.report import rounded
from finetune.preferences.pairs import METRICS_FILE, generate_pairs, select_prompts, write_pairs

EVAL_FILE = "eval.jsonl"  # inside paths.round_data/NAME: the round model's held-out answers and scores
REPORT_FILE = "plots/rounds.csv"  # inside paths.reports
SFT_ANSWERS = "sft.jsonl"  # inside paths.generations: stage generate@sft's answers, the comparison's baseline
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
    metrics = {"round": name, "index": index, "start": settings.start, **metrics, "cost": process_cost()}
    write_pairs(Path(cfg.paths.round_data) / name, pairs, records, metrics)
    return metrics


def reference_adapter(cfg: Config, settings: RoundConfig) -> str:
    """DPO's reference policy for a round: M_t itself (previous) or the SFT model (sft)."""
    return settings.start if cfg.self_rewarding.reference == "previous" else cfg.paths.sft_adapter


def train_round(cfg: Config, name: str) -> None:
    """DPO of M_t on the round's pairs into M_t+1, with the dpo stage's functions; resumable like dpo."""
    from trl import DPOConfig

    from finetune.training.dpo import build_dpo_trainer, load_pairs, train_and_save
    from finetune.training.resume import checkpoint_to_resume, restore_curves, run_fingerprint
    from finetune.training.runs import trainer_args

    _, settings = round_settings(cfg, name)
    pairs_path = Path(cfg.paths.round_data) / name / GENERATED_PAIRS
    train = load_pairs(pairs_path, f"run `dvc repro self_rewarding_pairs@{name}` first")
    output_dir = str(Path(cfg.paths.checkpoints) / "rounds" / name)
    args = trainer_args(DPOConfig, "self_rewarding", cfg.self_rewarding.trainer, output_dir)
    reference = reference_adapter(cfg, settings)
    run_settings = {
        "model": asdict(cfg.model),
        "trainer": cfg.self_rewarding.trainer,
        "start": settings.start,
        "reference": reference,
        "max_prompt_length": cfg.dpo.max_prompt_length,
    }
    inputs = [pairs_path, settings.start, reference, cfg.model.name_or_path]
    resume_from = checkpoint_to_resume(output_dir, run_fingerprint(run_settings, inputs, "self_rewarding_dpo"))
    metrics_dir = str(Path(cfg.paths.round_metrics) / name)
    restore_curves(resume_from, metrics_dir)
    trainer = build_dpo_trainer(
        cfg.model, settings.start, train, cfg.dpo.max_prompt_length, args, metrics_dir,
        resume=resume_from is not None, reference_adapter=reference,
    )  # fmt: skip
    train_and_save(trainer, resume_from, round_adapter(cfg.paths, name), output_dir)


def held_out_prompts(cfg: Config) -> list[dict[str, Any]]:
    """The first self_rewarding.eval_prompts held-out prompts of evaluate.split, in the order generate@sft answered
    them."""
    rows = evaluation_prompts(cfg.paths.prepared, cfg.paths.probe_prompts, cfg.evaluate.split)
    prompts = [row for row in rows if row["source"] == cfg.evaluate.split]
    return prompts[: cfg.self_rewarding.eval_prompts]


def sft_answers(cfg: Config, prompts: list[dict[str, Any]], texts: list[str]) -> list[dict[str, Any]]:
    """generate@sft's answers to the same prompts, checked to be the same rendered prompts."""
    path = Path(cfg.paths.generations) / SFT_ANSWERS
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro generate@sft` first")
    by_id = {row["id"]: row for row in read_jsonl(path)}
    answers = []
    for prompt, text in zip(prompts, texts):
        row = by_id.get(prompt["id"])
        if row is None or row["prompt_text"] != text:
            raise DataError(f"{path}: not the answers to the current held-out prompts; run `dvc repro generate@sft`")
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
    summaries = [_read_json(Path(cfg.paths.round_metrics) / f"{name}.json") for name in cfg.self_rewarding.rounds]
    rows = [rounded(row) for row in report_rows(summaries)]
    path = Path(cfg.paths.reports) / REPORT_FILE
    with atomic_path(path) as partial, partial.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({column: row.get(column) for column in REPORT_COLUMNS} for row in rows)
    return rows


def format_value(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
