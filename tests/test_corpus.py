"""The embedded default data: deterministic, in the real datasets' schemas, with the planned flaws, and consistent."""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from finetune.embedded.corpus import (
    DOLLY_CATEGORIES,
    REJECTED_KINDS,
    _labelled_preference_rows,
    make_dolly_rows,
    make_pretraining_text,
    make_ultrafeedback_rows,
)

SEED, N_ROWS = 0, 3000
DOLLY_KEYS = ("instruction", "context", "response", "category")
UF_KEYS = ("prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected", "category")
CONTEXT_CATEGORIES = {"closed_qa", "information_extraction", "summarization"}


@pytest.fixture(scope="module")
def dolly() -> list[dict]:
    return make_dolly_rows(SEED, N_ROWS)


@pytest.fixture(scope="module")
def labelled_pairs() -> list[tuple[dict, str]]:
    return _labelled_preference_rows(SEED, N_ROWS)


@pytest.fixture(scope="module")
def prose() -> list[str]:
    return make_pretraining_text(SEED)


def is_valid_dolly(row: dict) -> bool:
    return (tuple(row) == DOLLY_KEYS and all(isinstance(row[key], str) for key in DOLLY_KEYS)
            and bool(row["instruction"].strip()) and bool(row["response"].strip()))


def chars(row: dict) -> int:
    return len(row["instruction"]) + len(row["context"]) + len(row["response"])


def normal_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if is_valid_dolly(row) and chars(row) < 2300]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_same_seed_same_output_and_other_seed_other_output():
    assert make_dolly_rows(3, 400) == make_dolly_rows(3, 400)
    assert make_ultrafeedback_rows(3, 400) == make_ultrafeedback_rows(3, 400)
    assert make_pretraining_text(3) == make_pretraining_text(3)
    assert make_dolly_rows(3, 400) != make_dolly_rows(4, 400)
    assert make_ultrafeedback_rows(3, 400) != make_ultrafeedback_rows(4, 400)
    assert make_pretraining_text(3) != make_pretraining_text(4)


def test_output_does_not_depend_on_string_hashing():
    # Set iteration order changes with PYTHONHASHSEED; the data must not.
    code = ("import hashlib, json; from finetune.embedded.corpus import *; print(hashlib.sha256(json.dumps("
            "[make_dolly_rows(5, 300), make_ultrafeedback_rows(5, 300), make_pretraining_text(5)])"
            ".encode()).hexdigest())")
    root = Path(__file__).resolve().parents[1]
    digests = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout for hash_seed in ("1", "2")}
    assert len(digests) == 1


@pytest.mark.parametrize("n_rows", [0, 1, 37, 99, 100, 1001])
def test_exact_row_counts(n_rows):
    assert len(make_dolly_rows(SEED, n_rows)) == n_rows
    assert len(make_ultrafeedback_rows(SEED, n_rows)) == n_rows


def test_small_sets_are_all_valid_and_normal():
    rows = make_dolly_rows(SEED, 99)
    assert all(is_valid_dolly(row) and chars(row) <= 600 for row in rows)


def test_every_category_has_a_fair_share(dolly):
    counts = Counter(row["category"] for row in dolly if is_valid_dolly(row))
    assert set(counts) == set(DOLLY_CATEGORIES)
    assert min(counts.values()) >= 0.08 * N_ROWS


def test_valid_rows_are_well_formed(dolly):
    for row in filter(is_valid_dolly, dolly):
        assert row["category"] in DOLLY_CATEGORIES
        assert bool(row["context"]) == (row["category"] in CONTEXT_CATEGORIES)
        assert row["response"].endswith(".") and row["response"] == row["response"].strip()


def test_long_and_near_limit_rows(dolly):
    lengths = [chars(row) for row in dolly if is_valid_dolly(row)]
    assert sum(n >= 2500 for n in lengths) >= max(3, N_ROWS // 100)
    assert sum(2300 <= n < 2500 for n in lengths) >= 2


def test_normal_rows_are_short(dolly):
    lengths = [chars(row) for row in normal_rows(dolly)]
    assert max(lengths) <= 600
    assert sum(60 <= n for n in lengths) >= 0.9 * len(lengths)


def test_every_invalid_kind_is_present(dolly):
    missing = [row for row in dolly if set(row) != set(DOLLY_KEYS)]
    wrong_type = [row for row in dolly if not all(isinstance(v, str) for v in row.values())]
    empty = [row for row in dolly if set(row) == set(DOLLY_KEYS) and all(isinstance(v, str) for v in row.values())
             and not (row["instruction"].strip() and row["response"].strip())]
    seen, duplicates = set(), 0
    for row in filter(is_valid_dolly, dolly):
        key = json.dumps(row)
        duplicates += key in seen
        seen.add(key)
    assert missing and wrong_type and empty and duplicates
    assert len(missing) + len(wrong_type) + len(empty) + duplicates >= max(4, N_ROWS // 100)


def test_test_prompts_are_not_copies_of_train_prompts(dolly):
    rows = list({json.dumps(row): row for row in normal_rows(dolly)}.values())  # prepare drops exact duplicates
    random.Random(42).shuffle(rows)
    cut = int(0.9 * len(rows))
    train = {(row["instruction"], row["context"]) for row in rows[:cut]}
    copies = sum((row["instruction"], row["context"]) in train for row in rows[cut:])
    assert copies <= 0.01 * (len(rows) - cut)


def test_preference_rows_follow_the_ultrafeedback_schema(labelled_pairs):
    valid = [row for row, kind in labelled_pairs if kind in REJECTED_KINDS]
    assert len(valid) >= 0.98 * N_ROWS
    for row in valid:
        assert tuple(row) == UF_KEYS
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
        user = {"role": "user", "content": row["prompt"]}
        assert row["chosen"][0] == row["rejected"][0] == user
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["user", "assistant"]
        assert row["chosen"][1]["content"].strip() and row["rejected"][1]["content"].strip()
        assert row["messages"] == row["chosen"] and row["chosen"] != row["rejected"]
        assert isinstance(row["score_chosen"], float) and isinstance(row["score_rejected"], float)
        assert row["score_chosen"] > row["score_rejected"]
        assert row["category"] in DOLLY_CATEGORIES
    assert len({row["prompt_id"] for row in valid}) == len(valid)  # the loader drops repeated ids
    assert {row["category"] for row in valid} == set(DOLLY_CATEGORIES)


def test_every_rejected_kind_and_invalid_kind_is_present(labelled_pairs):
    kinds = Counter(kind for _, kind in labelled_pairs)
    assert all(kinds[kind] >= 0.3 * N_ROWS for kind in REJECTED_KINDS)
    assert {"missing_rejected", "chosen_not_a_list", "empty_assistant"} <= set(kinds)
    broken = [row for row, kind in labelled_pairs if kind not in REJECTED_KINDS]
    assert all("rejected" not in row or not isinstance(row["chosen"], list) or not row["chosen"][1]["content"]
               for row in broken)
    verbose = [row for row, kind in labelled_pairs if kind == "verbose"]
    for row in verbose:
        answer, padded = row["chosen"][1]["content"], row["rejected"][1]["content"]
        assert answer in padded and len(padded) >= 2 * len(answer)


def test_public_pairs_are_the_labelled_pairs(labelled_pairs):
    assert make_ultrafeedback_rows(SEED, N_ROWS) == [row for row, _ in labelled_pairs]


def test_pairs_draw_other_prompts_than_the_instruction_rows(dolly, labelled_pairs):
    dolly_prompts = {f"{row['instruction']}\n\n{row['context']}" if row["context"] else row["instruction"]
                     for row in normal_rows(dolly)}
    shared = sum(row["prompt"] in dolly_prompts for row, kind in labelled_pairs if kind in REJECTED_KINDS)
    assert shared <= 0.05 * N_ROWS


def test_facts_agree_across_rows_pairs_and_prose(dolly, labelled_pairs, prose):
    texts = [row[key] for row in normal_rows(dolly) for key in ("context", "response")]
    texts += [row["chosen"][1]["content"] for row, kind in labelled_pairs if kind in REJECTED_KINDS]
    texts += [row["prompt"] for row, kind in labelled_pairs if kind in REJECTED_KINDS]
    texts += prose
    name = r"([A-Z][a-z]+ [A-Z][a-z]+)"
    for pattern in (name + r" is (\d+) years old", name + r", aged (\d+)", name + r" lives in ([A-Z][a-z]+)"):
        stated = defaultdict(set)
        for text in texts:
            for person, value in re.findall(pattern, text):
                stated[person].add(value)
        assert len(stated) >= 80
        assert all(len(values) == 1 for values in stated.values()), pattern


def test_prose_has_no_instruction_or_dialogue_structure(prose):
    text = "\n".join(prose)
    assert "[INST]" not in text and "?" not in text
    assert not re.search(r"^\s*(Q|A|Question|Answer|User|Assistant|Instruction|Response)\s*:", text, re.MULTILINE)
    assert 50_000 < len(text.encode("utf-8")) < 400_000


def test_prose_covers_the_words_of_the_answers(dolly, prose):
    answer_words = set().union(*(words(row["response"]) for row in normal_rows(dolly)))
    assert answer_words <= words(" ".join(prose))
