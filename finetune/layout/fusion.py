"""A decoder layer's sibling LoRA projections as one matrix product each, where the frozen weights are plain tensors.

q, k and v read the same input, as do gate and up. PEFT runs each as its own LoRA layer: three products apiece
(frozen weight, A, B) forward and five backward, 56 per Mistral layer and step. At the seed's 8 examples per
optimizer step the fast layout is bound by the CPU issuing them. Fused, each sibling group takes one product for its
frozen weights (stacked once into one tensor, the layers' own weights becoming views of it, so no memory is added),
one batched product for the A matrices and one for the B matrices (block-diagonal), 32 per layer in all (12 forward).

The arithmetic is PEFT's: `base(x) + B(A(dropout(x))) * scaling` with the same casts, every projection drawing its
own dropout mask as PEFT's separate dropout modules do (tests/test_fusion.py compares outputs and gradients with
the unfused model). With the adapter disabled (DPO's reference pass) a group takes its one frozen product; merged
adapters, several active ones, DoRA or LoRA biases run PEFT's layers one by one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from finetune import overrides
from finetune.overrides import ATTENTION_CLASSES, MLP_CLASSES, DequantizedLinear

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj")
FUSED_WEIGHT = {ATTENTION_PROJECTIONS: "fused_qkv_weight", MLP_PROJECTIONS: "fused_gate_up_weight"}


def fuse_projections(model) -> int:
    """Stack the frozen weights of every supported layer's q/k/v and gate/up groups and route those layers through
    grouped_projections; returns how many groups. Runs before or after PEFT adds its LoRA layers.

    Needs plain frozen weights: nn.Linear, or the fast layout's bf16 copy of 4-bit ones
    (finetune.overrides.DequantizedLinear), without bias. Other groups stay as they are. The layers' forwards are
    re-implemented from transformers' and PEFT's (finetune.overrides.route_forward, attend, lora_input), whose guards
    run first.
    """
    overrides.check_lora_layers()
    fused = 0
    for module in model.modules():
        name = type(module).__name__
        if name in ATTENTION_CLASSES:
            overrides.check_reproduced_forward(module)
            if _stack_weights(module, ATTENTION_PROJECTIONS):
                overrides.route_forward(module, _attention_forward)
                fused += 1
        elif name in MLP_CLASSES:
            overrides.check_reproduced_forward(module)
            if _stack_weights(module, MLP_PROJECTIONS):
                overrides.route_forward(module, _mlp_forward)
                fused += 1
    return fused


def _frozen(layer):
    from peft.tuners.lora import LoraLayer

    return layer.get_base_layer() if isinstance(layer, LoraLayer) else layer


def _stack_weights(parent, names: tuple[str, ...]) -> bool:
    """Stack the group's weights into one parameter of `parent`, the layers' weights becoming views of it."""
    bases = [_frozen(getattr(parent, name, None)) for name in names]
    kinds = {type(base) for base in bases}
    if len(kinds) != 1 or not kinds <= {torch.nn.Linear, DequantizedLinear}:
        return False
    if any(base.bias is not None for base in bases):
        return False
    weights = [base.weight for base in bases]
    if len({(weight.dtype, weight.device, weight.shape[1], weight.requires_grad) for weight in weights}) > 1:
        return False
    stacked = torch.nn.Parameter(
        torch.cat([weight.data for weight in weights]), requires_grad=weights[0].requires_grad
    )
    parent.register_parameter(FUSED_WEIGHT[names], stacked)
    offset = 0
    for base in bases:
        # Each layer keeps its weight as a plain view: the stacked weight is the one parameter, counted, frozen by
        # PEFT and moved once. A merge into a layer's weight (PEFT's merge_and_unload) writes into it.
        del base.weight  # unregistered, then set again as a plain attribute, where PEFT and the forward read it
        base.weight = stacked.data[offset : offset + base.out_features]
        offset += base.out_features
    return True


_UNSUPPORTED = object()  # a LoRA state grouped_projections does not reproduce: PEFT's own forward runs


class LoraUpdate(NamedTuple):
    layer: torch.nn.Module
    weight_a: torch.Tensor  # (rank, in)
    weight_b: torch.Tensor  # (out, rank)
    dropout: torch.nn.Module
    scaling: float


def _lora_update(layer):
    """What a layer adds to its frozen product: a LoraUpdate, None for nothing (a plain layer, or its adapters
    disabled), or _UNSUPPORTED."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        return None
    if layer.merged:
        return _UNSUPPORTED
    if layer.disable_adapters:
        return None
    active = [adapter for adapter in layer.active_adapters if adapter in layer.lora_A]
    if not active:
        return None
    if len(active) > 1 or active[0] in layer.lora_variant or layer.lora_bias.get(active[0], False):
        return _UNSUPPORTED
    adapter = active[0]
    return LoraUpdate(
        layer, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.lora_dropout[adapter],
        layer.scaling[adapter],
    )  # fmt: skip


def _dropout_rate(dropout) -> float:
    return dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0


def grouped_projections(parent, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of `parent`'s layers `names` applied to x, as PEFT's (or the plain layer's) forward computes it."""
    layers = [getattr(parent, name) for name in names]
    updates = [_lora_update(layer) for layer in layers]
    stacked = getattr(parent, FUSED_WEIGHT[names])
    lora = [update for update in updates if update is not None]
    agree = len({(u.weight_a.shape, u.weight_a.dtype, _dropout_rate(u.dropout), u.scaling) for u in lora}) <= 1
    if any(update is _UNSUPPORTED for update in updates) or not agree:
        return tuple(layer(x) for layer in layers)
    if type(_frozen(layers[0])) is DequantizedLinear:
        base = F.linear(x.to(stacked.dtype), stacked).to(x.dtype)  # its dtype contract
    else:
        base = F.linear(x, stacked)
    sizes = [_frozen(layer).out_features for layer in layers]
    if not lora:
        return base.split(sizes, dim=-1)
    first = lora[0]
    lora_x = overrides.lora_input(first.layer, x, first.weight_a.dtype)
    if _dropout_rate(first.dropout) > 0:
        # One mask per projection, as PEFT's separate dropout modules draw them.
        count = len(lora)
        dropped = first.dropout(lora_x.unsqueeze(0).expand(count, *lora_x.shape)).reshape(count, -1, lora_x.shape[-1])
        # (projections, tokens, rank)
        hidden = torch.bmm(dropped, torch.stack([u.weight_a for u in lora]).transpose(1, 2))
        hidden = hidden.transpose(0, 1).reshape(*lora_x.shape[:-1], -1)
    else:
        hidden = F.linear(first.dropout(lora_x), torch.cat([u.weight_a for u in lora]))
    update = F.linear(hidden, _block_diagonal(updates, sizes, first.weight_b))
    return (base + update * first.scaling).to(base.dtype).split(sizes, dim=-1)


def _block_diagonal(updates, sizes: list[int], like: torch.Tensor) -> torch.Tensor:
    """(sum of outputs, LoRA layers x rank): each projection's B in the columns of its own A's output, zeros elsewhere
    (a projection without LoRA has zero rows). Built by masking the B matrices stacked by rows and tiled, not with
    torch.block_diag: then each B's gradient is a contiguous row block, which the optimizer takes as it is, where
    block_diag's would be a strided slice that autograd copies (5 copy kernels per Mistral layer and step)."""
    rank = like.shape[1]
    rows = torch.cat([u.weight_b if u is not None else like.new_zeros(size, rank) for u, size in zip(updates, sizes)])
    row_owner, layers = [], 0  # which LoRA layer's columns each row reads (-1: none)
    for update, size in zip(updates, sizes):
        row_owner.append(torch.full((size,), layers if update is not None else -1, device=like.device))
        layers += update is not None
    column_owner = torch.arange(layers * rank, device=like.device) // rank
    return rows.repeat(1, layers) * (torch.cat(row_owner)[:, None] == column_owner[None, :])


def _mlp_forward(self, x):
    """The MLP of Mistral and Llama, with gate and up from grouped_projections (the rest: finetune.overrides)."""
    gate, up = grouped_projections(self, MLP_PROJECTIONS, x)
    return overrides.project_down(self, gate, up)


def _attention_forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
    """The attention of Mistral and Llama, with q, k and v from grouped_projections (the rest: finetune.overrides)."""
    projections = grouped_projections(self, ATTENTION_PROJECTIONS, hidden_states)
    tokens = hidden_states.shape[:-1]
    return overrides.attend(self, tokens, projections, position_embeddings, attention_mask, past_key_values, **kwargs)
