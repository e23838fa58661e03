"""The results page's charts: matplotlib figures drawn when the page is built and inlined as SVG, so the page needs
no script and no network.

Each function takes plain numbers and returns one `<svg>` element as text. Text stays text (svg.fonttype none): the
browser draws it in the page's font, and it can be searched and copied. Every chart's ids are prefixed with its name,
since all of them share one HTML document.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

VARIANT_COLORS = {"base": "#8c8c8c", "sft": "#3274a1", "dpo": "#e1812c"}  # in pipeline order
METRIC_LABELS = {"f1": "token F1", "rougeL": "ROUGE-L", "bertscore_f1": "BERTScore F1"}
DELTA_LABELS = {"sft_vs_base": "SFT − base", "dpo_vs_sft": "DPO − SFT", "dpo_vs_base": "DPO − base"}
DELTA_COLORS = {"sft_vs_base": VARIANT_COLORS["sft"], "dpo_vs_sft": VARIANT_COLORS["dpo"], "dpo_vs_base": "#6b4c9a"}
STYLE = {
    "svg.fonttype": "none",  # <text> elements, not glyph outlines
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e4e4e4",
    "legend.frameon": False,
}

Points = Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Series:
    """One curve of a panel; a `validation` curve (evaluated every eval_steps) is dashed, with a dot per point."""

    label: str
    points: Points
    color: str
    validation: bool = False


def to_svg(name: str, size: tuple[float, float], draw: Callable) -> str:
    """`draw(figure)` on a new figure of `size` inches, as an <svg> element whose ids start with `name`."""
    import matplotlib
    from matplotlib.figure import Figure

    # The salt makes matplotlib's ids depend on the chart only, so the same numbers give the same page.
    with matplotlib.rc_context(STYLE | {"svg.hashsalt": name}):
        figure = Figure(figsize=size, layout="constrained")
        draw(figure)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg[svg.index("<svg") :], flags=re.DOTALL)  # RDF about the file
    return scoped_ids(svg, name)


def scoped_ids(svg: str, prefix: str) -> str:
    """Every id in `svg`, and every reference to one, prefixed with `prefix`."""
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m[1]}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m[1]})", svg)
    return re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m[1]}"', svg)


def _offsets(count: int, width: float) -> list[float]:
    """Where `count` bars of `width` sit around their group's centre."""
    return [(i - (count - 1) / 2) * width for i in range(count)]


def draw_scores(scores: dict[str, dict[str, float]]) -> str:
    """The held-out means: one group per metric, one bar per variant in pipeline order, each bar labelled."""
    variants = [variant for variant in VARIANT_COLORS if variant in scores]

    def draw(figure):
        axes = figure.subplots()
        width = 0.8 / len(variants)
        for variant, offset in zip(variants, _offsets(len(variants), width)):
            values = [scores[variant][metric] for metric in METRIC_LABELS]
            bars = axes.bar([i + offset for i in range(len(values))], values, width, label=variant,
                            color=VARIANT_COLORS[variant])  # fmt: skip
            axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        axes.set_xticks(range(len(METRIC_LABELS)), list(METRIC_LABELS.values()))
        axes.set_ylabel("mean on the held-out prompts")
        axes.margins(y=0.15)
        axes.grid(axis="x", visible=False)
        axes.legend(ncols=len(variants), loc="upper left")

    return to_svg("scores", (6.4, 2.8), draw)


def draw_deltas(deltas: dict[str, dict[str, dict[str, float]]]) -> str:
    """Each step's mean paired difference per metric with its 95% interval: an interval clear of 0 is a change that
    resampling the prompts does not undo."""
    rows = [(name, metric) for name in DELTA_LABELS if name in deltas for metric in METRIC_LABELS]

    def draw(figure):
        axes = figure.subplots()
        for y, (name, metric) in enumerate(rows):
            delta = deltas[name][metric]
            error = [[delta["mean"] - delta["low"]], [delta["high"] - delta["mean"]]]
            axes.errorbar(delta["mean"], y, xerr=error, fmt="o", color=DELTA_COLORS[name], capsize=3, markersize=4)
        axes.axvline(0, color="#333333", linewidth=0.8)
        axes.set_yticks(range(len(rows)), [f"{DELTA_LABELS[name]}, {METRIC_LABELS[metric]}" for name, metric in rows])
        axes.invert_yaxis()
        axes.set_xlabel("later − earlier: mean paired difference and 95% interval")

    return to_svg("deltas", (6.4, 0.26 * len(rows) + 0.9), draw)


def draw_categories(categories: dict[str, dict]) -> str:
    """One panel per metric, the categories down the side, one bar per variant in pipeline order."""
    names = sorted(categories)
    variants = [variant for variant in VARIANT_COLORS if all(variant in categories[name] for name in names)]

    def draw(figure):
        panels = figure.subplots(1, len(METRIC_LABELS), sharey=True)
        height = 0.8 / len(variants)
        for axes, (metric, label) in zip(panels, METRIC_LABELS.items()):
            for variant, offset in zip(variants, _offsets(len(variants), height)):
                values = [categories[name][variant][metric] for name in names]
                axes.barh([i + offset for i in range(len(names))], values, height, color=VARIANT_COLORS[variant],
                          label=variant)  # fmt: skip
            axes.set_title(label)
            axes.grid(axis="y", visible=False)
        labels = [f"{name.replace('_', ' ')} ({categories[name].get('n', '?')})" for name in names]
        panels[0].set_yticks(range(len(names)), labels)
        panels[0].invert_yaxis()
        handles, legend_labels = panels[0].get_legend_handles_labels()
        figure.legend(handles, legend_labels, ncols=len(variants), loc="outside upper center")

    return to_svg("categories", (7.6, 0.34 * len(names) + 1.1), draw)


def draw_curves(name: str, panels: Sequence[tuple[str, Sequence[Series]]], columns: int = 2) -> str:
    """Training curves by optimizer step, one panel per (title, series); a panel without data says so."""
    rows = math.ceil(len(panels) / columns)

    def draw(figure):
        grid = figure.subplots(rows, columns, squeeze=False)
        for axes, (title, series) in zip(grid.flat, panels):
            drawn = [line for line in series if line.points]
            for line in drawn:
                steps, values = zip(*line.points)
                style = {"linestyle": "--", "marker": "o", "markersize": 3} if line.validation else {"linewidth": 1.2}
                axes.plot(steps, values, color=line.color, label=line.label, **style)
            if not drawn:
                axes.text(0.5, 0.5, "no curve logged", ha="center", va="center", transform=axes.transAxes)
            else:
                axes.legend(fontsize=7)
            axes.set_title(title)
            axes.set_xlabel("optimizer step")
        for axes in list(grid.flat)[len(panels) :]:
            axes.set_visible(False)

    return to_svg(name, (7.6, 2.5 * rows), draw)


def draw_rounds(rows: Sequence[dict[str, float | str | None]]) -> str:
    """The self-rewarding rounds (round 0 = SFT): held-out scores by round, and the pairs each round trained on."""
    labels = [f"{row['round']}: {row['name']}" for row in rows]

    def draw(figure):
        scores, pairs = figure.subplots(1, 2)
        for metric, label in METRIC_LABELS.items():
            scores.plot(range(len(rows)), [row.get(metric) for row in rows], marker="o", label=label)
        scores.set_title("held-out scores")
        pair_rows = [(i, row) for i, row in enumerate(rows) if row.get("tie_rate") is not None]
        for column, label in (("tie_rate", "tie rate"), ("mean_gap", "chosen − rejected score")):
            pairs.plot([i for i, _ in pair_rows], [row.get(column) for _, row in pair_rows], marker="o", label=label)
        pairs.set_title("the round's pairs")
        for axes in (scores, pairs):
            axes.set_xticks(range(len(rows)), labels)
            axes.set_xlim(-0.3, len(rows) - 0.7)
            axes.legend(fontsize=7)

    return to_svg("rounds", (7.6, 2.6), draw)
