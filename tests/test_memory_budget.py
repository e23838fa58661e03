"""sft.memory_budget_gib / dpo.memory_budget_gib: the layout plans within a budget, and the allocator enforces it, so
one large GPU can stand in for a smaller one."""

from __future__ import annotations

import pytest
from test_speed import MISTRAL_7B, SEED

from finetune.core.config import load_config
from finetune.layout import speed
from finetune.layout.speed import GIB, memory_budget, plan


def test_no_budget_or_a_budget_above_the_gpu_plans_for_the_whole_gpu():
    assert memory_budget(None, 6) is None  # no GPU: nothing to plan
    assert memory_budget(140 * GIB, None) == 140 * GIB
    assert memory_budget(80 * GIB, 100) == 80 * GIB


def test_a_budget_below_the_gpu_is_planned_for_and_capped_on_the_allocator(monkeypatch):
    import torch

    capped = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction: capped.append(fraction))
    assert memory_budget(140 * GIB, 7) == 7 * GIB
    assert capped == [pytest.approx(7 / 140)]


def test_the_same_gpu_plans_a_smaller_layout_within_a_smaller_budget():
    _, roomy = plan("sft", SEED, "fast", MISTRAL_7B, 140 * GIB, quantized=True)
    _, tight = plan("sft", SEED, "fast", MISTRAL_7B, 6 * GIB, quantized=True)
    assert roomy.base_weights != "as loaded"  # a bf16 copy of the 4-bit weights fits 140 GiB...
    assert tight.base_weights == "as loaded"  # ...but not 6 GiB
    assert tight.max_tokens_per_batch <= roomy.max_tokens_per_batch


def test_the_budget_reaches_the_layout_from_params(tmp_path, monkeypatch):
    from conftest import write_params

    path = write_params(tmp_path, lambda params: params["sft"].update(memory_budget_gib=6))
    cfg = load_config(str(path))
    seen = []
    monkeypatch.setattr(speed, "gpu_memory_bytes", lambda: 140 * GIB)
    monkeypatch.setattr(speed, "memory_budget", lambda gpu, budget: seen.append((gpu, budget)) or None)
    speed.layout(cfg.model, "sft", cfg.sft.trainer, cfg.sft.speed, budget_gib=cfg.sft.memory_budget_gib)
    assert seen == [(140 * GIB, 6.0)]


def test_the_planners_terms_cover_the_counted_activations_of_the_7b_shape():
    """benchmarks/results/activation_memory.json, counted on the Mistral-7B shape as the fast layout trains it."""
    import json
    from pathlib import Path

    from trl.kernels import chunked_logprob

    counted = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/activation_memory.json").read_text())
    variants, shape = counted["variants"], MISTRAL_7B
    assert speed.layer_bytes_per_token(shape, compiled=True) >= variants["compiled"]["layer_bytes_per_token"]
    assert speed.layer_bytes_per_token(shape) >= variants["eager"]["layer_bytes_per_token"]
    # Rounded up, not far: a term twice too large halves the batches a budget allows.
    assert speed.layer_bytes_per_token(shape, compiled=True) < 1.05 * variants["compiled"]["layer_bytes_per_token"]
    assert speed.layer_bytes_per_token(shape) < 1.05 * variants["eager"]["layer_bytes_per_token"]
    assert shape.stream_bytes * shape.hidden == variants["checkpointed"]["layer_bytes_per_token"]
    assert speed.head_bytes_per_token(shape) >= variants["eager"]["rest_bytes_per_token"]
    assert speed.LOGIT_TILE_TOKENS == chunked_logprob.TOKEN_CHUNK_SIZE  # TRL's fused head: the tile's rows
