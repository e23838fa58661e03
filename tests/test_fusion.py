"""finetune.layout.fusion: q/k/v and gate/up as one product each compute what PEFT's separate LoRA layers compute."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finetune.core.config import load_config
from finetune.layout.fusion import ATTENTION_PROJECTIONS, fuse_projections, grouped_projections
from finetune.model.loading import build_lora_config, load_model
from finetune.overrides import DequantizedLinear

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_model(tiny_project, fused: bool, targets=ALL_SEVEN, dropout: float = 0.0, dequantized: bool = False):
    """The tiny base model with a LoRA adapter (nonzero B, so A gets gradients), fused before PEFT wraps it, as the
    stages' install step does; with `dequantized`, the frozen layers are bf16 DequantizedLinear as in the fast
    layout's bf16 copy of 4-bit weights."""
    from peft import get_peft_model

    cfg = load_config(tiny_project.params_path)
    lora = dataclasses.replace(cfg.lora, dropout=dropout, target_modules=list(targets))
    torch.manual_seed(0)
    base = load_model(cfg.model, for_training=True)
    if dequantized:
        for parent in list(base.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and name in ALL_SEVEN:
                    layer = DequantizedLinear(child.in_features, child.out_features, bias=False)
                    layer.weight = torch.nn.Parameter(child.weight.data.to(torch.bfloat16), requires_grad=False)
                    setattr(parent, name, layer)
    groups = fuse_projections(base) if fused else 0
    model = get_peft_model(base, build_lora_config(lora))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    return model, groups


def matrix_products(model, input_ids) -> int:
    """How many matrix products (mm, bmm, addmm) a forward pass issues."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func in products
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(input_ids=input_ids)
    return Count.calls


def logits_and_grads(model, input_ids):
    model.zero_grad()
    logits = model(input_ids=input_ids).logits
    logits.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


# Products per decoder layer in a forward pass, separate and fused: 3 per LoRA layer (frozen, A, B), 1 per plain one;
# fused, each group (q/k/v, gate/up) takes 1 frozen product, plus 1 for A and 1 for B if any member has LoRA.
@pytest.mark.parametrize(
    "targets, separate_products, fused_products",
    [(ALL_SEVEN, 21, 12), (("q_proj", "v_proj"), 11, 6)],
    ids=["all seven", "q and v only"],
)
def test_fused_projections_give_pefts_outputs_and_gradients(tiny_project, targets, separate_products, fused_products):
    input_ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    separate, _ = lora_model(tiny_project, fused=False, targets=targets)
    fused, groups = lora_model(tiny_project, fused=True, targets=targets)
    layers = fused.config.num_hidden_layers
    assert groups == 2 * layers  # attention and MLP of every layer
    lm_head = 1
    assert matrix_products(separate, input_ids) == separate_products * layers + lm_head
    assert matrix_products(fused, input_ids) == fused_products * layers + lm_head
    expected_logits, expected_grads = logits_and_grads(separate, input_ids)
    logits, grads = logits_and_grads(fused, input_ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    assert len(grads) == 2 * len(targets) * layers  # every LoRA A and B got a gradient
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)


def test_stacked_weights_are_shared_not_copied_counted_once_and_frozen(tiny_project):
    separate, _ = lora_model(tiny_project, fused=False)
    model, _ = lora_model(tiny_project, fused=True)
    attention = model.base_model.model.model.layers[0].self_attn
    stacked = attention.fused_qkv_weight
    offset = 0
    for name in ATTENTION_PROJECTIONS:
        weight = getattr(attention, name).base_layer.weight
        assert weight.data_ptr() == stacked[offset].data_ptr()
        offset += weight.shape[0]
    assert offset == stacked.shape[0]
    assert model.num_parameters() == separate.num_parameters()  # the views are not parameters of their own
    stacked_names = [name for name, _ in model.named_parameters() if "fused_" in name]
    assert len(stacked_names) == 2 * model.config.num_hidden_layers
    assert not any(p.requires_grad for name, p in model.named_parameters() if "fused_" in name)  # PEFT froze them


def test_with_the_adapter_disabled_the_fused_model_is_the_base_model(tiny_project):
    """DPO's reference pass runs the model with its adapter disabled."""
    input_ids = torch.randint(0, 500, (1, 30), generator=torch.Generator().manual_seed(2))
    separate, _ = lora_model(tiny_project, fused=False)
    fused, _ = lora_model(tiny_project, fused=True)
    with torch.no_grad(), separate.disable_adapter(), fused.disable_adapter():
        base_logits = fused(input_ids=input_ids).logits
        torch.testing.assert_close(base_logits, separate(input_ids=input_ids).logits)
    with torch.no_grad():
        assert not torch.allclose(fused(input_ids=input_ids).logits, base_logits)  # the adapter is back


def test_bf16_copies_of_4_bit_weights_keep_their_dtype_contract(tiny_project):
    input_ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    separate, _ = lora_model(tiny_project, fused=False, dequantized=True)
    fused, groups = lora_model(tiny_project, fused=True, dequantized=True)
    assert groups == 2 * fused.config.num_hidden_layers
    assert fused.base_model.model.model.layers[0].mlp.fused_gate_up_weight.dtype == torch.bfloat16
    expected_logits, expected_grads = logits_and_grads(separate, input_ids)
    logits, grads = logits_and_grads(fused, input_ids)
    assert logits.dtype == expected_logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected_logits, rtol=1e-3, atol=1e-3)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=2e-2, atol=1e-4)


def test_each_projection_draws_its_own_dropout_mask(tiny_project):
    """PEFT gives q, k and v separate dropout modules, so separate masks: with k and v made identical (frozen weights,
    A and B), their outputs differ only through dropout."""
    model, _ = lora_model(tiny_project, fused=True, dropout=0.5)
    attention = model.base_model.model.model.layers[0].self_attn
    key, value = attention.k_proj, attention.v_proj
    with torch.no_grad():
        value.base_layer.weight.copy_(key.base_layer.weight)
        value.lora_A["default"].weight.copy_(key.lora_A["default"].weight)
        value.lora_B["default"].weight.copy_(key.lora_B["default"].weight)
    x = torch.randn(3, 16, model.config.hidden_size)
    model.train()
    _, keys, values = grouped_projections(attention, ATTENTION_PROJECTIONS, x)
    assert not torch.allclose(keys, values)
    model.eval()
    _, keys, values = grouped_projections(attention, ATTENTION_PROJECTIONS, x)
    torch.testing.assert_close(keys, values)
    expected = key.base_layer(x) + key.lora_B["default"](key.lora_A["default"](x)) * key.scaling["default"]
    torch.testing.assert_close(keys, expected)


def test_the_b_matrices_gradients_arrive_contiguous(tiny_project):
    """A strided gradient makes autograd copy it before accumulating: one more kernel per matrix and step."""
    model, _ = lora_model(tiny_project, fused=True, dropout=0.05)
    arriving = {}
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.register_hook(lambda grad, name=name: arriving.__setitem__(name, grad.is_contiguous()))
    model.train()
    model(input_ids=torch.ones(1, 12, dtype=torch.long)).logits.sum().backward()
    assert len(arriving) == len(ALL_SEVEN) * model.config.num_hidden_layers and all(arriving.values())
