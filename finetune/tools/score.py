"""score: token F1, ROUGE-L and BERTScore of a JSONL file of predictions against references, as one JSON object.

Each line is an object with string fields `prediction` and `reference`, and optionally `category` (a string, or
null for none). BERTScore settings come from params `evaluate.bertscore`. Only the JSON goes to stdout (logs go to
stderr), so it can be piped:

    python -m finetune.tools.score answers.jsonl [--params params.yaml] | jq '.categories'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finetune.core.config import PARAMS_FILE, load_config
from finetune.core.errors import DataError, exit_on_error
from finetune.evaluation.metrics import bertscore_description, mean_scores, score_rows

TEXT_FIELDS = ("prediction", "reference")
JSON_TYPES = {
    dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"
}


def _json_type(value: Any) -> str:
    return "null" if value is None else JSON_TYPES[type(value)]


def _checked(row: Any, where: str) -> dict[str, Any]:
    """`row` if it is an object with string `prediction` and `reference` and a string or null `category`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is {_json_type(row)}, expected an object")
    for key in TEXT_FIELDS:
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
    for key in (*TEXT_FIELDS, "category"):
        value = row.get(key)
        if not isinstance(value, str) and not (key == "category" and value is None):
            raise DataError(f"{where}: field '{key}' is {_json_type(value)}, expected a string")
    return row


def _parsed(line: bytes, where: str) -> Any:
    try:
        # without its newline, a cut-off row is reported at its end instead of at "column 1" of a next line
        return json.loads(line.decode("utf-8").rstrip())
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: invalid JSON ({error.msg}, column {error.colno})") from None


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """The checked rows of a JSONL file, blank lines skipped; an error names the file and the line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open("rb") as lines:  # bytes, so that text which is not UTF-8 is reported with its line number
        for number, line in enumerate(lines, start=1):
            if line.strip():
                where = f"{path}:{number}"
                rows.append(_checked(_parsed(line, where), where))
    if not rows:
        raise DataError(f"{path}: empty file, expected one JSON object per line with 'prediction' and 'reference'")
    return rows


def summarize(rows: list[dict[str, Any]], scores: list[dict[str, float]], bertscore: dict[str, Any]) -> dict[str, Any]:
    """Overall means, the settings behind BERTScore, every row's scores and the means per category."""
    by_category: dict[str, list[dict[str, float]]] = {}
    for row, row_scores in zip(rows, scores, strict=True):
        if row.get("category") is not None:
            by_category.setdefault(row["category"], []).append(row_scores)
    return {
        "n": len(scores),
        **mean_scores(scores),
        "bertscore": bertscore,
        "per_row": scores,
        "categories": {name: {"n": len(group), **mean_scores(group)} for name, group in sorted(by_category.items())},
    }


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m finetune.tools.score", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="JSONL rows with 'prediction', 'reference' and optional 'category'")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file to read evaluate.bertscore from")
    args = parser.parse_args(argv)
    settings = load_config(args.params).evaluate.bertscore
    rows = read_pairs(args.file)
    bertscore = bertscore_description(settings)
    print(f"scoring {len(rows)} rows (BERTScore {bertscore['model']}, layer {settings.num_layers})", file=sys.stderr)
    scores = score_rows([row["prediction"] for row in rows], [row["reference"] for row in rows], settings)
    print(json.dumps(summarize(rows, scores, bertscore), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
