"""The frozen input embedding and LM head held in bf16 under QLoRA, the dtype they were loaded in.

PEFT's prepare_model_for_kbit_training upcasts every weight that is not 4-bit to float32, for the norms' sake, and
with them the embedding and the head: for Mistral-7B 1.05 GB instead of 0.52. LoRA never trains either, and under
bf16 autocast the head is cast back to bf16 for its product anyway (TRL's fused LM head casts it once per forward
and once per backward, 0.26 GB held each time). Held in bf16, both keep the values they were loaded with, and the
embedding's output is cast to the float32 the rest of the model was upcast to, so the residual stream and every
product are the same, bit for bit (tests/test_embeddings.py).
"""

from __future__ import annotations

HELD_IN_BF16 = "frozen embedding and head held in bf16 (their loaded values)"


def hold_frozen_embeddings_in_bf16(model) -> int:
    """Store the model's frozen float32 embedding and head in bf16 where that loses nothing; returns the parameters
    held so. Needs bf16 or fp16 autocast around training (an fp32 product would meet a bf16 head): the layout plans
    it only then. A weight that trains, or whose float32 values are not all bf16 values, is left as it is."""
    import torch

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    held = 0
    for module in dict.fromkeys(m for m in (embedding, head) if m is not None):
        weight = module.weight
        if weight.requires_grad or weight.dtype != torch.float32 or not _bf16_exact(weight):
            continue
        weight.data = weight.data.to(torch.bfloat16)
        held += weight.numel()
    if embedding is not None and embedding.weight.dtype == torch.bfloat16 and held:
        embedding.register_forward_hook(_to_float32)
    return held


def _bf16_exact(weight) -> bool:
    import torch

    return bool(torch.equal(weight.data.to(torch.bfloat16).to(torch.float32), weight.data))


def _to_float32(module, args, output):
    """The embedding's output in the float32 it had before: the residual stream stays as PEFT upcast it."""
    return output.float()
