"""The base / sft / dpo comparison: implicit-reward accuracy, lengths, deltas and categories on hand-made rows."""

import pytest

from finetune.evaluation.comparison import answer_lengths, by_category, compare, preference_accuracy


def test_preference_accuracy_uses_the_log_ratio_against_the_reference():
    # pair 1: policy gains 2 on chosen, loses 1 on rejected -> margin beta * (2 - (-1)) = 0.1 * 3 = 0.3 > 0
    # pair 2: policy gains 1 on chosen and 3 on rejected     -> margin 0.1 * (1 - 3) = -0.2 < 0
    policy = [{"chosen_logp": -8.0, "rejected_logp": -21.0}, {"chosen_logp": -9.0, "rejected_logp": -7.0}]
    reference = [{"chosen_logp": -10.0, "rejected_logp": -20.0}, {"chosen_logp": -10.0, "rejected_logp": -10.0}]
    result = preference_accuracy(policy, reference, beta=0.1)
    assert result["accuracy"] == 0.5
    assert result["margin"] == pytest.approx((0.3 - 0.2) / 2)


def test_preference_accuracy_is_not_raw_likelihood():
    # Chosen is far likelier than rejected under both models, but the policy did not move: no preference learned.
    same = [{"chosen_logp": -5.0, "rejected_logp": -50.0}]
    assert preference_accuracy(same, same, beta=0.1) == {"accuracy": 0.0, "margin": 0.0}


def test_preference_accuracy_rejects_misaligned_inputs():
    with pytest.raises(ValueError):
        preference_accuracy([{"chosen_logp": 0.0, "rejected_logp": 0.0}], [], beta=0.1)


def answer(prediction, category="a", hit_max=False):
    return {"prediction": prediction, "category": category, "hit_max_new_tokens": hit_max}


def test_answer_lengths_count_words_empties_and_truncations():
    lengths = answer_lengths([answer("one two three"), answer("   "), answer("four", hit_max=True), answer("")])
    assert lengths == {"mean_words": 1.0, "empty_rate": 0.5, "truncated_rate": 0.25}


def scores(*f1s):
    return [{"f1": x, "rougeL": x, "bertscore_f1": x} for x in f1s]


def test_compare_reports_means_and_paired_deltas_with_intervals():
    answers = {v: [answer("x"), answer("y"), answer("z")] for v in ("base", "sft", "dpo")}
    table = {"base": scores(0.0, 0.1, 0.2), "sft": scores(0.5, 0.6, 0.7), "dpo": scores(0.5, 0.6, 0.7)}
    result = compare(table, answers, samples=200, seed=0)
    assert result["n"] == 3
    assert result["sft"]["f1"] == pytest.approx(0.6)
    # Every row gains exactly 0.5, so every resample does: a zero-width interval at 0.5.
    assert result["delta"]["sft_vs_base"]["f1"] == pytest.approx({"mean": 0.5, "low": 0.5, "high": 0.5})
    assert result["delta"]["dpo_vs_sft"]["rougeL"] == pytest.approx({"mean": 0.0, "low": 0.0, "high": 0.0})


def test_by_category_splits_rows_and_keeps_their_pairing():
    answers = {v: [answer("x", "a"), answer("y", "b"), answer("z", "a")] for v in ("base", "sft", "dpo")}
    table = {"base": scores(0.0, 0.9, 0.2), "sft": scores(0.4, 0.1, 0.6), "dpo": scores(0.4, 0.1, 0.6)}
    result = by_category(table, answers, samples=100, seed=0)
    assert sorted(result) == ["a", "b"]
    assert result["a"]["n"] == 2 and result["b"]["n"] == 1
    assert result["a"]["delta"]["sft_vs_base"]["f1"]["mean"] == pytest.approx(0.4)
    assert result["b"]["delta"]["sft_vs_base"]["f1"]["mean"] == pytest.approx(-0.8)


def test_eval_metrics_are_rounded_so_float_noise_is_not_a_change():
    from finetune.evaluation.report import rounded

    assert rounded({"base": {"f1": 0.21481671343323122, "n": 3}, "x": [0.5]}) == {
        "base": {"f1": 0.214817, "n": 3},
        "x": [0.5],
    }
    assert rounded(0.2148167143708893) == rounded(0.21481671343323122)


def test_a_pairwise_outcome_counts_ties_half_and_an_unranked_answer_as_a_loss():
    from finetune.evaluation.comparison import pairwise_outcome

    assert [pairwise_outcome(0.2, 0.5), pairwise_outcome(0.5, 0.2), pairwise_outcome(0.3, 0.3)] == [1.0, 0.0, 0.5]
    assert [pairwise_outcome(None, 0.1), pairwise_outcome(0.1, None), pairwise_outcome(None, None)] == [1, 0, 0.5]


def test_the_win_rate_is_wins_plus_half_the_ties_with_an_interval_around_it():
    from finetune.evaluation.comparison import win_rate

    # 6 wins, 2 ties, 2 losses of the second variant: (6 + 2 / 2) / 10 = 0.7
    first = [0.1] * 6 + [0.5, 0.5] + [0.9, 0.9]
    second = [0.2] * 6 + [0.5, 0.5] + [0.1, 0.1]
    result = win_rate(first, second, samples=1000, seed=0)
    assert result["rate"] == pytest.approx(0.7)
    assert (result["wins"], result["ties"], result["losses"]) == (6, 2, 2)
    assert 0.4 <= result["low"] < 0.7 < result["high"] <= 1.0
    assert win_rate(second, first, samples=1000, seed=0)["rate"] == pytest.approx(0.3)  # the other side of it
