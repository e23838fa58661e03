"""Ranking candidates for preference pairs: judge-score parsing, pairs, shuffling, PairRM, reward models,
references."""

import math
import random

import numpy as np
import pytest
import torch

from finetune.preferences.ranking import (
    PAIRRM_SPECIAL_TOKENS,
    PairRMModel,
    build_pair,
    encode_pairrm,
    in_shuffled_order,
    judge_prompt,
    mean_judge_score,
    pairrm_config_ids,
    pairrm_logits,
    pairrm_preference,
    pairrm_scores,
    parse_judge_score,
    reference_scores,
    reward_model_scores,
    reward_model_text,
    shuffled_order,
    unshuffle,
)

# --- judge -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is relevant and clear.\nScore: 4", 4.0),
        ("Score: 0", 0.0),
        ("Score: 5", 5.0),
        ("Score: 4.5", 4.5),
        ("**Score:** 2", 2.0),
        ("Score: **3**", 3.0),
        ("score:3", 3.0),
        ("Score: 4/5", 4.0),
        ("Score: 4 out of 5", 4.0),
        ("It would get Score: 3 at first ... final Score: 4", 4.0),
        ("Score: 4.", 4.0),
        ("Score: 7", None),
        ("Score: -1", None),
        ("Score: 8/10", None),
        ("no score", None),
        ("The scores: are unclear", None),
        ("", None),
        ("Score: 4 ... Score: 9", None),  # the last one counts, even when an earlier one was valid
    ],
)
def test_parse_judge_score(text, expected):
    assert parse_judge_score(text) == expected


def test_judge_prompt_holds_the_rubric_the_pair_and_the_answer_format():
    prompt = judge_prompt("  Name a prime.  ", "Seven.\n")
    assert "<request>\nName a prime.\n</request>" in prompt
    assert "<answer>\nSeven.\n</answer>" in prompt
    assert all(f"\n{point}. " in prompt for point in range(1, 6))
    assert prompt.rstrip().endswith('"Score: <points>".')
    # A judge that follows the format is parsed; the template's own placeholder is not a score.
    assert parse_judge_score(prompt) is None
    assert parse_judge_score(prompt + "\nGood answer.\nScore: 3") == 3.0


def test_mean_judge_score_excludes_and_counts_unparseable_judgments():
    assert mean_judge_score(["Score: 4", "I cannot grade this.", "Score: 3", "Score: 9"]) == (3.5, 2)
    assert mean_judge_score(["Score: 5", "Score: 4", "Score: 3"]) == (4.0, 0)
    assert mean_judge_score(["nothing", "Score: 6"]) == (None, 2)
    assert mean_judge_score([]) == (None, 0)


# --- pairs -------------------------------------------------------------------------------------------------------


def test_build_pair_takes_the_best_and_the_worst_with_their_margin():
    pair = build_pair(["a", "b", "c", "d"], [2.0, 4.5, 1.0, 3.0])
    assert pair == {
        "chosen": "b",
        "rejected": "c",
        "chosen_index": 1,
        "rejected_index": 2,
        "chosen_score": 4.5,
        "rejected_score": 1.0,
        "margin": 3.5,
    }


def test_build_pair_drops_ties_and_too_few_scores():
    assert build_pair(["a", "b", "c"], [3.0, 3.0, 3.0]) is None
    assert build_pair(["a", "b", "c"], [None, 2.0, None]) is None
    assert build_pair(["a", "b"], [None, None]) is None
    assert build_pair([], []) is None


def test_build_pair_ignores_unscored_candidates():
    pair = build_pair(["a", "b", "c", "d"], [None, 1.0, float("nan"), 2.0])
    assert (pair["chosen"], pair["rejected"], pair["margin"]) == ("d", "b", 1.0)
    # Only one scored value besides the unscored: all scored are equal, a tie
    assert build_pair(["a", "b", "c"], [None, 2.0, 2.0]) is None


def test_build_pair_breaks_ties_by_the_lowest_index():
    pair = build_pair(["a", "b", "c", "d", "e"], [1.0, 5.0, 1.0, 5.0, 3.0])
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 0)
    assert build_pair(["a", "b", "c", "d", "e"], [1.0, 5.0, 1.0, 5.0, 3.0]) == pair


def test_build_pair_rejects_misaligned_inputs():
    with pytest.raises(ValueError):
        build_pair(["a", "b"], [1.0])


# --- position shuffling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rng_factory", [random.Random, np.random.default_rng])
def test_shuffled_order_is_a_seeded_permutation(rng_factory):
    order = shuffled_order(10, rng_factory(3))
    assert sorted(order) == list(range(10))
    assert order == shuffled_order(10, rng_factory(3))
    assert all(isinstance(i, int) for i in order)
    assert shuffled_order(0, rng_factory(3)) == []


def test_unshuffle_maps_results_back_to_the_original_candidates():
    candidates = ["zero", "one", "two", "three", "four"]
    order = shuffled_order(len(candidates), random.Random(0))
    shown = [candidates[i] for i in order]
    assert unshuffle(shown, order) == candidates
    with pytest.raises(ValueError):
        unshuffle(["a", "b"], [0, 0])


def test_in_shuffled_order_returns_scores_in_input_order_whatever_order_they_were_shown_in():
    candidates = ["a", "bbb", "cc", "dddd", "eeeee", "f"]
    seen = []

    def score(shown):
        seen.append(shown)
        return [float(len(text)) for text in shown]

    for seed in range(5):
        assert in_shuffled_order(candidates, random.Random(seed), score) == [1.0, 3.0, 2.0, 4.0, 5.0, 1.0]
    assert len({tuple(shown) for shown in seen}) > 1  # the presentation order did change


# --- PairRM --------------------------------------------------------------------------------------------------------

WORDS = (  # noqa: SIM905 - a word list reads better as one string
    "the a is of and to in what which how why name explain capital city france paris germany berlin rome italy "
    "prime number seven eight two three water boils at degrees hundred it i do not know answer question good bad"
).split()


def tiny_encoder_tokenizer():
    """A word-level DeBERTa-style tokenizer: [CLS] text [SEP], with PairRM's marker tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *PAIRRM_SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        additional_special_tokens=list(PAIRRM_SPECIAL_TOKENS),
    )


@pytest.fixture(scope="module")
def pairrm():
    from transformers import DebertaV2Config

    tokenizer = tiny_encoder_tokenizer()
    config = DebertaV2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=32,
        pos_att_type=["p2c", "c2p"],
        pad_token_id=tokenizer.pad_token_id,
        n_tasks=1,
        drop_out=0.05,
        **pairrm_config_ids(tokenizer),
    )
    torch.manual_seed(0)
    model = PairRMModel(config).eval()
    return model, tokenizer


SOURCE = "what is the capital of france"
ANSWERS = ["paris is the capital", "i do not know", "berlin is the capital of germany", "the answer is rome"]


def test_encode_pairrm_lays_out_source_and_both_candidates_with_their_markers():
    tokenizer = tiny_encoder_tokenizer()
    batch = encode_pairrm(tokenizer, [SOURCE, "name a prime"], ["paris", "seven <|source|>"], ["rome", "two"])
    ids = batch["input_ids"]
    assert ids.shape[0] == 2 and batch["attention_mask"].shape == ids.shape
    tokens = tokenizer.convert_ids_to_tokens(ids[1][batch["attention_mask"][1].bool()].tolist())
    assert tokens == [
        "[CLS]", "<|source|>", "name", "a", "prime", "[SEP]",
        "[CLS]", "<|candidate1|>", "seven", "[SEP]",  # a marker inside an answer is removed
        "[CLS]", "<|candidate2|>", "two", "[SEP]",
    ]  # fmt: skip


def test_encode_pairrm_respects_the_token_limits():
    tokenizer = tiny_encoder_tokenizer()
    long_source, long_answer = " ".join(["city"] * 3000), " ".join(["paris"] * 3000)
    batch = encode_pairrm(tokenizer, [long_source], [long_answer], [long_answer])
    ids = batch["input_ids"][0].tolist()
    cls = [i for i, token in enumerate(ids) if token == tokenizer.cls_token_id]
    assert cls[1] - cls[0] == 1224 and cls[2] - cls[1] == 412 and len(ids) - cls[2] == 412
    # A short source leaves the candidates more room, as PairRM-hf's tokenize_pair does: (2048 - source) // 2 each
    batch = encode_pairrm(tokenizer, ["name"], [long_answer], [long_answer])
    assert batch["input_ids"].shape[1] == 4 + 2 * ((2048 - 4) // 2)


def test_pairrm_forward_gives_one_logit_per_row(pairrm):
    model, tokenizer = pairrm
    batch = encode_pairrm(tokenizer, [SOURCE] * 3, ANSWERS[:3], ANSWERS[1:4])
    logits = model(**batch).logits
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    # Padding a row does not change its logit
    alone = model(**encode_pairrm(tokenizer, [SOURCE], ANSWERS[:1], ANSWERS[1:2])).logits
    assert alone[0].item() == pytest.approx(logits[0].item(), abs=1e-5)


def test_pairrm_needs_its_marker_tokens(pairrm):
    model, tokenizer = pairrm
    plain = tokenizer(["paris is the capital"], return_tensors="pt")
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"])


def test_pairrm_round_trips_through_save_and_from_pretrained(pairrm, tmp_path):
    model, tokenizer = pairrm
    model.save_pretrained(tmp_path)
    loaded = PairRMModel.from_pretrained(tmp_path).eval()
    assert loaded.config.cand1_prefix_id == model.config.cand1_prefix_id
    batch = encode_pairrm(tokenizer, [SOURCE] * 2, ANSWERS[:2], ANSWERS[2:])
    state, reloaded = model.state_dict(), loaded.state_dict()
    assert set(reloaded) == set(state) and all(torch.equal(reloaded[key], state[key]) for key in state)
    # identical weights; the logits may differ in the last float bit between two forward passes on CPU
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    assert any(key.startswith("pretrained_model.") for key in model.state_dict())
    assert {"head_layer.1.weight", "head_layer.4.weight"} <= set(model.state_dict())


def test_pairrm_preference_is_antisymmetric(pairrm):
    model, tokenizer = pairrm
    ab = pairrm_preference(model, tokenizer, SOURCE, ANSWERS[0], ANSWERS[2])
    ba = pairrm_preference(model, tokenizer, SOURCE, ANSWERS[2], ANSWERS[0])
    assert math.isfinite(ab) and ab == pytest.approx(-ba, abs=1e-6)
    raw = pairrm_logits(model, tokenizer, [SOURCE], [ANSWERS[0]], [ANSWERS[2]])
    assert len(raw) == 1 and math.isfinite(raw[0])


def test_pairrm_scores_one_finite_score_per_candidate_independent_of_the_shown_order(pairrm):
    model, tokenizer = pairrm
    scores = pairrm_scores(model, tokenizer, SOURCE, ANSWERS, random.Random(0), batch_size=5)
    assert len(scores) == len(ANSWERS) and all(math.isfinite(s) for s in scores)
    assert sum(scores) == pytest.approx(0.0, abs=1e-5)  # every averaged comparison adds +x to one and -x to another
    # Both orders compared: the random presentation order changes nothing
    again = pairrm_scores(model, tokenizer, SOURCE, ANSWERS, random.Random(123), batch_size=3)
    assert again == pytest.approx(scores, abs=1e-5)
    # Two candidates: the score is the averaged preference
    a_vs_b = pairrm_preference(model, tokenizer, SOURCE, ANSWERS[0], ANSWERS[1])
    two = pairrm_scores(model, tokenizer, SOURCE, ANSWERS[:2], random.Random(0))
    assert two == pytest.approx([a_vs_b, -a_vs_b], abs=1e-5)
    assert pairrm_scores(model, tokenizer, SOURCE, ANSWERS[:1], random.Random(0)) == [0.0]


def test_pairrm_scores_single_order_is_seeded(pairrm):
    model, tokenizer = pairrm
    first = pairrm_scores(model, tokenizer, SOURCE, ANSWERS, random.Random(7), both_orders=False)
    second = pairrm_scores(model, tokenizer, SOURCE, ANSWERS, random.Random(7), both_orders=False)
    assert first == second and len(first) == len(ANSWERS) and all(math.isfinite(s) for s in first)


# --- reward models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mistral_reward_model():
    from transformers import MistralConfig, MistralForSequenceClassification

    from finetune.embedded.tiny_model import train_tokenizer

    tokenizer = train_tokenizer([" ".join(WORDS)] * 5, vocab_size=300)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return MistralForSequenceClassification(config).eval(), tokenizer


PROMPTS = ["what is the capital of france", "name a prime number", "why does water boil", "explain it"]
RESPONSES = ["paris", "seven is a prime number and so is two", "at a hundred degrees", "i do not know the answer"]


def test_reward_model_scores_one_finite_logit_per_response_whatever_the_batch_size(mistral_reward_model):
    model, tokenizer = mistral_reward_model
    scores = reward_model_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=1)
    assert len(scores) == len(RESPONSES) and all(math.isfinite(s) for s in scores)
    assert reward_model_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=3) == pytest.approx(scores, abs=1e-5)
    assert reward_model_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=8) == pytest.approx(scores, abs=1e-5)
    assert len({round(s, 6) for s in scores}) > 1


def test_reward_model_scores_use_the_chat_template_when_there_is_one(mistral_reward_model):
    _, tokenizer = mistral_reward_model

    text, add_special = reward_model_text(tokenizer, "name a prime", "seven")
    assert text.startswith("<s>[INST]") and "seven" in text and add_special is False
    tokenizer_without = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<unk>")
    assert reward_model_text(tokenizer_without, "name a prime", "seven") == ("name a prime\n\nseven", True)


def test_reward_model_scores_with_a_deberta_classifier():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tokenizer = tiny_encoder_tokenizer()
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(config).eval()
    scores = reward_model_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=1)
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    assert reward_model_scores(model, tokenizer, PROMPTS, RESPONSES, batch_size=4) == pytest.approx(scores, abs=1e-5)


def test_reward_model_scores_reject_bad_inputs(mistral_reward_model):
    model, tokenizer = mistral_reward_model
    with pytest.raises(ValueError):
        reward_model_scores(model, tokenizer, PROMPTS, RESPONSES[:2], batch_size=2)


# --- references ------------------------------------------------------------------------------------------------------


def test_reference_scores_rank_a_copy_of_the_reference_first():
    reference = "Paris is the capital and largest city of France."
    candidates = ["Bananas are rich in potassium.", reference, "The capital of France is Paris."]
    scores = reference_scores(candidates, reference)
    assert scores[1] == pytest.approx(1.0)
    assert scores[1] > scores[2] > scores[0]
    assert scores[0] == pytest.approx(0.0)
    assert reference_scores(["", reference], reference)[0] == 0.0
    pair = build_pair(candidates, scores)
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 0)
