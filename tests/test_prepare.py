"""prepare: the length filter's boundary, seeded disjoint splits, byte-identical outputs, counted drops and clear
errors."""

import json
from pathlib import Path

import pytest
import yaml

from finetune.core.errors import DataError
from finetune.data.formats import RELABEL_REASONS, from_dolly
from finetune.data.rows import DROP_REASONS, clean_rows, read_rows, split_examples, split_train_validation_test
from stages import prepare

REPO = Path(__file__).resolve().parents[1]


def dolly_row(i, total_chars=None, category=None):
    instruction, context = f"Question number {i}?", f"Context {i}."
    response = f"Answer {i}."
    if total_chars is not None:
        response = "x" * (total_chars - len(instruction) - len(context))
    return {"instruction": instruction, "context": context, "response": response, "category": category or "open_qa"}


def test_rows_of_2500_characters_or_more_are_dropped_and_2499_kept():
    rows = [dolly_row(1, total_chars=2499), dolly_row(2, total_chars=2500), dolly_row(3, total_chars=4000)]
    cleaned = clean_rows(rows, from_dolly, max_chars=2500)
    assert [e["n_chars"] for e in cleaned.examples] == [2499]
    assert cleaned.dropped == {"too_long": 2}


def test_duplicates_and_non_object_rows_are_counted_not_lost():
    rows = [dolly_row(1), dolly_row(1), ["not", "an", "object"], dolly_row(2)]
    cleaned = clean_rows(rows, from_dolly, max_chars=2500)
    assert cleaned.rows_read == 4 and len(cleaned.examples) == 2
    assert cleaned.dropped == {"duplicate": 1, "wrong_type": 1}


def make_examples(n=200):
    categories = ["open_qa", "closed_qa", "summarization", "brainstorming"]
    rows = [dolly_row(i, category=categories[i % 4]) for i in range(n)]
    return clean_rows(rows, from_dolly, max_chars=2500).examples


def test_split_is_seeded_disjoint_complete_and_stratified():
    examples = make_examples()
    train, test = split_examples(examples, test_size=0.1, seed=42)
    again_train, again_test = split_examples(examples, test_size=0.1, seed=42)
    assert [e["id"] for e in train] == [e["id"] for e in again_train]
    assert [e["id"] for e in test] == [e["id"] for e in again_test]
    assert len(test) == 20 and len(train) == 180
    assert {e["id"] for e in train}.isdisjoint(e["id"] for e in test)
    assert {e["id"] for e in train} | {e["id"] for e in test} == {e["id"] for e in examples}
    assert sorted(e["category"] for e in test).count("open_qa") == 5  # 4 categories x 5 rows
    other_train, _ = split_examples(examples, test_size=0.1, seed=7)
    assert [e["id"] for e in other_train] != [e["id"] for e in train]


def test_the_test_split_is_the_same_whatever_the_validation_size():
    examples = make_examples(200)
    _, no_validation, test = split_train_validation_test(examples, test_size=0.1, validation_size=0, seed=3)
    train, validation, same_test = split_train_validation_test(examples, test_size=0.1, validation_size=0.2, seed=3)
    assert no_validation == [] and same_test == test and len(test) == 20
    assert len(validation) == 36 and len(train) == 144
    ids = [[e["id"] for e in part] for part in (train, validation, test)]
    assert sorted(sum(ids, [])) == sorted(e["id"] for e in examples)  # disjoint and complete


def test_too_few_rows_to_split_is_a_clear_error():
    with pytest.raises(DataError, match=r"cannot split 1 rows with test_size=0\.1"):
        split_examples(make_examples(1), test_size=0.1, seed=0)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with params.yaml pointing at small local sources."""
    monkeypatch.chdir(tmp_path)
    rows = [dolly_row(i, category=["open_qa", "closed_qa"][i % 2]) for i in range(40)]
    rows += [dolly_row(100, total_chars=2600), {"instruction": "x", "context": ""}, dolly_row(3)]
    Path("sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": f"Q{i}?", "chosen": f"Good {i}.", "rejected": f"bad {i}"} for i in range(30)]
    Path("pairs.json").write_text(json.dumps(pairs))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["sft"].update(source="sft.jsonl", format="dolly")
    params["data"]["preferences"].update(source="pairs.json", format="pairs")
    Path("params.yaml").write_text(yaml.safe_dump(params))
    return params


def run_prepare_failing(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        prepare.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_prepare_writes_splits_and_metrics_identically_on_rerun(project):
    prepare.main()
    out = Path("data/prepared")
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [
        "preferences_test.jsonl",
        "preferences_train.jsonl",
        "preferences_validation.jsonl",
        "sft_test.jsonl",
        "sft_train.jsonl",
        "sft_validation.jsonl",
    ]
    first = {f.name: f.read_bytes() for f in files}
    metrics = json.loads(Path("metrics/data.json").read_text())
    sft = metrics["sft"]
    assert sft["rows_read"] == 43 and sft["kept"] == 40
    assert sft["dropped"] == {reason: 0 for reason in DROP_REASONS} | {
        "too_long": 1,
        "missing_field": 1,
        "duplicate": 1,
        "total": 3,
    }
    # 10% of the 40 kept rows are the test split; 10% of the other 36, the validation split.
    assert (sft["train"], sft["validation"], sft["test"]) == (32, 4, 4)
    assert sft["categories"] == {
        "closed_qa": {"train": 16, "validation": 2, "test": 2},
        "open_qa": {"train": 16, "validation": 2, "test": 2},
    }
    assert sft["relabelled"] == {reason: 0 for reason in RELABEL_REASONS} | {"total": 0}
    assert metrics["preferences"]["kept"] == 30
    record = json.loads((out / "sft_train.jsonl").read_text().splitlines()[0])
    assert list(record) == ["id", "category", "prompt", "completion"]

    prepare.main()
    assert {f.name: f.read_bytes() for f in sorted(out.iterdir())} == first


def test_rows_without_a_category_are_kept_as_general_and_counted(project):
    rows = [json.loads(line) for line in Path("sft.jsonl").read_text().splitlines()]
    for row in rows[:6]:
        del row["category"]
    rows[6]["category"] = None
    Path("sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepare.main()
    sft = json.loads(Path("metrics/data.json").read_text())["sft"]
    assert sft["kept"] == 40 and sft["dropped"]["total"] == 3
    assert sft["relabelled"] == {"category_missing": 7, "category_wrong_type": 0, "total": 7}
    general = sft["categories"]["general"]
    assert general["train"] + general["validation"] + general["test"] == 7
    assert sft["rows_read"] == sft["kept"] + sft["dropped"]["total"]


def test_a_jsonl_file_holding_one_array_stops_prepare_with_one_line(project, capsys):
    rows = [json.loads(line) for line in Path("sft.jsonl").read_text().splitlines()]
    Path("sft.jsonl").write_text(json.dumps(rows, indent=2))
    assert run_prepare_failing(capsys) == (
        "error: sft.jsonl: this .jsonl file holds one JSON array; save it as .json or one object per line"
    )


def test_corrupt_json_line_names_the_file_and_line(project, capsys):
    lines = Path("sft.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-5]
    Path("sft.jsonl").write_text("\n".join(lines) + "\n")
    assert "sft.jsonl:7: invalid JSON" in run_prepare_failing(capsys)


def test_missing_file_is_one_clear_line(project, capsys):
    Path("sft.jsonl").unlink()
    assert run_prepare_failing(capsys) == "error: sft.jsonl: file not found"


def test_unknown_format_is_one_clear_line(project, capsys):
    project["data"]["sft"]["format"] = "csv"
    Path("params.yaml").write_text(yaml.safe_dump(project))
    assert "data.sft.format: must be one of" in run_prepare_failing(capsys)


def test_dataset_empty_after_filtering_is_one_clear_line(project, capsys):
    project["data"]["max_chars"] = 5
    Path("params.yaml").write_text(yaml.safe_dump(project))
    err = run_prepare_failing(capsys)
    assert "data.sft.source sft.jsonl: no usable rows (read 43; dropped: too_long 42, missing_field 1)" in err


def test_unreachable_hub_dataset_is_one_clear_line(project, capsys, monkeypatch):
    import datasets
    import huggingface_hub

    # The hub clients read HF_HUB_OFFLINE at import; offline mode makes them fail at once instead of retrying.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    project["data"]["sft"]["source"] = "someone/no-such-dataset"
    Path("params.yaml").write_text(yaml.safe_dump(project))
    err = run_prepare_failing(capsys)
    assert err.startswith("error: someone/no-such-dataset: cannot load this hub dataset (split 'train')")


def test_hub_sources_go_through_datasets_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return [{"instruction": "Hi", "context": "", "response": "Hello"}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_rows("databricks/databricks-dolly-15k", "train", "bdd27f4d")
    assert calls == [("databricks/databricks-dolly-15k", "train", "bdd27f4d")]
    assert clean_rows(rows, from_dolly, 2500).examples[0]["completion"][0]["content"] == "Hello"


def test_the_validation_split_comes_from_the_train_rows_and_leaves_the_test_split_alone(project):
    import yaml

    def split_ids(name):
        return {json.loads(line)["id"] for line in (Path("data/prepared") / name).read_text().splitlines()}

    prepare.main()
    test, train = split_ids("sft_test.jsonl"), split_ids("sft_train.jsonl")
    validation = split_ids("sft_validation.jsonl")
    assert validation and not validation & train and not validation & test
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"]["validation_size"] = 0
    Path("params.yaml").write_text(yaml.safe_dump(params))
    prepare.main()
    assert split_ids("sft_test.jsonl") == test  # settings are chosen on validation, never on what test holds
    assert split_ids("sft_train.jsonl") == train | validation
    assert Path("data/prepared/sft_validation.jsonl").read_text() == ""
