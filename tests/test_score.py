"""score CLI: one JSON object on stdout with means, per-row scores in order and per-category means; bad input is one
`error: FILE:LINE: ...` line on stderr and exit status 2.

    python -m pytest tests/test_score.py -q
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.evaluation.metrics import token_f1
from finetune.tools import score

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path) -> Path:
    return Path(shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml"))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


ROWS = [
    {"prediction": "Paris is in France.", "reference": "Paris is in France.", "category": "qa"},
    {"prediction": "", "reference": "Berlin is in Germany.", "category": "qa"},
    {"prediction": "The river flows north.", "reference": "A river flows to the north.", "category": "summary"},
    {"prediction": "Three cats.", "reference": "Two dogs.", "category": None},
    {"prediction": "Blue.", "reference": "The sky is blue."},
]


def test_scores_rows_in_order_with_means_and_categories(tmp_path, params, capsys):
    lines = [json.dumps(row) for row in ROWS]
    lines.insert(2, "")  # blank lines are skipped
    answers = write_lines(tmp_path / "answers.jsonl", lines)
    score.main([str(answers), "--params", str(params)])
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout holds the JSON object and nothing else
    assert "scoring 5 rows" in err

    assert result["n"] == 5
    per_row = result["per_row"]
    assert [row["f1"] for row in per_row] == pytest.approx([token_f1(r["prediction"], r["reference"]) for r in ROWS])
    assert per_row[0]["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    assert per_row[1] == {"f1": 0.0, "rougeL": 0.0, "bertscore_f1": 0.0}
    for key in ("f1", "rougeL", "bertscore_f1"):
        assert result[key] == pytest.approx(sum(row[key] for row in per_row) / 5)

    # rows without a category (missing or null) count overall but in no category
    assert list(result["categories"]) == ["qa", "summary"]
    qa = result["categories"]["qa"]
    assert qa["n"] == 2 and qa["f1"] == pytest.approx(0.5) and qa["bertscore_f1"] == pytest.approx(0.5, abs=1e-5)
    assert result["categories"]["summary"] == {"n": 1, **per_row[2]}
    assert result["bertscore"]["model"] == "all-MiniLM-L6-v2" and result["bertscore"]["num_layers"] == 6


def test_runs_as_a_module_with_only_json_on_stdout(tmp_path, params):
    answers = write_lines(tmp_path / "answers.jsonl", [json.dumps(ROWS[0])])
    done = subprocess.run(
        [sys.executable, "-m", "finetune.tools.score", str(answers), "--params", str(params)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout)["f1"] == 1.0


def expect_error(capsys, argv, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        score.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(ROWS[0]), "{not json"], "{file}:2: invalid JSON (Expecting property name"),
        (['{"prediction": "a"'], "{file}:1: invalid JSON (Expecting ',' delimiter, column 19)"),
        (["", json.dumps(ROWS[0]), "[1, 2]"], "{file}:3: row is an array, expected an object"),
        (['"just text"'], "{file}:1: row is a string, expected an object"),
        (['{"prediction": "a"}'], "{file}:1: missing field 'reference'"),
        (['{"reference": "a"}'], "{file}:1: missing field 'prediction'"),
        (['{"prediction": 3, "reference": "a"}'], "{file}:1: field 'prediction' is a number, expected a string"),
        (['{"prediction": "a", "reference": null}'], "{file}:1: field 'reference' is null, expected a string"),
        (['{"prediction": "a", "reference": "b", "category": ["x"]}'], "{file}:1: field 'category' is an array"),
        ([], "{file}: empty file"),
        (["", "   "], "{file}: empty file"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, params, capsys, lines, message):
    answers = write_lines(tmp_path / "answers.jsonl", lines)
    expect_error(capsys, [str(answers), "--params", str(params)], message.format(file=answers))


def test_text_that_is_not_utf8_names_its_line(tmp_path, params, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prediction": "caf\xe9"}\n')
    expect_error(capsys, [str(answers), "--params", str(params)], f"{answers}:2: not UTF-8 text")


def test_missing_file_is_named(tmp_path, params, capsys):
    missing = tmp_path / "nowhere.jsonl"
    expect_error(capsys, [str(missing), "--params", str(params)], f"{missing}: file not found")
