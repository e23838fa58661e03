"""finetune.layout.documents: a checkpointed layer recomputes a long padding-free batch in runs of whole
documents, with the whole batch's outputs and gradients, and the layout plans whole-step batches with it."""

from __future__ import annotations

import pytest
import torch

from finetune.core.errors import ProjectError
from finetune.layout import speed
from finetune.layout.documents import DocumentRuns, document_block_mask, document_runs

LENGTHS = [37, 5, 64, 1, 90, 23]  # documents laid end to end in one row: 220 tokens


def positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(length) for length in lengths])[None]


@pytest.mark.parametrize(
    "lengths, capacity, expected",
    [
        ([3, 2, 5, 1], 100, [(0, 11)]),  # fits: one run
        ([3, 2, 5, 1], 5, [(0, 5), (5, 10), (10, 11)]),  # filled in order, never past the capacity
        ([3, 2, 5, 1], 4, [(0, 3), (3, 5), (5, 10), (10, 11)]),  # a document longer than a run is a run of its own
        ([4, 4, 4], 4, [(0, 4), (4, 8), (8, 12)]),
        ([7], 2, [(0, 7)]),  # one document is never cut
        ([2, 2, 2, 2, 2], 8, [(0, 6), (6, 10)]),  # as few runs as filling in order, as even as documents allow
        ([6, 6, 30], 10, [(0, 6), (6, 12), (12, 42)]),  # a long document does not let short ones past the capacity
    ],
)
def test_runs_are_consecutive_whole_documents_up_to_the_capacity(lengths, capacity, expected):
    assert document_runs(positions(lengths)[0].tolist(), capacity) == expected


@pytest.fixture(autouse=True)
def flex_attention_with_a_cpu_backward(monkeypatch):
    """transformers' flex attention, computed from each call's BlockMask as a dense mask: PyTorch's flex attention has
    no backward on the CPU. What is tested here is which tokens each run attends to, not the kernel."""
    from torch.nn.attention.flex_attention import create_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def dense_flex_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        tokens = query.shape[2]
        allowed = create_mask(attention_mask.mask_mod, 1, 1, tokens, tokens, device=query.device)
        output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
        return output.transpose(1, 2).contiguous(), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", dense_flex_attention)


def tiny_lora_model(dropout: float):
    """A two-layer Mistral under flex attention with LoRA on every projection, as the fast layout trains it:
    padding-free rows get the layout's document block mask (speed.pack_padded_batches), checkpoints are torch's
    non-reentrant."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="flex_attention", use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, lora)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    speed.pack_padded_batches(model.get_base_model().model)
    return model.train()


def lora_gradients(model, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)  # the dropout masks
    ids = torch.randint(3, 100, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(2))
    loss = model(input_ids=ids, position_ids=positions(LENGTHS), labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def in_runs(model, capacity: int, checkpointed: bool = True) -> list[list[int]]:
    """Every layer checkpointed around an eager forward and split into runs of `capacity` tokens; returns the tokens
    of each call a layer's forward gets. `checkpointed` False: the same runs, each called directly (no recompute)."""
    from finetune.model.loading import decoder_layers
    from finetune.overrides import checkpoint_around_compiled

    runs = DocumentRuns(sliding_window=None)
    runs.capacity = capacity
    calls: list[list[int]] = []

    def recording(forward):  # the layer class's forward
        def run(layer, hidden, *args, **kwargs):
            calls.append([hidden.shape[1], int(torch.is_grad_enabled())])
            return forward(layer, hidden, *args, **kwargs)

        return run

    for layer in decoder_layers(model):
        layer.gradient_checkpointing = True
        if not checkpointed:
            layer._gradient_checkpointing_func = lambda function, *args: function(*args)
        checkpoint_around_compiled(layer, recording, split=runs.split)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_runs_give_the_whole_batchs_loss_and_gradients(dropout):
    """Dropout 0: the runs' loss and LoRA gradients are the whole batch's. With dropout, each run draws its own
    masks, so the reference is the same runs without checkpointing: the recompute must redraw the masks the forward
    pass drew, or the gradients would belong to another forward pass."""
    model = tiny_lora_model(dropout)
    if dropout == 0:
        expected_loss, expected = lora_gradients(model)
    else:
        in_runs(model, capacity=100, checkpointed=False)
        expected_loss, expected = lora_gradients(model)
    model = tiny_lora_model(dropout)
    calls = in_runs(model, capacity=100)
    loss, gradients = lora_gradients(model)
    # Runs of 37+5 tokens (the next document would pass 100), 64+1, 90, 23... per layer: forward, then recompute.
    forward_runs = [tokens for tokens, _ in calls[: len(calls) // 2]]
    assert forward_runs == [42, 65, 90, 23] * 2
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert gradients.keys() == expected.keys() and len(expected) == 2 * 7 * 2
    for name in expected:
        torch.testing.assert_close(gradients[name], expected[name], rtol=1e-4, atol=1e-6)
    if dropout:  # and the masks did change with the runs
        model = tiny_lora_model(dropout)
        _, whole = lora_gradients(model)
        assert any(not torch.allclose(whole[name], expected[name]) for name in expected)


def test_a_batch_within_the_capacity_runs_whole():
    model = tiny_lora_model(0.0)
    calls = in_runs(model, capacity=sum(LENGTHS))
    lora_gradients(model)
    assert [tokens for tokens, _ in calls] == [sum(LENGTHS)] * 4  # two layers, forward and recompute


def test_runs_are_as_even_as_whole_documents_allow_and_no_more_than_filling_in_order_gives():
    import random

    from finetune.layout.documents import _filled_in_order, document_starts

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 30))]
        row, capacity = positions(lengths)[0].tolist(), rng.randint(50, 2000)
        runs, in_order = document_runs(row, capacity), _filled_in_order(document_starts(row), len(row), capacity)
        assert len(runs) == len(in_order) and runs[0][0] == 0 and runs[-1][1] == len(row)
        assert all(end == start for (_, end), (start, _) in zip(runs, runs[1:]))  # consecutive, every token once
        longest = max(end - start for start, end in runs)
        assert longest <= max(end - start for start, end in in_order)
        assert all(end - start <= capacity or end - start in lengths for start, end in runs)


def test_runs_need_one_padding_free_row_under_flex_attention():
    from torch.nn.attention.flex_attention import BlockMask

    runs = DocumentRuns(sliding_window=None)
    runs.capacity = 8
    hidden = torch.zeros(2, 16, 4)
    keywords = {"position_ids": torch.arange(16).expand(2, -1), "attention_mask": None}
    with pytest.raises(ProjectError, match="one padding-free row under flex attention"):
        runs.split(hidden, keywords)
    mask = document_block_mask(positions([8, 8]))
    assert isinstance(mask, BlockMask)
    with pytest.raises(ProjectError, match="'extra'"):  # a keyword it cannot cut is an error, not a silent slice
        runs.split(hidden[:1], {"position_ids": positions([8, 8]), "attention_mask": mask, "extra": torch.ones(16)})


def test_each_run_gets_its_own_tokens_positions_mask_and_document_bounds():
    """What TRL's padding-free collator and the model hand a decoder layer, cut to each run: per-token tensors
    sliced, the block mask and the varlen kernels' bounds (cu_seq_lens, max_length, seq_idx) rebuilt for the run's
    documents, counts and flags as they are."""
    from finetune.layout.documents import document_starts

    lengths = [3, 2, 5, 1]
    row = positions(lengths)
    starts = document_starts(row[0].tolist())
    bounds = torch.tensor([*starts, 11], dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(4, dtype=torch.int32), torch.tensor(lengths))[None]
    cos, sin = torch.randn(1, 11, 8), torch.randn(1, 11, 8)
    keywords = {
        "attention_mask": document_block_mask(row), "position_ids": row, "position_embeddings": (cos, sin),
        "past_key_values": None, "use_cache": False, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
        "max_length_q": 5, "max_length_k": 5, "seq_idx": seq_idx, "num_items_in_batch": torch.tensor(9),
    }  # fmt: skip
    runs = DocumentRuns(sliding_window=None)
    runs.capacity = 5
    parts = runs.split(torch.randn(1, 11, 4), keywords)
    assert [part.shape[1] for part, _ in parts] == [5, 5, 1]
    second = parts[1][1]
    assert torch.equal(second["position_ids"], torch.arange(5)[None])
    assert torch.equal(second["position_embeddings"][0], cos[:, 5:10])
    assert second["cu_seq_lens_q"].tolist() == [0, 5] and second["max_length_k"] == 5
    assert parts[0][1]["cu_seq_lens_k"].tolist() == [0, 3, 5] and parts[0][1]["max_length_q"] == 3
    assert second["seq_idx"].tolist() == [[0] * 5] and parts[0][1]["seq_idx"].tolist() == [[0, 0, 0, 1, 1]]
    assert second["num_items_in_batch"] is keywords["num_items_in_batch"] and second["use_cache"] is False
    assert second["attention_mask"].seq_lengths == (5, 5)
    # Each run's per-token tensors have the strides of tensors of their own size (views, not copies).
    for part, run in parts:
        for tensor in (part, run["position_ids"], *run["position_embeddings"]):
            assert tensor.stride() == torch.empty(tensor.shape).stride() and tensor._base is not None


def test_runs_reuse_the_compiled_layers_dynamic_graph(monkeypatch):
    """A compiled decoder layer compiles a static graph at its first batch length and a dynamic one at the second;
    batches split into runs of documents reuse the dynamic one. (Sliced from the whole row, a run kept the row's
    stride on its batch dimension, which the dynamic graph guards on, so each process compiled a third graph at its
    first long batch: 26-42 s for a 7B layer on an H100.)"""
    import functools

    from torch._dynamo.utils import counters

    from finetune import overrides
    from finetune.model.loading import decoder_layers
    from finetune.overrides import checkpoint_around_compiled

    torch._dynamo.reset()
    monkeypatch.setattr(overrides, "SUPPRESS_COMPILE_ERRORS", False)  # a compile failure fails, not runs eagerly
    model = tiny_lora_model(0.0)
    runs = DocumentRuns(speed._uniform_sliding_window(model.config))
    compiled = functools.cache(speed.torch_compiled_forward)
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = True
        checkpoint_around_compiled(layer, compiled, split=runs.split)

    def graphs_compiled_by(lengths: list[int], capacity: int | None = None) -> int:
        runs.capacity = capacity
        before = counters["frames"]["total"]
        ids = torch.randint(3, 100, (1, sum(lengths)), generator=torch.Generator().manual_seed(sum(lengths)))
        model(input_ids=ids, position_ids=positions(lengths), labels=ids).loss.backward()
        return counters["frames"]["total"] - before

    assert graphs_compiled_by([30, 50, 20]) == 1 and graphs_compiled_by([40, 70, 33, 9]) == 1
    assert graphs_compiled_by([25, 61, 44]) == 0
    assert graphs_compiled_by([60, 50, 45, 30], capacity=100) == 0  # runs of 110 and 75 tokens
    assert graphs_compiled_by([70, 20, 65, 31, 12], capacity=110) == 0  # 90 and 108


def test_the_memory_model_of_runs():
    shape = speed.ModelShape(7_000_000_000, 262_410_240, 32, 4096, 14336, 32000)
    how = speed.Activations(compiled=True, offloaded=True, in_runs=True)
    layer = speed.layer_bytes_per_token(shape, compiled=True)
    tokens, run = 8192, 2048
    # One run recomputing, beside the whole batch's gradient out of the layer and the runs' gradients into it.
    assert speed.batch_bytes(shape, tokens, 32, how, run_tokens=run) == max(
        run * layer + tokens * 8 * shape.hidden,
        tokens * speed.head_bytes_per_token(shape) + speed.LOGIT_TILE_TOKENS * shape.vocab * speed.LOGIT_TILE_BYTES,
    )
    assert speed.batch_bytes(shape, tokens, 32, how, run_tokens=tokens) == speed.batch_bytes(shape, tokens, 32, how)
    budget = speed.batch_bytes(shape, tokens, 32, how, run_tokens=run)
    assert speed.run_capacity(shape, tokens, budget, how) == run
    assert speed.run_capacity(shape, tokens, budget - 1, how) == run - 64
    assert speed.run_capacity(shape, tokens, tokens * speed.head_bytes_per_token(shape), how) is None  # no room


def test_the_per_batch_hook_splits_only_the_batches_too_long_to_recompute_whole(monkeypatch):
    """checkpoint_as_needed with runs (the fast layout at a small budget): a batch whose whole recompute would pass
    the budget recomputes in runs sized by the memory model, and the gradients are the whole batch's."""
    model = tiny_lora_model(0.0)
    expected_loss, expected = lora_gradients(model)

    calls = []

    def recording(forward):
        def run(layer, hidden, *args, **kwargs):
            calls.append(hidden.shape[1])
            return forward(layer, hidden, *args, **kwargs)

        return run

    monkeypatch.setattr(speed, "_compiled", recording)
    shape = speed.ModelShape(0, 0, layers=2, hidden=32, intermediate=64, vocab=100)
    how = speed.Activations(compiled=True, in_runs=True)
    budget = speed.batch_bytes(shape, 256, 2, how, run_tokens=128)  # the hook plans by buckets of 256 tokens
    assert speed.layers_to_checkpoint(shape, 256, budget, how) is None  # whole, no layer could recompute it
    model = tiny_lora_model(0.0)
    speed.checkpoint_as_needed(model, shape, budget, how=how)
    loss, gradients = lora_gradients(model)
    # 37+5+64+1 and 90+23 tokens; two layers forward, then each recomputes its runs as the backward pass meets them.
    assert calls == [107, 113] * 2 + [113, 107] * 2
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(gradients[name], expected[name], rtol=1e-4, atol=1e-6)


def test_the_sft_stage_in_runs_follows_the_seed_layouts_loss_trajectory(tiny_project, tmp_path, monkeypatch):
    """The sft stage's trainer (TRL's padding-free collator and its varlen keywords, compiled layers, the per-batch
    hook) with the whole step as one batch of 4 split into runs, against the seed layout's 1 x 4: the same losses.
    The tiny model's memory is all in its head, so the memory model is told the batches need runs of 100 tokens."""
    import dataclasses

    from trl import SFTConfig

    from finetune.core.config import load_config
    from finetune.training import sft as sft_training
    from finetune.training.runs import trainer_args
    from test_speed import three_steps

    monkeypatch.chdir(tmp_path)
    cfg = load_config(tiny_project.params_path)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))  # exact arithmetic
    seed = three_steps(cfg.sft.trainer, batch=1, accumulation=4)
    shape = speed.model_shape(cfg.model, quantized=False)  # a CPU loads it unquantized
    fast, chosen = speed.plan("sft", seed, "fast", shape, 80 * speed.GIB, quantized=False)
    fast.update(per_device_train_batch_size=4, gradient_accumulation_steps=1, activation_checkpointing=True)
    in_runs = dataclasses.replace(
        chosen, per_device_train_batch_size=4, gradient_accumulation_steps=1, checkpointing="as memory needs",
        recompute=speed.IN_RUNS.format(tokens=100),
    )  # fmt: skip
    monkeypatch.setattr(speed, "layers_to_checkpoint", lambda *args, **kwargs: None)
    monkeypatch.setattr(speed, "run_capacity", lambda *args, **kwargs: 100)

    split_calls = []
    real_split = DocumentRuns.split

    def recording_split(self, hidden, keywords):
        parts = real_split(self, hidden, keywords)
        split_calls.append([part.shape[1] for part, _ in parts or ()])
        return parts

    monkeypatch.setattr(DocumentRuns, "split", recording_split)

    def losses(name, kwargs, install=None):
        run_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_metrics=str(tmp_path / name)))
        args = trainer_args(SFTConfig, "sft", kwargs, str(tmp_path / f"{name}-checkpoints"))
        trainer = sft_training.build_trainer(run_cfg, args, resume=False, speed=in_runs, install=install)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    seed_losses = losses("seed", seed)
    torch._dynamo.utils.counters.clear()
    fast_losses = losses("fast", fast, install=speed.installer(in_runs, shape))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled for real, not left to eager
    assert sum(len(runs) >= 2 for runs in split_calls) >= 2, split_calls  # batches did run in runs
    assert len(fast_losses) == len(seed_losses) == 3
    assert fast_losses == pytest.approx(seed_losses, rel=1e-4)


def test_the_dpo_stage_in_runs_follows_the_padded_runs_loss_trajectory(tiny_project, tmp_path, monkeypatch):
    """The dpo stage's trainer (TRL's padded pairs packed into one row, its precomputed reference pass, compiled
    layers) with each batch split into runs: the padded run's reference log-probs and losses."""
    import dataclasses

    from trl import DPOConfig

    from finetune.training import dpo as dpo_training
    from finetune.training.runs import trainer_args
    from test_speed import dpo_config_from_a_moved_adapter, three_steps

    monkeypatch.chdir(tmp_path)
    cfg = dpo_config_from_a_moved_adapter(tiny_project, tmp_path)
    shape = speed.model_shape(cfg.model, quantized=False)
    fast, chosen = speed.plan("dpo", three_steps(cfg.dpo.trainer, 4, 1), "fast", shape, 80 * speed.GIB, False)
    padded = dataclasses.replace(chosen, compiled=False, attention="sdpa", padding_free=False)
    in_runs = dataclasses.replace(chosen, checkpointing="as memory needs", recompute=speed.IN_RUNS.format(tokens=100))
    split_calls = []
    real_split = DocumentRuns.split

    def recording_split(self, hidden, keywords):
        parts = real_split(self, hidden, keywords)
        split_calls.append(len(parts or ()))
        return parts

    def run(name, layout, kwargs):
        run_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, dpo_metrics=str(tmp_path / name)))
        args = trainer_args(DPOConfig, "dpo", kwargs, str(tmp_path / f"{name}-checkpoints"))
        trainer = dpo_training.build_trainer(
            run_cfg, args, resume=False, speed=layout, install=speed.installer(layout, shape)
        )
        reference = list(trainer.train_dataset["ref_chosen_logps"])
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], reference

    padded_losses, padded_reference = run("padded", padded, fast)
    monkeypatch.setattr(speed, "layers_to_checkpoint", lambda *args, **kwargs: None)
    monkeypatch.setattr(speed, "run_capacity", lambda *args, **kwargs: 100)
    monkeypatch.setattr(DocumentRuns, "split", recording_split)
    runs_losses, runs_reference = run("runs", in_runs, {**fast, "activation_checkpointing": True})
    assert sum(count >= 2 for count in split_calls) >= 2, split_calls  # batches did run in runs
    assert runs_reference == pytest.approx(padded_reference, rel=1e-4)
    assert len(padded_losses) == 3 and runs_losses == pytest.approx(padded_losses, rel=1e-4)
