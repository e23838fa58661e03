"""finetune.layout.speed: the fast layout is the same training run, laid out differently, and fits the GPU it is
planned for.

The loss-trajectory test runs the real sft stage on the tiny project in the seed layout (batch 1 x accumulation 4)
and the fast layout (one padding-free batch of 4), eager and with compiled decoder layers as the stage runs it.
Same examples, same order, same normalisation: the per-step losses must agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from finetune.core.config import LoraConfig, load_config
from finetune.core.errors import ConfigError
from finetune.layout.documents import document_block_mask
from finetune.layout.embeddings import HELD_IN_BF16
from finetune.layout.speed import (
    FUSED_ADAMW,
    GIB,
    IN_RUNS,
    OFFLOADED,
    WHOLE_BATCHES,
    Activations,
    ModelShape,
    activations_of,
    batch_bytes,
    checkpoint_as_needed,
    compile_decoder_layers,
    installer,
    layers_to_checkpoint,
    model_shape,
    pack_padded_batches,
    plan,
    speed_record,
    static_bytes,
)
from finetune.tools.dry_run import architecture_file, default_section
from finetune.training import sft as sft_training
from finetune.training.launch import launch_command, relaunch
from finetune.model.loading import decoder_layers
from finetune.training.runs import trainer_args

# Mistral-7B-v0.1 as finetune.layout.speed.model_shape counts it (checked against the shipped architecture below).
MISTRAL_7B = ModelShape(
    quantized_params=6_979_321_856, other_params=262_410_240, layers=32, hidden=4096, intermediate=14336, vocab=32000,
    embedding_params=262_144_000, head_params=131_072_000,
)  # fmt: skip
SEED = {
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "activation_checkpointing": True,
    "max_length": 1024,
    "optim": "paged_adamw_8bit",
    "bf16": True,
}


def test_model_shape_counts_mistral_7b_on_the_meta_device(tmp_path):
    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(architecture_file("mistralai/Mistral-7B-v0.1").read_text())
    shape = model_shape(default_section("model", name_or_path=str(folder), load_in_4bit=True))
    assert shape == MISTRAL_7B
    assert shape.quantized_params + shape.other_params == 7_241_732_096


def test_fast_on_an_80_gb_gpu_is_one_real_batch_of_the_same_examples():
    kwargs, chosen = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True)
    assert (kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]) == (8, 1)
    assert kwargs["padding_free"] is True
    assert {k: kwargs[k] for k in ("bf16", "max_length")} == {k: SEED[k] for k in ("bf16", "max_length")}
    # AdamW as one fused step with float32 states instead of bitsandbytes' loop over 8-bit ones: the same update rule.
    assert kwargs["optim"] == "adamw_torch_fused" and chosen.optimizer == "adamw_torch_fused (for paged_adamw_8bit)"
    assert chosen.mode == "fast" and chosen.max_tokens_per_batch == 8 * 1024
    # The worst batch (8 full-length rows) needs some layers checkpointed; typical batches need none.
    assert kwargs["activation_checkpointing"] is True
    assert 1024 < chosen.tokens_without_checkpointing < 8 * 1024
    assert chosen.checkpointing.startswith("as memory needs")
    # The next batches collated in worker processes, unless the trainer settings say how.
    assert (kwargs["dataloader_num_workers"], kwargs["dataloader_persistent_workers"]) == (2, True)
    assert chosen.batches_from == "2 worker processes"
    kept, kept_plan = plan("sft", {**SEED, "dataloader_num_workers": 0}, "fast", MISTRAL_7B, 80 * GIB, quantized=True)
    assert kept["dataloader_num_workers"] == 0 and kept_plan.batches_from == "as written"


def test_only_adamw_optimizers_are_swapped_for_the_fused_one():
    swaps = (("paged_lion_8bit", "paged_lion_8bit"), ("adafactor", "adafactor"), ("adamw_torch", "adamw_torch_fused"))
    for optim, runs in swaps:
        kwargs, chosen = plan("sft", {**SEED, "optim": optim}, "fast", MISTRAL_7B, 80 * GIB, quantized=True)
        assert kwargs["optim"] == runs
        assert chosen.optimizer == ("as written" if runs == optim else f"adamw_torch_fused (for {optim})")
    kwargs, chosen = plan("sft", SEED, "low_memory", MISTRAL_7B, 80 * GIB, quantized=True)
    assert kwargs["optim"] == "paged_adamw_8bit" and chosen.optimizer == "as written"  # memory first


def test_with_the_4_bit_weights_adamw_is_fused_where_its_float32_states_fit_beside_the_longest_batch():
    """The seed recipe's adapter (LoRA r16 on the seven projections: 41,943,040 parameters) at small budgets."""
    adapted = dataclasses.replace(MISTRAL_7B, adapter_params=41_943_040)
    states_gib = 41_943_040 * 8 / GIB
    for stage, budgets in (("sft", (8, 16, 20)), ("dpo", (10, 12, 16, 24))):
        for gib in budgets:
            kwargs, chosen = plan(stage, SEED, "fast", adapted, gib * GIB, quantized=True)
            _, uncounted = plan(stage, SEED, "fast", MISTRAL_7B, gib * GIB, quantized=True)
            assert chosen.base_weights == "as loaded" and chosen.recompute == WHOLE_BATCHES, (stage, gib)
            assert kwargs["optim"] == FUSED_ADAMW and chosen.optimizer == f"{FUSED_ADAMW} (for paged_adamw_8bit)"
            # The states come out of the activations' budget: the per-batch checkpointing plans within the rest.
            assert chosen.memory_budget_gib == pytest.approx(uncounted.memory_budget_gib - states_gib, abs=0.01)
            assert uncounted.optimizer == "as written"  # an adapter not counted: no room known for its states
    # Where the longest batch needs runs of documents (SFT at 6 GiB, DPO up to 8), the 8-bit states stay.
    for stage, gib in (("sft", 6), ("dpo", 6), ("dpo", 8)):
        kwargs, chosen = plan(stage, SEED, "fast", adapted, gib * GIB, quantized=True)
        assert chosen.recompute != WHOLE_BATCHES and kwargs["optim"] == "paged_adamw_8bit", (stage, gib)
    # With the bf16 copy the reserve holds them, as before (24 GiB for SFT).
    _, copied = plan("sft", SEED, "fast", adapted, 24 * GIB, quantized=True)
    _, copied_uncounted = plan("sft", SEED, "fast", MISTRAL_7B, 24 * GIB, quantized=True)
    assert copied.base_weights != "as loaded" and copied.optimizer.startswith(FUSED_ADAMW)
    assert copied.memory_budget_gib == copied_uncounted.memory_budget_gib


def test_a_run_without_the_adapters_dropout_is_planned_with_its_smaller_activations():
    """TRL's DPOTrainer sets every dropout to 0 (DPOConfig.disable_dropout, on by default), and a LoRA dropout of 0
    saves no masks: fewer layers recompute at the same budget (benchmarks/results/activation_memory.json)."""
    for budget in (10 * GIB, 24 * GIB, 48 * GIB):
        _, dpo = plan("dpo", SEED, "fast", MISTRAL_7B, budget, quantized=True)
        _, kept = plan("dpo", {**SEED, "disable_dropout": False}, "fast", MISTRAL_7B, budget, quantized=True)
        assert not dpo.adapter_dropout and kept.adapter_dropout
        assert dpo.tokens_without_checkpointing > kept.tokens_without_checkpointing
        _, sft = plan("sft", SEED, "fast", MISTRAL_7B, budget, quantized=True)
        no_dropout = dataclasses.replace(MISTRAL_7B, adapter_dropout=False)
        _, sft_without = plan("sft", SEED, "fast", no_dropout, budget, quantized=True)
        assert sft.adapter_dropout and not sft_without.adapter_dropout
        assert sft_without.tokens_without_checkpointing > sft.tokens_without_checkpointing
    assert not activations_of(dpo, MISTRAL_7B).dropout and activations_of(kept, MISTRAL_7B).dropout
    assert not plan("dpo", SEED, "fast", None, None, quantized=True)[1].adapter_dropout  # recorded without a GPU too


def test_model_shape_counts_the_adapter_as_peft_builds_it(tmp_path):
    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(architecture_file("mistralai/Mistral-7B-v0.1").read_text())
    model_cfg = default_section("model", name_or_path=str(folder), load_in_4bit=True)
    seven = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shape = model_shape(model_cfg, lora_cfg=LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=seven))
    assert shape == dataclasses.replace(MISTRAL_7B, adapter_params=41_943_040)
    query_only = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=("q_proj",))
    attention_only = model_shape(model_cfg, lora_cfg=query_only)
    assert attention_only.adapter_params == 32 * 8 * (4096 + 4096) and not attention_only.adapter_dropout


def test_fast_dpo_batches_pairs_and_packs_them_inside_the_model():
    dpo_seed = {**SEED, "max_length": 1024}
    kwargs, chosen = plan("dpo", dpo_seed, "fast", MISTRAL_7B, 80 * GIB, quantized=True)
    assert kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] == 8
    # TRL's collator still pads (its padding_free is disabled in 1.16); pack_padded_batches removes the padding.
    assert "padding_free" not in kwargs and chosen.padding_free is True
    assert chosen.max_tokens_per_batch == kwargs["per_device_train_batch_size"] * 2 * 1024


def test_smaller_gpus_checkpoint_sooner_then_batch_smaller_and_the_smallest_stay_compiled_and_padding_free():
    _, on_80 = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True)
    kwargs, on_24 = plan("sft", SEED, "fast", MISTRAL_7B, 24 * GIB, quantized=True)
    assert kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] == 8
    assert on_24.mode == "fast" and on_24.tokens_without_checkpointing < on_80.tokens_without_checkpointing
    # 8 GiB: the whole step is still one batch, its longest forms with every layer's input offloaded.
    kwargs, on_8 = plan("sft", SEED, "fast", MISTRAL_7B, 8 * GIB, quantized=True)
    assert kwargs["per_device_train_batch_size"] == 8 and on_8.checkpoints == OFFLOADED
    assert on_8.tokens_without_checkpointing < on_24.tokens_without_checkpointing
    assert on_8.recompute == WHOLE_BATCHES  # its longest batch recomputes whole
    # 6 GiB: still padding-free and compiled, with the 4-bit weights as loaded, the frozen embedding and head back in
    # bf16, the checkpointed layers' inputs offloaded to host memory, the checkpointing chosen per batch, and the
    # written 8-bit optimizer for its smaller states. The whole step is still one batch: a batch too long for a
    # layer to recompute whole recomputes in runs of documents.
    kwargs, on_6 = plan("sft", SEED, "auto", MISTRAL_7B, 6 * GIB, quantized=True)
    assert on_6.mode == "fast" and on_6.compiled and on_6.padding_free and on_6.base_weights == "as loaded"
    assert on_6.embeddings == HELD_IN_BF16 and on_6.checkpointing.startswith("as memory needs")
    assert on_6.checkpoints == OFFLOADED and kwargs["activation_checkpointing_kwargs"] == {"offload": True}
    assert (kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]) == (8, 1)
    assert on_6.recompute == IN_RUNS.format(tokens=3968)
    assert kwargs["activation_checkpointing"] is True and kwargs["optim"] == "paged_adamw_8bit"
    # Where the layers attend differently (one block mask cannot serve them all), no runs: smaller micro-batches.
    mixed_shape = dataclasses.replace(MISTRAL_7B, uniform_attention=False)
    _, mixed = plan("sft", SEED, "auto", mixed_shape, 6 * GIB, quantized=True)
    assert (mixed.per_device_train_batch_size, mixed.recompute) == (2, WHOLE_BATCHES)
    # Less room: smaller micro-batches, each in runs; then batch 1, whole, as the seeds' layout.
    _, on_5_2 = plan("sft", SEED, "auto", MISTRAL_7B, int(5.2 * GIB), quantized=True)
    assert on_5_2.per_device_train_batch_size == 4 and on_5_2.recompute != WHOLE_BATCHES
    _, on_5 = plan("sft", SEED, "auto", MISTRAL_7B, 5 * GIB, quantized=True)
    assert (on_5.mode, on_5.per_device_train_batch_size, on_5.recompute) == ("fast", 1, WHOLE_BATCHES)
    # Without autocast the embedding and head stay float32: 0.52 GB less room.
    _, float32_6 = plan("sft", {**SEED, "bf16": False}, "auto", MISTRAL_7B, 6 * GIB, quantized=True)
    assert float32_6.embeddings == "as loaded"
    assert on_6.memory_budget_gib - float32_6.memory_budget_gib == pytest.approx(0.49, abs=0.01)  # GiB
    # No room at all beside the weights: the seeds' layout, which fails as it would anyway.
    kwargs, chosen = plan("sft", SEED, "auto", MISTRAL_7B, 4 * GIB, quantized=True)
    assert chosen.mode == "low_memory" and "no room beside the weights" in chosen.reason


def test_low_memory_is_batch_1_with_every_layer_checkpointed():
    fast_like = {
        **SEED,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "activation_checkpointing": False,
    }
    kwargs, chosen = plan("sft", fast_like, "low_memory", MISTRAL_7B, 80 * GIB, quantized=True)
    assert (kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]) == (1, 8)
    assert kwargs["activation_checkpointing"] is True and chosen.checkpointing == "all layers"


@pytest.mark.parametrize("requested, gpu", [("as_written", 80 * GIB), ("auto", None), ("fast", None)])
def test_as_written_and_cpu_runs_keep_the_trainer_settings(requested, gpu):
    kwargs, chosen = plan("sft", SEED, requested, MISTRAL_7B if gpu else None, gpu, quantized=True)
    assert kwargs == SEED and chosen.mode == "as_written"
    assert speed_record(chosen)["speed"]["mode"] == "as_written"


def test_memory_model_checkpoints_more_layers_for_longer_batches_and_never_exceeds_the_budget():
    budget = 80 * GIB * 0.85 - static_bytes(MISTRAL_7B, quantized=True)
    counts = [layers_to_checkpoint(MISTRAL_7B, tokens, budget) for tokens in (1024, 4096, 8192, 16384)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] > 0
    for tokens, layers in zip((1024, 4096, 8192, 16384), counts):
        assert batch_bytes(MISTRAL_7B, tokens, layers) <= budget
        if layers:
            assert batch_bytes(MISTRAL_7B, tokens, layers - 1) > budget
    assert layers_to_checkpoint(MISTRAL_7B, 10**7, budget) is None


def checkpointable_tiny_model(tiny_project):
    """(model with checkpointing enabled, its shape, its decoder layers, a budget that fits 512 tokens with one
    layer checkpointed)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from finetune.model.loading import load_model

    cfg = load_config(tiny_project.params_path)
    model = load_model(cfg.model, for_training=True, gradient_checkpointing=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    shape = model_shape(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return model, shape, layers, batch_bytes(shape, 512, 1)


def test_the_hook_checkpoints_layers_by_the_size_of_each_batch(tiny_project):
    model, shape, layers, budget = checkpointable_tiny_model(tiny_project)
    needed = layers_to_checkpoint(shape, 512, budget)
    assert needed == 1 and len(layers) == 2
    checkpoint_as_needed(model, shape, budget)
    model.train()
    model(input_ids=torch.ones(1, 512, dtype=torch.long))
    assert [layer.gradient_checkpointing for layer in layers] == [i < needed for i in range(len(layers))]
    model(input_ids=torch.ones(2, 100, dtype=torch.long))  # 200 tokens: nothing to checkpoint
    assert not any(layer.gradient_checkpointing for layer in layers)


@pytest.mark.parametrize("offload", [False, True])
def test_a_checkpointed_compiled_layer_recomputes_through_its_compiled_forward(tiny_project, monkeypatch, offload):
    """The hook on compiled layers (the fast layout): a checkpointed layer runs its compiled forward, then again in
    the backward pass, and the gradients are those of the compiled run without checkpointing. Compile errors raise
    here instead of falling back to eager, as the stage would. `offload` (speed.OFFLOADED, as the Trainer enables it):
    the checkpointed layer's input, and only that, goes through transformers' save_on_cpu (recorded here: a CPU-only
    torch has no pinned memory)."""
    import transformers.modeling_utils as modeling_utils

    from finetune import overrides
    from finetune.layout import speed

    inputs = torch.randint(3, 100, (1, 512), generator=torch.Generator().manual_seed(0))
    forward_calls, sent_to_host = [], []

    class RecordingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(lambda tensor: sent_to_host.append(tuple(tensor.shape)) or tensor, lambda tensor: tensor)

    monkeypatch.setattr(modeling_utils, "save_on_cpu", RecordingSaveOnCpu)

    def counted(forward):
        compiled = speed.torch_compiled_forward(forward)

        def run(*args, **kwargs):
            forward_calls.append(torch.is_grad_enabled())
            return compiled(*args, **kwargs)

        return run

    def gradients(budget_tokens: int):
        torch.manual_seed(0)
        model, shape, layers, _ = checkpointable_tiny_model(tiny_project)
        model.float()
        if offload:
            model.activation_checkpointing_enable(offload=True)
        compile_decoder_layers(model)
        monkeypatch.setattr(overrides, "SUPPRESS_COMPILE_ERRORS", False)  # the compiled layers' dynamo setting
        how = speed.Activations(compiled=True, offloaded=offload)
        checkpoint_as_needed(model, shape, batch_bytes(shape, budget_tokens, 1), how=how)
        model.train()
        model(input_ids=inputs, labels=inputs).loss.backward()
        grads = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
        return [layer.gradient_checkpointing for layer in layers], grads, shape.hidden

    torch._dynamo.reset()
    monkeypatch.setattr(speed, "_compiled", counted)
    flags, expected, _ = gradients(budget_tokens=4096)
    assert flags == [False, False] and forward_calls == [] and sent_to_host == []
    flags, checkpointed, hidden = gradients(budget_tokens=512)
    assert flags == [True, False]
    assert forward_calls == [True, True]  # the forward pass, then its recompute in the backward pass
    assert sent_to_host == ([(1, 512, hidden)] if offload else [])
    assert checkpointed.keys() == expected.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(checkpointed[name], expected[name], rtol=1e-5, atol=1e-6)


def right_padded_batch(lengths: list[int], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask}


def record_layer_inputs(model) -> list[tuple[int, int]]:
    """(rows, tokens) of each batch the first decoder layer receives."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = []
    first = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    first.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[:2])))
    return calls


def test_a_packed_padded_batch_gives_the_padded_batchs_log_probs_and_gradients(tiny_project):
    """What TRL's DPO loss reads (per-token log-probs through its fused LM head) and what training changes (the LoRA
    gradients), with and without packing: equal at every real token."""
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from finetune.model.loading import build_lora_config, load_model

    cfg = load_config(tiny_project.params_path)
    lora = dataclasses.replace(cfg.lora, dropout=0.0)
    batch = right_padded_batch([37, 5, 64, 20, 64, 1], vocab=100)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :3] = -100  # a prompt, as in TRL's completion-only labels

    def run(packed: bool):
        torch.manual_seed(0)
        base = load_model(cfg.model, for_training=True).float()
        add_fused_lm_head(base)
        calls = record_layer_inputs(base)
        if packed:
            pack_padded_batches(base.base_model)
        model = get_peft_model(base, build_lora_config(lora))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # nonzero B, so the LoRA A matrices get gradients too
                torch.nn.init.normal_(parameter, std=0.02)
        out = model(**batch, labels=labels, use_cache=False, fused_lm_head=True)
        (-out.log_probs.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.log_probs.detach(), grads, calls

    padded_logps, padded_grads, _ = run(packed=False)
    packed_logps, packed_grads, calls = run(packed=True)
    assert calls == [(1, sum([37, 5, 64, 20, 64, 1]))]  # one padding-free row went through the layers
    assert packed_logps.shape == padded_logps.shape
    assert (padded_logps[labels[:, 1:] != -100] != 0).all()
    torch.testing.assert_close(packed_logps, padded_logps, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 0
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6)


def test_batches_that_packing_would_change_run_as_they_are(tiny_project):
    from finetune.model.loading import load_model

    cfg = load_config(tiny_project.params_path)
    model = load_model(cfg.model, for_training=False).float()
    batch = right_padded_batch([9, 4], vocab=100)
    left = {key: value.flip(1) for key, value in batch.items()}  # left padding: the padded run's positions differ
    full = right_padded_batch([6, 6], vocab=100)  # no padding: nothing to gain
    with torch.no_grad():
        unpacked = [model.base_model(**inputs).last_hidden_state for inputs in (left, full)]
        pack_padded_batches(model.base_model)
        calls = record_layer_inputs(model)
        for inputs, expected in zip((left, full), unpacked):
            torch.testing.assert_close(model.base_model(**inputs).last_hidden_state, expected)
        model.base_model(**batch, use_cache=True)  # a cache for generation: its rows must stay rows
        model.config.use_cache = True
        model.base_model(**batch)  # the same, asked for by the config's default
        model.base_model(**batch, use_cache=False)
    assert calls == [(2, 9), (2, 6), (2, 9), (2, 9), (1, 13)]


def random_documents(lengths: list[int], rows: int = 1) -> torch.Tensor:
    """Position ids of `rows` rows, each the documents of `lengths` laid end to end."""
    return torch.cat([torch.arange(length) for length in lengths]).expand(rows, -1)


@pytest.mark.parametrize(
    "lengths, window, block_size",
    [
        ([300], None, 128),  # one document, a ragged last block
        ([37, 5, 200, 1, 90, 256], None, 128),
        ([37, 5, 200, 1, 90, 256], 4096, 128),
        ([37, 5, 200, 1, 90, 256], 50, 16),  # a window shorter than the documents
        ([64] * 8, 100, 32),  # documents on block boundaries
        ([1] * 40 + [130], 7, 16),
    ],
)
def test_the_document_block_mask_has_create_block_masks_layout(lengths, window, block_size):
    """Which blocks flex attention skips, masks per token or takes whole: as torch's create_block_mask finds by
    evaluating the per-token rule (causal within each document, within the window) everywhere."""
    from torch.nn.attention.flex_attention import create_block_mask

    position_ids = random_documents(lengths, rows=2)
    document = (position_ids == 0).cumsum(dim=1)

    def rule(batch, head, q_index, kv_index):
        allowed = (document[batch, q_index] == document[batch, kv_index]) & (kv_index <= q_index)
        return allowed if window is None else allowed & (kv_index > q_index - window)

    length = position_ids.shape[1]
    expected = create_block_mask(rule, 2, None, length, length, device="cpu", BLOCK_SIZE=block_size)
    ours = document_block_mask(position_ids, window, block_size)
    assert torch.equal(ours.kv_num_blocks, expected.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, expected.full_kv_num_blocks)
    assert torch.equal(ours.to_dense(), expected.to_dense())
    q_index, kv_index = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    for row in range(2):
        assert torch.equal(ours.mask_mod(row, 0, q_index, kv_index), rule(row, 0, q_index, kv_index))


def test_a_padding_free_row_under_flex_attention_gives_each_document_its_own_run(monkeypatch):
    """Documents laid end to end in one row (TRL's padding-free SFT batches, packed DPO pairs): with the block mask
    built without compiling, each document's hidden states are those of running it alone, with a sliding window
    shorter than the documents; transformers' compiled create_block_mask is never called."""
    import transformers.masking_utils
    from transformers import MistralConfig, MistralModel

    config = MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=40, attn_implementation="flex_attention",
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralModel(config).eval()
    lengths = [37, 5, 64, 1, 90]
    input_ids = torch.randint(3, 100, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    starts = [sum(lengths[:index]) for index in range(len(lengths))]
    with torch.no_grad():
        documents = [input_ids[:, start : start + length] for start, length in zip(starts, lengths)]
        alone = torch.cat([model(input_ids=ids, use_cache=False).last_hidden_state for ids in documents], dim=1)
        pack_padded_batches(model)
        monkeypatch.setattr(transformers.masking_utils, "create_block_mask", None)  # calling it would fail
        packed = model(input_ids=input_ids, position_ids=random_documents(lengths), use_cache=False).last_hidden_state
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_the_hook_counts_only_the_real_tokens_of_a_batch_that_will_be_packed(tiny_project):
    model, shape, layers, budget = checkpointable_tiny_model(tiny_project)
    checkpoint_as_needed(model, shape, budget, packs_padding=True)
    pack_padded_batches(model.base_model)
    model.train()
    model(**right_padded_batch([500, 1], vocab=100))  # 1,000 padded tokens (2 layers), 501 real: one layer
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    model(**right_padded_batch([200, 1, 1, 1], vocab=100))  # 800 padded tokens, 203 real: none
    assert not any(layer.gradient_checkpointing for layer in layers)


def three_steps(trainer: dict, batch: int, accumulation: int) -> dict:
    """`trainer` for a 3-step test run of `batch` x `accumulation`, without checkpointing, saved checkpoints or
    evaluation on the validation split."""
    return {
        **trainer,
        "eval_strategy": "no",
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "max_steps": 3,
        "save_steps": 1000,
        "activation_checkpointing": False,
    }


def dpo_config_from_a_moved_adapter(tiny_project, tmp_path, dropout: float = 0.0):
    """The tiny project's config with LoRA `dropout` (0: exact arithmetic), its dpo starting from an SFT adapter that
    moved, so the reference is not the adapter-free base."""
    from peft import get_peft_model

    from finetune.model.loading import build_lora_config, load_model

    cfg = load_config(tiny_project.params_path)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=dropout))
    start = tmp_path / "start-adapter"
    torch.manual_seed(0)
    start_model = get_peft_model(load_model(cfg.model, for_training=True), build_lora_config(cfg.lora))
    for name, parameter in start_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    start_model.save_pretrained(start)
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_adapter=str(start)))


def test_packed_dpo_follows_the_padded_runs_loss_trajectory(tiny_project, tmp_path, monkeypatch):
    """The dpo stage's trainer over three steps, TRL's precomputed reference pass included, padded and packed."""
    from trl import DPOConfig

    from finetune.training import dpo as dpo_training

    monkeypatch.chdir(tmp_path)
    # An adapter with dropout: TRL's disable_dropout zeroes it, as the plan counts, so both runs compute the same.
    cfg = dpo_config_from_a_moved_adapter(tiny_project, tmp_path, dropout=0.1)
    written = three_steps(cfg.dpo.trainer, batch=4, accumulation=1)
    shape = model_shape(cfg.model)
    fast, chosen = plan("dpo", written, "fast", shape, 80 * GIB, quantized=False)
    assert fast["precompute_ref_log_probs"] is True and chosen.padding_free
    eager = dataclasses.replace(chosen, compiled=False, attention="sdpa")  # flex attention has no CPU backward

    def run(name, layout):
        run_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, dpo_metrics=str(tmp_path / name)))
        args = trainer_args(DPOConfig, "dpo", fast, str(tmp_path / f"{name}-checkpoints"))
        trainer = dpo_training.build_trainer(
            run_cfg, args, resume=False, speed=layout, install=installer(layout, shape)
        )
        reference = list(trainer.train_dataset["ref_chosen_logps"])
        dropouts = [module for name, module in trainer.model.named_modules() if name.endswith("lora_dropout.default")]
        assert dropouts and all(module.p == 0 for module in dropouts) and not layout.adapter_dropout
        calls = record_layer_inputs(trainer.model)
        trainer.train()
        assert {rows for rows, _ in calls} == {1 if layout.padding_free else 8}  # 4 pairs: chosen + rejected rows
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], reference

    padded_losses, padded_reference = run("padded", dataclasses.replace(eager, padding_free=False))
    packed_losses, packed_reference = run("packed", eager)
    assert len(padded_losses) == 3
    assert packed_reference == pytest.approx(padded_reference, rel=1e-4)
    assert packed_losses == pytest.approx(padded_losses, rel=1e-4)
    assert padded_losses[-1] != pytest.approx(padded_losses[0], rel=1e-3)  # training moved the policy


@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "tight"])
def test_fast_layout_follows_the_seed_layouts_loss_trajectory(tiny_project, tmp_path, monkeypatch, tight):
    """Same examples per optimizer step, same order, same token-level normalisation: the same run. Roomy: one
    batch of 4 with no layer checkpointed; tight (a budget where not even one full-length row fits the memory model):
    batch 1 x accumulation 4, every layer checkpointed through its compiled forward."""
    from trl import SFTConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(tiny_project.params_path)
    # No LoRA dropout: its random masks depend on the batch layout, and this test compares exact arithmetic.
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
    seed = three_steps(cfg.sft.trainer, batch=1, accumulation=4)
    shape = model_shape(cfg.model)
    one_row = batch_bytes(shape, int(seed.get("max_length") or 1024), shape.layers)
    gpu = (static_bytes(shape, quantized=False) + one_row / 2) / 0.85 if tight else 80 * GIB
    fast, chosen = plan("sft", seed, "fast", shape, gpu, quantized=False)
    batch = (1, 4) if tight else (4, 1)
    assert (fast["per_device_train_batch_size"], fast["gradient_accumulation_steps"], fast["padding_free"]) == (
        *batch,
        True,
    )
    assert chosen.compiled and chosen.checkpointing.startswith("as memory needs" if tight else "off")

    def losses(name, kwargs, install=None):
        run_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_metrics=str(tmp_path / name)))
        args = trainer_args(SFTConfig, "sft", kwargs, str(tmp_path / f"{name}-checkpoints"))
        trainer = sft_training.build_trainer(run_cfg, args, resume=False, speed=chosen, install=install)
        trainer.train()
        compiled = [layer for layer in trainer.model.modules() if getattr(layer, "_compiled_call_impl", None)]
        checkpointed = [layer for layer in decoder_layers(trainer.model) if layer.gradient_checkpointing]
        steps = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return steps, len(compiled), len(checkpointed)

    (seed_losses, _, _), (eager_losses, eager_compiled, _) = losses("seed", seed), losses("eager", fast)
    torch._dynamo.utils.counters.clear()
    on_cpu = dataclasses.replace(chosen, attention="sdpa")  # PyTorch's flex attention has no backward on a CPU
    fast_losses, fast_compiled, fast_checkpointed = losses("fast", fast, install=installer(on_cpu, shape))
    assert fast_checkpointed == (shape.layers if tight else 0)  # the per-batch hook's choice for the last batch
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled for real, not left to eager
    print(dict(torch._dynamo.utils.counters["stats"]), dict(torch._dynamo.utils.counters["graph_break"]))
    assert len(seed_losses) == len(fast_losses) == 3
    assert eager_losses == pytest.approx(seed_losses, rel=1e-4)
    # The layout as the stage runs it: every decoder layer compiled (inductor reorders float sums, hence 1e-4).
    assert (eager_compiled, fast_compiled) == (0, shape.layers)
    assert fast_losses == pytest.approx(seed_losses, rel=1e-4)
    recorded = yaml.safe_load((tmp_path / "fast" / "params.yaml").read_text())
    assert recorded["speed"]["mode"] == "fast" and recorded["padding_free"] is True


def test_inputs_that_require_grad_halve_the_compiled_layers_graphs_and_keep_the_losses(
    tiny_project, tmp_path, monkeypatch
):
    """The benchmark's warm-up candidate `inputs_require_grad`: the first layer's input (the frozen embedding's
    output) requires grad as every later layer's does, so dynamo no longer traces each graph twice."""
    from trl import SFTConfig

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from throughput import with_inputs_requiring_grad

    monkeypatch.chdir(tmp_path)
    cfg = load_config(tiny_project.params_path)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
    shape = model_shape(cfg.model)
    fast, chosen = plan("sft", three_steps(cfg.sft.trainer, batch=1, accumulation=4), "fast", shape, 80 * GIB,
                        quantized=False)  # fmt: skip
    layout = dataclasses.replace(chosen, attention="sdpa")  # PyTorch's flex attention has no backward on a CPU
    assert layout.compiled

    def run(name, inputs_require_grad):
        run_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_metrics=str(tmp_path / name)))
        args = trainer_args(SFTConfig, "sft", fast, str(tmp_path / f"{name}-checkpoints"))
        install = with_inputs_requiring_grad(installer(layout, shape), inputs_require_grad)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer = sft_training.build_trainer(run_cfg, args, resume=False, speed=layout, install=install)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, torch._dynamo.utils.counters["stats"]["unique_graphs"]

    (off_losses, off_graphs), (on_losses, on_graphs) = run("off", False), run("on", True)
    assert len(off_losses) == 3 and on_losses == pytest.approx(off_losses, rel=1e-5)
    assert (off_graphs, on_graphs) == (4, 2)  # static, then dynamic at the second length; twice without the candidate


# --- several GPUs -------------------------------------------------------------------------------------------------


def test_two_gpus_split_each_optimizer_step_and_keep_the_effective_batch():
    fast, chosen = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True, world=2)
    assert (fast["per_device_train_batch_size"], fast["gradient_accumulation_steps"]) == (4, 1)
    assert fast["ddp_find_unused_parameters"] is False
    written, chosen = plan("sft", SEED, "as_written", MISTRAL_7B, 80 * GIB, quantized=True, world=2)
    assert (written["per_device_train_batch_size"], written["gradient_accumulation_steps"]) == (1, 4)
    odd = {**SEED, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 3}
    written, _ = plan("sft", odd, "as_written", MISTRAL_7B, 80 * GIB, quantized=True, world=2)
    assert written["per_device_train_batch_size"] * written["gradient_accumulation_steps"] * 2 == 12


def test_a_step_that_cannot_be_split_evenly_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sft.trainer: .* = 8 examples .* distributed.processes = 3"):
        plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True, world=3)


class Done:
    returncode = 0


def test_the_stage_reruns_itself_under_accelerate_launch_with_one_process_per_gpu(monkeypatch, tmp_path):
    claims = str(tmp_path)  # the GPU claims (finetune.training.devices), not the machine's
    settings = default_section("distributed", processes=2, strategy="ddp", gpu_claims=claims)
    command = launch_command("stages.sft", ["params.yaml"], settings)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[-3:] == ["-m", "stages.sft", "params.yaml"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one = default_section("distributed", processes=1, gpu_claims=claims)
    assert relaunch("stages.sft", [], one) is None  # one GPU or none: run here
    runs = []
    monkeypatch.setattr(subprocess, "run", lambda command, env, check, **kwargs: runs.append((command, env)) or Done())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert relaunch("stages.sft", ["p.yaml"], one) == 0
    command, env = runs[0]
    assert command[1:] == ["-m", "stages.sft", "p.yaml"] and env["CUDA_VISIBLE_DEVICES"] == "2"  # never DataParallel
    monkeypatch.setenv("LOCAL_RANK", "1")  # already one of the launched processes
    assert relaunch("stages.sft", [], settings) is None
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="distributed.processes: 2 processes need 2 GPUs; this machine has 1"):
        relaunch("stages.sft", [], settings)


def test_only_the_first_process_writes_curves_and_adapters(tmp_path, monkeypatch):
    from finetune.training.runs import StopOnNonFiniteLoss, WalkModulesOnce, live_callbacks, save_atomically

    monkeypatch.setenv("RANK", "1")
    callbacks = live_callbacks(str(tmp_path / "metrics"), resume=False)
    assert [type(c) for c in callbacks] == [WalkModulesOnce, StopOnNonFiniteLoss]
    assert not (tmp_path / "metrics").exists()
    save_atomically(lambda folder: Path(folder).mkdir(), str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()
    monkeypatch.setenv("RANK", "0")
    save_atomically(lambda folder: Path(folder).mkdir(), str(tmp_path / "adapter"))
    assert (tmp_path / "adapter").is_dir()


def test_padding_free_examples_are_cut_to_max_length_as_trl_cuts_them():
    from datasets import Dataset

    from finetune.overrides import truncate_examples

    rows = Dataset.from_list([
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, -100, 5]},  # only its answer would be cut off
        {"input_ids": [1, 2], "labels": [-100, 2]},
    ])
    kept = truncate_examples(rows, 3, "keep_start")
    assert kept["input_ids"] == [[1, 2, 3], [1, 2]] and kept["labels"] == [[-100, -100, 3], [-100, 2]]
    assert truncate_examples(rows, 3, "keep_end")["input_ids"] == [[3, 4, 5], [3, 4, 5], [1, 2]]


def test_every_log_line_gets_the_tokens_per_second_since_the_previous_one(monkeypatch):
    import time

    from finetune.training.runs import LogThroughput

    clock = iter([10.0, 12.0, 13.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    callback, logs = LogThroughput(), [{"num_tokens": 100.0}, {"num_tokens": 1100.0}, {"loss": 1.0}]
    for entry in logs:
        callback.on_log(None, None, None, logs=entry)
    assert "tokens_per_second" not in logs[0] and logs[1]["tokens_per_second"] == 500.0
    assert "tokens_per_second" not in logs[2]  # a line without token counts (the final summary)


def test_a_dequantized_copy_of_4_bit_layers_gives_the_same_products_and_gradients():
    """finetune.overrides.dequantize_base: what bitsandbytes computes per call, from weights dequantized once."""
    import bitsandbytes as bnb

    from finetune.overrides import DequantizedLinear, dequantize_base

    torch.manual_seed(0)
    source = torch.nn.Linear(64, 32, bias=True)
    quantized = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(source.weight.data.clone(), requires_grad=False, quant_type="nf4")
    quantized.bias = torch.nn.Parameter(source.bias.data.clone(), requires_grad=False)
    model = torch.nn.Sequential(quantized.to("cpu"))
    x = torch.randn(5, 64, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    expected_grad, x.grad = x.grad.clone(), None

    assert dequantize_base(model) == 1 and isinstance(model[0], DequantizedLinear)
    assert not model[0].weight.requires_grad and model[0].weight.dtype == torch.bfloat16
    actual = model(x)
    actual.sum().backward()
    assert actual.dtype == expected.dtype == torch.float32  # bitsandbytes returns the input's dtype
    assert torch.equal(actual, expected)
    assert torch.equal(x.grad, expected_grad)


def test_the_fast_plan_keeps_a_bf16_copy_only_where_the_longest_step_fits_beside_it_as_one_batch():
    copied = "nf4, dequantized once to bf16"
    plans = {
        (stage, gib): plan(stage, SEED, "fast", MISTRAL_7B, gib * GIB, quantized=True)[1]
        for stage in ("sft", "dpo")
        for gib in (20, 24, 32, 80)
    }
    _, unquantized = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=False)
    # SFT's longest step is 8 x 1,024 tokens: beside the copy (13.5 GiB) it fits 24 GiB with 31 layers checkpointed.
    assert [plans["sft", gib].base_weights == copied for gib in (20, 24, 32, 80)] == [False, True, True, True]
    # DPO's is twice as long (chosen and rejected): 32 GiB.
    assert [plans["dpo", gib].base_weights == copied for gib in (20, 24, 32, 80)] == [False, False, True, True]
    for chosen in plans.values():  # never at the cost of the whole step as one batch, runs or offloading
        assert chosen.per_device_train_batch_size == 8 and chosen.recompute == WHOLE_BATCHES
        assert (chosen.checkpoints == OFFLOADED) == (chosen.base_weights != copied)
    assert unquantized.base_weights == "as loaded"
    layers_for = layers_to_checkpoint(
        MISTRAL_7B, 8 * 1024, plans["sft", 24].memory_budget_gib * GIB, Activations(compiled=True)
    )
    assert layers_for == 31
    _, forced = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True, bf16_copy=False)
    assert forced.base_weights == "as loaded" and forced.checkpoints == OFFLOADED
    on_80 = plans["sft", 80]
    assert on_80.compiled and on_80.attention == "flex_attention"
    # The copy's memory comes out of the activation budget.
    assert on_80.memory_budget_gib == pytest.approx(
        (80 * GIB * 0.85 - static_bytes(MISTRAL_7B, quantized=True, dequantized=True, embeddings_bf16=True)) / GIB,
        abs=0.01,
    )


def test_profile_steps_writes_a_table_of_the_chosen_steps_per_process(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from finetune.core.errors import ConfigError
    from finetune.training.runs import PROFILE_ENV, PROFILE_STEPS_ENV, ProfileSteps, profile_callbacks

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert profile_callbacks() == []
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "profile"))
    monkeypatch.delenv(PROFILE_STEPS_ENV, raising=False)
    [callback] = profile_callbacks()
    assert isinstance(callback, ProfileSteps) and (callback.first, callback.count) == (8, 4)
    for wrong in ("3", "4-2", "0-1", "a-b"):
        monkeypatch.setenv(PROFILE_STEPS_ENV, wrong)
        with pytest.raises(ConfigError, match=f"{PROFILE_STEPS_ENV}='{wrong}'"):
            profile_callbacks()
    monkeypatch.setenv(PROFILE_STEPS_ENV, "2-3")
    [callback] = profile_callbacks()
    weights = torch.randn(64, 64)
    for step in range(4):  # Trainer order: on_step_begin, the step, then global_step += 1 and on_step_end
        state = SimpleNamespace(global_step=step)
        callback.on_step_begin(None, state, None)
        (weights @ weights).sum()
        state.global_step = step + 1
        callback.on_step_end(None, state, None)
    text = (tmp_path / "profile" / "profile_rank0.txt").read_text()
    assert text.startswith("steps 2-3: wall ") and "aten::mm" in text and "sorted by self_cpu_time_total" in text
    with gzip.open(tmp_path / "profile" / "trace_rank0.json.gz", "rt") as trace:
        events = json.load(trace)["traceEvents"]
    assert sum(event.get("name") == "aten::mm" for event in events) == 2  # steps 2 and 3, not 1 or 4
