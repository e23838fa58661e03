"""Each optimizer step's examples split across the GPUs by token count, so that no GPU waits for a longer share.

Under data parallelism every GPU takes a share of the step's examples, and the gradients are averaged once all of
them are done: the share with the most tokens sets the pace. Dealt in the sampler's order, shares of examples whose
lengths vary as instruction data does are uneven (tests/test_balance.py measures by how much, and how much less here).

The split keeps the mathematics of the step: the same examples (the Trainer's random sampler draws a permutation
from the seed and the epoch; this sampler draws the same one, so 1 and N GPUs train on the same steps), the same
number in each share, and the loss normalised by the step's tokens over all GPUs. Only which GPU takes which example
changes. It applies to padding-free batches, where a share costs its tokens; padded batches cost their longest row.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.overrides import SharesSampler, replace_train_sampler


def balanced_shares(lengths: Sequence[int], shares: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 in `shares` lists whose sizes differ by at most one (the first ones larger), each
    filled longest first: the next example goes to the share with the fewest tokens that still has room."""
    if not 0 < shares <= len(lengths):
        raise ValueError(f"cannot split {len(lengths)} examples into {shares} non-empty shares")
    size, larger = divmod(len(lengths), shares)
    room = [size + (1 if share < larger else 0) for share in range(shares)]
    tokens = [0] * shares
    members: list[list[int]] = [[] for _ in range(shares)]
    for position in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        share = min((s for s in range(shares) if len(members[s]) < room[s]), key=lambda s: (tokens[s], s))
        members[share].append(position)
        tokens[share] += lengths[position]
    return [sorted(share) for share in members]


class TokenBalancedSampler(SharesSampler):
    """transformers' per-rank batch sampler (the Trainer passes it as the DataLoader's batch_sampler and keeps
    accelerate from sharding it again), with each step's shares cut by balanced_shares (finetune.overrides)."""

    split_shares = staticmethod(balanced_shares)


def balance_shares(trainer) -> None:
    """Make the trainer draw its training batches from a TokenBalancedSampler (its tokenized examples' lengths).

    Seeded as the Trainer's default sampler is: data_seed, else seed, plus the epoch."""
    args = trainer.args

    def token_balanced_sampler(train_dataset=None):
        dataset = trainer.train_dataset if train_dataset is None else train_dataset
        return TokenBalancedSampler(
            lengths=[len(ids) for ids in dataset["input_ids"]],
            effective_batch_size=args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
            dp_size=args.world_size,
            grad_accum=args.gradient_accumulation_steps,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            rank=args.process_index,
            drop_last=args.dataloader_drop_last,
        )

    replace_train_sampler(trainer, token_balanced_sampler)
