"""What a training run actually ran with, written where `dvc exp show` and `dvc metrics diff` show it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from finetune.core.files import write_json

LAYOUT_FILE = "layout.json"  # inside the stage's metrics folder (paths.sft_metrics, paths.dpo_metrics)


def write_layout(plan, metrics_dir: str) -> Path:
    """The GPU layout the run used (batching, checkpointing, compilation...), which may differ from the recipe's
    trainer settings; written atomically."""
    path = Path(metrics_dir) / LAYOUT_FILE
    write_json(path, {"layout": asdict(plan)})
    return path
