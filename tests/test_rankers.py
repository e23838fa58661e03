"""The configured ranker, end to end through finetune.preferences.pairs: loading (safetensors checkpoints, as a hub id
or folder would be), `rank_candidates` for all four rankers on tiny random models or a scripted judge, pair
building with ties and invalid rows counted, and the one-line errors of bad ranker settings."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from conftest import write_params
from test_ranking import WORDS, tiny_encoder_tokenizer

from finetune.core.config import RankerConfig, load_config
from finetune.core.errors import ConfigError
from finetune.evaluation import generation
from finetune.preferences.pairs import (
    Ranking,
    build_pairs,
    instruction_text,
    load_ranker,
    pair_metrics,
    rank_candidates,
    select_prompts,
)
from finetune.preferences.ranking import judge_prompt, pairrm_config_ids, pairrm_scores, reward_model_scores
from finetune.tools.dry_run import default_section

PROMPTS = [
    [{"role": "user", "content": "what is the capital of france"}],
    [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": "name a prime number"}],
]
CANDIDATES = [
    ["paris is the capital", "i do not know", "", "berlin is the capital of germany"],
    ["seven", "two is a prime number", "the answer is eight"],
]
REFERENCES = ["paris is the capital of france", "seven"]
MODEL = default_section("model", name_or_path="unused", load_in_4bit=False)


def settings(name: str, **changes) -> RankerConfig:
    """conf/config.yaml's ranker settings with another ranker and `changes`."""
    return default_section("preference_data.ranker", name=name, **changes)


def rows_for(prompts=PROMPTS) -> list[dict]:
    return [
        {"id": f"p{i}", "prompt": prompt, "completion": [{"role": "assistant", "content": REFERENCES[i]}],
         "category": "open_qa"}
        for i, prompt in enumerate(prompts)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pairrm_folder(tmp_path_factory):
    """A tiny random PairRM checkpoint saved as safetensors, with its tokenizer, like a downloaded PairRM-hf."""
    from transformers import DebertaV2Config

    from finetune.preferences.ranking import PairRMModel

    folder = tmp_path_factory.mktemp("pairrm")
    tokenizer = tiny_encoder_tokenizer()
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
        pad_token_id=tokenizer.pad_token_id, n_tasks=1, drop_out=0.05,
    )  # fmt: skip  (no marker ids in the config: load_ranker takes them from the tokenizer)
    torch.manual_seed(0)
    PairRMModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    from transformers import MistralConfig, MistralForSequenceClassification

    from finetune.embedded.tiny_model import train_tokenizer

    folder = tmp_path_factory.mktemp("reward")
    tokenizer = train_tokenizer([" ".join(WORDS)] * 5, vocab_size=300)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    MistralForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reference_ranker_scores_against_the_gold_answer_and_skips_empty_answers():
    ranking = rank_candidates(settings("reference"), None, PROMPTS, CANDIDATES, REFERENCES, seed=0)
    first, second = ranking.scores
    assert first[2] is None and all(isinstance(s, float) for i, s in enumerate(first) if i != 2)
    assert first[0] == max(s for s in first if s is not None)  # closest to the reference
    assert second[0] == pytest.approx(1.0)
    assert ranking.judgments is None and ranking.unparseable == ranking.verdicts == 0


def test_pairrm_ranker_loads_a_checkpoint_folder_and_scores_through_the_shared_function(pairrm_folder):
    config = settings("pairrm", model=str(pairrm_folder), batch_size=5)
    model, tokenizer = load_ranker(config, MODEL)
    assert model.config.cand1_prefix_id == pairrm_config_ids(tokenizer)["cand1_prefix_id"]  # filled from the tokenizer
    ranking = rank_candidates(config, (model, tokenizer), PROMPTS, CANDIDATES, REFERENCES, seed=0)
    assert [len(row) for row in ranking.scores] == [4, 3]
    assert ranking.scores[0][2] is None and all(math.isfinite(s) for s in ranking.scores[1])
    # The same scores as PairRM applied directly to the non-empty answers; both orders: the shuffling changes nothing
    direct = pairrm_scores(model, tokenizer, "what is the capital of france", [CANDIDATES[0][i] for i in (0, 1, 3)],
                           random.Random(5))  # fmt: skip
    assert [ranking.scores[0][i] for i in (0, 1, 3)] == pytest.approx(direct, abs=1e-5)
    other_seed = rank_candidates(config, (model, tokenizer), PROMPTS, CANDIDATES, REFERENCES, seed=9)
    assert other_seed.scores[1] == pytest.approx(ranking.scores[1], abs=1e-5)
    # The source PairRM reads holds the system turn too
    assert instruction_text(PROMPTS[1]) == "answer in one word\n\nname a prime number"


def test_pairrm_single_order_is_shuffled_by_the_seed(pairrm_folder):
    config = settings("pairrm", model=str(pairrm_folder), both_orders=False)
    ranker = load_ranker(config, MODEL)
    first = rank_candidates(config, ranker, PROMPTS, CANDIDATES, REFERENCES, seed=3)
    again = rank_candidates(config, ranker, PROMPTS, CANDIDATES, REFERENCES, seed=3)
    assert first.scores == again.scores


def test_reward_model_ranker_loads_a_checkpoint_folder_and_scores_every_answer(reward_folder):
    config = settings("reward_model", model=str(reward_folder), batch_size=2)
    model, tokenizer = load_ranker(config, MODEL)
    ranking = rank_candidates(config, (model, tokenizer), PROMPTS, CANDIDATES, REFERENCES, seed=0)
    assert ranking.scores[0][2] is None
    direct = reward_model_scores(model, tokenizer, ["answer in one word\n\nname a prime number"] * 3, CANDIDATES[1], 8)
    assert ranking.scores[1] == pytest.approx(direct, abs=1e-5)


def test_a_classifier_with_several_labels_is_not_a_reward_model(tmp_path, reward_folder):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(reward_folder, num_labels=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(reward_folder).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has 3 labels; a reward model has one"):
        load_ranker(settings("reward_model", model=str(tmp_path)), MODEL)


def test_a_ranker_model_that_cannot_be_loaded_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^ranker\.model: cannot load pairrm model .*missing") as error:
        load_ranker(settings("pairrm", model=str(tmp_path / "missing")), MODEL)
    assert "\n" not in str(error.value)


def scripted_judge(monkeypatch, verdicts_for):
    """Replace the judge's sampling with scripted verdicts: verdicts_for(answer) -> the judgments' texts."""
    asked = []

    def sample(model, tokenizer, texts, k, gen):
        asked.append((texts, k, gen))
        answers = [text.split("<answer>\n")[1].split("\n</answer>")[0] for text in texts]
        return [[{"prediction": verdict} for verdict in verdicts_for(answer)[:k]] for answer in answers]

    monkeypatch.setattr(generation, "sample_candidates", sample)
    return asked


def test_judge_ranker_averages_parseable_verdicts_and_counts_malformed_ones(monkeypatch):
    from finetune.embedded.tiny_model import train_tokenizer

    verdicts = {
        "paris is the capital": ["Relevant and right.\nScore: 5", "Score: 4", "**Score:** 5"],
        "i do not know": ["No help.\nScore: 0", "I refuse to grade this", "Score: 9"],  # 2 malformed
        "berlin is the capital of germany": ["Score: 2/5", "Score: 1", "Score: 3"],
        "seven": ["Score: 4", "Score: 4", "Score: 4"],
        "two is a prime number": ["Score: 3", "Score: 3", "Score: 3"],
        "the answer is eight": ["", "Score: eight", "no verdict"],  # all malformed: not ranked
    }
    asked = scripted_judge(monkeypatch, lambda answer: verdicts[answer])
    tokenizer = train_tokenizer([" ".join(WORDS)] * 5, vocab_size=300)
    config = settings("judge", judgments=3, temperature=0.5, top_p=0.8, max_new_tokens=20)
    ranking = rank_candidates(config, (None, tokenizer), PROMPTS, CANDIDATES, REFERENCES, seed=11)

    assert ranking.scores[0] == [pytest.approx(14 / 3), 0.0, None, 2.0]  # "" is never sent to the judge
    assert ranking.scores[1] == [4.0, 3.0, None]
    assert (ranking.verdicts, ranking.unparseable) == (6 * 3, 2 + 3)
    assert ranking.judgments[0][1] == verdicts["i do not know"] and ranking.judgments[0][2] is None
    # One batched call: the rubric prompt in the judge's chat template, k = judgments, the judge's sampling settings
    (texts, k, gen), = asked  # fmt: skip
    assert k == 3 and len(texts) == 6
    assert texts[0] == tokenizer.apply_chat_template(
        [{"role": "user", "content": judge_prompt("what is the capital of france", "paris is the capital")}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.max_new_tokens, gen.seed) == (True, 0.5, 0.8, 20, 11)

    pairs, _, counts = build_pairs(rows_for(), CANDIDATES, ranking)
    assert [p["chosen"][-1]["content"] for p in pairs] == ["paris is the capital", "seven"]
    assert pairs[0]["rejected"][-1]["content"] == "i do not know"
    assert (pairs[1]["rejected"][-1]["content"], pairs[1]["margin"]) == ("two is a prime number", 1.0)
    assert pairs[0]["all_judgments"][0] == verdicts["paris is the capital"]
    metrics = pair_metrics(config, rows_for(), CANDIDATES, ranking, pairs, counts)
    assert (metrics["judgments"], metrics["unparseable_judgments"]) == (18, 5)
    assert metrics["unparseable_rate"] == pytest.approx(5 / 18)


def test_the_second_prompt_is_a_tie_when_its_ranked_answers_score_the_same(monkeypatch):
    ranking = Ranking(scores=[[3.0, 1.0, None, 2.0], [4.0, 4.0, None]])
    pairs, records, counts = build_pairs(rows_for(), CANDIDATES, ranking)
    assert len(pairs) == 1 and counts == {"ties_dropped": 1, "invalid_dropped": 0}
    assert [r["outcome"] for r in records] == ["pair", "tie"]
    assert records[1]["candidates"] == CANDIDATES[1] and records[1]["scores"] == [4.0, 4.0, None]
    metrics = pair_metrics(settings("reference"), rows_for(), CANDIDATES, ranking, pairs, counts)
    assert (metrics["pairs"], metrics["ties_dropped"], metrics["tie_rate"]) == (1, 1, 0.5)
    assert metrics["mean_score"] == pytest.approx((3 + 1 + 2 + 4 + 4) / 5)
    assert metrics["mean_gap"] == 2.0 and metrics["unparseable_rate"] is None


def test_a_pair_the_dpo_reader_would_reject_is_dropped_and_counted():
    rows = rows_for()
    rows[0]["prompt"] = [{"role": "user", "content": "   "}]  # an empty instruction: from_ultrafeedback rejects it
    pairs, records, counts = build_pairs(rows, CANDIDATES, Ranking(scores=[[3.0, 1.0, None, 2.0], [1.0, 2.0, 0.0]]))
    assert counts == {"ties_dropped": 0, "invalid_dropped": 1} and len(pairs) == 1
    assert [r["outcome"] for r in records] == ["invalid", "pair"]


def test_a_self_judge_is_the_policy_and_a_judge_model_is_loaded_like_the_policy(monkeypatch):
    policy = ("model", "tokenizer")
    assert load_ranker(settings("judge"), MODEL, policy=policy) is policy
    assert load_ranker(settings("reference"), MODEL) is None
    loaded = {}
    monkeypatch.setattr(generation, "load_variant", lambda cfg, adapter: loaded.setdefault("cfg", cfg) and ("m", "t"))
    load_ranker(settings("judge", model="org/judge", revision="abc"), dataclasses.replace(MODEL, load_in_4bit=True))
    assert (loaded["cfg"].name_or_path, loaded["cfg"].revision, loaded["cfg"].load_in_4bit) == (
        "org/judge",
        "abc",
        True,
    )


def test_a_real_tiny_model_judges_itself_and_its_unparseable_verdicts_are_counted():
    """The judge path with real generation: a random tiny LM writes no "Score: X", so nothing is ranked."""
    from finetune.embedded.tiny_model import build_model, train_tokenizer

    tokenizer = train_tokenizer([" ".join(WORDS)] * 5, vocab_size=300)
    arch = default_section("base.architecture", vocab_size=300, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=2048)  # fmt: skip
    model = build_model(arch, tokenizer, seed=0).eval()
    config = settings("judge", judgments=2, max_new_tokens=4, batch_size=4)
    ranking = rank_candidates(config, (model, tokenizer), PROMPTS[:1], CANDIDATES[:1], REFERENCES[:1], seed=0)
    assert ranking.verdicts == 3 * 2 and ranking.unparseable == 6
    assert ranking.scores == [[None, None, None, None]]
    assert all(len(texts) == 2 for texts in ranking.judgments[0] if texts is not None)


def test_select_prompts_excludes_ids_and_is_seeded():
    rows = [{"id": str(i)} for i in range(20)]
    first = select_prompts(rows, 5, seed=1)
    assert first == select_prompts(rows, 5, seed=1) and len(first) == 5
    rest = select_prompts(rows, 5, seed=1, exclude={row["id"] for row in first})
    assert not {row["id"] for row in rest} & {row["id"] for row in first}
    assert select_prompts(rows, 50, seed=0, exclude={"0"}) == rows[1:]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["self_rewarding"]["ranker"].update(name="reward_model"),
         r"self_rewarding\.ranker\.model: ranker reward_model needs a model"),
        (lambda p: p["self_rewarding"]["ranker"].update(top_p=0), r"self_rewarding\.ranker\.top_p: must be in"),
        (lambda p: p["self_rewarding"].update(reference="base"),
         r"self_rewarding\.reference: must be one of previous, sft, got 'base'"),
        (lambda p: p["self_rewarding"]["rounds"]["round2"].update(start="models/dpo"),
         r"self_rewarding\.rounds\.round2\.start: must be one of models/rounds/round1, models/sft, got 'models/dpo'"),
        (lambda p: p["self_rewarding"]["rounds"].pop("round1"),
         r"self_rewarding\.rounds\.round2\.start: must be one of models/sft, got 'models/rounds/round1'"),
        (lambda p: p["self_rewarding"]["rounds"].update({"round 3": {"start": "models/sft", "seed": 3}}),
         r"self_rewarding\.rounds\.round 3: a round name may hold only"),
        (lambda p: p["self_rewarding"].update(rounds={}), r"self_rewarding\.rounds: must list at least one round"),
        (lambda p: p["self_rewarding"]["rounds"]["round1"].update(sead=1),
         r"self_rewarding\.rounds\.round1\.sead: unknown key \(did you mean 'self_rewarding\.rounds\.round1\.seed'"),
        (lambda p: p["self_rewarding"].update(candidates=1), r"self_rewarding\.candidates: must be at least 2"),
    ],
)  # fmt: skip
def test_bad_ranker_and_round_settings_name_the_key(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_params(tmp_path, edit))

