"""The DVC contract end to end on tiny settings, with DVC's Hydra composition on as in the real repository (the real
conf/, its default recipe switched to a tiny one): a clone reproduces every stage, a second repro does nothing, an
experiment on lora.r re-runs only what depends on the adapter; and sharing results and queued sweeps.

Clone A runs the pipeline and pushes: data and run cache to a local-directory DVC remote, commits to a bare git
remote. Clone B is a `git clone` of that remote: `dvc pull --run-cache` brings every output and `dvc repro` runs
nothing; a stage that A ran outside any commit is restored in B from the shared run cache instead of running; an
experiment travels with `dvc exp push` / `dvc exp pull`. A queued sweep (`dvc exp run --queue -S 'lora.r=4,8'`,
`dvc queue start`) runs in A and compares with `dvc exp show`, `dvc metrics diff` and `dvc plots diff`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import DVC, REPO, copy_project, git_dvc_init, run, stages_run, tiny_params

pytestmark = pytest.mark.slow

# Two self-rewarding rounds (tiny_params) unrolled by foreach, each a pairs and a dpo stage, then their report.
ROUND_STAGES = {f"self_rewarding_{step}@round{n}" for step in ("pairs", "dpo") for n in (1, 2)}
ADAPTER_STAGES = {"sft", "dpo", "preference_data", "generate@sft", "generate@dpo", "evaluate", "report", "publish",
                  *ROUND_STAGES, "self_rewarding_report"}  # fmt: skip
ALL_STAGES = ADAPTER_STAGES | {"params_check", "embedded", "prepare", "base", "generate@base"}

CACHED = "is cached - skipping run, checking out outputs"
UP_TO_DATE = "Data and pipelines are up to date."


def stdout(args, cwd) -> str:
    """A command's standard output alone (for --json and --csv: DVC writes warnings to stderr)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def changed(new: dict, old: dict) -> dict:
    """The values of `new` that differ from `old`, nested."""
    out = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            if inner := changed(value, old[key]):
                out[key] = inner
        elif key not in old or old[key] != value:
            out[key] = value
    return out


def make_hydra_project(root: Path) -> None:
    """The project with the real conf/, whose default recipe is a tiny one: the tiny params as a recipe on top of
    conf/config.yaml, so `dvc exp run -S key=value` composes params.yaml exactly as it does in the repository."""
    copy_project(root)
    shutil.copytree(REPO / "conf", root / "conf")
    tiny = {**tiny_params(Path(".")), "recipe": "tiny"}
    for section in ("sft", "dpo"):  # validation curves of two points each, as the dashboard draws them
        tiny[section]["trainer"]["eval_steps"] = 2
    recipe = changed(tiny, yaml.safe_load((REPO / "params.yaml").read_text()))
    (root / "conf/recipe/tiny.yaml").write_text("# @package _global_\n" + yaml.safe_dump(recipe))
    config = (root / "conf/config.yaml").read_text()
    default = "  - recipe: embedded "
    assert config.count(default) == 1, "conf/config.yaml no longer chooses the default recipe on one line"
    (root / "conf/config.yaml").write_text(config.replace(default, "  - recipe: tiny     "))
    git_dvc_init(root)
    run([*DVC, "config", "hydra.enabled", "true"], root)
    # The composition `dvc exp run` does, with no overrides: the committed params.yaml is what a run would write.
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(root / "params.yaml", str(root / "conf"), None, "config", str(root), [])
    composed = yaml.safe_load((root / "params.yaml").read_text())
    assert changed(tiny, composed) == {}, "the composed params.yaml lacks some tiny settings"


@dataclass
class Stage:
    name: str
    outs: dict[str, bool]  # path -> cached by DVC (False: `cache: false`, tracked by git)
    persist: bool


def pipeline(root: Path) -> list[Stage]:
    """Every stage of dvc.yaml, as DVC resolves it (whatever stages the pipeline has)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [
            Stage(stage.name, {out.def_path: out.use_cache for out in stage.outs}, any(o.persist for o in stage.outs))
            for stage in repo.index.stages
        ]


def restorable(stages: list[Stage]) -> list[Stage]:
    """Stages DVC 3.67.1 can restore from the run cache of another clone: every output cached and none persistent.

    A `cache: false` output (the git-tracked metrics) is never pushed to a remote, but the run cache needs
    it in the cache to restore the stage; and DVC never restores a stage with a persistent output."""
    return [stage for stage in stages if all(stage.outs.values()) and not stage.persist]


def digest(path: Path) -> str:
    """One hash of a file or of every file under a folder (names and contents)."""
    sha = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        sha.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes())
    return sha.hexdigest()


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def experiments(root: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its data (params, metrics, ...)."""
    found = {}
    for commit in json.loads(stdout([*DVC, "exp", "show", "--json"], root)):
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = rev["data"]
    return found


@dataclass
class Clones:
    a: Path
    b: Path
    origin: Path  # the bare git remote
    storage: Path  # the DVC remote
    stages: list[Stage]
    first_repro: str  # the output of A's first `dvc repro`


@dataclass
class Experiment:
    name: str
    output: str  # what `dvc exp run` printed


@pytest.fixture(scope="module")
def clones(tmp_path_factory) -> Clones:
    """A ran every stage, committed, pushed data + run cache to the DVC remote and commits to the git remote; B is a
    fresh `git clone` of that remote (nothing pulled yet)."""
    top = tmp_path_factory.mktemp("sharing")
    origin, storage, a, b = top / "origin.git", top / "storage", top / "a", top / "b"
    run(["git", "init", "-q", "--bare", str(origin)], top)
    a.mkdir()
    make_hydra_project(a)
    run([*DVC, "remote", "add", "-d", "storage", str(storage)], a)
    run(["git", "remote", "add", "origin", str(origin)], a)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "tiny project"], a)

    stages = pipeline(a)
    first_repro = run([*DVC, "repro"], a)
    assert stages_run(first_repro) == {stage.name for stage in stages}
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "first run"], a)
    run([*DVC, "push", "--run-cache"], a)
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], a).strip()
    run(["git", "push", "-q", "origin", branch], a)

    run(["git", "clone", "-q", "--branch", branch, str(origin), str(b)], top)
    run(["git", "config", "user.email", "teammate@example.com"], b)
    run(["git", "config", "user.name", "teammate"], b)
    return Clones(a=a, b=b, origin=origin, storage=storage, stages=stages, first_repro=first_repro)


@pytest.fixture(scope="module")
def lora_r8(clones) -> Experiment:
    """An experiment run in A (`dvc exp run --temp -n r8 -S lora.r=8`), pushed with `dvc exp push origin r8`."""
    output = run([*DVC, "exp", "run", "--temp", "-n", "r8", "-S", "lora.r=8"], clones.a)
    pushed = run([*DVC, "exp", "push", "origin", "r8"], clones.a)
    assert "Pushed experiment r8 to Git remote 'origin'" in pushed
    return Experiment("r8", output)


def test_repro_runs_every_stage_then_nothing(clones):
    a = clones.a
    assert stages_run(clones.first_repro) == ALL_STAGES
    result = json.loads((a / "metrics/eval.json").read_text())
    for variant in ("base", "sft", "dpo"):
        assert set(result[variant]) >= {"f1", "rougeL", "bertscore_f1", "mean_words", "empty_rate"}
    assert set(result["delta"]) == {"sft_vs_base", "dpo_vs_sft", "dpo_vs_base"}
    assert set(result["delta"]["sft_vs_base"]["f1"]) == {"mean", "low", "high"}
    assert {"accuracy", "margin"} <= set(result["preferences"]["dpo"])
    assert (a / "reports/side_by_side.md").is_file() and (a / "reports/plots/categories.csv").is_file()
    rounds = (a / "reports/plots/rounds.csv").read_text().splitlines()
    assert [line.split(",")[:2] for line in rounds[1:]] == [["0", "sft"], ["1", "round1"], ["2", "round2"]]
    plots = json.loads(stdout([*DVC, "plots", "show", "--json"], a))["data"]
    round_plots = [name for name in plots if name.startswith("Self-rewarding rounds")]
    assert len(round_plots) == 3 and all(plots[name] for name in round_plots)
    again = run([*DVC, "repro"], a)
    assert stages_run(again) == set() and "up to date" in again


def test_an_experiment_reruns_only_the_adapter_stages(clones, lora_r8):
    assert stages_run(lora_r8.output) == ADAPTER_STAGES
    assert experiments(clones.a)[lora_r8.name]["params"]["params.yaml"]["data"]["lora"]["r"] == 8
    diff = json.loads(stdout([*DVC, "metrics", "diff", "HEAD", lora_r8.name, "--json"], clones.a))
    changed = diff["metrics/eval.json"]
    # A few tiny training steps barely move the answers, but the preference log-probs always move.
    assert any(key.startswith("preferences.") for key in changed)
    assert not [key for key in changed if "base" in key.split(".")], "the base model's scores must not change"


def test_a_fresh_clone_pulls_every_output_and_reproduces_nothing(clones):
    a, b = clones.a, clones.b
    run([*DVC, "pull", "--run-cache"], b)
    assert UP_TO_DATE in run([*DVC, "status"], b)
    output = run([*DVC, "repro"], b)
    assert stages_run(output) == set() and UP_TO_DATE in output
    for stage in clones.stages:
        assert f"Stage '{stage.name}' didn't change, skipping" in output
    outs = [path for stage in clones.stages for path in stage.outs]
    assert outs and {path: digest(b / path) for path in outs} == {path: digest(a / path) for path in outs}

    # Outputs deleted in B: every stage whose outputs are all in the cache comes back without running its command.
    reusable = [stage for stage in restorable(clones.stages) if stage.outs]  # params_check writes nothing
    assert reusable, "no stage can be restored from the run cache"
    for stage in reusable:
        for path in stage.outs:
            remove(b / path)
    output = run([*DVC, "repro"], b)
    assert stages_run(output) == set()
    for stage in reusable:
        assert f"Stage '{stage.name}' {CACHED}" in output
    assert UP_TO_DATE in run([*DVC, "status"], b)
    assert {path: digest(b / path) for path in outs} == {path: digest(a / path) for path in outs}


def test_a_stage_run_in_one_clone_is_restored_in_the_other_from_the_shared_run_cache(clones):
    """A runs a stage on settings no commit records and shares the run; B asks for the same settings and gets the
    outputs from the DVC remote's run cache without running the command."""
    assert "embedded" in {stage.name for stage in restorable(clones.stages)}
    output = run([*DVC, "exp", "run", "--temp", "-n", "seed1", "-S", "embedded.seed=1", "embedded"], clones.a)
    assert stages_run(output) == {"embedded"}
    run([*DVC, "exp", "push", "--run-cache", "origin", "seed1"], clones.a)

    b = clones.b
    output = run([*DVC, "exp", "run", "--pull", "-n", "seed1-b", "-S", "embedded.seed=1", "embedded"], b)
    assert stages_run(output) == set() and f"Stage 'embedded' {CACHED}" in output
    a_rev = run(["git", "rev-parse", "refs/exps/" + exp_ref(clones.a, "seed1")], clones.a).strip()
    a_lock = yaml.safe_load(run(["git", "show", f"{a_rev}:dvc.lock"], clones.a))
    b_lock = yaml.safe_load((b / "dvc.lock").read_text())
    assert b_lock["stages"]["embedded"] == a_lock["stages"]["embedded"]
    # Back to the committed state for the next tests.
    run(["git", "checkout", "-q", "--", "."], b)
    run([*DVC, "checkout", "-q"], b)
    assert UP_TO_DATE in run([*DVC, "status"], b)


def exp_ref(root: Path, name: str) -> str:
    """The path of experiment `name` under refs/exps/."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], root).split()
    matches = [ref for ref in refs if ref.rsplit("/", 1)[-1] == name]
    assert len(matches) == 1, refs
    return matches[0].removeprefix("refs/exps/")


def test_an_experiment_travels_with_exp_push_and_exp_pull(clones, lora_r8):
    b = clones.b
    name = lora_r8.name
    assert name in run([*DVC, "exp", "list", "origin"], b)
    pulled = run([*DVC, "exp", "pull", "origin", name], b)
    assert name in pulled
    theirs, ours = experiments(clones.a)[name], experiments(b)[name]
    assert ours["params"]["params.yaml"]["data"]["lora"]["r"] == 8
    metrics = ours["metrics"]["metrics/eval.json"]["data"]
    assert {"base", "sft", "dpo", "delta", "preferences"} <= set(metrics)
    assert metrics == theirs["metrics"]["metrics/eval.json"]["data"]
    # B compares it with its own workspace, like any local experiment.
    diff = json.loads(stdout([*DVC, "metrics", "diff", "HEAD", name, "--json"], b))
    assert any(key.startswith("preferences.") for key in diff["metrics/eval.json"])


def wait_for_queue(root: Path, timeout: float = 1200) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = run([*DVC, "queue", "status"], root)
        tasks = [line.split() for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
        if not any(task[-1] in ("Queued", "Running") for task in tasks):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout} s:\n{status}"
        time.sleep(5)


def test_a_queued_sweep_runs_and_compares(clones, lora_r8):
    a = clones.a
    queued = run([*DVC, "exp", "run", "--queue", "-S", "lora.r=4,8"], a)
    names = [line.split("'")[1] for line in queued.splitlines() if line.startswith("Queued experiment '")]
    assert len(names) == 2, queued
    # The worker runs each experiment in a copy of the repository (.dvc/tmp/exps), where `python -m stages.X`
    # imports the copy's stages package: no PYTHONPATH needed.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([*DVC, "queue", "start", "-j", "1"], cwd=a, env={**env, "DVC_NO_ANALYTICS": "1"}, check=True)
    try:
        status = wait_for_queue(a)
    finally:
        subprocess.run([*DVC, "queue", "stop"], cwd=a, env=env, capture_output=True, check=False)
    logs = {name: run([*DVC, "queue", "logs", name], a) for name in names}
    failures = "\n".join(f"--- dvc queue logs {name}\n{log[-3000:]}" for name, log in logs.items())
    assert status.count("Success") == 2, f"{status}\n{failures}"

    found = experiments(a)
    ranks = {name: found[name]["params"]["params.yaml"]["data"]["lora"]["r"] for name in names}
    assert sorted(ranks.values()) == [4, 8]
    for name in names:
        assert {"base", "sft", "dpo", "delta"} <= set(found[name]["metrics"]["metrics/eval.json"]["data"])
    # r=8 was run already (experiment r8): the sweep reuses those stage runs from A's run cache.
    r8 = next(name for name, r in ranks.items() if r == 8)
    r4 = next(name for name, r in ranks.items() if r == 4)
    # r8's sft is not run again: restored from the run cache, or already in the workspace the queue copied.
    reused = (f"Stage 'sft' {CACHED}", "Stage 'sft' didn't change, skipping")
    assert any(line in logs[r8] for line in reused) and "Running stage 'sft'" not in logs[r8], logs[r8][-2000:]
    assert "Running stage 'sft'" in logs[r4]

    table = stdout([*DVC, "exp", "show", "--only-changed", "--csv"], a)  # the table, without a terminal's width
    header, *rows = table.splitlines()
    assert "lora.r" in header.split(",")  # with one params file, its name is left out
    assert set(names) <= {row.split(",")[0] for row in rows}
    diff = json.loads(stdout([*DVC, "metrics", "diff", r4, r8, "--json"], a))
    assert diff["metrics/eval.json"]
    plots = json.loads(stdout([*DVC, "plots", "diff", r4, r8, "--json"], a))
    if plots.get("errors") and entries_lost_by_the_data_index(a):  # DVC's threaded reads damaged its own index
        warnings.warn(f"dvc plots diff met DVC's damaged data index (README, Sharing results): {plots['errors']}")
        reset_the_data_index(a)
        plots = json.loads(stdout([*DVC, "plots", "diff", r4, r8, "--json"], a))
    assert plots["data"] and not plots.get("errors"), plots.get("errors")
    for title, entries in plots["data"].items():
        assert {r4, r8} <= {rev for entry in entries for rev in entry["revisions"]}, title

    # The README's fix, on an index damaged as the threads damage it: listed curves cut from their folders (each
    # given a parent id that no entry has; (parent, name) is unique).
    with sqlite3.connect(data_index_file(a)) as index:
        cut = index.execute("UPDATE nodes SET pid = -id WHERE name = 'learning_rate.tsv'").rowcount
    assert cut and entries_lost_by_the_data_index(a)
    damaged = json.loads(stdout([*DVC, "plots", "diff", r4, r8, "--json"], a))
    assert "learning_rate.tsv" in str(damaged.get("errors")), damaged.get("errors")
    reset_the_data_index(a)
    repaired = json.loads(stdout([*DVC, "plots", "diff", r4, r8, "--json"], a))
    assert repaired["data"] and not repaired.get("errors"), repaired.get("errors")


# README, "Sharing results and running sweeps": DVC 3.67 writes a directory's listing into its data index (sqltrie
# 0.11.3) from several threads at once, which can lose entries; deleting the index (a cache) repairs it.
RESET_DATA_INDEX = "rm -rf \"$(dvc doctor | sed -n 's/^Repo.site_cache_dir: //p')/index/data\""


def data_index_file(root: Path) -> Path:
    report = stdout([*DVC, "doctor"], root)
    [site] = [line.split(": ", 1)[1] for line in report.splitlines() if line.startswith("Repo.site_cache_dir: ")]
    return Path(site) / "index" / "data" / "db.db"


def entries_lost_by_the_data_index(root: Path) -> int:
    """Entries of DVC's data index whose parent entry is not there: unreachable, so DVC reports their files missing."""
    if not data_index_file(root).is_file():
        return 0
    with sqlite3.connect(data_index_file(root)) as index:
        query = "SELECT COUNT(*) FROM nodes WHERE pid IS NOT NULL AND pid NOT IN (SELECT id FROM nodes)"
        return index.execute(query).fetchone()[0]


def reset_the_data_index(root: Path) -> None:
    """The README's command, with `dvc` the test's own."""
    assert RESET_DATA_INDEX in (REPO / "README.md").read_text()
    dvc = " ".join(shlex.quote(part) for part in DVC)
    subprocess.run(["bash", "-c", f'dvc() {{ {dvc} "$@"; }}; {RESET_DATA_INDEX}'], cwd=root, check=True)
    assert not data_index_file(root).exists()
