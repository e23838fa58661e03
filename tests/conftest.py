"""Shared fixtures: a complete tiny project (embedded data, prepared splits, a pre-trained tiny base model)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# What a tiny git + DVC copy of the project needs (tests/test_sharing.py).
PROJECT_FILES = (
    "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "stages", "finetune", "data/raw", "data/prompts",
)  # fmt: skip
DVC = [sys.executable, "-m", "dvc"]

# A base model small enough to pre-train in seconds on 2 CPU cores, with the real architecture (GQA: 4 heads, 2 KV).
TINY_ARCHITECTURE = {
    "vocab_size": 600,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
# Few steps with a checkpoint every 2 steps: enough to see training, saving, rotation and resuming happen.
TINY_FINE_TUNING = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "max_length": 512,  # = max_position_embeddings; the embedded rows are shorter except a few deliberately long ones
    "logging_steps": 1,
    "save_steps": 2,
    "save_total_limit": 2,
}


def write_params(tmp_path: Path, edit) -> Path:
    """The repository's params.yaml, changed by `edit(params)`, written to tmp_path/params.yaml."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def tiny_params(root: Path) -> dict:
    """params.yaml with every path inside `root`, small data, a tiny base model and a few training steps."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"] = {key: str(root / value) for key, value in params["paths"].items()}
    params["embedded"].update(sft_rows=120, preference_rows=80)
    params["base"]["architecture"] = dict(TINY_ARCHITECTURE)
    params["base"]["trainer"].update(
        max_steps=10, per_device_train_batch_size=8, warmup_steps=2, logging_steps=5, save_steps=100
    )
    params["model"]["name_or_path"] = params["paths"]["base_model"]
    # The sources are relative to the repository in params.yaml; here they are the tmp project's embedded files.
    embedded = Path(params["paths"]["embedded"])
    params["data"]["sft"]["source"] = str(embedded / Path(params["data"]["sft"]["source"]).name)
    params["data"]["preferences"]["source"] = str(embedded / Path(params["data"]["preferences"]["source"]).name)
    for section in ("sft", "dpo"):
        trainer = params[section]["trainer"]
        trainer.pop("num_train_epochs", None)  # max_steps decides
        trainer.update(TINY_FINE_TUNING)
    # Self-rewarding: two rounds of a few prompts, answers and DPO steps each.
    rounds = params["self_rewarding"]
    rounds.update(prompts=6, candidates=3, max_new_tokens=12, batch_size=8, eval_prompts=4)
    rounds["trainer"].pop("num_train_epochs", None)
    rounds["trainer"].update(TINY_FINE_TUNING, max_steps=2, per_device_train_batch_size=3)
    chain_rounds(params)
    return params


def chain_rounds(params: dict) -> None:
    """Round starts that follow params' paths: the first round from paths.sft_adapter, each next from the previous
    round's adapter (paths.rounds/NAME), as conf/config.yaml interpolates them."""
    start = params["paths"]["sft_adapter"]
    for name, settings in params["self_rewarding"]["rounds"].items():
        settings["start"] = start
        start = str(Path(params["paths"]["rounds"]) / name)


def run(args, cwd) -> str:
    """Run a command in `cwd` (the stages importable from it), fail with its output tails; return its output."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd)}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    """The stages whose command `dvc repro` / `dvc exp run` ran (restored or skipped stages print no such line)."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def copy_project(root: Path) -> None:
    """The project's files (PROJECT_FILES) copied into root."""
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)


def git_dvc_init(root: Path) -> None:
    """`git init` + `dvc init` in root, with a committer identity for the tests' commits, and the plot templates
    dvc.yaml's dashboard names (.dvc/plots/), as a clone of the repository has them."""
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run([*DVC, "init", "-q"], root)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")


@dataclass
class TinyProject:
    root: Path
    params: dict  # what params_path holds; edit a deep copy through `variant`
    params_path: Path

    def variant(self, name: str, edit=None) -> Path:
        """Another params file whose fine-tuning outputs go to root/name/ (the data and base model are shared).

        Tests that train with other settings use one, so they neither see nor spoil the main run's outputs.
        """
        params = copy.deepcopy(self.params)
        folder = self.root / name
        for key in ("sft_adapter", "sft_metrics", "dpo_adapter", "dpo_metrics", "checkpoints", "rounds", "round_data",
                    "round_metrics"):
            params["paths"][key] = str(folder / key)
        if edit is not None:
            edit(params)
        chain_rounds(params)  # the rounds start from this variant's SFT adapter, as conf/ interpolates it
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(params))
        return path


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> TinyProject:
    """embedded -> prepare -> base run for real on tiny settings, once per test module (about 10 s on a CPU)."""
    from stages import base, embedded, prepare

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "data" / "prompts", root / "data" / "prompts")  # a source file, like the repo's
    params = tiny_params(root)
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    # Run outside the repository: the stages must write only where params say, and DVCLive marks steps in the
    # .dvc/tmp of the DVC repository around the working directory.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in (embedded, prepare, base):
            stage.main(str(params_path))
    return TinyProject(root=root, params=params, params_path=params_path)


def pytest_collection_modifyitems(items) -> None:
    """Tests that train on the tiny project are heavy: `python -m pytest -m "not slow"` is the fast lane."""
    for item in items:
        if "tiny_project" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
