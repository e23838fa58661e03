"""metrics: hand-computed token F1 and ROUGE-L, BERTScore with the offline MiniLM, and the paired bootstrap.

    python -m pytest tests/test_metrics.py -q        # ~15 s on 2 CPU cores, most of it loading MiniLM
"""

import dataclasses
import json
import random
import socket

import pytest
import torch

from finetune.core.errors import ConfigError
from finetune.evaluation import metrics
from finetune.evaluation.metrics import (
    bertscore_description,
    bertscore_f1,
    mean_scores,
    normalize_answer,
    paired_bootstrap,
    rouge_l,
    score_rows,
    token_f1,
)
from finetune.tools.dry_run import default_section

MINILM = default_section("evaluate.bertscore", model="minilm", num_layers=6)  # the offline MiniLM; the rest as conf/


# --- SQuAD normalization and token F1 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The 28-year-old's café!", "28yearolds café"),  # punctuation deleted, not spaced; accents kept
        ("Theodore ate an apple, a pear and the fig.", "theodore ate apple pear and fig"),  # whole words only
        ("a.n", ""),  # punctuation goes first: "a.n" -> "an", then the article "an" goes
        ("don't vs don’t — wait", "dont vs don’t — wait"),  # only ASCII punctuation is removed
        ("  Many\tspaces\n here ", "many spaces here"),
    ],
)
def test_normalize_answer_follows_squad_v1_1_in_order(text, expected):
    assert normalize_answer(text) == expected


def test_token_f1_is_the_harmonic_mean_of_token_precision_and_recall():
    # pred [cat sat on mat] (4), ref [cat sat on red mat] (5), 4 shared: P = 4/4, R = 4/5, F1 = 2*0.8/1.8 = 8/9
    assert token_f1("The cat sat on the mat", "a cat sat on a red mat") == pytest.approx(8 / 9)


def test_token_f1_counts_shared_tokens_as_a_multiset():
    # pred {go: 3, stop: 1} (4), ref {go: 1, stop: 2} (3), min counts {go: 1, stop: 1} = 2 shared:
    # P = 2/4, R = 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert token_f1("go go go stop", "go stop stop") == pytest.approx(4 / 7)


def test_token_f1_edge_cases():
    assert token_f1("Paris.", "paris") == 1.0
    assert token_f1("The Eiffel Tower", "the eiffel tower") == 1.0
    assert token_f1("28-year-old", "28 year old") == 0.0  # one token "28yearold" against three
    assert token_f1("28-year-old", "a 28yearold") == 1.0
    assert token_f1("", "Paris") == 0.0
    assert token_f1("   ", "Paris") == 0.0
    assert token_f1("", "") == 0.0  # SQuAD v1.1: nothing shared is 0, even empty against empty (v2.0 says 1)
    assert token_f1("The.", "the") == 0.0  # both normalize to nothing


# --- ROUGE-L ------------------------------------------------------------------------------------------------------


def test_rouge_l_is_the_lcs_f_measure():
    # ref [the cat sat on the mat] (6), pred [the cat is on the mat] (6); LCS "the cat on the mat" = 5:
    # P = R = 5/6, F = 5/6.  ref [one two three four] (4), pred [one two] (2); LCS 2: P = 1, R = 1/2, F = 2/3
    scores = rouge_l(["the cat is on the mat", "One, two!"], ["The cat sat on the mat.", "one two three four"])
    assert scores == pytest.approx([5 / 6, 2 / 3])


def test_rouge_l_stems_words_longer_than_three_letters():
    # Stemmed: ref [the dog were run] (4), pred [the dog run] (3); LCS 3: P = 1, R = 3/4, F = 1.5/1.75 = 6/7.
    # Unstemmed it would be [the dogs were running] vs [the dog runs]: LCS 1, P = 1/3, R = 1/4, F = 2/7.
    assert rouge_l(["the dog runs"], ["the dogs were running"]) == pytest.approx([6 / 7])


def test_rouge_l_passes_the_reference_first(monkeypatch):
    from rouge_score import rouge_scorer

    calls = []
    score = rouge_scorer.RougeScorer.score

    def recorded(self, target, prediction):
        calls.append((target, prediction))
        return score(self, target, prediction)

    monkeypatch.setattr(rouge_scorer.RougeScorer, "score", recorded)
    rouge_l(["the prediction"], ["the reference"])
    assert calls == [("the reference", "the prediction")]


def test_rouge_l_edge_cases():
    predictions = ["", "  ", "same words here", "日本語"]
    references = ["a reference", "a reference", "Same words, here.", "日本語"]
    # the last is 0: rouge-score's tokenizer keeps only [a-z0-9], so non-Latin text has no tokens
    assert rouge_l(predictions, references) == [0.0, 0.0, 1.0, 0.0]
    assert rouge_l([], []) == []
    with pytest.raises(ValueError):
        rouge_l(["one"], ["one", "two"])


# --- BERTScore with the offline MiniLM ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """MiniLM loaded once for this module, with the network cut off so that any attempt to reach it fails."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access while loading BERTScore: {args}")

    metrics._scorer.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", no_network)
        patch.setattr(socket.socket, "connect", no_network)
        bertscore_f1(["warm up"], ["warm up"], MINILM)
    return MINILM


def test_bertscore_regression_values(minilm):
    # COMPUTED-HERE (bert-score 0.3.13, transformers 5.23.0, torch 2.13 CPU) and cross-checked with a direct
    # re-implementation: layer-6 hidden states, greedy cosine matching, [CLS]/[SEP] weighted 0.
    predictions = [
        "A feline was sitting on the rug.",
        "Stock prices fell sharply on Monday.",
        "Paris is the capital of France.",
    ]
    references = ["The cat sat on the mat.", "The cat sat on the mat.", "The capital of France is Paris."]
    expected = [0.5837885141372681, 0.10607895255088806, 0.9707894325256348]
    assert bertscore_f1(predictions, references, minilm) == pytest.approx(expected, abs=1e-5)


def test_bertscore_identical_is_one_and_paraphrase_beats_unrelated(minilm):
    identical, paraphrase, unrelated = bertscore_f1(
        ["The cat sat on the mat.", "A feline was sitting on the rug.", "Stock prices fell sharply on Monday."],
        ["The cat sat on the mat."] * 3,
        minilm,
    )
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > unrelated + 0.3


def test_bertscore_empty_rows_score_zero_in_place(minilm):
    alone = bertscore_f1(["A cat.", "A dog."], ["A small cat.", "A big dog."], minilm)
    predictions = ["A cat.", "", " \n\t", "A dog.", "Text"]
    mixed = bertscore_f1(predictions, ["A small cat.", "x", "y", "A big dog.", " "], minilm)
    assert mixed == pytest.approx([alone[0], 0.0, 0.0, alone[1], 0.0], abs=1e-6)
    assert bertscore_f1(["", ""], ["a", "b"], minilm) == [0.0, 0.0]


def test_bertscore_collapses_whitespace(minilm):
    assert bertscore_f1(["The  cat \n  sat."], ["The cat sat."], minilm) == pytest.approx([1.0], abs=1e-5)


def test_bertscore_idf_weights_come_from_all_references():
    settings = dataclasses.replace(MINILM, idf=True)
    predictions = ["A cat sat.", "The dog ran home.", "Birds sing."]
    references = ["The cat sat.", "A dog ran.", "x y"]
    full = bertscore_f1(predictions, references, settings)
    one_empty = bertscore_f1(predictions[:2] + [""], references, settings)
    assert one_empty == pytest.approx(full[:2] + [0.0], abs=1e-6)
    assert full[0] != pytest.approx(bertscore_f1(predictions, references, MINILM)[0], abs=1e-4)


def test_bertscore_refuses_to_rescale_a_model_without_baseline():
    with pytest.raises(ConfigError, match=r"rescale_with_baseline: .* no English baseline for all-MiniLM-L6-v2"):
        bertscore_f1(["a cat"], ["a cat"], dataclasses.replace(MINILM, rescale_with_baseline=True))


def test_bertscore_description_names_the_model_and_layer_without_paths():
    description = bertscore_description(MINILM)
    assert description["model"] == "all-MiniLM-L6-v2"
    assert (description["num_layers"], description["idf"], description["rescaled"]) == (6, False, False)
    assert description["hash"].startswith("all-MiniLM-L6-v2_L6_no-idf_version=")
    assert "/" not in json.dumps(description) and "site-packages" not in json.dumps(description)
    roberta = default_section("evaluate.bertscore", model="roberta-large", num_layers=17, rescale_with_baseline=True)
    roberta = bertscore_description(roberta)
    assert roberta["hash"].startswith("roberta-large_L17_no-idf_version=")
    assert roberta["hash"].endswith("-rescaled_fast-tokenizer")
    assert description["dtype"] == "float32"  # auto on a CPU


# --- rows and means -----------------------------------------------------------------------------------------------


def test_score_rows_keeps_order_and_zeroes_empty_predictions(minilm):
    predictions = ["Paris is in France.", "", "A dog barked."]
    references = ["Paris is in France.", "Berlin", "The cat sat."]
    rows = score_rows(predictions, references, minilm)
    assert [set(row) for row in rows] == [{"f1", "rougeL", "bertscore_f1"}] * 3
    assert rows[0]["f1"] == rows[0]["rougeL"] == 1.0 and rows[0]["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1] == {"f1": 0.0, "rougeL": 0.0, "bertscore_f1": 0.0}
    assert rows[2]["f1"] == rows[2]["rougeL"] == 0.0 and 0 < rows[2]["bertscore_f1"] < 1


def test_mean_scores_averages_each_metric_and_refuses_no_rows():
    rows = [{"f1": 1.0, "rougeL": 0.5, "bertscore_f1": 0.25}, {"f1": 0.0, "rougeL": 0.25, "bertscore_f1": 0.75}]
    assert mean_scores(rows) == {"f1": 0.5, "rougeL": 0.375, "bertscore_f1": 0.5}
    with pytest.raises(ValueError, match="no rows"):
        mean_scores([])


# --- paired bootstrap ---------------------------------------------------------------------------------------------

A, B = [0.50, 0.60, 0.40, 0.70], [0.40, 0.40, 0.45, 0.40]  # metrics.md: b - a = [-0.1, -0.2, 0.05, -0.3]


def test_paired_bootstrap_on_the_metrics_md_vector():
    result = paired_bootstrap(A, B, samples=2000, seed=0)
    assert result["mean"] == pytest.approx(-0.1375)  # (-0.1 - 0.2 + 0.05 - 0.3) / 4
    assert -0.3 <= result["low"] < result["mean"] < result["high"] <= 0.05  # resampled means stay in the range
    assert set(result) == {"mean", "low", "high"} and all(type(v) is float for v in result.values())


def test_paired_bootstrap_is_seeded_and_matches_the_normal_interval():
    import numpy as np

    rng = np.random.default_rng(7)
    a = rng.uniform(size=400)
    b = a + rng.normal(0.05, 0.2, size=400)  # paired: b - a has sd 0.2, so the 95% half-width is ~1.96 * 0.2 / 20
    result = paired_bootstrap(list(a), list(b), samples=2000, seed=0)
    assert result == paired_bootstrap(list(a), list(b), samples=2000, seed=0)
    assert result != paired_bootstrap(list(a), list(b), samples=2000, seed=1)
    delta = b - a
    half_width = 1.96 * delta.std(ddof=1) / np.sqrt(len(delta))
    assert result["mean"] - result["low"] == pytest.approx(half_width, rel=0.15)
    assert result["high"] - result["mean"] == pytest.approx(half_width, rel=0.15)


def test_paired_bootstrap_degenerate_deltas():
    constant = paired_bootstrap([0.25, 0.5, 0.75], [0.5, 0.75, 1.0], samples=500, seed=3)  # every delta 0.25
    assert constant["low"] == constant["high"] == pytest.approx(constant["mean"]) == pytest.approx(0.25)
    assert paired_bootstrap(A, A, samples=500, seed=3) == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([0.1, 0.2], [0.1], samples=100, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [], samples=100, seed=0)


@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_equals_bert_scores_own_loop(minilm, idf):
    """finetune.evaluation.metrics scores with bert-score's pieces in a faster loop: the numbers must be
    BERTScorer.score's."""
    settings = dataclasses.replace(MINILM, idf=idf, batch_size=3)  # several batches, some sentences repeated
    words = "the a cat dog sat ran on under mat rug quickly slowly red big small house tree river".split()
    rng = random.Random(0)
    predictions = [" ".join(rng.choices(words, k=rng.randint(1, 14))) for _ in range(11)] + ["the cat"]
    references = [" ".join(rng.choices(words, k=rng.randint(1, 14))) for _ in range(11)] + ["the cat"]
    ours = bertscore_f1(predictions, references, settings)
    scorer = metrics._scorer(settings)
    _, _, theirs = scorer.score(predictions, references, batch_size=settings.batch_size)
    assert ours == pytest.approx(theirs.tolist(), abs=1e-6)


def test_bertscore_rescales_with_bert_scores_baseline(minilm, monkeypatch):
    scorer = metrics._scorer(MINILM)
    raw = bertscore_f1(["A cat sat."], ["The cat sat."], MINILM)[0]
    monkeypatch.setattr(scorer, "_rescale_with_baseline", True)
    monkeypatch.setattr(scorer, "_baseline_vals", torch.tensor([0.8, 0.8, 0.8]))
    assert bertscore_f1(["A cat sat."], ["The cat sat."], MINILM)[0] == pytest.approx((raw - 0.8) / 0.2, abs=1e-6)
