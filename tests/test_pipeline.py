"""The DVC contract end to end, on tiny settings: a fresh clone reproduces, a second repro does nothing, and an
experiment on lora.r re-runs only what depends on the adapter, with the changes visible in `dvc metrics diff`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params

PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "stages", "data/raw", "data/prompts")
ADAPTER_STAGES = {"sft", "dpo", "preference_data", "generate_sft", "generate_dpo", "evaluate", "publish"}
ALL_STAGES = ADAPTER_STAGES | {"embedded", "prepare", "base", "generate_base"}


def run(args, cwd):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd)}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A git + DVC repository with the project's files and tiny params, committed."""
    root = tmp_path_factory.mktemp("clone")
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(Path("."))))
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([*dvc, "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny project"], root)
    return root


@pytest.mark.slow
def test_repro_runs_every_stage_then_nothing_and_an_experiment_reruns_only_the_adapter_stages(clone):
    dvc = [sys.executable, "-m", "dvc"]
    first = run([*dvc, "repro"], clone)
    assert stages_run(first) == ALL_STAGES
    result = json.loads((clone / "metrics/eval.json").read_text())
    for variant in ("base", "sft", "dpo"):
        assert set(result[variant]) >= {"f1", "rougeL", "bertscore_f1", "mean_words", "empty_rate"}
    assert set(result["delta"]) == {"sft_vs_base", "dpo_vs_sft", "dpo_vs_base"}
    assert set(result["delta"]["sft_vs_base"]["f1"]) == {"mean", "low", "high"}
    assert {"accuracy", "margin"} <= set(result["preferences"]["dpo"])
    assert (clone / "reports/side_by_side.md").is_file() and (clone / "reports/plots/categories.csv").is_file()

    again = run([*dvc, "repro"], clone)
    assert stages_run(again) == set() and "up to date" in again

    run(["git", "add", "-A"], clone)
    run(["git", "commit", "-qm", "first run"], clone)
    experiment = run([*dvc, "exp", "run", "-S", "lora.r=8"], clone)
    assert stages_run(experiment) == ADAPTER_STAGES
    adapter_config = json.loads((clone / "models/sft/adapter_config.json").read_text())
    assert adapter_config["r"] == 8

    diff = json.loads(run([*dvc, "metrics", "diff", "--json"], clone))
    changed = diff["metrics/eval.json"]
    # A few tiny training steps barely move the answers, but the preference log-probs always move.
    assert any(key.startswith("preferences.") for key in changed)
    assert not [key for key in changed if "base" in key.split(".")], "the base model's scores must not change"
