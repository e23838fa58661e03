"""Stage preference_data: sampled candidates ranked into UltraFeedback-schema pairs, and dpo training on them.

Runs on the tiny project (conftest.tiny_project) with an SFT adapter trained for a few steps, as dvc repro would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import chain_rounds, write_params

from finetune.core.config import load_config
from finetune.core.errors import ConfigError
from finetune.data.formats import from_ultrafeedback
from finetune.data.rows import read_jsonl
from finetune.preferences import pairs as preferences
from finetune.training import dpo as dpo_training
from stages import dpo, preference_data, sft

REPO = Path(__file__).resolve().parents[1]
SMALL = {"prompts": 10, "candidates": 3, "max_new_tokens": 16, "batch_size": 8, "seed": 3}
METRIC_KEYS = {
    "policy", "ranker", "prompts", "candidates", "pairs", "ties_dropped", "tie_rate", "invalid_dropped",
    "empty_candidates", "mean_score", "mean_score_chosen", "mean_score_rejected", "mean_gap", "mean_response_words",
    "judgments", "unparseable_judgments", "unparseable_rate", "cost",
}  # fmt: skip


@pytest.fixture(autouse=True)
def outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def small(params: dict, folder: Path, **changes) -> None:
    params["preference_data"].update(SMALL, **changes)
    params["paths"]["preference_data"] = str(folder)


@pytest.fixture(scope="module")
def sft_run(tiny_project):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_project.root)
        sft.main(str(tiny_project.params_path))
    return tiny_project


@pytest.fixture(scope="module")
def generated(sft_run):
    """preference_data on the SFT policy; returns (params path, config)."""
    project = sft_run
    path = project.root / "pref.yaml"
    params = json.loads(json.dumps(project.params))
    small(params, project.root / "pref")
    path.write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project.root)
        preference_data.main(str(path))
    return path, load_config(path)


def test_pairs_follow_the_ultrafeedback_schema_with_chosen_scored_above_rejected(generated):
    _, cfg = generated
    pairs = read_jsonl(Path(cfg.paths.preference_data) / "pairs.jsonl")
    metrics = json.loads((Path(cfg.paths.preference_data) / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert (metrics["prompts"], metrics["candidates"]) == (10, 3)
    assert metrics["pairs"] == len(pairs) > 0
    assert metrics["pairs"] + metrics["ties_dropped"] + metrics["invalid_dropped"] == metrics["prompts"]
    assert metrics["tie_rate"] == pytest.approx(metrics["ties_dropped"] / metrics["prompts"])
    assert metrics["mean_score_chosen"] > metrics["mean_score_rejected"]
    assert metrics["mean_gap"] == pytest.approx(metrics["mean_score_chosen"] - metrics["mean_score_rejected"])
    train_ids = {row["id"] for row in read_jsonl(Path(cfg.paths.prepared) / "sft_train.jsonl")}
    for row in pairs:
        assert set(row) == {
            "prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected",
            "all_generated_responses", "all_scores", "margin", "category",
        }  # fmt: skip
        assert row["prompt_id"] in train_ids and isinstance(row["prompt"], str)
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["user", "assistant"]
        assert row["chosen"][0]["content"] == row["prompt"]
        assert row["score_chosen"] > row["score_rejected"]
        assert row["margin"] == pytest.approx(row["score_chosen"] - row["score_rejected"])
        assert len(row["all_generated_responses"]) == len(row["all_scores"]) == 3
        assert row["chosen"][1]["content"] in row["all_generated_responses"]
        assert max(s for s in row["all_scores"] if s is not None) == row["score_chosen"]
        example = from_ultrafeedback(row)  # what dpo reads it with
        assert example["id"] == row["prompt_id"]


def test_same_seed_gives_identical_files_and_another_seed_other_candidates(sft_run, generated, tmp_path):
    path, cfg = generated
    first = (Path(cfg.paths.preference_data) / "pairs.jsonl").read_bytes()

    def rerun(name, **changes):
        params = yaml.safe_load(path.read_text())
        small(params, tmp_path / name, **changes)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(params))
        preference_data.main(str(tmp_path / f"{name}.yaml"))
        return (tmp_path / name / "pairs.jsonl").read_bytes(), without_cost(tmp_path / name / "metrics.json")

    def without_cost(path):  # the run's wall time and memory (finetune.core.process.process_cost) differ by run
        return {key: value for key, value in json.loads(path.read_text()).items() if key != "cost"}

    again, metrics = rerun("again")
    assert again == first
    assert metrics == without_cost(Path(cfg.paths.preference_data) / "metrics.json")
    other, _ = rerun("other", seed=4)
    assert other != first


def test_ties_are_dropped_and_counted(generated, tmp_path, monkeypatch):
    path, _ = generated
    params = yaml.safe_load(path.read_text())
    small(params, tmp_path / "ties", prompts=4)
    (tmp_path / "ties.yaml").write_text(yaml.safe_dump(params))
    def all_equal(settings, ranker, prompts, candidates, references, seed):
        return preferences.Ranking(scores=[[0.5] * len(answers) for answers in candidates])

    monkeypatch.setattr(preferences, "rank_candidates", all_equal)
    metrics = preference_data.make_pairs(load_config(tmp_path / "ties.yaml"))
    assert (metrics["pairs"], metrics["ties_dropped"], metrics["tie_rate"]) == (0, 4, 1.0)
    assert metrics["mean_gap"] is None
    assert (tmp_path / "ties" / "pairs.jsonl").read_text() == ""
    records = read_jsonl(tmp_path / "ties" / "candidates.jsonl")  # the tied prompts are kept for inspection
    assert [r["outcome"] for r in records] == ["tie"] * 4 and all(len(r["candidates"]) == 3 for r in records)


def test_the_base_policy_samples_without_the_adapter(tiny_project, tmp_path):
    params = json.loads(json.dumps(tiny_project.params))
    small(params, tmp_path / "base", policy="base", prompts=3)
    params["paths"]["sft_adapter"] = str(tmp_path / "no-adapter-here")  # must not be read
    chain_rounds(params)  # the first self-rewarding round starts from paths.sft_adapter
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(params))
    metrics = preference_data.make_pairs(load_config(tmp_path / "base.yaml"))
    assert metrics["policy"] == "base" and metrics["prompts"] == 3


def test_dpo_with_source_generated_trains_on_the_generated_pairs(sft_run, generated, monkeypatch):
    _, cfg = generated
    seen = {}
    original = dpo_training.load_generated_pairs

    def spy(folder):
        seen["rows"] = original(folder)
        return seen["rows"]

    monkeypatch.setattr(dpo_training, "load_generated_pairs", spy)

    def edit(params):
        params["dpo"]["source"] = "generated"
        params["paths"]["preference_data"] = cfg.paths.preference_data
        params["paths"]["sft_adapter"] = str(sft_run.root / "models" / "sft")  # the module's SFT run

    params_path = sft_run.variant("dpo_generated", edit)
    dpo.main(str(params_path))
    variant = load_config(params_path)
    assert len(seen["rows"]) == len(read_jsonl(Path(cfg.paths.preference_data) / "pairs.jsonl"))
    assert seen["rows"].column_names == ["prompt", "chosen", "rejected"]
    adapter = Path(variant.paths.dpo_adapter)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    metrics = json.loads((Path(variant.paths.dpo_metrics) / "metrics.json").read_text())
    assert metrics["step"] == variant.dpo.trainer["max_steps"]


def test_dpo_with_source_generated_and_no_pairs_fails_in_one_line(tiny_project, tmp_path, capsys):
    def edit(params):
        params["dpo"]["source"] = "generated"
        params["paths"]["preference_data"] = str(tmp_path / "missing")

    with pytest.raises(SystemExit):
        dpo.main(str(tiny_project.variant("dpo_missing", edit)))
    err = capsys.readouterr().err
    assert "pairs.jsonl: not found; dpo.source is generated" in err and "Traceback" not in err


def test_repository_defaults():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.dpo.source == "dataset"
    assert (cfg.preference_data.policy, cfg.preference_data.ranker.name) == ("sft", "reference")
    assert cfg.paths.preference_data == "data/preference_data"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["dpo"].update(source="hub"), r"dpo\.source: must be one of dataset, generated, got 'hub'"),
        (
            lambda p: p["preference_data"]["ranker"].update(name="pairrm"),
            r"preference_data\.ranker\.model: ranker pairrm needs a model",
        ),
        (
            lambda p: p["preference_data"]["ranker"].update(name="gpt4"),
            r"preference_data\.ranker\.name: must be one of reference, pairrm, reward_model, judge",
        ),
        (lambda p: p["preference_data"]["ranker"].update(judgments=0), r"preference_data\.ranker\.judgments: must"),
        (lambda p: p["preference_data"].update(policy="dpo"), r"preference_data\.policy: must be one of sft, base"),
        (lambda p: p["preference_data"].update(candidates=1), r"preference_data\.candidates: must be at least 2"),
        (lambda p: p["preference_data"].update(prompts=0), r"preference_data\.prompts: must be positive"),
        (lambda p: p["preference_data"].update(top_p=1.5), r"preference_data\.top_p: must be in \(0, 1\]"),
        (lambda p: p["preference_data"].update(temperature=0), r"preference_data\.temperature: must be positive"),
        (lambda p: p["preference_data"].update(promts=5), r"preference_data\.promts: unknown key \(did you mean"),
        (lambda p: p.pop("preference_data"), r"preference_data: missing"),
    ],
)
def test_bad_preference_data_values_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_params(tmp_path, edit))
