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


def test_the_budget_reaches_the_layout_from_params(tmp_path, monkeypatch, capsys):
    from conftest import write_params

    path = write_params(tmp_path, lambda params: params["sft"].update(memory_budget_gib=6))
    cfg = load_config(str(path))
    seen = []
    monkeypatch.setattr(speed, "gpu_memory_bytes", lambda: 140 * GIB)
    monkeypatch.setattr(speed, "memory_budget", lambda gpu, budget: seen.append((gpu, budget)) or None)
    speed.layout(cfg.model, "sft", cfg.sft.trainer, cfg.sft.speed, budget_gib=cfg.sft.memory_budget_gib)
    assert seen == [(140 * GIB, 6.0)]
    printed = capsys.readouterr().out  # what ran belongs in the log: the weights and optimizer too
    assert "base weights as loaded" in printed and "optimizer as written" in printed


def test_the_stages_plan_with_their_adapter_counted(tmp_path, monkeypatch):
    """The fused AdamW's float32 states are planned for (finetune.layout.speed.plan): start_run hands the layout the
    adapter the stage trains (model_shape counts it: tests/test_speed.py)."""
    from conftest import write_params
    from trl import SFTConfig

    from finetune.training import start

    cfg = load_config(str(write_params(tmp_path, lambda params: params["paths"].update(checkpoints=str(tmp_path)))))
    seen = {}

    def layout(model_cfg, stage, trainer, requested, **kwargs):
        seen.update(kwargs)
        return speed.layout(model_cfg, stage, trainer, requested, **kwargs)

    monkeypatch.setattr(start, "layout", layout)
    monkeypatch.setattr(speed, "gpu_memory_bytes", lambda: None)  # a CPU: nothing is planned
    start.start_run(cfg, "sft", cfg.sft, SFTConfig, {}, str(tmp_path / "metrics"))
    assert seen["lora_cfg"] == cfg.lora


def test_the_planners_terms_cover_the_counted_activations_of_the_7b_shape():
    """benchmarks/results/activation_memory.json, counted on the Mistral-7B shape as the fast layout trains it."""
    import json
    from pathlib import Path

    from trl.kernels import chunked_logprob

    counted = json.loads(
        (Path(__file__).resolve().parents[1] / "benchmarks/results/activation_memory.json").read_text()
    )
    variants, shape = counted["variants"], MISTRAL_7B
    assert speed.layer_bytes_per_token(shape, compiled=True) >= variants["compiled"]["layer_bytes_per_token"]
    assert speed.layer_bytes_per_token(shape) >= variants["eager"]["layer_bytes_per_token"]
    # Rounded up, not far: a term twice too large halves the batches a budget allows.
    assert speed.layer_bytes_per_token(shape, compiled=True) < 1.05 * variants["compiled"]["layer_bytes_per_token"]
    assert speed.layer_bytes_per_token(shape) < 1.05 * variants["eager"]["layer_bytes_per_token"]
    for name, compiled in (("compiled, dropout 0", True), ("eager, dropout 0", False)):
        without_dropout = speed.layer_bytes_per_token(shape, compiled=compiled, dropout=False)
        counted_bytes = variants[name]["layer_bytes_per_token"]
        assert variants[name]["lora_dropout"] == 0 and counted_bytes <= without_dropout < 1.05 * counted_bytes
    assert shape.stream_bytes * shape.hidden == variants["checkpointed"]["layer_bytes_per_token"]
    assert speed.head_bytes_per_token(shape) >= variants["eager"]["rest_bytes_per_token"]
    assert speed.LOGIT_TILE_TOKENS == chunked_logprob.TOKEN_CHUNK_SIZE  # TRL's fused head: the tile's rows


def test_offloaded_checkpoints_send_only_each_checkpointed_layers_input_to_the_host_and_change_no_number(monkeypatch):
    """activation_checkpointing_kwargs {"offload": True}, as the fast layout sets it where the 4-bit weights stay
    4-bit: transformers wraps each layer's checkpoint in torch's save_on_cpu. Recorded here in place of the copy (a
    CPU-only torch has no pinned memory), what it would move is each checkpointed layer's input and nothing else,
    and the loss and gradients are the same bit for bit."""
    import torch
    import transformers.modeling_utils as modeling_utils
    from transformers import MistralConfig, MistralForCausalLM

    sent_to_host = []

    class RecordingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda tensor: sent_to_host.append(tuple(tensor.shape)) or tensor, lambda tensor: tensor)

    monkeypatch.setattr(modeling_utils, "save_on_cpu", RecordingSaveOnCpu)
    config = MistralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )  # fmt: skip

    def step(offload: bool):
        torch.manual_seed(0)
        model = MistralForCausalLM(config).train()
        model.activation_checkpointing_enable(offload=offload)
        ids = torch.randint(0, 256, (1, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: parameter.grad for name, parameter in model.named_parameters()}

    loss, grads = step(offload=True)
    assert sent_to_host == [(1, 16, 64)] * 3  # the three layers' inputs
    sent_to_host.clear()
    expected_loss, expected_grads = step(offload=False)
    assert sent_to_host == []
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(grad, expected_grads[name]) for name, grad in grads.items())


def test_small_budgets_offload_the_checkpoints_and_fit_larger_batches():
    seed = {**SEED, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    kwargs, offloaded = plan("sft", seed, "fast", MISTRAL_7B, 6 * GIB, quantized=True)
    assert kwargs["activation_checkpointing_kwargs"] == {"offload": True} and offloaded.checkpoints == speed.OFFLOADED
    kept, on_gpu = plan(
        "sft", {**seed, "activation_checkpointing_kwargs": {"offload": False}}, "fast", MISTRAL_7B, 6 * GIB, True
    )  # the trainer settings chose: the layout keeps their choice
    assert kept["activation_checkpointing_kwargs"] == {"offload": False} and on_gpu.checkpoints == "on the GPU"
    assert offloaded.per_device_train_batch_size > on_gpu.per_device_train_batch_size
    # With room for the bf16 weights, checkpointing is rare and its inputs stay on the GPU.
    roomy_kwargs, roomy = plan("sft", seed, "fast", MISTRAL_7B, 140 * GIB, quantized=True)
    assert "activation_checkpointing_kwargs" not in roomy_kwargs and roomy.checkpoints == "on the GPU"


def test_the_peak_is_the_larger_of_the_heads_backward_and_a_layers_recompute():
    shape, tokens = MISTRAL_7B, 2048
    layer = speed.layer_bytes_per_token(shape, compiled=True)
    gradient = 4 * shape.hidden  # the float32 gradient flowing back
    on_gpu, offloaded = speed.Activations(compiled=True), speed.Activations(compiled=True, offloaded=True)
    # Every layer checkpointed: the peak is a layer recomputing beside the checkpointed inputs, or, offloaded, alone.
    inputs = 32 * shape.stream_bytes * shape.hidden
    assert speed.batch_bytes(shape, tokens, 32, on_gpu) == tokens * (layer + inputs + gradient)
    assert speed.batch_bytes(shape, tokens, 32, offloaded) == tokens * (layer + gradient)
    # Nothing checkpointed: every layer's activations at the head's backward, with the logits tile, and a float32
    # head's bf16 copy beside them.
    tile = tokens * shape.vocab * 2
    at_the_head = tokens * (32 * layer + speed.head_bytes_per_token(shape)) + tile
    assert speed.batch_bytes(shape, tokens, 0, on_gpu) == at_the_head
    float32_head = speed.Activations(compiled=True, float32_head=True)
    assert speed.batch_bytes(shape, tokens, 0, float32_head) == at_the_head + shape.head_params * 2


def test_the_memory_model_predicts_the_measured_peak_of_the_seeds_layout():
    """The one peak measured on a GPU with these versions that the model can be set beside: the seeds' layout
    (`speed: low_memory`: batch 1 x 1,024 tokens, 4-bit weights, every layer checkpointed, eager, paged 8-bit AdamW)
    peaked at 5.61 GiB of allocated memory on an H100 (benchmarks/results/throughput.json, 2026-11-22, torch 2.11,
    transformers 5.23, TRL 1.16). Added to the model: the LoRA weights and gradients in float32 (paged optimizer
    states live outside the allocator)."""
    import json
    from pathlib import Path

    measured = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/throughput.json").read_text())
    run = measured["training"]["sft_low_memory"]
    assert run["layout"]["mode"] == "low_memory" and run["layout"]["max_tokens_per_batch"] == 1024
    shape = MISTRAL_7B
    per_layer = sum(inputs + outputs for inputs, outputs in ((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096)))
    per_layer += 3 * (4096 + 14336)  # gate, up, down
    lora = 16 * per_layer * shape.layers * 8  # r16 A and B on the seven projections: weights and gradients, float32
    how = speed.Activations(float32_head=True)  # eager, on the GPU, PEFT's float32 head
    predicted = speed.static_bytes(shape, quantized=True) + speed.batch_bytes(shape, 1024, 32, how) + lora
    assert abs(predicted / speed.GIB / run["peak_memory_gib"] - 1) < 0.03
