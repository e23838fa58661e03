"""A run's result files made up for tests of what a person looks at (tests/test_results.py, tests/test_dashboard.py):
metrics/eval.json, metrics/data.json, DVCLive curves and summaries of sft and dpo, reports/side_by_side.csv and the
chart tables of reports/plots/, each in the format the stages write it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

VARIANTS = ("base", "sft", "dpo")
METRICS = ("f1", "rougeL", "bertscore_f1")
SCORES = {  # the held-out means; DPO lowers F1 against SFT, as the embedded default's run does
    "base": {"f1": 0.086, "rougeL": 0.121, "bertscore_f1": 0.215},
    "sft": {"f1": 0.372, "rougeL": 0.409, "bertscore_f1": 0.503},
    "dpo": {"f1": 0.271, "rougeL": 0.298, "bertscore_f1": 0.430},
}
DELTA_F1 = {"sft_vs_base": (0.28526, 0.258884, 0.309659), "dpo_vs_sft": (-0.100334, -0.126031, -0.073956)}
HOSTILE_ANSWER = "<script>alert('x')</script> & a line,\nthen another"  # must be shown as text, never run
PAGE_SIZE = 10  # report.examples


def variant_scores(shift: float = 0.0) -> dict:
    return {
        variant: {metric: round(value + shift, 6) for metric, value in SCORES[variant].items()}
        | {"mean_words": 12.5, "empty_rate": 0.0, "truncated_rate": 0.05}
        for variant in VARIANTS
    }


def delta(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "low": low, "high": high}


def evaluation(shift: float = 0.0) -> dict:
    """metrics/eval.json as stages/evaluate.py writes it."""
    deltas = {
        "sft_vs_base": {m: delta(*DELTA_F1["sft_vs_base"]) for m in METRICS},
        "dpo_vs_sft": {m: delta(*DELTA_F1["dpo_vs_sft"]) for m in METRICS},
        "dpo_vs_base": {m: delta(0.184926, 0.158462, 0.214246) for m in METRICS},
    }
    categories = {
        name: {"n": n, **variant_scores(shift + offset), "delta": deltas}
        for name, n, offset in (("brainstorming", 37, 0.05), ("closed_qa", 37, -0.03), ("safety_refusal", 5, 0.0))
    }
    match = {"rate": 0.412, "low": 0.36, "high": 0.465, "wins": 110, "ties": 22, "losses": 162}
    return {
        "split": "test",
        "n": 294,
        **variant_scores(shift),
        "delta": deltas,
        "categories": categories,
        "preferences": {"n": 198, "sft": {"accuracy": 0.61, "margin": 0.12}, "dpo": {"accuracy": 0.74, "margin": 0.9}},
        "win_rate": {
            "ranker": "reference",
            "n": 294,
            "dpo_vs_sft": match,
            "sft_vs_base": {"rate": 0.851, "low": 0.81, "high": 0.89, "wins": 240, "ties": 20, "losses": 34},
        },
        "bertscore_settings": {"model": "all-MiniLM-L6-v2", "num_layers": 6, "idf": False, "rescaled": False},
        "cost": {"wall_s": 61.0},
    }


def data_counts() -> dict:
    """metrics/data.json as stages/prepare.py writes it."""
    dropped = {"too_long": 30, "missing_field": 8, "wrong_type": 7, "empty_field": 7, "malformed": 0, "duplicate": 8}
    return {
        "sft": {
            "rows_read": 3000, "kept": 2940, "dropped": dropped | {"duplicate_id": 0, "total": 60},
            "relabelled": {"category_missing": 2, "category_wrong_type": 0, "total": 2},
            "train": 2381, "validation": 265, "test": 294,
        },
        "preferences": {
            "rows_read": 2000, "kept": 1980, "dropped": {"missing_field": 20, "total": 20},
            "relabelled": {"total": 0}, "train": 1604, "validation": 178, "test": 198,
        },
        "cost": {"wall_s": 3.2},
    }  # fmt: skip


def side_by_side_rows() -> list[dict]:
    """reports/side_by_side.csv's rows: 12 held-out prompts and 2 probe prompts."""
    rows = []
    for i in range(14):
        source = "test" if i < 12 else "probe"
        row = {"id": f"{source}-{i}", "source": source, "category": "open_qa", "instruction": f"Question number {i}?",
               "reference": f"Reference answer {i}."}  # fmt: skip
        for variant in VARIANTS:
            row[variant] = HOSTILE_ANSWER if (i, variant) == (0, "dpo") else f"{variant} answer {i}"
            row |= {f"{variant}_{metric}": SCORES[variant][metric] for metric in METRICS}
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def rounds_rows() -> list[dict]:
    """reports/plots/rounds.csv (stage self_rewarding_report): round 0 is SFT, with no pairs."""
    from finetune.preferences.rounds import REPORT_COLUMNS

    rows = [
        {"round": 0, "name": "sft", "f1": 0.41, "rougeL": 0.44, "bertscore_f1": 0.527, "mean_words": 12.9},
        {"round": 1, "name": "round1", "pairs": 33, "tie_rate": 0.175, "mean_score": 0.41, "mean_gap": 0.226,
         "mean_response_words": 13.6, "f1": 0.363, "rougeL": 0.395, "bertscore_f1": 0.508, "mean_words": 11.8,
         "delta_f1_vs_sft": -0.047},
        {"round": 2, "name": "round2", "pairs": 31, "tie_rate": 0.225, "mean_score": 0.37, "mean_gap": 0.305,
         "mean_response_words": 11.1, "f1": 0.398, "rougeL": 0.429, "bertscore_f1": 0.527, "mean_words": 13.5,
         "delta_f1_vs_sft": -0.012},
    ]  # fmt: skip
    return [{column: row.get(column, "") for column in REPORT_COLUMNS} for row in rows]


def log_curves(folder: Path, logs: list[tuple[int, dict]]) -> None:
    """DVCLive's curves and summary in `folder`, logged through transformers' DVCLiveCallback as a Trainer logs
    them (train keys, then `eval_*` keys every eval_steps), so the file names are the ones a real run gets."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    live = Live(str(folder), dvcyaml=False, save_dvc_exp=False)
    callback = DVCLiveCallback(live=live)
    callback._initialized = True  # its setup logs the TrainingArguments, which a made-up run has none of
    state = SimpleNamespace(is_world_process_zero=True)
    for step, values in logs:
        live.step = step  # as finetune.training.runs.LogEveryStepToDvcLive does
        callback.on_log(None, state, None, logs=values)
    live.summary["cost"] = {"wall_s": 120.0}
    live.end()


def training_logs(stage: str, steps: int = 12, eval_steps: int = 4, shift: float = 0.0) -> list[tuple[int, dict]]:
    """What SFTTrainer / DPOTrainer log: every step, and the validation split's `eval_*` every eval_steps."""
    logs = []
    for step in range(1, steps + 1):
        train = {"loss": 2.0 / step + shift, "learning_rate": 1e-4 * (1 - step / steps), "grad_norm": 1.0}
        if stage == "dpo":
            train |= {"rewards/chosen": 0.1 * step, "rewards/rejected": -0.2 * step, "rewards/margins": 0.3 * step,
                      "rewards/accuracies": min(1.0, 0.5 + step / 20)}  # fmt: skip
        logs.append((step, train))
        if step % eval_steps == 0:
            logs.append((step, {f"eval_{key}": value * 1.1 for key, value in train.items() if key != "learning_rate"}))
    logs.append((steps, {"train_runtime": 42.0, "train_loss": 0.5}))
    return logs


def write_result_files(root: Path, paths: dict[str, str], shift: float = 0.0, curves: bool = True) -> None:
    """Every file the report stage and the dashboard read, at `paths` (params' paths section) under `root`."""
    from finetune.evaluation.report import chart_data

    def at(key: str) -> Path:
        return root / paths[key]

    result = evaluation(shift)
    for key, value in (("eval_metrics", result), ("data_metrics", data_counts())):
        at(key).parent.mkdir(parents=True, exist_ok=True)
        at(key).write_text(json.dumps(value, indent=2) + "\n")
    reports = at("reports")
    write_csv(reports / "side_by_side.csv", side_by_side_rows())
    variants, categories = chart_data(result)
    (reports / "plots").mkdir(parents=True, exist_ok=True)
    variants.to_csv(reports / "plots" / "variants.csv", index=False)
    categories.to_csv(reports / "plots" / "categories.csv", index=False)
    write_csv(reports / "plots" / "rounds.csv", rounds_rows())
    if curves:
        for stage in ("sft", "dpo"):
            log_curves(at(f"{stage}_metrics"), training_logs(stage, shift=shift))
