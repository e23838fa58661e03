"""The project beside its best peer, as a chart: every stage and memory budget that one `benchmarks/peers.py` call
measured on both sides, drawn from its saved peers JSON.

Each pair of bars comes from one call (one machine, one process per run, the same rows), so only bars of one
pair are compared: the lent GPUs and their hosts differ between calls. Bars are medians, whiskers the min and max
of the repeats, and the mark on the project's bar is the 1.5x target over the peer's median.

    python benchmarks/speed_chart.py                     # every peers JSON under benchmarks/results/
    python benchmarks/speed_chart.py A.json B.json --out chart.svg
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from peers import against_peers  # the best peer and the ratio, as peers.md reports them

from finetune.results.charts import VARIANT_COLORS, to_svg

RESULTS = REPO / "benchmarks" / "results"
DEFAULT_OUT = RESULTS / "speed_vs_peers.svg"
PEERS_RESULT = "peer engines on"  # how peers.py's saved results begin their "what"
TARGET_RATIO = 1.5
GPU_NAMES = {"NVIDIA H100 80GB HBM3": "H100", "NVIDIA H200": "H200"}


@dataclass(frozen=True)
class Pair:
    """The project's rates and its best peer's (highest median) at one stage and budget of one call."""

    source: str
    stage: str
    budget_gib: float | None
    gpu: str
    date: str
    project: tuple[float, ...]
    peer: str
    peer_rates: tuple[float, ...]
    ratio: float

    @property
    def label(self) -> str:
        budget = "whole GPU" if self.budget_gib is None else f"{self.budget_gib:g} GiB"
        return f"{self.stage.upper()} at {budget}, {self.gpu}, {self.date}"

    @property
    def call(self) -> str:
        """The saved result, short: its folder and name under results/ (a "peers.json" by its two folders)."""
        path = Path(self.source).with_suffix("")
        path = path.parent if path.name == "peers" else path
        return f"{path.parent.name}/{path.name}"


def pairs_of(result: dict, source: str) -> list[Pair]:
    """The measured pairs of one saved peers.py result (peers.against_peers' rows with a peer), with every run's rate
    for the whiskers; a failed run has no rate."""
    rates: dict[tuple[str, float | None], tuple[float, ...]] = {}
    for run in result["runs"]:
        if run.get("tokens_per_s"):
            key = (run["engine"], run["budget_gib"])
            rates[key] = (*rates.get(key, ()), run["tokens_per_s"])
    gpu = result.get("versions", {}).get("gpu", "GPU")
    pairs = []
    for row in against_peers(result["runs"]):
        if row["best_peer"]:
            budget = row["budget_gib"]
            project, peer = rates[row["project_engine"], budget], rates[row["best_peer"], budget]
            gpu_name = GPU_NAMES.get(gpu, gpu)
            pairs.append(
                Pair(
                    source,
                    row["stage"],
                    budget,
                    gpu_name,
                    result["date"],
                    project,
                    row["best_peer"],
                    peer,
                    row["ratio"],
                )
            )
    return pairs


def peers_results(root: Path) -> list[Path]:
    """Every saved peers.py result under `root`, by name."""
    found = []
    for path in sorted(root.rglob("*.json")):
        try:
            what = json.loads(path.read_text()).get("what", "")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(what, str) and what.startswith(PEERS_RESULT):
            found.append(path)
    return found


def draw(pairs: list[Pair]) -> str:
    """Horizontal bars, a pair per row group in stage, budget and date order, the ratio written beside each."""
    pairs = sorted(pairs, key=lambda pair: (pair.stage != "sft", pair.budget_gib or 1e9, pair.date, pair.source))

    def figure_of(figure):
        axes = figure.subplots()
        ticks, labels = [], []
        for row, pair in enumerate(reversed(pairs)):
            centre = row * 3
            for offset, rates, color in (
                (0.5, pair.project, VARIANT_COLORS["sft"]),
                (-0.5, pair.peer_rates, VARIANT_COLORS["base"]),
            ):
                middle = statistics.median(rates)
                whisker = [[middle - min(rates)], [max(rates) - middle]]
                axes.barh(centre + offset, middle, height=0.9, color=color, xerr=whisker, capsize=2)
            target = TARGET_RATIO * statistics.median(pair.peer_rates)
            axes.plot([target, target], [centre + 0.05, centre + 0.95], color="black", linewidth=1.5)
            axes.text(
                max(max(pair.project), target) * 1.02, centre + 0.5, f"{pair.ratio:.2f}x", va="center", fontsize=8
            )
            ticks.append(centre)
            labels.append(f"{pair.label}\nvs {pair.peer}\n{pair.call}")
        axes.set_yticks(ticks, labels, fontsize=7)
        axes.set_xlabel("tokens/s (median; whiskers: min and max of the repeats)")
        axes.set_title(f"blue: the project; grey: its best peer; mark: {TARGET_RATIO}x the peer", loc="left")
        axes.grid(axis="y", visible=False)

    return to_svg("speed-vs-peers", (7.5, 0.75 * len(pairs) + 1.0), figure_of)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="saved peers.py results (default: all in results/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    paths = args.results or peers_results(RESULTS)
    pairs = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
            source = str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path)
            pairs += pairs_of(result, source)
        except (OSError, json.JSONDecodeError, KeyError) as error:
            print(f"speed_chart: {path}: not a peers.py result ({type(error).__name__}: {error})", file=sys.stderr)
            return 2
    if not pairs:
        print("speed_chart: no stage and budget measured on both sides in " + ", ".join(map(str, paths)))
        return 2
    args.out.write_text(draw(pairs) + "\n", encoding="utf-8")
    for pair in pairs:
        print(f"{pair.label}: {pair.ratio:.2f}x {pair.peer} ({pair.source})")
    print(f"speed_chart: {len(pairs)} pairs from {len(paths)} files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
