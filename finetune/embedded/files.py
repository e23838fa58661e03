"""The embedded default data's files: their names, how they are written, and the texts the tiny model learns from."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.core.files import write_text

DOLLY_FILE, ULTRAFEEDBACK_FILE, PRETRAIN_FILE = "dolly.jsonl", "ultrafeedback.jsonl", "pretrain.txt"


def write_rows(path: Path, rows: list[dict]) -> None:
    # No sort_keys: invalid rows keep their odd shapes, and the key order matches the real datasets' files.
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _strings(value) -> list[str]:
    """Every string inside a JSON value, for tokenizer training."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [text for item in items for text in _strings(item)]


def read_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """(all texts of the embedded data, the pre-training paragraphs)."""
    paragraphs = [p for p in (folder / PRETRAIN_FILE).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    texts = list(paragraphs)
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts += _strings(json.loads(line))
    return texts, paragraphs
