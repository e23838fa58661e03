"""What a training run actually ran with, written where `dvc exp show` and `dvc metrics diff` show it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

LAYOUT_FILE = "layout.json"  # inside the stage's metrics folder (paths.sft_metrics, paths.dpo_metrics)


def write_layout(plan, metrics_dir: str) -> Path:
    """The GPU layout the run used (batching, checkpointing, compilation...), which may differ from the recipe's
    trainer settings; written atomically."""
    path = Path(metrics_dir) / LAYOUT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"layout": asdict(plan)}, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
