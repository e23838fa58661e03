"""The `dvc plots show` dashboard is dvc.yaml's top-level `plots:`: at most 20 charts, none drawn from a single point,
the SFT validation loss among them, and `dvc plots diff` overlays two runs in every chart. Checked on made-up result
files in a copy of the project, and on the repository's own files after a pipeline run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import DVC, REPO, git_dvc_init, run
from result_files import write_result_files

MAX_CHARTS = 20
SERIES_KEYS = ("rev", "filename", "field", "filename::field")  # what tells a chart's series apart, as DVC marks them
SFT_LOSS = "SFT loss (train, validation)"


def plots_json(args: list[str], cwd: Path) -> dict:
    """`dvc plots show|diff --json`, its standard output alone (DVC writes warnings to stderr)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([*DVC, "plots", *args, "--json"], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def series(chart: dict) -> Counter:
    """Points per series of a chart (one series per revision, file and field drawn)."""
    return Counter(tuple(point.get(key) for key in SERIES_KEYS) for point in chart["content"]["data"]["values"])


def check_dashboard(plots: dict) -> dict:
    """The checks every dashboard must pass; returns the charts by title."""
    assert not plots.get("errors"), f"dvc plots show could not draw: {plots['errors']}"
    charts = plots["data"]
    assert 0 < len(charts) <= MAX_CHARTS, f"{len(charts)} charts: {sorted(charts)}"
    for title, renders in charts.items():
        for chart in renders:
            for line, points in series(chart).items():
                assert points >= 2, f"{title!r}: the series {line} is drawn from {points} point"
    points = charts[SFT_LOSS][0]["content"]["data"]["values"]
    validation = [point for point in points if point["filename"].endswith("eval/loss.tsv")]
    assert len(validation) >= 2, "no SFT validation loss (eval/loss.tsv) in the dashboard"
    return charts


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project's dvc.yaml, params.yaml and plot templates over made-up result files, committed."""
    root = tmp_path_factory.mktemp("dashboard")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    write_result_files(root, paths)
    git_dvc_init(root)  # with the project's plot templates
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "a run"], root)
    return root


def test_the_dashboard_draws_at_most_20_charts_none_from_one_point(project):
    charts = check_dashboard(plots_json(["show"], project))
    # The chart tables' variants in pipeline order, whatever the templates' sort does with them.
    variants = charts["Held-out scores by variant (base, sft, dpo)"][0]["content"]
    assert variants["encoding"]["xOffset"]["sort"] == ["base", "sft", "dpo"]
    assert len(variants["data"]["values"]) == 9  # three variants by three metrics
    categories = charts["Scores by category and variant"][0]["content"]["data"]["values"]
    assert {point["field"] for point in categories} == {"f1", "rougeL", "bertscore_f1"}


def test_plots_diff_overlays_two_runs_in_every_chart(project):
    paths = yaml.safe_load((project / "params.yaml").read_text())["paths"]
    write_result_files(project, paths, shift=0.05)  # another run (an experiment) in the workspace
    charts = check_dashboard(plots_json(["diff", "HEAD"], project))
    for title, renders in charts.items():
        revisions = {point["rev"] for point in renders[0]["content"]["data"]["values"]}
        assert revisions == {"HEAD", "workspace"}, f"{title!r} shows {revisions}"


@pytest.mark.skipif(
    not (REPO / "metrics" / "sft" / "plots" / "metrics" / "loss.tsv").is_file(), reason="no pipeline run here"
)
def test_the_repository_dashboard_after_a_pipeline_run():
    if not (REPO / "metrics" / "sft" / "plots" / "metrics" / "eval" / "loss.tsv").is_file():
        pytest.fail("the committed run has no validation curves (it predates eval_strategy): dvc repro, and commit")
    check_dashboard(plots_json(["show"], REPO))
