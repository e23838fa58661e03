"""finetune.layout.embeddings: the frozen embedding and head in bf16 change no number of a QLoRA step."""

from __future__ import annotations

import copy

import pytest
import torch

from finetune.layout.embeddings import hold_frozen_embeddings_in_bf16

TRAINER_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL 1.16's SFTTrainer asks of its fused LM head


def prepared_model(tie: bool = False):
    """A tiny Mistral loaded in bf16 and prepared as QLoRA prepares it: everything but 4-bit weights in float32."""
    from peft import prepare_model_for_kbit_training
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    model = MistralForCausalLM(config).to(torch.bfloat16)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def lora_step(model, autocast: bool = True):
    """Loss, per-token log-probs and LoRA gradients of one step as TRL's SFTTrainer takes it: seed LoRA, bf16
    autocast, TRL's fused LM head, a padding-free row of two examples."""
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, lora)
    add_fused_lm_head(peft_model.get_base_model(), outputs=TRAINER_OUTPUTS)
    peft_model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    positions = torch.cat([torch.arange(20), torch.arange(28)])[None]
    torch.manual_seed(2)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outputs = peft_model(input_ids=ids, position_ids=positions, labels=ids, fused_lm_head=True)
    outputs.loss.backward()
    grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
    return outputs.loss.detach(), outputs.log_probs.detach(), grads


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("autocast", [True, False])  # without autocast, TRL's fused head computes in float32
def test_a_step_is_the_same_bit_for_bit_at_half_the_memory(tie, autocast):
    float32, held = prepared_model(tie), prepared_model(tie)
    embedding_bytes = held.get_input_embeddings().weight.nbytes
    count = hold_frozen_embeddings_in_bf16(held)

    embedding, head = held.get_input_embeddings().weight, held.get_output_embeddings().weight
    assert embedding.dtype == head.dtype == torch.bfloat16
    assert embedding.nbytes == embedding_bytes // 2
    assert count == embedding.numel() * (1 if tie else 2)  # a tied head is the embedding: held once
    assert held.model.norm.weight.dtype == torch.float32  # the norms stay as PEFT upcast them

    loss, log_probs, grads = lora_step(held, autocast)
    expected_loss, expected_log_probs, expected_grads = lora_step(float32, autocast)
    assert torch.equal(loss, expected_loss)
    assert torch.equal(log_probs, expected_log_probs)
    assert grads.keys() == expected_grads.keys() and len(grads) == 12
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


def test_the_residual_stream_stays_float32():
    model = prepared_model()
    hold_frozen_embeddings_in_bf16(model)
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain head's product needs it: the layout requires it
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [torch.float32]


def test_trained_or_inexact_weights_and_a_second_call_are_left_alone():
    model = prepared_model()
    model.get_output_embeddings().weight.requires_grad_(True)  # a head that trains (modules_to_save)
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1e-4  # a value bf16 cannot hold
    assert hold_frozen_embeddings_in_bf16(model) == 0
    assert model.get_input_embeddings().weight.dtype == model.get_output_embeddings().weight.dtype == torch.float32

    fresh = prepared_model()
    first = hold_frozen_embeddings_in_bf16(fresh)
    assert first > 0 and hold_frozen_embeddings_in_bf16(fresh) == 0
    assert len(fresh.get_input_embeddings()._forward_hooks) == 1
    copied = copy.deepcopy(fresh)  # the hook travels with the module
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert copied(input_ids=torch.tensor([[4, 5]])).logits.shape == (1, 2, 512)


def test_the_fast_layout_plans_it_under_qlora_with_autocast_and_its_installer_applies_it():
    import dataclasses

    from test_speed import MISTRAL_7B, SEED

    from finetune.layout.embeddings import HELD_IN_BF16
    from finetune.layout.speed import GIB, installer, plan

    _, chosen = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True)
    assert chosen.embeddings == HELD_IN_BF16
    for trainer, quantized in (({**SEED, "bf16": False}, True), (SEED, False)):  # no autocast; no PEFT upcast
        assert plan("sft", trainer, "fast", MISTRAL_7B, 80 * GIB, quantized=quantized)[1].embeddings == "as loaded"
    only_embeddings = dataclasses.replace(
        chosen, compiled=False, attention="sdpa", base_weights="as loaded",
        padding_free=False, checkpointing="off",
    )  # fmt: skip
    model = prepared_model()
    installer(only_embeddings, MISTRAL_7B)(model)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
