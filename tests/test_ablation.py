"""benchmarks/ablation.py: the keep / delete rule, the ABBA running order, and a CPU smoke run in which every
measured run is its own process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ablation  # its dataclasses look their module up there
spec.loader.exec_module(ablation)


def test_a_lever_that_beats_the_threshold_plus_its_spread_is_kept():
    decision = ablation.verdict([110.0, 111.0, 112.0], [100.0, 100.5, 101.0])
    assert decision["verdict"] == "keep" and not decision["off_faster"]
    assert decision["gain"] == pytest.approx(111.0 / 100.5 - 1)
    assert decision["spread"] == pytest.approx(2.0 / 111.0)  # the ON side spreads more than the OFF side


def test_a_gain_within_the_runs_own_spread_is_not_enough():
    # 5% faster in the median, but one side's runs spread 10%: the rule asks for 3% + 10%
    decision = ablation.verdict([100.0, 105.0, 110.0], [100.0, 100.0, 100.0])
    assert decision["gain"] == pytest.approx(0.05) and decision["spread"] == pytest.approx(10 / 105)
    assert decision["verdict"] == "delete"


def test_a_gain_below_three_percent_deletes_the_lever_even_without_spread():
    assert ablation.verdict([102.0, 102.0], [100.0, 100.0])["verdict"] == "delete"
    assert ablation.verdict([104.0, 104.0], [100.0, 100.0])["verdict"] == "keep"


def test_a_lever_slower_than_its_absence_is_deleted_and_said_so():
    decision = ablation.verdict([90.0, 91.0], [100.0, 101.0])
    assert decision["verdict"] == "delete" and decision["off_faster"]


@pytest.mark.parametrize("on, off", [([100.0, None], [90.0, 91.0]), ([100.0], [None]), ([], [90.0])])
def test_a_failed_or_missing_run_on_either_side_is_an_error(on, off):
    assert ablation.verdict(on, off) == {"verdict": "error"}


def test_repeats_alternate_abba_and_levers_share_their_baseline_run():
    order = ablation.run_order(["compiled", "flex_attention"], repeats=3)
    assert order == [
        ("fast", 0), ("fast_eager", 0), ("fast_sdpa", 0),
        ("fast_sdpa", 1), ("fast_eager", 1), ("fast", 1),
        ("fast", 2), ("fast_eager", 2), ("fast_sdpa", 2),
    ]  # fmt: skip


def test_over_two_repeats_every_variant_has_the_same_mean_position():
    order = ablation.run_order(list(ablation.LEVERS), repeats=2)
    positions: dict[str, list[int]] = {}
    for position, (variant, _) in enumerate(order):
        positions.setdefault(variant, []).append(position)
    assert all(len(seen) == 2 for seen in positions.values())
    assert len({sum(seen) for seen in positions.values()}) == 1


def test_every_lever_names_two_throughput_variants_of_one_stage():
    for lever in ablation.LEVERS.values():
        on, off = ablation.VARIANTS[lever.on], ablation.VARIANTS[lever.off]
        assert on.get("stage", "sft") == off.get("stage", "sft"), lever


@pytest.mark.slow
def test_tiny_ablation_runs_each_variant_in_its_own_process_on_the_same_rows(tmp_path, monkeypatch):
    """Three real processes (prepare, ON, OFF); the order of repeats and warm-ups is checked without processes."""
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")  # the flow is under test, not the compiler: minutes on a CPU
    out = tmp_path / "out"
    arguments = ["--tiny", "--levers", "compiled", "--repeats", "1", "--no-warm-up", "--out", str(out)]
    arguments += ["--work", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model")]
    assert ablation.main(arguments) == 0
    result = json.loads((out / "ablation.json").read_text())
    measured = [run for run in result["runs"] if run["role"] == "measured"]
    assert [run["role"] for run in result["runs"]] == ["prepare", "measured", "measured"]
    assert [(run["variant"], run["repeat"]) for run in measured] == [("fast", 0), ("fast_eager", 0)]
    assert all(run["tokens_per_s"] > 0 and run["tokens_per_s_incl_build"] > 0 for run in measured)
    assert all(len(run["step_tokens"]) == result["steps"] == len(run["step_seconds"]) for run in measured)
    assert len({run["process_id"] for run in result["runs"]}) == len(result["runs"])
    assert result["same_rows"]
    (lever,) = result["levers"]
    assert len(lever["on_side"]["rates"]) == len(lever["off_side"]["rates"]) == 1
    assert lever["verdict"] in ("keep", "delete")
    report = (out / "ablation.md").read_text()
    assert "smoke run on cpu" in report.lower() and "compiled decoder layers" in report
    assert not (tmp_path / "work" / "fast_r0").exists()  # a measured run's scratch goes with it


def test_summarise_judges_the_runs_a_stopped_ablation_saved(tmp_path):
    def run(variant, rate, repeat):
        return {"variant": variant, "role": "measured", "repeat": repeat, "rows_digest": "d", "label": variant,
                "tokens_per_s": rate, "tokens_per_s_incl_build": rate / 4, "peak_memory_gib": 40.0}  # fmt: skip

    saved = {
        "date": "2026-12-05", "tiny": False, "cold_cache": False, "warm_up": False, "memory_budget_gib": 64.0,
        "repeats": 3, "steps": 24, "levers_asked": ["compiled"], "versions": {"gpu": "H200"},
        "order": ", ".join(["fast#0", "fast_eager#0", "fast_eager#1", "fast#1", "fast#2", "fast_eager#2"]),
        "runs": [
            run("fast", 110.0, 0), run("fast_eager", 100.0, 0), run("fast_eager", 101.0, 1), run("fast", 111.0, 1),
        ],
    }  # fmt: skip
    (tmp_path / "ablation.json").write_text(json.dumps(saved))
    assert ablation.main(["--summarise", str(tmp_path / "ablation.json")]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    (lever,) = result["levers"]
    assert lever["on_side"]["rates"] == [110.0, 111.0] and lever["verdict"] == "keep"
    report = (tmp_path / "ablation.md").read_text()
    assert "Stopped early: 4 of the 6 measured runs finished" in report
    assert "--no-warm-up" in report


def test_pending_runs_are_those_no_saved_run_measured():
    order = ablation.run_order(["compiled"], repeats=2)  # fast#0, fast_eager#0, fast_eager#1, fast#1
    saved = [{"variant": "fast", "repeat": 0, "role": "measured"}, {"variant": "fast", "repeat": 0, "role": "prepare"}]
    assert ablation.pending(order, saved) == [(1, ("fast_eager", 0)), (2, ("fast_eager", 1)), (3, ("fast", 1))]


def fake_processes(monkeypatch, gpu: str, clock: list[float] | None = None) -> list[str]:
    """run_process without processes: each variant at a fixed rate; the labels run, in order. With `clock` (seconds,
    read as time.monotonic), a prepare run takes 150 s and any other 100 s."""
    ran = []

    def run_process(settings, variant, label, prepare=False):
        ran.append(label)
        rate, wall = {"fast": 110.0, "fast_eager": 100.0}[variant], 150.0 if prepare else 100.0
        if clock is not None:
            clock[0] += wall
        return {"variant": variant, "label": label, "rows_digest": "d", "log": "", "tokens_per_s": rate,
                "tokens_per_s_incl_build": rate / 4, "peak_memory_gib": 1.0, "process_wall_s": wall}  # fmt: skip

    monkeypatch.setattr(ablation, "run_process", run_process)
    monkeypatch.setattr(ablation, "prepared_versions", lambda settings: {"gpu": gpu})
    return ran


def test_resume_runs_only_what_the_stopped_call_lacks_on_the_same_gpu(tmp_path, monkeypatch):
    first = tmp_path / "first"
    ran = fake_processes(monkeypatch, "H200")
    assert ablation.main(["--levers", "compiled", "--repeats", "2", "--no-warm-up", "--out", str(first)]) == 0
    saved = json.loads((first / "ablation.json").read_text())
    saved["runs"] = saved["runs"][:3]  # the call stopped after prepare, fast#0 and fast_eager#0
    (first / "ablation.json").write_text(json.dumps(saved))
    ran.clear()
    second = tmp_path / "second"
    assert ablation.main(["--resume", str(first / "ablation.json"), "--out", str(second)]) == 0
    assert ran == ["prepare", "fast_eager_r1", "fast_r1"]
    result = json.loads((second / "ablation.json").read_text())
    assert result["calls"] == 2 and result["memory_budget_gib"] is None and not result["warm_up"]
    (lever,) = result["levers"]
    assert lever["on_side"]["rates"] == [110.0, 110.0] and lever["verdict"] == "keep"
    assert "Runs from 2 calls on one GPU kind" in (second / "ablation.md").read_text()
    ran.clear()  # nothing left to run: verdicts only, no prepare run
    assert ablation.main(["--resume", str(second / "ablation.json"), "--out", str(tmp_path / "third")]) == 0
    assert ran == [] and json.loads((tmp_path / "third" / "ablation.json").read_text())["calls"] == 2


def test_each_variant_but_the_prepare_runs_once_unmeasured_first_then_the_repeats_go_abba(tmp_path, monkeypatch):
    ran = fake_processes(monkeypatch, "H200")
    assert ablation.main(["--levers", "compiled", "--repeats", "2", "--out", str(tmp_path)]) == 0
    assert ran == ["prepare", "warm_up_fast_eager", "fast_r0", "fast_eager_r0", "fast_eager_r1", "fast_r1"]
    roles = [run["role"] for run in json.loads((tmp_path / "ablation.json").read_text())["runs"]]
    assert roles == ["prepare", "cache warm-up"] + ["measured"] * 4


def test_resume_on_another_gpu_stops_before_measuring(tmp_path, monkeypatch, capsys):
    first = tmp_path / "first"
    fake_processes(monkeypatch, "NVIDIA H200")
    assert ablation.main(["--levers", "compiled", "--repeats", "1", "--out", str(first)]) == 0
    saved = json.loads((first / "ablation.json").read_text())
    saved["runs"] = [run for run in saved["runs"] if run["label"] != "fast_eager_r0"]
    (first / "ablation.json").write_text(json.dumps(saved))
    ran = fake_processes(monkeypatch, "NVIDIA H100 80GB HBM3")
    assert ablation.main(["--resume", str(first / "ablation.json"), "--out", str(tmp_path / "second")]) == 2
    assert ran == ["prepare"]
    assert "the saved runs ran on NVIDIA H200, this is NVIDIA H100 80GB HBM3" in capsys.readouterr().err


def test_a_call_with_a_time_limit_starts_no_run_it_cannot_finish_and_resume_runs_the_rest(tmp_path, monkeypatch):
    clock = [0.0]
    ran = fake_processes(monkeypatch, "H100", clock)
    monkeypatch.setattr(ablation.time, "monotonic", lambda: clock[0])
    first = tmp_path / "first"
    arguments = ["--levers", "compiled", "--repeats", "2", "--no-warm-up", "--stop-after-s", "450", "--out", str(first)]
    assert ablation.main(arguments) == 0
    # 150 s of prepare, then 100 s a run: a fourth would end at 550 s
    assert ran == ["prepare", "fast_r0", "fast_eager_r0", "fast_eager_r1"]
    assert "3 of the 4 measured runs finished" in (first / "ablation.md").read_text()
    ran.clear()
    assert ablation.main(["--resume", str(first / "ablation.json"), "--out", str(tmp_path / "second")]) == 0
    assert ran == ["prepare", "fast_r1"]


def test_the_time_left_is_judged_by_the_longest_run_after_the_prepare_run():
    prepare, run = {"role": "prepare", "process_wall_s": 150.0}, {"role": "measured", "process_wall_s": 90.0}
    assert ablation.room_for_another([prepare], 300.0, 450.0)
    assert not ablation.room_for_another([prepare], 301.0, 450.0)
    assert ablation.room_for_another([prepare, run], 360.0, 450.0)  # the prepare run also built the model
    assert ablation.room_for_another([prepare, run], 10_000.0, None)


def test_a_lever_for_the_warm_up_is_judged_on_the_rates_including_the_build():
    def run(variant, steady, incl_build):
        return {"variant": variant, "tokens_per_s": steady, "tokens_per_s_incl_build": incl_build}

    on = [run("fast", 100.0, 60.0), run("fast", 101.0, 61.0), run("fast", 99.0, 59.0)]
    off = [run("fast_aot_cache_bypassed", 100.0, 40.0) for _ in range(3)]
    (summary,) = ablation.summarise(["aot_cache_custom_functions"], on + off)
    assert summary["judged_on"] == "rates_incl_build" and summary["gain"] == pytest.approx(0.5)
    assert summary["verdict"] == "keep"  # the steady rates alone, equal, would delete it
    assert "(on the rates incl. build)" in ablation.lever_row(summary)
