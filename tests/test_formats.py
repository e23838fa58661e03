"""Each source adapter, fed a small local file in its own schema, yields TRL conversational examples."""

import json

import pytest

from finetune.core.errors import DataError
from finetune.data.formats import (
    DEFAULT_CATEGORY,
    PREFERENCE_FORMATS,
    RELABELLED,
    SFT_FORMATS,
    InvalidRow,
    from_dolly,
    from_lima,
    from_messages,
    from_text,
    from_ultrafeedback,
    parse_inst_text,
    with_system_prompt,
)
from finetune.data.rows import clean_rows, read_rows


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def load_file(tmp_path, rows, fmt, suffix=".jsonl"):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    adapter = {**SFT_FORMATS, **PREFERENCE_FORMATS}[fmt]
    return clean_rows(read_rows(str(path)), adapter, max_chars=2500)


def test_dolly_folds_the_context_into_the_user_turn_and_keeps_the_category(tmp_path):
    rows = [
        {"instruction": "How old is Ana?", "context": "Ana is 30.", "response": "Ana is 30.", "category": "closed_qa"},
        {"instruction": "Name a fruit.", "context": "", "response": "A pear.", "category": "open_qa"},
    ]
    cleaned = load_file(tmp_path, rows, "dolly")
    first, second = cleaned.examples
    assert first["prompt"] == [user("How old is Ana?\n\nAna is 30.")]
    assert first["completion"] == [assistant("Ana is 30.")]
    assert first["category"] == "closed_qa"
    assert first["n_chars"] == len("How old is Ana?") + len("Ana is 30.") * 2
    assert second["prompt"] == [user("Name a fruit.")]


def test_alpaca_from_json_with_input_and_a_fixed_system_prompt(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    cleaned = load_file(tmp_path, rows, "alpaca", suffix=".json")
    (example,) = cleaned.examples
    assert example["prompt"] == [user("Add the numbers.\n\n2 and 3")]
    assert example["category"] == "general"
    system = "You are a helpful assistant. Please follow the instruction and provide a helpful response."
    with_system = with_system_prompt(example, system)
    assert with_system["prompt"][0] == {"role": "system", "content": system}
    assert with_system_prompt(with_system, "another")["prompt"] == with_system["prompt"]


def test_text_rows_in_mistral_inst_form_are_parsed_into_turns(tmp_path):
    rows = [
        {"text": "<s>[INST]  What year is it? [/INST]  It is 2068. </s>"},
        {"text": "<s>[INST] Hi [/INST] Hello </s>[INST] And you? [/INST] Fine. </s>"},
        {"text": "no instruction markers here"},
    ]
    cleaned = load_file(tmp_path, rows, "text", suffix=".parquet")
    single, multi = cleaned.examples
    assert single["prompt"] == [user("What year is it?")]
    assert single["completion"] == [assistant("It is 2068.")]
    assert multi["prompt"] == [user("Hi"), assistant("Hello"), user("And you?")]
    assert multi["completion"] == [assistant("Fine.")]
    assert cleaned.dropped == {"malformed": 1}


def test_llama_style_system_block_becomes_a_system_turn():
    turns = parse_inst_text("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s>")
    assert turns == [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello")]


def test_messages_rows_train_on_the_last_assistant_turn(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello!")]},
        {"messages": [user("Hi"), user("Again")]},
    ]
    cleaned = load_file(tmp_path, rows, "messages")
    (example,) = cleaned.examples
    assert example["prompt"][0]["role"] == "system" and example["completion"] == [assistant("Hello!")]
    assert cleaned.dropped == {"malformed": 1}


def test_lima_conversations_alternate_user_and_assistant(tmp_path):
    rows = [
        {"conversations": ["Why is the sky blue?", "Scattering.", "More?", "Rayleigh scattering."], "source": "wiki"},
        {"conversations": ["A question with no answer"], "source": "wiki"},
    ]
    cleaned = load_file(tmp_path, rows, "lima")
    (example,) = cleaned.examples
    assert example["prompt"] == [user("Why is the sky blue?"), assistant("Scattering."), user("More?")]
    assert example["completion"] == [assistant("Rayleigh scattering.")]
    assert example["category"] == "wiki"
    assert cleaned.dropped == {"malformed": 1}


def ultrafeedback_row(prompt="Which is larger, 3 or 9?", chosen="9 is larger than 3.", rejected="3."):
    return {
        "prompt": prompt,
        "prompt_id": "abc123",
        "chosen": [user(prompt), assistant(chosen)],
        "rejected": [user(prompt), assistant(rejected)],
        "messages": [user(prompt), assistant(chosen)],
        "score_chosen": 9.0,
        "score_rejected": 3,
    }


def test_ultrafeedback_rows_become_prompt_chosen_rejected(tmp_path):
    cleaned = load_file(tmp_path, [ultrafeedback_row()], "ultrafeedback")
    (example,) = cleaned.examples
    assert example["id"] == "abc123"
    assert example["prompt"] == [user("Which is larger, 3 or 9?")]
    assert example["chosen"] == [assistant("9 is larger than 3.")]
    assert example["rejected"] == [assistant("3.")]
    assert (example["score_chosen"], example["score_rejected"]) == (9.0, 3.0)


def test_pairs_format_takes_plain_strings(tmp_path):
    cleaned = load_file(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}], "pairs")
    (example,) = cleaned.examples
    assert example["prompt"] == [user("2+2?")] and example["chosen"] == [assistant("4")]
    assert len(example["id"]) == 16


@pytest.mark.parametrize(
    "adapter, row, reason",
    [
        (from_dolly, {"instruction": "Hi", "context": ""}, "missing_field"),
        (from_dolly, {"instruction": "  ", "context": "", "response": "x"}, "empty_field"),
        (from_dolly, {"instruction": "Hi", "context": "", "response": 42}, "wrong_type"),
        (from_text, {"text": ["not", "a", "string"]}, "wrong_type"),
        (from_messages, {"messages": "Hi"}, "wrong_type"),
        (from_messages, {"messages": [user("Hi"), {"role": "robot", "content": "x"}]}, "malformed"),
        (from_lima, {"conversations": ["Q", ""]}, "empty_field"),
        (from_ultrafeedback, {k: v for k, v in ultrafeedback_row().items() if k != "rejected"}, "missing_field"),
        (from_ultrafeedback, ultrafeedback_row(rejected="9 is larger than 3."), "malformed"),
        (from_ultrafeedback, {**ultrafeedback_row(), "chosen": [user("x"), assistant("")]}, "empty_field"),
    ],
)
def test_unusable_rows_raise_a_counted_reason(adapter, row, reason):
    with pytest.raises(InvalidRow) as invalid:
        adapter(row)
    assert invalid.value.reason == reason


def test_ids_are_stable_content_hashes_when_the_source_has_none():
    row = {"instruction": "Hi", "context": "", "response": "Hello"}
    assert from_dolly(row)["id"] == from_dolly(dict(row))["id"]
    assert from_dolly(row)["id"] != from_dolly({**row, "response": "Hey"})["id"]
    assert from_dolly({**row, "id": 7})["id"] == "7"


DOLLY_ROWS = [
    {"instruction": "Name a fruit.", "context": "", "response": "A pear.", "category": "open_qa"},
    {"instruction": "Name a tree.", "context": "", "response": "An oak.", "category": "open_qa"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_files_with_a_byte_order_mark_are_read(tmp_path, suffix):
    path = tmp_path / f"bom{suffix}"
    text = "".join(json.dumps(row) + "\n" for row in DOLLY_ROWS) if suffix == ".jsonl" else json.dumps(DOLLY_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what Notepad and Excel write
    cleaned = clean_rows(read_rows(str(path)), from_dolly, max_chars=2500)
    assert [e["completion"][0]["content"] for e in cleaned.examples] == ["A pear.", "An oak."]
    assert cleaned.dropped == {}


@pytest.mark.parametrize("indent", [None, 2], ids=["one line", "pretty-printed"])
def test_a_jsonl_file_holding_one_json_array_is_one_clear_line(tmp_path, indent):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(DOLLY_ROWS, indent=indent) + "\n")
    with pytest.raises(DataError) as error:
        list(read_rows(str(path)))
    assert str(error.value) == (
        f"{path}: this .jsonl file holds one JSON array; save it as .json or one object per line"
    )


def test_jsonl_rows_that_are_arrays_are_rows_counted_as_wrong_type(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('["a", "b"]\n' + json.dumps(DOLLY_ROWS[0]) + "\n")
    cleaned = clean_rows(read_rows(str(path)), from_dolly, max_chars=2500)
    assert len(cleaned.examples) == 1 and cleaned.dropped == {"wrong_type": 1}


@pytest.mark.parametrize(
    "category, reason",
    [(None, "category_missing"), ("", "category_missing"), ("  ", "category_missing"), (7, "category_wrong_type")],
)
def test_an_unusable_category_is_relabelled_and_the_adapter_says_why(category, reason):
    row = {"instruction": "Hi", "context": "", "response": "Hello", "category": category}
    example = from_dolly(row)
    assert (example["category"], example[RELABELLED]) == (DEFAULT_CATEGORY, reason)
    absent = from_dolly({k: v for k, v in row.items() if k != "category"})
    assert absent[RELABELLED] == "category_missing"
    assert RELABELLED not in from_dolly({**row, "category": "open_qa"})


def test_relabelled_categories_are_counted_for_kept_rows_only_and_not_written(tmp_path):
    rows = [
        {"instruction": "A?", "context": "", "response": "a", "category": "open_qa"},
        {"instruction": "B?", "context": "", "response": "b"},
        {"instruction": "C?", "context": "", "response": "c", "category": None},
        {"instruction": "D?", "context": "", "response": "d", "category": ["x"]},
        {"instruction": "B?", "context": "", "response": "b", "category": None},  # a duplicate: dropped, not counted
    ]
    cleaned = load_file(tmp_path, rows, "dolly")
    assert [e["category"] for e in cleaned.examples] == ["open_qa", "general", "general", "general"]
    assert cleaned.relabelled == {"category_missing": 2, "category_wrong_type": 1}
    assert cleaned.dropped == {"duplicate": 1}
    assert all(RELABELLED not in example for example in cleaned.examples)
    preferences = load_file(tmp_path, [ultrafeedback_row()], "ultrafeedback")
    assert preferences.relabelled == {"category_missing": 1}
    lima = load_file(tmp_path, [{"conversations": ["Q", "A"]}], "lima")  # LIMA's category is its `source`
    assert lima.relabelled == {"category_missing": 1}
