"""benchmarks/activation_memory.py --tiny: the saved-tensor count behind the planner's memory model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_counted_activations_match_the_planners_checkpoint_term_and_order_the_variants(tmp_path):
    command = [sys.executable, str(REPO / "benchmarks" / "activation_memory.py"), "--tiny", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True)  # its own process: compiled layers stay there
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "activation_memory.json").read_text())
    variants, planner = result["variants"], result["planner"]
    # A checkpointed layer keeps only its input, QLoRA's float32 residual stream: exactly the planner's term
    assert variants["checkpointed"]["layer_bytes_per_token"] == planner["checkpointed_layer_bytes_per_token"]
    # LoRA dropout keeps a dropped copy of each projection's input; compiling recomputes what is cheap
    assert variants["eager, dropout 0"]["layer_bytes_per_token"] < variants["eager"]["layer_bytes_per_token"]
    assert variants["compiled"]["layer_bytes_per_token"] < variants["eager"]["layer_bytes_per_token"]
    assert variants["compiled, dropout 0"]["layer_bytes_per_token"] < variants["compiled"]["layer_bytes_per_token"]
    assert len({row["rest_bytes_per_token"] for row in variants.values()}) == 1  # the head and loss: no layer in it
    assert all(row["first_layer_bytes_per_token"] <= row["layer_bytes_per_token"] for row in variants.values())
    assert variants["checkpointed"]["layer_bytes_per_token"] == 4 * 64  # float32 x the tiny hidden size
    assert all(row["rest_bytes_per_token"] <= planner["head_bytes_per_token"] for row in variants.values())
    assert "| checkpointed | 0.05 | 256 | 256 |" in (tmp_path / "activation_memory.md").read_text()
