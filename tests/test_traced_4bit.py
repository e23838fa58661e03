"""finetune.overrides.trace_4bit_products: bitsandbytes' 4-bit products with the dequantization inside the
compiled graph give bitsandbytes' own weights, products and input gradients bit for bit (a compiled model's LoRA
gradients within inductor's reordering), and keep only the 4-bit weight for the backward pass. CPU only:
bitsandbytes' CPU kernels are the reference where every row holds whole blocks (rows a multiple of 64 wide). For
rows whose blocks run on into the next row, bitsandbytes 0.50.2's AVX-512 CPU kernel restarts the blocks at each
row, unlike its CUDA and pure-torch kernels, so a hand-written reference stands in."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from finetune.overrides import Traced4bitLinear, dequantize_base, trace_4bit_products, traced_4bit_weight

OUT, IN = 96, 256
BLOCK = 64  # bitsandbytes' 4-bit blocksize


def quantized_linear(quant_type="nf4", nested=True, bias=False, seed=0, features=(IN, OUT)) -> bnb.nn.Linear4bit:
    torch.manual_seed(seed)
    source = torch.nn.Linear(*features, bias=bias)
    layer = bnb.nn.Linear4bit(*features, bias=bias, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              compress_statistics=nested)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(source.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested)  # fmt: skip
    if bias:
        layer.bias = torch.nn.Parameter(source.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes, with bitsandbytes' CPU kernels


@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_the_traced_weight_is_bitsandbytes_dequantized_weight(quant_type, nested):
    layer = quantized_linear(quant_type, nested)
    state = layer.weight.quant_state
    assert state.nested == nested
    traced = Traced4bitLinear(layer)
    quantized = [getattr(traced, name) for name in traced.quantized_names]
    for dtype in (torch.bfloat16, torch.float32):
        expected = bnb.functional.dequantize_4bit(layer.weight.data, state).to(dtype)
        assert torch.equal(traced_4bit_weight(quantized, *traced.layout, dtype), expected)


def flat_blocks_weight(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The weight as bitsandbytes' format defines it, by hand: the flattened weight in blocks of 64 codes, each code
    (high nibble first) times its block's absmax; a double-quantized absmax is itself 8-bit codes in blocks of 256,
    times their block's scale, plus the offset."""
    state = layer.weight.quant_state
    packed = layer.weight.data.view(torch.uint8).flatten().long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten()
    absmax = state.absmax
    if state.nested:
        scales = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: absmax.numel()]
        absmax = state.state2.code[absmax.long()] * scales + state.offset
    return (state.code[codes].view(-1, BLOCK) * absmax.view(-1, 1)).view(state.shape)


@pytest.mark.parametrize("nested", [True, False])
def test_blocks_that_run_on_into_the_next_row_dequantize_as_the_format_defines(nested):
    layer = quantized_linear(nested=nested, features=(OUT, 8))  # 96-wide rows: every other block spans two rows
    traced = Traced4bitLinear(layer)
    quantized = [getattr(traced, name) for name in traced.quantized_names]
    assert torch.equal(traced_4bit_weight(quantized, *traced.layout, torch.float32), flat_blocks_weight(layer))


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_products_and_input_gradients_are_bitsandbytes(input_dtype):
    layer = quantized_linear(bias=True)
    x = torch.randn(7, IN, dtype=input_dtype, requires_grad=True)
    expected = layer(x)
    expected.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None
    actual = Traced4bitLinear(layer)(x)
    actual.float().square().sum().backward()
    assert actual.dtype == expected.dtype == input_dtype  # returned in the input's dtype, as bitsandbytes does
    assert torch.equal(actual, expected) and torch.equal(x.grad, expected_grad)


def test_compiled_it_keeps_the_4_bit_weight_for_the_backward_pass_not_a_dequantized_copy():
    layer = Traced4bitLinear(quantized_linear())
    x = torch.randn(64, IN, dtype=torch.bfloat16, requires_grad=True)

    def block(inputs):
        return torch.nn.functional.silu(layer(inputs)) * 2

    torch._dynamo.reset()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compiled = torch.compile(block)(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not any(tensor.dtype == torch.bfloat16 and tensor.numel() >= OUT * IN for tensor in saved)
    assert any(tensor.data_ptr() == layer.packed.data_ptr() for tensor in saved)  # the 4-bit storage itself
    compiled.float().sum().backward()
    compiled_grad, x.grad = x.grad, None
    eager = block(x)
    eager.float().sum().backward()
    assert torch.equal(compiled, eager) and torch.equal(compiled_grad, x.grad)


def test_compiled_training_writes_no_integer_tensor_the_size_of_the_weight():
    """On the GPU an int64 range over the weight's positions was written out (448 MiB for an MLP weight of
    Mistral-7B) and a 6 GiB run ran out of memory; the buffers a compiled forward and backward allocate show it."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    # Two layers of one shape, whose ranges the compiler could share, with whole blocks of scales (2,048 absmax)
    features = (2 * IN, IN)
    up, gate = (Traced4bitLinear(quantized_linear(seed=seed, features=features)) for seed in (1, 2))
    x = torch.randn(8, features[0], requires_grad=True)

    compiled = torch.compile(
        lambda inputs: (torch.nn.functional.silu(gate(inputs)) * up(inputs)).float().square().sum()
    )
    _, codes = run_and_get_code(lambda: compiled(x).backward())  # the forward's code and the backward's
    sizes = re.findall(r"empty_strided_\w+\(\((\d+), \), \(1, \), torch\.(u?int\d+)\)", "\n".join(codes))
    assert sizes and all(int(numel) < features[0] * features[1] for numel, _ in sizes), sizes


def test_every_4_bit_layer_is_replaced_on_its_own_storage_and_lora_trains_the_same():
    from peft import LoraConfig, get_peft_model

    def model():
        stack = torch.nn.Sequential(
            quantized_linear(seed=2, features=(IN, 2 * BLOCK)),
            torch.nn.GELU(),
            quantized_linear(seed=3, features=(2 * BLOCK, 8)),
        )
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0", "2"], init_lora_weights=False)
        return get_peft_model(stack, lora)

    x = torch.randn(5, IN)

    def lora_gradients(network):
        network(x).square().sum().backward()
        return {name: p.grad for name, p in network.named_parameters() if p.grad is not None}

    expected, traced = lora_gradients(model()), model()
    packed = [module.weight.data.data_ptr() for module in traced.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert trace_4bit_products(traced) == 2
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in traced.modules())
    assert [module.packed.data_ptr() for module in traced.modules() if isinstance(module, Traced4bitLinear)] == packed
    actual = lora_gradients(traced)
    assert actual.keys() == expected.keys() and len(actual) == 4
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


@pytest.mark.parametrize("load_adapter", [False, True], ids=["fresh", "saved"])
def test_traced_before_the_adapter_is_added_as_the_stages_do_lora_goes_on_it(tmp_path, load_adapter):
    """The stages install the plan on the loaded model, then SFTTrainer adds a fresh adapter (get_peft_model) and
    DPO loads the SFT one (PeftModel.from_pretrained)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0", "2"], init_lora_weights=False)

    def stack():
        first, second = (
            quantized_linear(seed=2, features=(IN, 2 * BLOCK)),
            quantized_linear(seed=3, features=(2 * BLOCK, 8)),
        )
        return torch.nn.Sequential(first, torch.nn.GELU(), second)

    def model(traced: bool):
        base = stack()
        if traced:
            assert trace_4bit_products(base) == 2
        torch.manual_seed(0)
        if load_adapter:
            return PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
        return get_peft_model(base, lora)

    if load_adapter:
        torch.manual_seed(0)
        get_peft_model(stack(), lora).save_pretrained(tmp_path / "adapter")
    x = torch.randn(5, IN)

    def lora_gradients(network):
        network(x).square().sum().backward()
        return {name: p.grad for name, p in network.named_parameters() if p.grad is not None}

    traced = model(traced=True)
    assert [type(traced.base_model.model[i].base_layer) for i in (0, 2)] == [Traced4bitLinear] * 2
    assert traced.base_model.model[0].lora_A.default.weight.dtype == torch.float32  # as on Linear4bit
    expected, actual = lora_gradients(model(traced=False)), lora_gradients(traced)
    assert actual.keys() == expected.keys() and len(actual) == 4
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def four_bit_copy(linear: torch.nn.Linear) -> bnb.nn.Linear4bit:
    """`linear`'s weight quantized to NF4 (double-quantized) on the CPU, computing in float32."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def quantized_mistral(traced: bool, checkpointed: bool, dequantized: bool = False):
    """A two-layer Mistral whose decoder projections are bitsandbytes 4-bit layers (quantized on the CPU), with LoRA
    on all seven, compiled as the fast layout compiles it; `checkpointed`: every layer recomputes through its
    compiled forward (finetune.overrides.checkpoint_around_compiled); `dequantized`: the 4-bit weights dequantized
    once into plain layers (finetune.overrides.dequantize_base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from finetune.layout import speed
    from finetune.model.loading import decoder_layers
    from finetune.overrides import checkpoint_around_compiled

    config = MistralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa", use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, four_bit_copy(child))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, lora)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if traced:
        assert trace_4bit_products(model) == 2 * 7
    if dequantized:
        assert dequantize_base(model) == 2 * 7
    speed.compile_decoder_layers(model)
    for layer in decoder_layers(model):
        layer.gradient_checkpointing = checkpointed
        if checkpointed:
            checkpoint_around_compiled(layer, speed._compiled)
    return model.train()


@pytest.mark.parametrize("checkpointed", [False, True], ids=["whole", "checkpointed"])
def test_a_compiled_4_bit_model_trains_its_adapter_as_with_bitsandbytes_products(monkeypatch, checkpointed):
    from finetune import overrides

    monkeypatch.setattr(overrides, "SUPPRESS_COMPILE_ERRORS", False)  # a layer left to eager would pass unnoticed
    ids = torch.randint(3, 100, (1, 150), generator=torch.Generator().manual_seed(4))

    def train_step(traced: bool):
        """(loss, LoRA gradients, what autograd kept for the backward pass)"""
        torch._dynamo.reset()
        model, saved = quantized_mistral(traced, checkpointed), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, saved

    (expected_loss, expected, _), (loss, actual, saved) = train_step(traced=False), train_step(traced=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert actual.keys() == expected.keys() and len(actual) == 2 * 7 * 2
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6)
    weight_shapes = {(64, 64), (32, 64), (128, 64), (64, 128)}  # q and o, k and v, gate and up, down
    assert not any(t.is_floating_point() and tuple(t.shape) in weight_shapes for t in saved)


def test_without_gradients_and_without_the_adapter_the_logits_are_those_of_bitsandbytes_weights(monkeypatch):
    """Evaluation, and DPO's reference pass (the adapter disabled), compile graphs of their own."""
    from finetune import overrides

    monkeypatch.setattr(overrides, "SUPPRESS_COMPILE_ERRORS", False)
    torch._dynamo.reset()
    ids = torch.randint(3, 100, (1, 77), generator=torch.Generator().manual_seed(5))
    logits = {}
    # The reference multiplies by bitsandbytes' dequantized weights, not through its products: without gradients,
    # bitsandbytes 0.50.2 on an AVX-512 CPU multiplies in its own fused kernel (in bf16 where the CPU has it) and,
    # compiled, stops at a nested absmax of another shape than its fake kernel declares.
    for traced in (False, True):
        model = quantized_mistral(traced, checkpointed=False, dequantized=not traced).eval()
        with torch.no_grad():
            with_adapter = model(input_ids=ids).logits
            with model.disable_adapter():
                logits[traced] = with_adapter, model(input_ids=ids).logits
    assert all(torch.equal(actual, expected) for actual, expected in zip(logits[True], logits[False], strict=True))


def test_a_plan_with_traced_4_bit_weights_installs_them():
    from finetune.layout.speed import TRACED_4BIT, SpeedPlan, installer

    model = torch.nn.Sequential(quantized_linear(), torch.nn.GELU(), quantized_linear(features=(OUT, 8)))
    chosen = SpeedPlan("fast", "fast", 8, 1, False, "off", 1024, None, None, "a test", base_weights=TRACED_4BIT)
    installer(chosen, None)(model)
    assert [type(module) for module in model] == [Traced4bitLinear, torch.nn.GELU, Traced4bitLinear]


def with_4_bit_projections(load_model, traced: bool):
    """`load_model` whose decoder projections become NF4 layers (`traced`: bitsandbytes' 4-bit layers, for the plan
    to trace), or plain layers holding the same 4-bit values as their weights (the reference)."""
    from finetune.model.loading import decoder_layers

    def load(*args, **kwargs):
        model = load_model(*args, **kwargs)
        for layer in decoder_layers(model):
            for parent in list(layer.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        four_bit = four_bit_copy(child)
                        if not traced:
                            child.weight = torch.nn.Parameter(flat_blocks_weight(four_bit), requires_grad=False)
                        setattr(parent, name, four_bit if traced else child)
        return model

    return load


def stage_trainer(stage: str, cfg, trainer_kwargs: dict, layout, load_model, traced: bool, tmp_path, monkeypatch):
    """The sft or dpo stage's trainer, built as the stage builds it, on projections loaded by with_4_bit_projections
    and `layout` installed, traced or with the weights as loaded."""
    import dataclasses

    from trl import DPOConfig, SFTConfig

    from finetune.layout.speed import TRACED_4BIT, installer, model_shape
    from finetune.training import dpo as dpo_training
    from finetune.training import sft as sft_training
    from finetune.training.runs import trainer_args

    module, config_cls = (sft_training, SFTConfig) if stage == "sft" else (dpo_training, DPOConfig)
    name = "traced" if traced else "values"
    monkeypatch.setattr(module, "load_model", with_4_bit_projections(load_model, traced))
    paths = dataclasses.replace(cfg.paths, **{f"{stage}_metrics": str(tmp_path / f"{stage}-{name}")})
    args = trainer_args(config_cls, stage, trainer_kwargs, str(tmp_path / f"{stage}-{name}-checkpoints"))
    layout = dataclasses.replace(layout, base_weights=TRACED_4BIT if traced else "as loaded")
    install, cfg = installer(layout, model_shape(cfg.model)), dataclasses.replace(cfg, paths=paths)
    return module.build_trainer(cfg, args, resume=False, speed=layout, install=install)


def base_layer_types(model) -> set[type]:
    return {type(module.base_layer) for module in model.modules() if hasattr(module, "base_layer")}


@pytest.mark.slow
def test_the_sft_stage_trains_on_traced_4_bit_weights_as_on_their_values(tiny_project, tmp_path, monkeypatch):
    """The stage's order on a tiny model whose projections are 4-bit: the plan installed on the loaded model, then
    SFTTrainer adds the adapter. The reference multiplies by the same 4-bit values held as plain weights (the tiny
    model's 32-wide rows are where bitsandbytes' AVX-512 CPU kernels go wrong)."""
    import dataclasses

    from finetune.core.config import load_config
    from finetune.layout.speed import GIB, model_shape, plan
    from finetune.training import sft as sft_training

    monkeypatch.chdir(tmp_path)
    cfg = load_config(tiny_project.params_path)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))  # exact arithmetic compared
    trainer = {**cfg.sft.trainer, "eval_strategy": "no", "max_steps": 3, "save_steps": 1000}
    trainer.update(per_device_train_batch_size=4, gradient_accumulation_steps=1, activation_checkpointing=False)
    fast, chosen = plan("sft", trainer, "fast", model_shape(cfg.model), 80 * GIB, quantized=False)
    on_cpu = dataclasses.replace(chosen, attention="sdpa")  # PyTorch's flex attention has no backward on a CPU

    def losses(traced: bool):
        run = stage_trainer("sft", cfg, fast, on_cpu, sft_training.load_model, traced, tmp_path, monkeypatch)
        run.train()
        return [entry["loss"] for entry in run.state.log_history if "loss" in entry], base_layer_types(run.model)

    (expected, plain), (actual, traced) = losses(traced=False), losses(traced=True)
    assert plain == {torch.nn.Linear} and traced == {Traced4bitLinear}
    assert len(actual) == 3 and actual == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_the_dpo_stage_trains_on_traced_4_bit_weights_as_on_their_values(tiny_project, tmp_path, monkeypatch):
    """The dpo stage's order on 4-bit projections: the plan installed on the loaded model, then the SFT adapter
    loaded onto it, TRL's frozen "ref" copy of it added, and the reference log-probs precomputed with the adapter
    swapped. The reference run multiplies by the same 4-bit values held as plain weights."""
    import dataclasses

    from test_speed import dpo_config_from_a_moved_adapter, three_steps

    from finetune.layout.speed import GIB, model_shape, plan
    from finetune.training import dpo as dpo_training

    monkeypatch.chdir(tmp_path)
    cfg = dpo_config_from_a_moved_adapter(tiny_project, tmp_path)
    fast, chosen = plan("dpo", three_steps(cfg.dpo.trainer, batch=4, accumulation=1), "fast", model_shape(cfg.model),
                        80 * GIB, quantized=False)  # fmt: skip
    assert fast["precompute_ref_log_probs"] is True and chosen.compiled
    on_cpu = dataclasses.replace(chosen, attention="sdpa")  # PyTorch's flex attention has no backward on a CPU

    def run(traced: bool):
        trainer = stage_trainer("dpo", cfg, fast, on_cpu, dpo_training.load_model, traced, tmp_path, monkeypatch)
        reference = list(trainer.train_dataset["ref_chosen_logps"])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, reference, base_layer_types(trainer.model)

    (expected, expected_reference, plain), (actual, reference, traced) = run(traced=False), run(traced=True)
    assert plain == {torch.nn.Linear} and traced == {Traced4bitLinear}
    assert reference == pytest.approx(expected_reference, rel=1e-4)
    assert len(actual) == 3 and actual == pytest.approx(expected, rel=1e-4)
    assert expected[-1] != pytest.approx(expected[0], rel=1e-3)  # training moved the policy
