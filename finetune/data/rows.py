"""Reading sources, cleaning rows, splitting and writing the prepared datasets.

Local JSON/JSONL files are read line by line here rather than by `datasets`: Arrow needs one type per column, so a
single malformed row would abort the whole load, while we want to count it and go on, and to name the line of a
corrupt record. They are UTF-8, with or without a byte-order mark (Windows editors write one). Parquet files and hub
datasets go through `datasets.load_dataset`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from finetune.core.errors import DataError
from finetune.data.formats import (
    REASONS,
    RELABEL_REASONS,
    RELABELLED,
    WRONG_TYPE,
    Example,
    InvalidRow,
    with_system_prompt,
)

TOO_LONG = "too_long"
DUPLICATE = "duplicate"
DUPLICATE_ID = "duplicate_id"
DROP_REASONS = (TOO_LONG, *REASONS, DUPLICATE, DUPLICATE_ID)

# The files prepare writes inside paths.prepared; later stages read them by these names.
SFT_TRAIN, SFT_TEST = "sft_train.jsonl", "sft_test.jsonl"
PREFERENCES_TRAIN, PREFERENCES_TEST = "preferences_train.jsonl", "preferences_test.jsonl"
# Carved from the train rows (data.validation_size): eval loss during training, and where settings are chosen.
SFT_VALIDATION, PREFERENCES_VALIDATION = "sft_validation.jsonl", "preferences_validation.jsonl"
HELD_OUT = {"test": (SFT_TEST, PREFERENCES_TEST), "validation": (SFT_VALIDATION, PREFERENCES_VALIDATION)}
# The file stage preference_data writes inside paths.preference_data, which dpo reads with dpo.source: generated.
GENERATED_PAIRS = "pairs.jsonl"

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def is_local_source(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or Path(source).exists()


# utf-8-sig reads UTF-8 and drops a leading byte-order mark, which json.loads would reject.
ENCODING = "utf-8-sig"


def _holds_one_array(path: Path, first_line: str) -> bool:
    """Whether a .jsonl file whose first record starts with '[' is one JSON array (a .json file misnamed), rather than
    JSON Lines whose rows are arrays (those are read, and counted as wrong_type)."""
    try:
        json.loads(first_line)
    except json.JSONDecodeError:
        return True  # '[' alone, or the first items of a pretty-printed array
    try:
        return isinstance(json.loads(path.read_text(encoding=ENCODING)), list)
    except json.JSONDecodeError:
        return False


def _read_jsonl(path: Path) -> Iterator[Any]:
    with path.open(encoding=ENCODING) as lines:
        first = True
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("[") and _holds_one_array(path, line):
                raise DataError(
                    f"{path}: this .jsonl file holds one JSON array; save it as .json or one object per line"
                )
            first = False
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: invalid JSON ({error.msg}, column {error.colno})") from None


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding=ENCODING))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
    return data


def read_rows(source: str, split: str = "train", revision: str | None = None) -> Iterable[Any]:
    """The raw rows of a local file or of a hub dataset split."""
    if is_local_source(source):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".json":
            return _read_json(path)
        if path.suffix == ".parquet":
            import datasets

            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        raise DataError(f"{source}: unsupported file type (use one of {', '.join(LOCAL_SUFFIXES)})")
    return _load_hub_dataset(source, split, revision)


def _load_hub_dataset(name: str, split: str, revision: str | None) -> Iterable[Any]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split, revision=revision)
    except Exception as error:  # the hub client raises many types; the user needs one line either way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = f"split '{split}'" + (f", revision '{revision}'" if revision else "")
        raise DataError(f"{name}: cannot load this hub dataset ({where}): {reason}") from None


@dataclass
class Cleaned:
    """The usable examples of a source, the count of every row dropped by reason, and of every kept row whose
    category was replaced by the default one (formats.RELABEL_REASONS)."""

    examples: list[Example]
    rows_read: int
    dropped: Counter = field(default_factory=Counter)
    relabelled: Counter = field(default_factory=Counter)


def _dedup_key(example: Example) -> str:
    """The conversation itself: the same exchange under another id or category is still a duplicate."""
    content = {k: v for k, v in example.items() if k not in ("id", "category", "n_chars")}
    return json.dumps(content, ensure_ascii=False, sort_keys=True)


def clean_rows(
    rows: Iterable[Any],
    adapter: Callable[[Mapping], Example],
    max_chars: int,
    system_prompt: str | None = None,
) -> Cleaned:
    """Adapt every row; drop (and count) invalid, too long and duplicate rows, and count the kept rows whose category
    was relabelled. Keeps the input order."""
    cleaned = Cleaned(examples=[], rows_read=0)
    seen_content: set[str] = set()
    seen_ids: set[str] = set()
    for row in tqdm(rows, desc="rows", unit="row", leave=False, disable=None):
        cleaned.rows_read += 1
        try:
            if not isinstance(row, Mapping):
                raise InvalidRow(WRONG_TYPE, f"row is {type(row).__name__}, expected an object")
            example = adapter(row)
        except InvalidRow as invalid:
            cleaned.dropped[invalid.reason] += 1
            continue
        relabelled = example.pop(RELABELLED, None)
        if example["n_chars"] >= max_chars:
            cleaned.dropped[TOO_LONG] += 1
            continue
        key = _dedup_key(example)
        if key in seen_content:
            cleaned.dropped[DUPLICATE] += 1
            continue
        if example["id"] in seen_ids:
            cleaned.dropped[DUPLICATE_ID] += 1
            continue
        seen_content.add(key)
        seen_ids.add(example["id"])
        if relabelled:
            cleaned.relabelled[relabelled] += 1
        cleaned.examples.append(with_system_prompt(example, system_prompt))
    return cleaned


def split_examples(examples: list[Example], test_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded train/test split, stratified by category where every category can appear on both sides."""
    from sklearn.model_selection import train_test_split

    counts = Counter(example["category"] for example in examples)
    n_test = int(-(-len(examples) * test_size // 1))  # sklearn rounds the test share up
    can_stratify = min(counts.values()) >= 2 and len(counts) <= min(n_test, len(examples) - n_test)
    categories = [example["category"] for example in examples] if can_stratify else None
    try:
        train, test = train_test_split(examples, test_size=test_size, random_state=seed, stratify=categories)
    except ValueError as error:
        raise DataError(f"cannot split {len(examples)} rows with test_size={test_size}: {error}") from None
    return train, test


def split_train_validation_test(
    examples: list[Example], test_size: float, validation_size: float, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """train, validation, test: the test split is cut first, so it stays the same whatever validation_size is;
    validation is validation_size of the rest (none at 0)."""
    train, test = split_examples(examples, test_size, seed)
    if validation_size <= 0:
        return train, [], test
    train, validation = split_examples(train, validation_size, seed)
    return train, validation, test


def summarize(
    cleaned: Cleaned, train: list[Example], test: list[Example], validation: list[Example]
) -> dict[str, Any]:
    """Counts and length percentiles for metrics/data.json: every drop and relabel reason and every category is
    listed, even at 0. A relabelled row is kept (in the default category), so it is not in `dropped`."""
    import numpy as np

    lengths = np.array([example["n_chars"] for example in cleaned.examples])
    categories = sorted({example["category"] for example in cleaned.examples})
    return {
        "rows_read": cleaned.rows_read,
        "kept": len(cleaned.examples),
        "dropped": {reason: cleaned.dropped[reason] for reason in DROP_REASONS}
        | {"total": sum(cleaned.dropped.values())},
        "relabelled": {reason: cleaned.relabelled[reason] for reason in RELABEL_REASONS}
        | {"total": sum(cleaned.relabelled.values())},
        "train": len(train),
        "validation": len(validation),
        "test": len(test),
        "categories": {
            name: {
                "train": sum(e["category"] == name for e in train),
                "validation": sum(e["category"] == name for e in validation),
                "test": sum(e["category"] == name for e in test),
            }
            for name in categories
        },
        "chars": {f"p{q}": int(np.percentile(lengths, q)) for q in (10, 50, 90, 99)} | {"max": int(lengths.max())},
    }


def write_jsonl(path: Path, examples: Iterable[Example], drop: tuple[str, ...] = ("n_chars",)) -> None:
    """One example per line, keys in a fixed order, so the same input gives byte-identical files."""
    from finetune.core.files import atomic_path

    with atomic_path(path) as partial, partial.open("w", encoding="utf-8", newline="\n") as out:
        for example in examples:
            record = {k: v for k, v in example.items() if k not in drop}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file written by this project (a corrupt line names the file and line)."""
    return list(_read_jsonl(Path(path)))


def load_split(prepared_dir: str, name: str, columns: tuple[str, ...]):
    """A prepared split as a `datasets.Dataset` with just the columns a trainer reads."""
    return as_dataset(read_jsonl(Path(prepared_dir) / name), columns)


def as_dataset(rows: list[dict[str, Any]], columns: tuple[str, ...]):
    """Rows as a `datasets.Dataset` with just the columns a trainer reads."""
    from datasets import Dataset

    return Dataset.from_list(rows).select_columns(list(columns))


def _probe_prompt(row: Any, where: str) -> Example:
    """A fixed evaluation prompt: {"id", "category", "instruction", "reference"}, all strings."""
    for key in ("id", "category", "instruction", "reference"):
        if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{where}: needs a non-empty string '{key}'")
    return {
        "id": row["id"],
        "source": "probe",
        "category": row["category"],
        "instruction": row["instruction"].strip(),
        "prompt": [{"role": "user", "content": row["instruction"].strip()}],
        "reference": row["reference"].strip(),
    }


def evaluation_prompts(prepared_dir: str, probe_path: str, split: str = "test") -> list[Example]:
    """The held-out SFT `split` (test or validation) and the fixed probe prompts: {"id", "source", "category",
    "instruction", "prompt", "reference"}, where instruction is the last user turn, as a person reading the
    comparison wants it."""
    held_out = [
        {
            "id": row["id"],
            "source": split,
            "category": row["category"],
            "instruction": row["prompt"][-1]["content"],
            "prompt": row["prompt"],
            "reference": row["completion"][-1]["content"],
        }
        for row in read_jsonl(Path(prepared_dir) / HELD_OUT[split][0])
    ]
    probes = [_probe_prompt(row, f"{probe_path}:{n}") for n, row in enumerate(read_jsonl(probe_path), start=1)]
    return held_out + probes
