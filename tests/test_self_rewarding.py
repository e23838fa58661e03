"""Self-rewarding rounds on the tiny project: a round of iterative DPO (pairs, training, held-out evaluation, report),
fresh prompts per round, and DPO's reference policy: M_t (`previous`) or the SFT model (`sft`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.core.config import load_config
from finetune.data.formats import from_ultrafeedback
from finetune.data.rows import read_jsonl
from finetune.evaluation.metrics import METRICS
from finetune.preferences import rounds
from stages import generate, self_rewarding_dpo, self_rewarding_pairs, self_rewarding_report, sft

ROUND_KEYS = {"round", "index", "start", "reference", "pairs", "training", "eval", "cost"}


@pytest.fixture(autouse=True)
def outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_round(tiny_project):
    """sft, generate@sft, then round1's pairs and DPO and the report, with round1 the only round."""

    def only_round1(params):
        params["self_rewarding"]["rounds"] = {"round1": params["self_rewarding"]["rounds"]["round1"]}

    path = tiny_project.variant("rounds", only_round1)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_project.root)
        sft.main(str(path))
        generate.main("sft", str(path))
        self_rewarding_pairs.main("round1", str(path))
        self_rewarding_dpo.main("round1", str(path))
        self_rewarding_report.main(str(path))
    return path, load_config(path)


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_a_round_writes_pairs_from_its_start_model_with_every_candidate_and_score(one_round):
    _, cfg = one_round
    folder = Path(cfg.paths.round_data) / "round1"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["round"], metrics["index"], metrics["start"]) == ("round1", 1, cfg.paths.sft_adapter)
    assert (metrics["prompts"], metrics["candidates"], metrics["ranker"]) == (6, 3, "reference")
    pairs, records = read_jsonl(folder / "pairs.jsonl"), read_jsonl(folder / "candidates.jsonl")
    assert metrics["pairs"] == len(pairs) > 0 and len(records) == 6
    assert metrics["ties_dropped"] == sum(r["outcome"] == "tie" for r in records)
    for row in pairs:
        from_ultrafeedback(row)
        assert len(row["all_generated_responses"]) == 3 and row["score_chosen"] > row["score_rejected"]
    train_ids = {row["id"] for row in read_jsonl(Path(cfg.paths.prepared) / "sft_train.jsonl")}
    assert {r["prompt_id"] for r in records} <= train_ids


def test_a_round_trains_its_adapter_from_the_start_adapter_and_evaluates_it_against_sft(one_round):
    _, cfg = one_round
    adapter = Path(cfg.paths.rounds) / "round1"
    tensors, start = adapter_tensors(adapter), adapter_tensors(cfg.paths.sft_adapter)
    assert {n: t.shape for n, t in tensors.items()} == {n: t.shape for n, t in start.items()}
    assert any(not torch.equal(tensors[n], start[n]) for n in tensors)  # DPO moved M_1 into M_2
    assert not any(".ref." in name for name in tensors)
    assert not (Path(cfg.paths.checkpoints) / "rounds" / "round1").exists()

    summary = json.loads((Path(cfg.paths.round_metrics) / "round1.json").read_text())
    assert set(summary) == ROUND_KEYS and summary["reference"] == "previous"
    assert summary["training"]["step"] == cfg.self_rewarding.trainer["max_steps"]
    evaluation = summary["eval"]
    assert evaluation["n"] == cfg.self_rewarding.eval_prompts == 4
    assert set(evaluation["delta_vs_sft"]) == set(METRICS)
    for side in ("round", "sft"):
        assert {*METRICS, "mean_words", "empty_rate", "truncated_rate"} <= set(evaluation[side])
    rows = read_jsonl(Path(cfg.paths.round_data) / "round1" / "eval.jsonl")
    sft_rows = {row["id"]: row for row in read_jsonl(Path(cfg.paths.generations) / "sft.jsonl")}
    assert len(rows) == 4 and all(row["sft_prediction"] == sft_rows[row["id"]]["prediction"] for row in rows)
    mean_f1 = sum(row["f1"] - row["sft_f1"] for row in rows) / 4
    assert evaluation["delta_vs_sft"]["f1"]["mean"] == pytest.approx(mean_f1, abs=1e-6)


def test_the_report_has_round_0_sft_then_one_row_per_round(one_round):
    _, cfg = one_round
    with (Path(cfg.paths.reports) / "plots" / "rounds.csv").open() as lines:
        rows = list(csv.DictReader(lines))
    assert [(row["round"], row["name"]) for row in rows] == [("0", "sft"), ("1", "round1")]
    assert rows[0]["pairs"] == "" and rows[1]["pairs"] != ""
    summary = json.loads((Path(cfg.paths.round_metrics) / "round1.json").read_text())
    assert float(rows[0]["f1"]) == pytest.approx(summary["eval"]["sft"]["f1"])
    assert float(rows[1]["tie_rate"]) == pytest.approx(summary["pairs"]["tie_rate"])
    assert float(rows[1]["delta_rougeL_vs_previous"]) == pytest.approx(
        float(rows[1]["rougeL"]) - float(rows[0]["rougeL"]), abs=1e-5
    )


def test_each_round_draws_fresh_prompts_by_its_own_seed(tiny_project):
    cfg = load_config(tiny_project.params_path)
    rows = read_jsonl(Path(cfg.paths.prepared) / "sft_train.jsonl")
    first = rounds.round_prompts(cfg, "round1", rows)
    second = rounds.round_prompts(cfg, "round2", rows)
    assert len(first) == len(second) == cfg.self_rewarding.prompts
    assert not {r["id"] for r in first} & {r["id"] for r in second}
    assert rounds.round_prompts(cfg, "round2", rows) == second


def test_the_report_lines_up_rounds_and_rejects_a_changed_baseline():
    def summary(index, f1, sft_f1=0.5):
        means = {"f1": f1, "rougeL": f1, "bertscore_f1": f1, "mean_words": 10.0}
        sft = {"f1": sft_f1, "rougeL": sft_f1, "bertscore_f1": sft_f1, "mean_words": 8.0}
        delta = {m: {"mean": f1 - sft_f1, "low": 0.0, "high": 0.0} for m in METRICS}
        pairs = {"pairs": 5, "tie_rate": 0.2, "mean_score": 1.0, "mean_gap": 0.5, "mean_response_words": 7.0,
                 "unparseable_rate": None}  # fmt: skip
        return {"round": f"r{index}", "index": index, "pairs": pairs,
                "eval": {"round": means, "sft": sft, "delta_vs_sft": delta}}  # fmt: skip

    rows = rounds.report_rows([summary(1, 0.6), summary(2, 0.55)])
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[2]["delta_f1_vs_previous"] == pytest.approx(-0.05)
    assert rows[2]["delta_f1_vs_sft"] == pytest.approx(0.05)
    with pytest.raises(Exception, match="other SFT answers"):
        rounds.report_rows([summary(1, 0.6), summary(2, 0.55, sft_f1=0.4)])


def test_training_without_the_rounds_pairs_fails_in_one_line(tiny_project, capsys):
    path = tiny_project.variant("no_pairs")
    with pytest.raises(SystemExit):
        self_rewarding_dpo.main("round1", str(path))
    err = capsys.readouterr().err
    assert "pairs.jsonl: not found; run `dvc repro self_rewarding_pairs@round1` first" in err
    assert "Traceback" not in err


def test_an_unknown_round_fails_naming_the_rounds(tiny_project, capsys):
    with pytest.raises(SystemExit):
        self_rewarding_pairs.main("round9", str(tiny_project.params_path))
    assert "self_rewarding.rounds: no round 'round9' (rounds: round1, round2)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The reference policy: `previous` must be M_t (the adapter the round starts from), `sft` the SFT model.


def completion_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.fixture(scope="module")
def moved_adapter(one_round, tmp_path_factory):
    """An adapter of the SFT adapter's shape that is clearly another model: the SFT adapter with its LoRA B matrices
    perturbed. (A round's few tiny steps move the model too little to tell it from SFT reliably.)"""
    from safetensors.torch import save_file

    _, cfg = one_round
    folder = tmp_path_factory.mktemp("moved") / "adapter"
    shutil.copytree(cfg.paths.sft_adapter, folder)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator) if "lora_B" in name else tensor
        for name, tensor in adapter_tensors(cfg.paths.sft_adapter).items()
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("reference", ["previous", "sft"])
def test_the_reference_policy_is_the_start_model_or_the_sft_model(one_round, moved_adapter, reference, tmp_path):
    from peft import PeftModel
    from trl import DPOConfig

    from finetune.model.loading import load_model
    from finetune.training.dpo import build_dpo_trainer, load_pairs
    from finetune.training.runs import trainer_args

    _, cfg = one_round
    settings = rounds.round_settings(cfg, "round1")[1]
    settings = dataclasses.replace(settings, start=moved_adapter)  # M_t = the moved adapter
    cfg = dataclasses.replace(cfg, self_rewarding=dataclasses.replace(cfg.self_rewarding, reference=reference))
    expected = rounds.reference_adapter(cfg, settings)
    assert expected == (moved_adapter if reference == "previous" else cfg.paths.sft_adapter)

    train = load_pairs(Path(cfg.paths.round_data) / "round1" / "pairs.jsonl", "")
    args = trainer_args(DPOConfig, "self_rewarding", {**cfg.self_rewarding.trainer, "max_steps": 1}, str(tmp_path))
    trainer = build_dpo_trainer(cfg.model, moved_adapter, train, cfg.dpo.max_prompt_length, args,
                                str(tmp_path / "curves"), resume=False, reference_adapter=expected)  # fmt: skip
    policy = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    policy.eval()  # no LoRA dropout: exact comparisons
    reference_logps = torch.cat(trainer.compute_ref_log_probs(policy, batch))  # what TRL puts in the DPO loss

    def logps_of(adapter):
        return completion_logps(PeftModel.from_pretrained(load_model(cfg.model, for_training=False), adapter).eval(),
                                batch)  # fmt: skip

    moved, sft_model = logps_of(moved_adapter), logps_of(cfg.paths.sft_adapter)
    tolerance = {"rtol": 1e-5, "atol": 1e-3}
    assert (moved - sft_model).abs().max() > 100 * tolerance["atol"]  # the two candidates differ far above noise
    torch.testing.assert_close(reference_logps, moved if reference == "previous" else sft_model, **tolerance)
    torch.testing.assert_close(completion_logps(policy, batch), moved, **tolerance)  # the policy starts from M_t
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".ref." in n)  # the reference is frozen
