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
def test_tiny_ablation_runs_each_repeat_in_its_own_process_in_abba_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")  # the flow is under test, not the compiler: minutes saved on a CPU
    out = tmp_path / "out"
    arguments = ["--tiny", "--levers", "compiled", "--repeats", "2", "--out", str(out)]
    arguments += ["--work", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model")]
    assert ablation.main(arguments) == 0
    result = json.loads((out / "ablation.json").read_text())
    measured = [run for run in result["runs"] if run["role"] == "measured"]
    assert [(run["variant"], run["repeat"]) for run in measured] == [
        ("fast", 0), ("fast_eager", 0), ("fast_eager", 1), ("fast", 1),
    ]  # fmt: skip
    assert all(run["tokens_per_s"] > 0 and run["tokens_per_s_incl_build"] > 0 for run in measured)
    assert all(len(run["step_tokens"]) == result["steps"] == len(run["step_seconds"]) for run in measured)
    assert len({run["process_id"] for run in result["runs"]}) == len(result["runs"])
    assert result["same_rows"]
    (lever,) = result["levers"]
    assert len(lever["on_side"]["rates"]) == len(lever["off_side"]["rates"]) == 2
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
