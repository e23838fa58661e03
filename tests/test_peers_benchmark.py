"""benchmarks/peers.py --tiny: the peer benchmark's flow on a CPU (one process per run, the whole order of engines
again at each repeat, hook-counted tokens, DPO's combined rate), and Unsloth's engines on its CPU backend, so the GPU
run meets no surprise but Liger, which needs CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_peers_and_the_project_run_each_in_its_process_and_count_tokens_alike(tmp_path):
    """The project's own stage trainers (`project`, `project_dpo`) beside TRL's: one process per run, the same tokens
    step by step and the same first loss (a fresh LoRA adds nothing), and the report setting one against the other."""
    out = tmp_path / "out"
    engines = ["project", "trl", "project_dpo", "trl_dpo"]
    command = [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--tiny", "--engines", ",".join(engines),
               "--out", str(out), "--work", str(tmp_path / "work"),
               "--model-dir", str(tmp_path / "model")]  # fmt: skip
    # The flow is under test, not the compiler: the compiled layers' CPU build would take minutes.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "peers.json").read_text())
    runs = {r["engine"]: r for r in result["runs"]}

    assert [r["engine"] for r in result["runs"]] == engines
    assert len({r["process_id"] for r in result["runs"]}) == len(engines)  # each run its own process
    assert all(r["budget_gib"] is None and "error" not in r for r in runs.values())
    for r in runs.values():
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_incl_setup"] > 0
        assert len(r["losses"]) == r["steps"] and all(math.isfinite(loss) for loss in r["losses"])
        # The hook counts what TRL counts, so engines whose trainers count nothing are measured alike
        assert r["tokens_total"] == r["trainer_tokens_total"] > 0
    for project, trl in (("project", "trl"), ("project_dpo", "trl_dpo")):
        assert runs[project]["layout"]["mode"] == "fast" and runs[trl]["layout"] is None
        assert runs[project]["step_tokens"] == runs[trl]["step_tokens"]  # the same rows in every process
        assert runs[project]["first_loss"] == pytest.approx(runs[trl]["first_loss"], rel=1e-3)
    assert runs["project"]["trainer"]["padding_free"] and runs["project_dpo"]["trainer"]["precompute_ref_log_probs"]
    for name in ("project_dpo", "trl_dpo"):
        dpo = runs[name]
        training, reference = dpo["tokens_per_s_training_only"], dpo["reference_pass"]["tokens_per_s"]
        assert dpo["tokens_per_s"] == pytest.approx(1 / (1 / training + 1 / reference), abs=0.1)

    # The same rows as benchmarks/throughput.py writes (its fast runs' row counts, seed 0)
    assert result["data"]["sft_tokens"]["rows"] == 48 and result["data"]["dpo_prompt_plus_chosen_tokens"]["rows"] == 24
    if not torch.cuda.is_available():
        for name in ("trl_liger", "trl_liger_dpo"):
            assert "no CUDA device" in result["skipped"][name]
    for name in ("unsloth", "unsloth_d0_ckpt", "unsloth_dpo"):  # no --unsloth-site
        assert "no Unsloth install" in result["skipped"][name]
    assert not set(engines) & set(result["skipped"])
    report = (out / "peers.md").read_text()
    assert report.startswith("# Peers") and "## SFT" in report and "## DPO" in report and "Not run here" in report
    assert "## The project against the best peer (target: 1.5x)" in report
    assert "| SFT | whole GPU |" in report and "| trl |" in report and "| DPO | whole GPU |" in report


def test_repeats_go_through_the_whole_order_forward_then_backward():
    """ABBA: engines alternate rather than one repeating in a row, and each sits at the same mean position."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import peers

    assert peers.run_order(["trl", "trl_dpo"], [6, 24], 2) == [
        (0, "trl", 6), (0, "trl", 24), (0, "trl_dpo", 6), (0, "trl_dpo", 24),
        (1, "trl_dpo", 24), (1, "trl_dpo", 6), (1, "trl", 24), (1, "trl", 6),
    ]  # fmt: skip


@pytest.mark.slow
def test_tiny_unsloth_runs_read_the_same_tokens_and_start_from_the_same_loss_as_trl(tmp_path):
    """Unsloth's own install (benchmarks/unsloth_site.sh, from the package registry unless UNSLOTH_SITE names one)
    trains on its CPU backend here: the calls peers.py makes to it, its DPO variants and the hook's count."""
    site = Path(os.environ.get("UNSLOTH_SITE") or tmp_path / "unsloth_site")
    if not (site / "unsloth").is_dir():
        build = subprocess.run(["bash", str(REPO / "benchmarks" / "unsloth_site.sh"), str(site)], capture_output=True,
                               text=True)  # fmt: skip
        assert build.returncode == 0, build.stderr[-3000:]
    out = tmp_path / "out"
    engines = "trl,unsloth_d0_ckpt,trl_dpo,unsloth_d0_ckpt_dpo,unsloth_d0_ckpt_fused_dpo"
    command = [sys.executable, str(REPO / "benchmarks" / "peers.py"), "--tiny", "--engines", engines,
               "--unsloth-site", str(site), "--out", str(out), "--work", str(tmp_path / "work"),
               "--model-dir", str(tmp_path / "model")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "peers.json").read_text())
    runs = {r["engine"]: r for r in result["runs"]}
    assert set(runs) == set(engines.split(",")) and not any("error" in r for r in runs.values())
    for name in ("unsloth_d0_ckpt", "unsloth_d0_ckpt_dpo", "unsloth_d0_ckpt_fused_dpo"):
        assert runs[name]["versions"]["unsloth"] == "2026.10.9" and runs[name]["versions"]["trl"] == "1.15.0"
        assert runs[name]["tokens_total"] == runs[name]["trainer_tokens_total"]
    for trl, unsloth in (("trl", "unsloth_d0_ckpt"), ("trl_dpo", "unsloth_d0_ckpt_dpo"),
                         ("trl_dpo", "unsloth_d0_ckpt_fused_dpo")):  # fmt: skip
        assert runs[unsloth]["step_tokens"] == runs[trl]["step_tokens"]
        # A fresh LoRA adds nothing (B = 0), whatever its dropout: the first losses are the same model's
        assert runs[unsloth]["first_loss"] == pytest.approx(runs[trl]["first_loss"], rel=1e-3)
    assert "fused preference loss" in (out / "peers.md").read_text()


def test_the_project_is_set_against_the_fastest_peer_that_ran_at_the_same_budget():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import peers

    def run(engine, budget, rate):
        return {"engine": engine, "budget_gib": budget, "tokens_per_s": rate}

    runs = [
        run("project", 6, 900), run("project", 6, 1000), run("project", 6, 1100),
        run("unsloth_d0_ckpt", 6, 400), run("unsloth_d0_ckpt", 6, 500), run("unsloth_d0_ckpt", 6, 450),
        run("trl", 6, None),  # no rate
        {"engine": "trl_liger", "budget_gib": 6, "error": "OOM at 6 GiB"},  # out of memory: does not fit
        run("trl_ckpt", 6, 300),
        run("trl", 24, 2000),  # another budget
        run("trl_dpo", 6, 5000),  # another stage
        run("project", 24, 3000),
        run("project_dpo", 10, 700),
    ]  # fmt: skip
    rows = {(row["stage"], row["budget_gib"]): row for row in peers.against_peers(runs)}
    assert rows["sft", 6] == {"stage": "sft", "budget_gib": 6, "project_engine": "project", "project": 1000,
                              "best_peer": "unsloth_d0_ckpt", "best_peer_rate": 450, "ratio": 1000 / 450}  # fmt: skip
    assert rows["sft", 24]["best_peer"] == "trl" and rows["sft", 24]["ratio"] == 1.5
    assert rows["dpo", 10]["best_peer"] is None and rows["dpo", 10]["ratio"] is None
    assert len(rows) == 3


def test_steps_that_grew_the_pinned_host_pool_are_counted_apart_from_the_settled_rate():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    # (time, tokens so far, compilations so far) at the start and after each of 5 steps; warm-up 1
    marks = [(0.0, 0, 0), (5.0, 100, 1), (6.0, 300, 1), (8.0, 500, 1), (9.0, 700, 1), (20.0, 900, 2)]
    rates = throughput.steady_rate(marks, 1, pinned_blocks=[0, 0, 32, 0, 0])
    assert rates["tokens_per_s"] == round(600 / 4.0, 1)  # steps 2-4; step 5 compiled
    assert rates["warmup_step_seconds"] == [5.0] and rates["step_seconds"] == [1.0, 2.0, 1.0, 11.0]
    assert rates["pinned_growth_steps_after_warmup"] == 1  # step 3 created 32 pinned blocks
    assert rates["tokens_per_s_without_pinned_growth"] == round(400 / 2.0, 1)  # steps 2 and 4
    assert "tokens_per_s_without_pinned_growth" not in throughput.steady_rate(marks, 1)
    with pytest.raises(ValueError):  # one count per step, or the steps are misread
        throughput.steady_rate(marks, 1, pinned_blocks=[0, 0, 32])


def test_the_warmup_profile_covers_the_first_steps_or_all_of_a_shorter_run(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    def train(steps, max_steps, path):
        profiler = throughput.warmup_profiler(steps, path)
        profiler.on_train_begin(None, SimpleNamespace(global_step=0), None)
        for step in range(1, max_steps + 1):
            sorted(range(20_000), key=lambda number: -number)  # some Python for the profile to see
            profiler.on_step_end(None, SimpleNamespace(global_step=step), None)
        profiler.on_train_end(None, SimpleNamespace(global_step=max_steps), None)
        return path.read_text()

    assert train(2, 5, tmp_path / "long.txt").startswith("cProfile of optimizer steps 1-2")
    short = train(4, 3, tmp_path / "short.txt")
    assert short.startswith("cProfile of optimizer steps 1-3") and "<lambda>" in short


def test_runs_record_what_the_compile_caches_held_and_a_profile_of_a_cold_start_says_so(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import throughput

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    cold = throughput.compile_cache_state()
    assert cold == {"dir": str(tmp_path / "cache"), "fxgraph": 0, "aotautograd": 0}
    assert "(cold: every graph compiles)" in throughput.describe_compile_caches(cold)
    for entry in ("fxgraph/ab/key1/graph", "fxgraph/cd/key2/graph", "aotautograd/ef/key3/entry"):
        (tmp_path / "cache" / entry).parent.mkdir(parents=True)
        (tmp_path / "cache" / entry).write_text("x")
    warm = throughput.compile_cache_state()
    assert (warm["fxgraph"], warm["aotautograd"]) == (2, 1)
    assert "cold" not in throughput.describe_compile_caches(warm)

    profiler = throughput.warmup_profiler(1, tmp_path / "profile.txt", cold)
    profiler.on_train_begin(None, SimpleNamespace(global_step=0), None)
    profiler.on_step_end(None, SimpleNamespace(global_step=1), None)
    first_line = (tmp_path / "profile.txt").read_text().splitlines()[0]
    assert first_line.startswith("cProfile of optimizer steps 1-1") and first_line.endswith("every graph compiles)")


def test_a_call_with_a_time_limit_starts_no_run_the_longest_so_far_says_would_end_past_it(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import peers

    clock, ran = [0.0], []

    def run_child(name, budget, args, repeat):
        ran.append((repeat, name))
        clock[0] += 100.0
        return {"error": "OOM at none GiB", "process_s": 100.0}  # a result the report takes without measurements

    setup = {"model": {"shape": "tiny"}, "data": {"md5": {}}}
    monkeypatch.setattr(peers, "prepare", lambda *arguments: setup)
    monkeypatch.setattr(peers, "run_child", run_child)
    monkeypatch.setattr(peers, "versions", dict)
    monkeypatch.setattr(peers.time, "monotonic", lambda: clock[0])
    out = tmp_path / "out"
    arguments = ["--tiny", "--engines", "project,trl", "--repeats", "2", "--stop-after-s", "250", "--out", str(out),
                 "--work", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model")]  # fmt: skip
    assert peers.main(arguments) == 0
    assert ran == [(0, "project"), (0, "trl")]  # a third run would end at 300 s
    saved = json.loads((out / "peers.json").read_text())
    assert saved["stopped_early"] == "before trl at none GiB, repeat 1 (--stop-after-s)"
    assert "Stopped early" in (out / "peers.md").read_text()


def test_the_speed_chart_sets_the_project_beside_its_best_peer_of_the_same_call(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import speed_chart

    def run(engine, library, stage, budget, rate=None, error=None):
        return {
            "engine": engine, "settings": {"library": library, "stage": stage}, "budget_gib": budget,
            "tokens_per_s": rate, **({"error": error} if error else {}),
        }  # fmt: skip

    result = {
        "what": "peer engines on benchmarks/throughput.py's rows, model and recipe; one process per run",
        "date": "2026-12-06",
        "versions": {"gpu": "NVIDIA H100 80GB HBM3"},
        "runs": [
            run("project", "project", "sft", 6.0, 4500.0),
            run("unsloth_d0_ckpt", "unsloth", "sft", 6.0, 3000.0),
            run("trl_liger", "trl", "sft", 6.0, 2000.0),
            run("project", "project", "sft", 6.0, 4100.0),
            run("unsloth_d0_ckpt", "unsloth", "sft", 6.0, error="OutOfMemoryError: ..."),  # counts as no rate
            run("project", "project", "sft", 24.0, 9000.0),  # no peer at 24 GiB: no pair
            run("project_dpo", "project", "dpo", 10.0, 6000.0),
            run("unsloth_d0_ckpt_dpo", "unsloth", "dpo", 10.0, 4000.0),
        ],
    }
    pairs = speed_chart.pairs_of(result, "benchmarks/results/loan/peers.json")
    assert [(pair.stage, pair.budget_gib, pair.peer) for pair in pairs] == [
        ("sft", 6.0, "unsloth_d0_ckpt"),
        ("dpo", 10.0, "unsloth_d0_ckpt_dpo"),
    ]
    sft, dpo = pairs
    assert sft.project == (4500.0, 4100.0) and sft.peer_rates == (3000.0,)
    assert sft.ratio == pytest.approx(4300 / 3000) and dpo.ratio == pytest.approx(1.5)
    assert sft.label == "SFT at 6 GiB, H100, 2026-12-06" and sft.call == "results/loan"

    saved = tmp_path / "results" / "call" / "peers.json"
    saved.parent.mkdir(parents=True)
    saved.write_text(json.dumps(result))
    (tmp_path / "results" / "other.json").write_text(json.dumps({"what": "not a peers result"}))
    assert speed_chart.peers_results(tmp_path) == [saved]
    out = tmp_path / "chart.svg"
    assert speed_chart.main([str(saved), "--out", str(out)]) == 0
    svg = out.read_text()
    assert svg.startswith("<svg") and "1.43x" in svg and "1.50x" in svg and "vs unsloth_d0_ckpt_dpo" in svg
    assert "SFT at 24 GiB" not in svg
    assert "2 pairs from 1 files" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("{")
    assert speed_chart.main([str(tmp_path / "broken.json"), "--out", str(out)]) == 2
