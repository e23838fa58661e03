"""Padding-free rows of documents: their flex-attention block mask, and runs of whole documents for checkpointed
layers.

Within a small memory budget the peak of a step is one checkpointed layer recomputing its activations for the
whole batch (about 300 KB per token for a 7B layer under QLoRA, compiled). A padding-free batch is documents laid
end to end that never attend to one another, so a layer can run it as consecutive runs of whole documents, each
its own checkpoint: every token meets the same weights, positions and attended tokens, so the outputs and gradients
are the whole batch's up to float rounding, and the peak is one run's activations. The optimizer step then keeps
its examples in one batch instead of accumulated micro-batches sized for the longest batch that could come; only
batches longer than the run capacity (rare for instruction data) are split.
"""

from __future__ import annotations

import math
from typing import Any

from finetune.core.errors import ProjectError

# Keywords a decoder layer takes that the runs leave as they are (None or flags for a training forward).
UNSPLIT = ("past_key_values", "use_cache", "output_attentions")
# TRL's padding-free collator's document bounds for varlen kernels, which each run gets for its own documents.
BOUNDS = ("cu_seq_lens_q", "cu_seq_lens_k")
LONGEST = ("max_length_q", "max_length_k")


def document_block_mask(position_ids, sliding_window: int | None = None, block_size: int = 128):
    """Flex attention's BlockMask for rows of documents laid end to end: causal within each document, and within
    `sliding_window` tokens when the model has one. A document starts wherever a position id is not the previous
    one plus 1 (transformers' rule for packed rows).

    Built from per-block ranges of document ids, a few small tensor operations with no compilation: a block of
    queries and one of keys are empty when they share no document, lie wholly in each other's future, or lie
    wholly outside the window; full when both lie in one document with every key at or before every query and
    within the window (blocks at a ragged end are never full, as in create_block_mask); partial otherwise, where
    the kernel evaluates the per-token rule. A block is only called empty or full when it certainly is, so the
    attention is the per-token rule's; tests/test_speed.py checks the layout against torch's create_block_mask.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    rows, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    document = starts.cumsum(dim=1)  # (rows, length), from 1
    blocks = math.ceil(length / block_size)
    padded = torch.cat([document, document[:, -1:].expand(rows, blocks * block_size - length)], dim=1)
    per_block = padded.view(rows, blocks, block_size)
    low, high = per_block.amin(dim=-1), per_block.amax(dim=-1)  # (rows, blocks)

    first = torch.arange(blocks, device=position_ids.device) * block_size
    last = torch.clamp(first + block_size - 1, max=length - 1)
    complete = (last - first + 1) == block_size
    q_first, q_last, k_first, k_last = first[:, None], last[:, None], first[None, :], last[None, :]
    shares_document = (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])
    any_allowed = shares_document & (k_first <= q_last)
    one_document = (low == high)[:, :, None] & (low == high)[:, None, :] & (low[:, :, None] == low[:, None, :])
    all_allowed = one_document & (k_last <= q_first) & (complete[:, None] & complete[None, :])
    if sliding_window is not None:
        any_allowed &= (q_first - k_last) < sliding_window
        all_allowed &= (q_last - k_first) < sliding_window
    partial = any_allowed & ~all_allowed

    def indices(chosen):  # (rows, 1, blocks) counts and (rows, 1, blocks, blocks) indices, the chosen ones first
        order = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)
        return chosen.sum(dim=-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def same_document(batch, head, q_index, kv_index):
        allowed = (document[batch, q_index] == document[batch, kv_index]) & (kv_index <= q_index)
        if sliding_window is None:
            return allowed
        return allowed & (q_index - kv_index < sliding_window)  # mask functions must not write in place

    kv_blocks, kv_order = indices(partial)
    full_blocks, full_order = indices(all_allowed)
    return BlockMask.from_kv_blocks(
        kv_blocks, kv_order, full_blocks, full_order, BLOCK_SIZE=block_size, mask_mod=same_document,
        seq_lengths=(length, length),
    )  # fmt: skip


def document_starts(position_ids) -> list[int]:
    """Where each document of one row starts: wherever a position id is not the previous one plus 1 (transformers'
    rule for packed rows)."""
    positions = [int(p) for p in position_ids]
    return [i for i, p in enumerate(positions) if i == 0 or p != positions[i - 1] + 1]


def document_runs(position_ids, capacity: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of consecutive whole documents of one row, at most `capacity` tokens each where the
    documents allow (a longer document is a run of its own): as few runs as filling them in order gives, as even as
    whole documents allow (the smallest cap that needs no more runs), so the peak is lower and no run is a short
    remainder."""
    starts, length = document_starts(position_ids), len(position_ids)
    fewest = len(_filled_in_order(starts, length, capacity))
    low, high = min(math.ceil(length / fewest), capacity), capacity
    while low < high:  # filling with a smaller cap never needs fewer runs
        middle = (low + high) // 2
        if len(_filled_in_order(starts, length, middle)) <= fewest:
            high = middle
        else:
            low = middle + 1
    return _filled_in_order(starts, length, low)


def _filled_in_order(starts: list[int], length: int, cap: int) -> list[tuple[int, int]]:
    """Runs of whole documents filled greedily in order, each ending before the document that would take it past
    `cap` tokens."""
    runs: list[tuple[int, int]] = []
    begin = 0
    for start, end in zip(starts, [*starts[1:], length]):  # each document, [start, end)
        if end - begin > cap and start > begin:
            runs.append((begin, start))
            begin = start
    runs.append((begin, length))
    return runs


class DocumentRuns:
    """Splits a checkpointed layer's call into runs of whole documents (finetune.overrides.checkpoint_around_compiled
    calls `split`). `capacity` is set before each training forward by the per-batch checkpointing hook: None runs
    batches whole. The runs and their block masks are built once per batch and shared by every layer."""

    def __init__(self, sliding_window: int | None):
        self.sliding_window = sliding_window
        self.capacity: int | None = None
        self._position_ids, self._capacity = None, None  # the batch and capacity the runs below belong to
        self._runs: list[tuple[int, int]] = []
        self._masks: list[Any] = []
        self._bounds: list[Any] = []  # each run's document bounds, from 0 (cu_seq_lens_q)
        self._longest: list[int] = []  # each run's longest document (max_length_q)

    def split(self, hidden, keywords: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]] | None:
        """(hidden states, layer keywords) of each run, or None to run the call whole."""
        import torch
        from torch.nn.attention.flex_attention import BlockMask

        position_ids = keywords.get("position_ids")
        if self.capacity is None or hidden.shape[1] <= self.capacity or position_ids is None:
            return None
        if hidden.shape[0] != 1 or not isinstance(keywords.get("attention_mask"), BlockMask):
            raise ProjectError(
                "speed: a batch to split into runs of documents must be one padding-free row under flex attention; "
                f"got {tuple(hidden.shape[:2])} rows x tokens with a {type(keywords.get('attention_mask')).__name__}"
            )
        self._prepare(position_ids)
        if len(self._runs) == 1:
            return None
        pieces = torch.split(hidden, [end - start for start, end in self._runs], dim=1)
        return [(own_strides(piece), self._run_keywords(keywords, index)) for index, piece in enumerate(pieces)]

    def _prepare(self, position_ids) -> None:
        import torch

        if self._position_ids is position_ids and self._capacity == self.capacity:
            return
        row = position_ids[0].tolist()  # the one copy to the host per batch
        self._runs = document_runs(row, self.capacity)
        self._masks = [document_block_mask(position_ids[:, s:e], self.sliding_window) for s, e in self._runs]
        starts = document_starts(row)
        bounds = [[b - s for b in starts if s <= b < e] + [e - s] for s, e in self._runs]
        self._bounds = [torch.tensor(b, dtype=torch.int32, device=position_ids.device) for b in bounds]
        self._longest = [max(high - low for low, high in zip(b, b[1:])) for b in bounds]
        self._position_ids, self._capacity = position_ids, self.capacity

    def _run_keywords(self, keywords: dict[str, Any], index: int) -> dict[str, Any]:
        """The layer keywords of run `index`: each per-token one cut to the run, the mask and bounds its own."""
        import torch

        start, end = self._runs[index]
        run = {}
        for key, value in keywords.items():
            if key == "attention_mask":
                run[key] = self._masks[index]
            elif key == "position_embeddings":  # (cos, sin), each (1, tokens, head_dim)
                run[key] = tuple(own_strides(part[:, start:end]) for part in value)
            elif key == "position_ids":
                run[key] = own_strides(value[:, start:end])
            elif key == "cache_position" and value is not None:
                run[key] = value[start:end]
            elif key in BOUNDS:
                run[key] = self._bounds[index].to(value.dtype)
            elif key in LONGEST:
                run[key] = self._longest[index]
            elif key == "seq_idx":  # each token's document, from 0
                run[key] = value[:, start:end] - value[:, start : start + 1]
            elif key in UNSPLIT or not isinstance(value, torch.Tensor | tuple | list) or _is_scalar(value):
                run[key] = value
            else:
                raise ProjectError(
                    f"speed: a decoder layer took the keyword {key!r}, which runs of documents do not know how to "
                    "split; set the stage's speed to low_memory"
                )
        return run


def own_strides(row_slice):
    """A slice of one row, as a view with the strides of a tensor of its own size. A slice keeps the whole row's
    stride on its batch dimension, and a compiled layer's dynamic graph guards on that stride (tokens x width), so
    without this the runs compile a graph of their own (tests/test_documents.py). No copy; the backward is a
    reshape."""
    return row_slice.squeeze(0).unsqueeze(0)


def _is_scalar(value) -> bool:
    """A 0-dimensional tensor (a count such as the loss's num_items_in_batch), the same for every run."""
    import torch

    return isinstance(value, torch.Tensor) and value.dim() == 0
