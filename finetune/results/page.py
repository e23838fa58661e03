"""reports/index.html: a run's results on one self-contained page, for a person to open instead of reading JSON.

The page holds its style and its charts (inline SVG drawn by finetune.results.charts) and no script; its
Content-Security-Policy forbids loading anything, so it looks the same offline. `load_results` reads what the
pipeline wrote; `render_page` is pure, so tests build pages from fixture data.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from finetune.core.config import Config
from finetune.core.errors import DataError
from finetune.core.files import read_json
from finetune.results import charts
from finetune.results.charts import DELTA_LABELS, METRIC_LABELS, VARIANT_COLORS, Series

# The DVCLive curves the page draws, per training stage (files under paths.{sft,dpo}_metrics/plots/metrics/).
CURVES = {
    "sft": ("loss", "eval/loss"),
    "dpo": (
        "loss", "eval/loss", "rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected",
        "rewards/margins", "eval/rewards/margins", "rewards/accuracies", "eval/rewards/accuracies",
    ),
}  # fmt: skip
MATCHES = {"sft_vs_base": ("SFT", "base"), "dpo_vs_sft": ("DPO", "SFT")}  # win_rate keys: (later, earlier)


@dataclass(frozen=True)
class Results:
    """Everything the page shows, as read from the pipeline's files."""

    recipe: str
    model: str
    evaluation: dict[str, Any]  # metrics/eval.json
    data: dict[str, Any]  # metrics/data.json
    examples: list[dict[str, str]]  # side-by-side rows of the held-out split, as many as report.examples
    rounds: list[dict[str, Any]] = field(default_factory=list)  # reports/plots/rounds.csv (round 0 = SFT)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # "sft/eval/loss" -> (step, value)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # "sft"/"dpo" -> DVCLive summary
    versions: dict[str, str | None] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def load_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as rows:
        return list(csv.DictReader(rows))


def load_curve(path: Path) -> list[tuple[float, float]]:
    """A DVCLive curve (TSV: step, value), or [] when the run did not log it."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as rows:
        return [(float(row[0]), float(row[1])) for row in list(csv.reader(rows, delimiter="\t"))[1:] if len(row) > 1]


def to_number(value: str | None) -> float | int | str | None:
    """A CSV cell as a number where it is one ("" -> None)."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value else number


def load_results(cfg: Config, versions: dict[str, str | None]) -> Results:
    """The page's inputs from the pipeline's files (paths.*); a missing evaluation says which stage to run."""
    reports = Path(cfg.paths.reports)
    evaluation = read_json(cfg.paths.eval_metrics, "evaluate")
    table = reports / "side_by_side.csv"
    if not table.is_file():
        raise DataError(f"{table}: not found; run dvc repro evaluate")
    split = evaluation.get("split", "test")
    examples = [row for row in load_csv(table) if row["source"] == split][: cfg.report.examples]
    rounds_file = reports / "plots" / "rounds.csv"
    rounds = []
    if rounds_file.is_file():
        rounds = [{key: to_number(value) for key, value in row.items()} for row in load_csv(rounds_file)]
    folders = {"sft": Path(cfg.paths.sft_metrics), "dpo": Path(cfg.paths.dpo_metrics)}
    curves = {
        f"{stage}/{name}": load_curve(folders[stage] / "plots" / "metrics" / f"{name}.tsv")
        for stage, names in CURVES.items()
        for name in names
    }
    training = {
        stage: read_json(folder / "metrics.json", stage) for stage, folder in folders.items()
        if (folder / "metrics.json").is_file()
    }  # fmt: skip
    return Results(
        recipe=cfg.recipe,
        model=cfg.model.name_or_path + (f" @ {cfg.model.revision}" if cfg.model.revision else ""),
        evaluation=evaluation,
        data=read_json(cfg.paths.data_metrics, "prepare"),
        examples=examples,
        rounds=rounds,
        curves=curves,
        training=training,
        versions=versions,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------


def number(value: Any, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return escape(str(value))


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def interval_class(low: float, high: float, neutral: float = 0.0) -> str:
    """The CSS class of an interval: up when all of it lies above `neutral`, down when below, else flat."""
    return "up" if low > neutral else "down" if high < neutral else "flat"


def delta_cell(delta: dict[str, float] | None) -> str:
    if not delta:
        return "<td>–</td>"
    span = f"[{number(delta['low'], sign=True)}, {number(delta['high'], sign=True)}]"
    return (
        f'<td class="{interval_class(delta["low"], delta["high"])}">{number(delta["mean"], sign=True)} '
        f'<span class="ci">{span}</span></td>'
    )


def table(header: str, rows: list[str], css: str = "") -> str:
    """A table from its header (<tr>s) and body rows (the inside of each <tr>)."""
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f'<table class="{css}"><thead>{header}</thead><tbody>{body}</tbody></table>'


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def variant_name(variant: str) -> str:
    return f'<span class="variant {variant}">{escape(variant)}</span>'


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


def render_headline(evaluation: dict[str, Any]) -> str:
    """What a reader wants first: each variant's scores, then what SFT and DPO changed."""
    cards = []
    for variant in VARIANT_COLORS:
        if variant in evaluation:
            lines = "".join(
                f"<div>{escape(label)} <b>{number(evaluation[variant].get(metric))}</b></div>"
                for metric, label in METRIC_LABELS.items()
            )
            cards.append(f'<div class="card"><h3>{variant_name(variant)}</h3>{lines}</div>')
    wins = evaluation.get("win_rate", {})
    for name, (later, earlier) in MATCHES.items():
        delta = evaluation.get("delta", {}).get(name, {}).get("f1")
        if delta is None:
            continue
        low, mean, high = (number(delta[key], sign=True) for key in ("low", "mean", "high"))
        css = interval_class(delta["low"], delta["high"])
        line = f'<div>token F1 <b class="{css}">{mean}</b> <span class="ci">[{low}, {high}]</span></div>'
        match = wins.get(name)
        if isinstance(match, dict):
            line += (
                f'<div>{escape(later)} wins <b class="{interval_class(match["low"], match["high"], 0.5)}">'
                f"{percent(match['rate'])}</b> of prompts</div>"
            )
        cards.append(f'<div class="card step"><h3>{escape(later)} vs {escape(earlier)}</h3>{line}</div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def render_setup(results: Results) -> str:
    evaluation = results.evaluation
    settings = evaluation.get("bertscore_settings", {})
    facts = [
        ("recipe", escape(results.recipe)),
        ("base model", f"<code>{escape(results.model)}</code>"),
        ("scored on", f"{number(evaluation.get('n'))} prompts of the {escape(str(evaluation.get('split', 'test')))}"
                      " split (plus the probe prompts in the per-category table)"),
        ("BERTScore", escape(f"{settings.get('model', '?')}, layer {settings.get('num_layers', '?')}"
                             + (", idf weights" if settings.get("idf") else "")
                             + (", rescaled with the baseline" if settings.get("rescaled") else ""))),
    ]  # fmt: skip
    listing = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    header = (
        "<tr><th>dataset</th><th>rows read</th><th>kept</th><th>dropped</th><th>relabelled</th>"
        "<th>train</th><th>validation</th><th>test</th></tr>"
    )
    rows = []
    for name, counts in results.data.items():
        if not isinstance(counts, dict) or "rows_read" not in counts:
            continue
        dropped = counts.get("dropped", {})
        reasons = ", ".join(f"{escape(k.replace('_', ' '))} {v}" for k, v in dropped.items() if k != "total" and v)
        relabelled = counts.get("relabelled", {})
        rows.append(
            f"<td>{escape(name)}</td><td>{number(counts['rows_read'])}</td><td>{number(counts.get('kept'))}</td>"
            f"<td>{number(dropped.get('total', 0))}{f' <span class=ci>({reasons})</span>' if reasons else ''}</td>"
            f"<td>{number(relabelled.get('total', 0))}</td><td>{number(counts.get('train'))}</td>"
            f"<td>{number(counts.get('validation', 0))}</td><td>{number(counts.get('test'))}</td>"
        )
    return f"<dl>{listing}</dl>" + table(header, rows, "numbers")


def render_scores(evaluation: dict[str, Any]) -> str:
    variants = [variant for variant in VARIANT_COLORS if variant in evaluation]
    columns = [*METRIC_LABELS.items(), ("mean_words", "mean words"), ("empty_rate", "empty"),
               ("truncated_rate", "cut at max_new_tokens")]  # fmt: skip
    header = "<tr><th>variant</th>" + "".join(f"<th>{escape(label)}</th>" for _, label in columns) + "</tr>"
    rows = []
    for variant in variants:
        scores = evaluation[variant]
        cells = [
            number(scores.get(key), 1) if key == "mean_words"
            else percent(scores.get(key)) if key.endswith("_rate")
            else number(scores.get(key))
            for key, _ in columns
        ]  # fmt: skip
        rows.append(f"<td>{variant_name(variant)}</td>" + "".join(f"<td>{cell}</td>" for cell in cells))
    chart = charts.draw_scores({variant: evaluation[variant] for variant in variants})
    return table(header, rows, "numbers") + figure(chart, "Mean scores on the held-out prompts, in pipeline order.")


def render_deltas(evaluation: dict[str, Any]) -> str:
    deltas = evaluation.get("delta", {})
    header = "<tr><th>step</th>" + "".join(f"<th>{escape(label)}</th>" for label in METRIC_LABELS.values()) + "</tr>"
    rows = [
        f"<td>{escape(label)}</td>" + "".join(delta_cell(deltas[name].get(metric)) for metric in METRIC_LABELS)
        for name, label in DELTA_LABELS.items()
        if name in deltas
    ]
    note = (
        "<p>The mean paired difference over the same prompts, with its 95% paired-bootstrap interval in brackets. "
        '<span class="up">Green</span>: the whole interval is above 0; <span class="down">red</span>: below 0; '
        "grey: the interval holds 0, so the data cannot tell the change from noise.</p>"
    )
    if not rows:
        return "<p>No deltas in metrics/eval.json.</p>"
    return note + table(header, rows, "numbers") + figure(charts.draw_deltas(deltas), "Deltas and their intervals.")


def render_win_rates(evaluation: dict[str, Any]) -> str:
    wins = evaluation.get("win_rate")
    parts = []
    if not wins:
        parts.append("<p>metrics/eval.json has no win rates; re-run <code>dvc repro evaluate</code>.</p>")
    else:
        parts.append(
            f"<p>For each of the {number(wins.get('n'))} held-out prompts, preference_data's ranker "
            f"(<code>{escape(str(wins.get('ranker')))}</code>) compares the two variants' answers; a tie counts half, "
            "and 50% means neither is preferred.</p>"
        )
        columns = ("match", "win rate", "95% interval", "wins", "ties", "losses")
        header = "<tr>" + "".join(f"<th>{column}</th>" for column in columns) + "</tr>"
        rows = []
        for name, (later, earlier) in MATCHES.items():
            match = wins.get(name)
            if isinstance(match, dict):
                rows.append(
                    f"<td>{escape(later)} over {escape(earlier)}</td>"
                    f'<td class="{interval_class(match["low"], match["high"], 0.5)}">{percent(match["rate"])}</td>'
                    f"<td>{percent(match['low'])} – {percent(match['high'])}</td><td>{number(match.get('wins'))}</td>"
                    f"<td>{number(match.get('ties'))}</td><td>{number(match.get('losses'))}</td>"
                )
        parts.append(table(header, rows, "numbers"))
    preferences = evaluation.get("preferences")
    if preferences:
        header = "<tr><th>variant</th><th>reference</th><th>accuracy</th><th>mean reward margin</th></tr>"
        references = {"sft": "base", "dpo": "sft"}
        rows = [
            f"<td>{variant_name(variant)}</td><td>{references[variant]}</td>"
            f"<td>{percent(preferences[variant].get('accuracy'))}</td><td>{number(preferences[variant].get('margin'))}</td>"
            for variant in references
            if variant in preferences
        ]
        parts.append(
            f"<h3>Held-out preference pairs</h3><p>On {number(preferences.get('n'))} held-out pairs, how often the "
            "implicit reward β·log(π/π<sub>ref</sub>) ranks the chosen answer above the rejected one.</p>"
            + table(header, rows, "numbers")
        )
    return "".join(parts)


def render_categories(evaluation: dict[str, Any]) -> str:
    categories = evaluation.get("categories", {})
    if not categories:
        return "<p>No categories in metrics/eval.json.</p>"
    variants = [variant for variant in VARIANT_COLORS if variant in evaluation]
    header = (
        '<tr><th rowspan="2">category</th><th rowspan="2">n</th>'
        + "".join(f'<th colspan="{len(variants)}">{escape(label)}</th>' for label in METRIC_LABELS.values())
        + '<th colspan="2">token F1 change</th></tr><tr>'
        + "".join(f"<th>{variant_name(v)}</th>" for _ in METRIC_LABELS for v in variants)
        + "<th>SFT − base</th><th>DPO − SFT</th></tr>"
    )
    rows = []
    for name in sorted(categories):
        summary = categories[name]
        cells = "".join(
            f"<td>{number(summary.get(variant, {}).get(metric))}</td>"
            for metric in METRIC_LABELS
            for variant in variants
        )
        deltas = summary.get("delta", {})
        changes = "".join(delta_cell(deltas.get(step, {}).get("f1")) for step in ("sft_vs_base", "dpo_vs_sft"))
        rows.append(f"<td>{escape(name.replace('_', ' '))}</td><td>{number(summary.get('n'))}</td>{cells}{changes}")
    chart = charts.draw_categories(categories)
    return table(header, rows, "numbers compact") + figure(chart, "Mean scores per category (n prompts).")


def render_training(results: Results) -> str:
    curves = results.curves
    sft, dpo = VARIANT_COLORS["sft"], VARIANT_COLORS["dpo"]
    chosen, rejected = "#2e8b57", "#c0392b"

    def pair(stage: str, name: str, label: str, color: str) -> list[Series]:
        train, validation = f"{label} train".strip(), f"{label} validation".strip()
        return [Series(train, curves.get(f"{stage}/{name}", []), color),
                Series(validation, curves.get(f"{stage}/eval/{name}", []), color, validation=True)]  # fmt: skip

    loss = charts.draw_curves("loss", [("SFT loss", pair("sft", "loss", "", sft)),
                                       ("DPO loss", pair("dpo", "loss", "", dpo))])  # fmt: skip
    rewards = charts.draw_curves(
        "rewards",
        [
            ("DPO rewards", pair("dpo", "rewards/chosen", "chosen", chosen)
                            + pair("dpo", "rewards/rejected", "rejected", rejected)),
            ("DPO reward margin (chosen − rejected)", pair("dpo", "rewards/margins", "", dpo)),
            ("DPO reward accuracy", pair("dpo", "rewards/accuracies", "", dpo)),
        ],
    )  # fmt: skip
    missing = [f"{stage}" for stage in ("sft", "dpo") if not curves.get(f"{stage}/eval/loss")]
    note = (
        f"<p>No validation curve for {', '.join(missing)}: set <code>{missing[0]}.trainer.eval_strategy: steps</code> "
        "and <code>data.validation_size</code> above 0.</p>"
        if missing
        else ""
    )
    return (
        note
        + figure(loss, "Loss by optimizer step: train (line) and the validation split every eval_steps (dots).")
        + figure(rewards, "DPO's implicit rewards β·log(π/π_ref) of the chosen and rejected answers.")
    )


def render_answers(results: Results) -> str:
    if not results.examples:
        return "<p>No held-out prompts to show.</p>"
    blocks = []
    for i, row in enumerate(results.examples, 1):
        answers = [("reference", row.get("reference", ""), "")]
        for variant in VARIANT_COLORS:
            if variant in row:
                scores = " · ".join(
                    f"{escape(label)} {number(to_number(row.get(f'{variant}_{metric}')))}"
                    for metric, label in METRIC_LABELS.items()
                )
                answers.append((variant, row[variant], scores))
        cells = "".join(
            f'<div class="answer {name}"><h4>{variant_name(name) if name != "reference" else "reference"}</h4>'
            f'<pre>{escape(text) or "<i>(empty)</i>"}</pre><div class="ci">{scores}</div></div>'
            for name, text, scores in answers
        )
        blocks.append(
            f'<article class="example"><h3>{i}. <span class="ci">{escape(row.get("category", ""))}</span></h3>'
            f'<pre class="instruction">{escape(row.get("instruction", ""))}</pre><div class="answers">{cells}</div>'
            "</article>"
        )
    return "".join(blocks)


def render_rounds(rounds: list[dict[str, Any]]) -> str:
    if len(rounds) < 2:
        return "<p>No self-rewarding rounds in this run (<code>self_rewarding.rounds</code>).</p>"
    columns = [("round", "round"), ("name", "name"), ("pairs", "pairs"), ("tie_rate", "tie rate"),
               ("mean_gap", "chosen − rejected"), *METRIC_LABELS.items(), ("delta_f1_vs_sft", "F1 − SFT"),
               ("mean_words", "mean words")]  # fmt: skip
    header = "<tr>" + "".join(f"<th>{escape(label)}</th>" for _, label in columns) + "</tr>"
    rows = [
        "".join(f"<td>{number(row.get(key), 1 if key == 'mean_words' else 3)}</td>" for key, _ in columns)
        for row in rounds
    ]
    chart = charts.draw_rounds(rounds)
    return table(header, rows, "numbers") + figure(chart, "Round 0 is the SFT model each round starts from.")


def render_run(results: Results) -> str:
    versions = "".join(f"<tr><td>{escape(k)}</td><td>{number(v)}</td></tr>" for k, v in results.versions.items())
    header = "<tr><th>stage</th><th>wall time</th><th>training time</th><th>peak GPU memory</th></tr>"
    costs = {stage: summary for stage, summary in results.training.items()} | {"evaluate": results.evaluation}
    rows = []
    for stage, summary in costs.items():
        cost = summary.get("cost", {})
        train = summary.get("train", {}) if isinstance(summary.get("train"), dict) else {}
        peak = cost.get("peak_gpu_memory_gib", summary.get("peak_memory_gib"))
        rows.append(
            f"<td>{escape(stage)}</td><td>{number(cost.get('wall_s'), 0)} s</td>"
            f"<td>{number(train.get('runtime'), 0) + ' s' if train.get('runtime') is not None else '–'}</td>"
            f"<td>{number(peak, 2) + ' GiB' if peak is not None else '–'}</td>"
        )
    packages = f"<table><thead><tr><th>package</th><th>version</th></tr></thead><tbody>{versions}</tbody></table>"
    return packages + table(header, rows, "numbers")


POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"  # load nothing, run nothing
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#fafafa}
main{max-width:1120px;margin:0 auto;padding:1.2em 1.5em 4em}
header{background:#20303f;color:#fff;padding:1.2em 1.5em}header h1{margin:0 0 .2em;font-size:1.5em}
header p{margin:0;opacity:.85}nav{max-width:1120px;margin:0 auto;padding:.5em 1.5em;font-size:.9em}
nav a{margin-right:1em;color:#20303f}
section{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:.6em 1.3em 1.1em;margin:1.2em 0}
h2{font-size:1.2em;border-bottom:1px solid #eee;padding-bottom:.3em}h3{font-size:1em;margin:.8em 0 .3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border-bottom:1px solid #e6e6e6;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f4f5f7}table.numbers td+td{font-variant-numeric:tabular-nums}
table.compact{font-size:.8em}.ci{color:#777;font-size:.85em}.up{color:#1b7f3b}.down{color:#b3261e}
.flat{color:#555}td.up,td.down{font-weight:600}
.variant{font-weight:600}.variant.base{color:#6d6d6d}.variant.sft{color:#3274a1}.variant.dpo{color:#c0651a}
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{border:1px solid #e3e3e3;border-radius:8px;padding:.4em 1em .7em;
min-width:11em;background:#fff}.card.step{background:#f6f9fc}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#666}dd{margin:0}
figure{margin:1em 0}figure svg{max-width:100%;height:auto}figcaption{color:#666;font-size:.85em}
.example{border-top:1px solid #eee;padding:.4em 0}.answers{display:grid;grid-template-columns:repeat(auto-fit,
minmax(230px,1fr));gap:.6em}.answer{background:#f7f7f8;border-radius:6px;padding:.2em .7em .5em}
.answer h4{margin:.3em 0}pre{white-space:pre-wrap;word-wrap:break-word;font:inherit;margin:.2em 0}
pre.instruction{font-weight:600}
"""


def render_page(results: Results) -> str:
    """The whole page as one HTML document."""
    sections = [
        ("setup", "Setup", render_setup(results)),
        ("scores", "Scores", render_scores(results.evaluation)),
        ("steps", "What each step bought", render_deltas(results.evaluation)),
        ("wins", "Win rates", render_win_rates(results.evaluation)),
        ("categories", "By category", render_categories(results.evaluation)),
        ("training", "Training curves", render_training(results)),
        ("answers", "Side by side", render_answers(results)),
        ("rounds", "Self-rewarding rounds", render_rounds(results.rounds)),
        ("run", "Versions and cost", render_run(results)),
    ]
    nav = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{escape(title)}</h2>{html}</section>' for key, title, html in sections)
    title = f"Results: {results.recipe}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Nothing to load and nothing to run: the page is the same with the network off.
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p>base → SFT → DPO on <code>{escape(results.model)}</code></p></header>"
        f"<nav>{nav}</nav><main>{render_headline(results.evaluation)}{body}</main></body></html>\n"
    )
