"""params.yaml is generated from conf/: a hand edit of params.yaml, or a conf/ edit that params.yaml does not have yet,
stops every stage with one line (finetune/core/params_check.py) instead of running silently; `dvc exp run` and any
params file that is not a repository's own are left alone."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import DVC, REPO, git_dvc_init, run

from finetune.core.config import load_config
from finetune.core.errors import ConfigError
from finetune.core.params_check import check_params
from stages import prepare


def compose(root: Path, *overrides: str) -> None:
    """root/params.yaml as `dvc exp run -S ...` writes it (DVC's own function)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(root / "params.yaml", str(root / "conf"), None, "config", str(root), list(overrides))


def set_in_conf(root: Path, old: str, new: str) -> None:
    config = root / "conf" / "config.yaml"
    text = config.read_text()
    assert text.count(old) == 1, old
    config.write_text(text.replace(old, new))


def edit_params(root: Path, edit) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A DVC repository with Hydra on (the project's .dvc/config), the project's conf/ and a composed params.yaml."""
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", tmp_path / ".dvc" / "config")
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    compose(tmp_path)
    return tmp_path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_repository_params_yaml_is_what_conf_composes():
    assert load_config(REPO / "params.yaml").recipe == "embedded"


def test_a_composed_params_yaml_loads(repo):
    assert load_config(repo / "params.yaml").data.sft.source == "data/embedded/dolly.jsonl"


def test_a_hand_edit_of_params_yaml_is_refused_naming_the_key_and_what_to_run(repo):
    edit_params(repo, lambda p: p["data"]["sft"].update(source="data/raw/mine.jsonl"))
    message = refusal(repo / "params.yaml")
    assert message.startswith(
        'params.yaml: data.sft.source is "data/raw/mine.jsonl" but conf/ composes "data/embedded/dolly.jsonl". '
    )
    assert "to run conf/ as it is, run `dvc exp run`;" in message
    assert "put them in conf/ (then `dvc exp run`)" in message
    assert message.endswith("or pass them: `dvc exp run -S data.sft.source=data/raw/mine.jsonl`")


def test_a_stage_run_on_a_hand_edited_params_yaml_stops_with_one_line(repo, monkeypatch, capsys):
    edit_params(repo, lambda p: p["data"].update(max_chars=100))
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: params.yaml: data.max_chars is 100 but conf/ composes 2500.") and "\n" not in err
    assert not (repo / "data" / "prepared").exists()


def test_a_conf_edit_with_a_stale_params_yaml_is_refused(repo):
    set_in_conf(repo, "  r: 16 ", "  r: 8 ")
    set_in_conf(repo, "max_chars: 2500 ", "max_chars: 2000 ")
    message = refusal(repo / "params.yaml")
    assert message.startswith("params.yaml: data.max_chars is 2500 but conf/ composes 2000; 1 more key differs: ")
    assert "differs: lora.r. params.yaml is generated" in message
    compose(repo)  # what `dvc exp run` does first
    assert load_config(repo / "params.yaml").lora.r == 8


def test_a_key_only_params_yaml_has_or_only_conf_has_is_a_difference(repo):
    edit_params(repo, lambda p: (p["sft"]["trainer"].update(max_grad_norm=0.5), p["publish"].pop("private")))
    message = refusal(repo / "params.yaml")
    assert "sft.trainer.max_grad_norm is 0.5 but conf/ composes nothing" in message
    assert "-S +sft.trainer.max_grad_norm=0.5 -S '~publish.private'" in message


def test_another_recipe_is_compared_with_that_recipe_and_named_in_the_command(repo):
    compose(repo, "recipe=seed003-zephyr-alpaca")
    assert load_config(repo / "params.yaml").recipe == "seed003-zephyr-alpaca"
    set_in_conf(repo, "  test_size: 0.1 ", "  test_size: 0.2 ")
    message = refusal(repo / "params.yaml")
    assert message.startswith("params.yaml: data.test_size is 0.1 but conf/ composes 0.2.")
    assert "run `dvc exp run -S recipe=seed003-zephyr-alpaca`;" in message


def test_an_unknown_recipe_in_params_yaml_is_one_line(repo):
    edit_params(repo, lambda p: p.update(recipe="no-such-recipe"))
    assert refusal(repo / "params.yaml").startswith(
        "params.yaml: conf/ does not compose with recipe=no-such-recipe: "
    )


def test_the_suggested_overrides_compose_exactly_the_refused_params_yaml(repo):
    """Values an experiment left in params.yaml (`dvc exp run -S`, `dvc exp apply`) are refused by a later run outside
    `dvc exp run`; the command the message gives brings back exactly that params.yaml."""
    overrides = ["recipe=seed003-zephyr-alpaca", "lora.r=4", "data.sft.split='train[:100]'", "data.seed='7'"]
    compose(repo, *overrides)
    left = (repo / "params.yaml").read_text()
    command = re.search(r"or pass them: `(dvc exp run [^`]*)`", refusal(repo / "params.yaml")).group(1)
    words = shlex.split(command)
    suggested = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    compose(repo, *suggested)
    assert (repo / "params.yaml").read_text() == left
    assert yaml.safe_load(left)["data"]["seed"] == "7"  # a string that looks like a number stays quoted


def test_under_dvc_exp_run_params_yaml_is_not_compared(repo, monkeypatch):
    """DVC composed it from this conf/ with the run's -S overrides, which conf/ does not hold."""
    compose(repo, "lora.r=4")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1234")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    assert load_config(repo / "params.yaml").lora.r == 4


def test_params_files_that_are_not_a_repository_params_yaml_are_read_as_they_are(repo, tmp_path_factory):
    edit_params(repo, lambda p: p["lora"].update(r=4))
    copy = repo / "variant.yaml"  # another name, next to .dvc/
    shutil.copy(repo / "params.yaml", copy)
    assert load_config(copy).lora.r == 4
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "params.yaml"  # no .dvc/ beside it
    shutil.copy(repo / "params.yaml", elsewhere)
    assert load_config(elsewhere).lora.r == 4
    check_params(elsewhere, {"anything": 1})


def test_with_hydra_off_params_yaml_is_the_source(repo):
    (repo / ".dvc" / "config").write_text("[hydra]\n    enabled = false\n")
    edit_params(repo, lambda p: p["lora"].update(r=4))
    assert load_config(repo / "params.yaml").lora.r == 4


def dvc(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([*DVC, *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_real_dvc_repro_refuses_both_traps_and_dvc_exp_run_recomposes(tmp_path):
    """In a git + DVC repository: `dvc repro` refuses a hand-edited params.yaml and a conf/ edit (the stage lists
    conf as a dependency, so a conf/ edit alone re-runs it); `dvc exp run` recomposes and runs."""
    root = tmp_path / "project"
    root.mkdir()
    git_dvc_init(root)
    run([*DVC, "config", "hydra.enabled", "true"], root)
    shutil.copytree(REPO / "conf", root / "conf")
    compose(root)
    read = "from finetune.core.config import load_config; print(load_config().lora.r)"
    stage = {"cmd": f'python -c "{read}" > r.txt', "deps": ["conf"], "params": ["lora.r"], "outs": ["r.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"read": stage}}))
    run([*DVC, "repro"], root)
    assert (root / "r.txt").read_text() == "16\n"
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "start"], root)

    edit_params(root, lambda p: p["lora"].update(r=8))  # trap 1: a hand edit, then `dvc repro`
    result = dvc(["repro"], root)
    assert result.returncode != 0
    assert "ConfigError: params.yaml: lora.r is 8 but conf/ composes 16." in result.stderr
    run(["git", "checkout", "-q", "params.yaml"], root)

    set_in_conf(root, "  r: 16 ", "  r: 4 ")  # trap 2: a conf/ edit, then `dvc repro`
    result = dvc(["repro"], root)
    assert result.returncode != 0
    assert "ConfigError: params.yaml: lora.r is 16 but conf/ composes 4." in result.stderr
    run([*DVC, "exp", "run"], root)  # what the message says to run
    assert (root / "r.txt").read_text() == "4\n"
    assert yaml.safe_load((root / "params.yaml").read_text())["lora"]["r"] == 4

    run([*DVC, "exp", "run", "-S", "lora.r=2"], root)  # -S values are in params.yaml, not in conf/: fine here
    assert (root / "r.txt").read_text() == "2\n"
