"""finetune.layout.balance: each optimizer step's examples split across GPUs by tokens, the same examples per step as
the Trainer's own sampler, and the split installed in a real SFTTrainer's data loader."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pytest
import torch

from finetune.core.config import load_config
from finetune.layout.balance import TokenBalancedSampler, balanced_shares
from finetune.layout.speed import BALANCED_SHARES, plan
from finetune.training import sft as sft_training
from finetune.training.runs import trainer_args


def benchmark_lengths(count: int, seed: int = 0) -> list[int]:
    """Example lengths as benchmarks/throughput.py writes them: lognormal, median 250 tokens, 24 to 1024."""
    rng = random.Random(seed)
    return [int(min(1024, max(24, rng.lognormvariate(math.log(250), 0.7)))) for _ in range(count)]


def largest_share_over_mean(lengths: list[int], shares: list[list[int]]) -> float:
    tokens = [sum(lengths[i] for i in share) for share in shares]
    return max(tokens) / (sum(tokens) / len(tokens))


def test_shares_hold_every_example_once_in_equal_numbers():
    lengths = [5, 900, 30, 30, 400, 12, 77, 250, 250, 3, 640]
    shares = balanced_shares(lengths, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    assert [len(share) for share in shares] == [4, 4, 3]
    assert balanced_shares([7, 7], 2) == [[0], [1]]
    with pytest.raises(ValueError, match="3 examples into 4"):
        balanced_shares([1, 2, 3], 4)


@pytest.mark.parametrize(
    ("per_share", "dealt_at_least", "balanced_at_most"),
    [(4, 1.15, 1.05), (16, 1.07, 1.01)],
)
def test_shares_are_even_where_dealing_in_order_is_not(per_share, dealt_at_least, balanced_at_most):
    """Two GPUs, the benchmark's lengths: the larger share over the mean share, averaged over 500 steps."""
    lengths = benchmark_lengths(1000 * per_share)
    dealt, balanced = [], []
    for start in range(0, len(lengths), 2 * per_share):
        step = lengths[start : start + 2 * per_share]
        dealt.append(largest_share_over_mean(step, [list(range(per_share)), list(range(per_share, 2 * per_share))]))
        balanced.append(largest_share_over_mean(step, balanced_shares(step, 2)))
    print(f"{per_share} examples a GPU: dealt {statistics.mean(dealt):.3f}, split {statistics.mean(balanced):.3f}")
    assert statistics.mean(dealt) > dealt_at_least
    assert statistics.mean(balanced) < balanced_at_most


def test_ranks_together_take_the_default_samplers_examples_each_step():
    """Two ranks, accumulation 2, batch 3: per optimizer step, the 12 examples a single GPU would take (the Trainer's
    random sampler: a permutation drawn from seed + epoch), each in exactly one micro-batch of one rank."""
    lengths = benchmark_lengths(100, seed=1)
    seed, per_step = 7, 12
    ranks = [TokenBalancedSampler(lengths, per_step, dp_size=2, grad_accum=2, seed=seed, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for rank in ranks:
            rank.set_epoch(epoch)
        batches = [list(rank) for rank in ranks]
        assert all(len(rank_batches) == len(ranks[0]) for rank_batches in batches)
        for step in range(len(lengths) // per_step):
            micro = [batch for rank_batches in batches for batch in rank_batches[2 * step : 2 * step + 2]]
            assert sorted(len(batch) for batch in micro) == [3, 3, 3, 3]
            drawn = order[step * per_step : (step + 1) * per_step]
            assert sorted(i for batch in micro for i in batch) == sorted(drawn)


@pytest.mark.slow
def test_the_sft_trainer_draws_the_split_batches(tiny_project, tmp_path):
    """stages.sft with the plan's BALANCED_SHARES: the trainer's data loader yields the balanced micro-batches, over
    the same examples per step as its default loader."""
    from trl import SFTConfig

    cfg = load_config(tiny_project.params_path)
    cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_metrics=str(tmp_path / "metrics")))
    trainer_kwargs = {**cfg.sft.trainer, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}
    args = trainer_args(SFTConfig, "sft", trainer_kwargs, str(tmp_path / "out"))
    _, as_written = plan("sft", trainer_kwargs, "as_written", None, None, quantized=False)
    default = sft_training.build_trainer(cfg, args, resume=False)
    split = dataclasses.replace(as_written, shares=BALANCED_SHARES)
    balanced = sft_training.build_trainer(cfg, args, resume=False, speed=split)
    assert as_written.shares != BALANCED_SHARES and isinstance(balanced._get_train_sampler(), TokenBalancedSampler)

    def micro_batches(trainer) -> list[list[tuple[int, ...]]]:
        rows = []
        for batch in trainer.get_train_dataloader():
            ids, mask = batch["input_ids"], batch["attention_mask"]
            rows.append([tuple(row[: int(n)].tolist()) for row, n in zip(ids, mask.sum(dim=1))])
        return rows

    default_batches, balanced_batches = micro_batches(default), micro_batches(balanced)
    full_steps = len(balanced.train_dataset) // 6
    assert full_steps > 4
    for step in range(full_steps):
        drawn = default_batches[2 * step] + default_batches[2 * step + 1]  # the step's examples, in sampler order
        shares = balanced_shares([len(row) for row in drawn], 2)
        for slot, share in enumerate(shares):
            assert sorted(balanced_batches[2 * step + slot]) == sorted(drawn[p] for p in share)
    # The last, partial step: the same examples (the default loader takes them as one short micro-batch).
    assert sorted(sum(balanced_batches[2 * full_steps :], [])) == sorted(sum(default_batches[2 * full_steps :], []))


def test_only_sft_on_several_gpus_splits_by_tokens_unless_the_settings_name_a_sampler():
    from finetune.layout.speed import ModelShape

    shape = ModelShape(7_000_000_000, 260_000_000, 32, 4096, 14336, 32000)
    seed = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "max_length": 1024}
    gib = 2**30
    assert plan("sft", seed, "fast", shape, 80 * gib, quantized=True, world=2)[1].shares == BALANCED_SHARES
    assert plan("sft", seed, "fast", shape, 80 * gib, quantized=True, world=1)[1].shares != BALANCED_SHARES
    assert plan("dpo", seed, "fast", shape, 80 * gib, quantized=True, world=2)[1].shares != BALANCED_SHARES
    chosen = {**seed, "train_sampling_strategy": "group_by_length"}  # the settings' own sampler stays
    assert plan("sft", chosen, "fast", shape, 80 * gib, quantized=True, world=2)[1].shares != BALANCED_SHARES
