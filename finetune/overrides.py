"""Every place the pipeline reaches into a library's internals: private attributes and methods it replaces or reads,
library code it re-implements, and private library settings it changes (public ones, such as PyTorch's cuDNN
attention switch or its allocator cap, stay with the code that needs them). The rest of the package calls these
instead of reaching into a library itself.

Each override is a small function (or class) here, under a header naming the library and the version it was written
against (WRITTEN_AGAINST, the pins of pyproject.toml) and the upstream issue, where one is known, whose fix would let
us delete it. Its docstring's first line says why it exists. Its guard, check_*(), looks for what it relies on (a
private attribute, a signature, the names the re-implemented library code uses) and raises a RuntimeError naming the
installed version when that is gone, so a library upgrade fails loudly at the override instead of running without it
or with a stale copy of the library's code. Every override calls its guard before it changes anything, and
tests/test_overrides.py runs each guard on the installed libraries, and against a library object with the attribute
removed. On a pin bump, read each override of that library against the new code, then update WRITTEN_AGAINST.

Settings with process-wide effect are scoped to what needs them: dynamo's suppress_errors and recompile_limit, and
AOTAutograd's caching of custom autograd functions, hold only while a compiled decoder layer runs (compiler_settings).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from typing import Any

import torch
import torch._functorch.config  # AOTAutograd's settings, which `import torch` leaves unloaded
from transformers.trainer_pt_utils import BatchRebalanceSampler

# The versions the overrides below were read against: pyproject.toml's pins (the GPU machine runs torch 2.11).
WRITTEN_AGAINST = {
    "torch": "2.13.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "bitsandbytes": "0.50.2",
    "bert-score": "0.3.13",
    "dvclive": "3.49.1",
    "trl": "1.16.0",
}


def _changed(library: str, what: str, override: str) -> RuntimeError:
    return RuntimeError(
        f"{library} {version(library)}: {what} changed; see finetune/overrides.py {override} "
        f"(written against {library} {WRITTEN_AGAINST[library]})"
    )


def _require(holds: bool, library: str, what: str, override: str) -> None:
    if not holds:
        raise _changed(library, what, override)


def _parameters(function) -> list[str]:
    """The parameter names of `function`; none for a missing one (None) or one without a signature."""
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def _constants(function) -> frozenset[object]:
    """The constants (strings, numbers) a function's code uses, with those of its nested code; none for a missing one."""
    constants, codes = set(), [function.__code__] if hasattr(function, "__code__") else []
    while codes:
        code = codes.pop()
        for constant in code.co_consts:
            if isinstance(constant, types.CodeType):
                codes.append(constant)
            elif isinstance(constant, str | int | float):
                constants.add(constant)
    return frozenset(constants)


def _codes(function) -> list[types.CodeType]:
    """A function's code objects: its own, its nested code (inner functions, and comprehensions, which Python 3.12
    inlines) and those of the functions it wraps (functools.wraps' __wrapped__); none for a missing one."""
    found, codes = [], []
    while hasattr(function, "__code__"):
        codes.append(function.__code__)
        function = getattr(function, "__wrapped__", None)
    while codes:
        code = codes.pop()
        found.append(code)
        codes.extend(constant for constant in code.co_consts if isinstance(constant, types.CodeType))
    return found


def _names(function) -> frozenset[str]:
    """The global and attribute names a function's code uses (_codes)."""
    return frozenset(name for code in _codes(function) for name in code.co_names)


# --- transformers 5.23.0: Trainer._get_train_sampler ------------------------------------------------------------
# Upstream: the supported route is a Trainer subclass overriding get_train_dataloader
# (https://github.com/huggingface/transformers/issues/8952), which the house style rules out; no issue asks for a hook.


def replace_train_sampler(trainer, build_sampler: Callable[..., Any]) -> None:
    """Make `trainer` draw its training batches from build_sampler(train_dataset=None), without a Trainer subclass."""
    check_train_sampler()
    trainer._get_train_sampler = build_sampler


def check_train_sampler() -> None:
    from transformers import Trainer

    name = "replace_train_sampler"
    signature = _parameters(getattr(Trainer, "_get_train_sampler", None)) == ["self", "train_dataset"]
    _require(signature, "transformers", "Trainer._get_train_sampler(self, train_dataset)", name)
    uses = "_get_train_sampler" in _names(getattr(Trainer, "get_train_dataloader", None))
    _require(uses, "transformers", "Trainer.get_train_dataloader's call of _get_train_sampler", name)
    # A BatchRebalanceSampler is passed as the loader's batch_sampler and not sharded again by accelerate.
    batches = "BatchRebalanceSampler" in _names(getattr(Trainer, "_get_dataloader", None))
    _require(batches, "transformers", "Trainer._get_dataloader's handling of BatchRebalanceSampler", name)


# --- transformers 5.23.0: BatchRebalanceSampler._assign ---------------------------------------------------------
# Upstream: no upstream issue known (the sampler came in https://github.com/huggingface/transformers/pull/47340; its
# cost model, padding-aware, is the only split it offers).


class SharesSampler(BatchRebalanceSampler):
    """transformers' per-rank batch sampler with its split of each step into shares (the private _assign) replaced:
    a subclass's split_shares(lengths, shares) gives the positions of each share, share k going to rank
    k % dp_size, accumulation slot k // dp_size. The sampler's draw of each step's examples is kept."""

    @staticmethod
    def split_shares(lengths: Sequence[int], shares: int) -> list[list[int]]:
        raise NotImplementedError

    def __init__(self, *args, **kwargs):
        check_rebalance_sampler()
        super().__init__(*args, **kwargs)

    def _assign(self, indices, lengths):
        shares = self.split_shares(lengths, self.dp_size * self.grad_accum)
        return [
            [[indices[p] for p in shares[slot * self.dp_size + rank]] for slot in range(self.grad_accum)]
            for rank in range(self.dp_size)
        ]


def check_rebalance_sampler() -> None:
    name = "SharesSampler"
    signature = _parameters(getattr(BatchRebalanceSampler, "_assign", None)) == ["self", "indices", "lengths"]
    _require(signature, "transformers", "BatchRebalanceSampler._assign(self, indices, lengths)", name)
    callers = [f for key, f in vars(BatchRebalanceSampler).items() if key != "_assign" and inspect.isfunction(f)]
    _require(
        any("_assign" in _names(f) for f in callers), "transformers", "BatchRebalanceSampler's call of _assign", name
    )
    _require(
        {"dp_size", "grad_accum"} <= _names(BatchRebalanceSampler.__init__),
        "transformers",
        "BatchRebalanceSampler's dp_size and grad_accum",
        name,
    )


# --- torch 2.13.0, transformers 5.23.0: the Trainer's walks over the model at every step --------------------------
# Upstream: no upstream issue known.


def walk_modules_once(model) -> bool:
    """Spare the Trainer its per-step walks over the whole model: train(), zero_grad() and num_parameters() over
    lists made once. Returns False (and changes nothing) where a module's train() does more than set its flag.

    Each optimizer step the Trainer calls model.train() (recursing through every module), model.zero_grad() (every
    parameter) and, for its FLOP count, model.num_parameters(). With LoRA on the seven projections of a 32-layer
    model that is about 2,700 modules and 740 parameters: 22 ms per step on a 2-core CPU, while the fast layout's GPU
    waits. The replacements set the same flags and clear the same gradients, and the parameter count is counted once
    (training adds no modules or parameters). restore_module_walks undoes this.
    """
    from torch import nn
    from transformers import PreTrainedModel

    check_module_walks()
    if getattr(model, "use_kernels", False):  # transformers' hub kernels: its train() re-applies them
        return False
    modules = list(model.modules())
    if any(type(module).train not in (nn.Module.train, PreTrainedModel.train) for module in modules):
        return False
    parameters = list(model.parameters())

    def train(mode: bool = True):
        for module in modules:
            module.__dict__["training"] = mode  # what nn.Module.train sets, without its recursion
        return model

    def zero_grad(set_to_none: bool = True) -> None:
        for parameter in parameters:
            if parameter.grad is None:
                continue
            if set_to_none:
                parameter.grad = None
            else:
                parameter.grad.detach_().zero_()

    model.train, model.zero_grad = train, zero_grad
    if hasattr(model, "num_parameters"):  # transformers' models
        model.num_parameters = functools.cache(model.num_parameters)
    return True


def restore_module_walks(model) -> None:
    """Back to the module methods: the lists would otherwise keep every module of the run alive with the model."""
    for name in ("train", "zero_grad", "num_parameters"):
        model.__dict__.pop(name, None)


def check_module_walks() -> None:
    from torch import nn
    from transformers import PreTrainedModel

    name = "walk_modules_once"
    train = getattr(nn.Module, "train", None)
    _require(_parameters(train) == ["self", "mode"], "torch", "nn.Module.train(self, mode)", name)
    _require(
        _names(train) == {"isinstance", "bool", "ValueError", "training", "children", "train"},
        "torch",
        "nn.Module.train (more than setting `training` in every module)",
        name,
    )
    _require("training" in nn.Module().__dict__, "torch", "nn.Module's `training` instance attribute", name)
    signature = _parameters(getattr(nn.Module, "zero_grad", None)) == ["self", "set_to_none"]
    _require(signature, "torch", "nn.Module.zero_grad(self, set_to_none)", name)
    model_train = _names(getattr(PreTrainedModel, "train", None))
    _require(
        model_train == {"training", "super", "train", "use_kernels", "set_use_kernels"},
        "transformers",
        "PreTrainedModel.train (more than nn.Module.train and its hub kernels)",
        name,
    )
    counted = set(_parameters(getattr(PreTrainedModel, "num_parameters", None)))
    counts = {"only_trainable", "exclude_embeddings"} <= counted
    _require(counts, "transformers", "PreTrainedModel.num_parameters(only_trainable, exclude_embeddings)", name)


# --- dvclive 3.49.1: the Studio payload built at every log line ----------------------------------------------------
# Upstream: no upstream issue known.


def skip_unconfigured_studio_posts(live) -> bool:
    """Skip DVCLive's Studio "data" payload at every log line when no Studio is configured; True if skipped.

    With no Studio, DVCLive drops the "data" event, but builds its payload first, re-parsing params.yaml and every
    curve (56 ms per line on a 2-core CPU, growing with the run; about 30 ms of idle GPU per step in the H100 profile
    of the fast layout).
    """
    check_studio_posts(live)
    if "data" not in live._studio_events_to_skip:
        return False
    live.post_data_to_studio = _nothing_to_post
    return True


def _nothing_to_post() -> None:
    return None


def check_studio_posts(live=None) -> None:
    from dvclive.live import Live

    name = "skip_unconfigured_studio_posts"
    posts = _parameters(getattr(Live, "post_data_to_studio", None)) == ["self"]
    _require(posts, "dvclive", "Live.post_data_to_studio()", name)
    syncs = "post_data_to_studio" in _names(getattr(Live, "sync", None))
    _require(syncs, "dvclive", "Live.sync's call of post_data_to_studio", name)
    skips = {"_studio_events_to_skip", "get_dvc_studio_config"} <= _names(getattr(Live, "_init_studio", None))
    _require(skips, "dvclive", "Live._init_studio's skipped Studio events (_studio_events_to_skip)", name)
    if live is not None:
        skip = getattr(live, "_studio_events_to_skip", None)
        _require(isinstance(skip, set), "dvclive", "Live._studio_events_to_skip", name)


# --- torch 2.13.0: dynamo's and AOTAutograd's settings, and the compiled call of a module (_compiled_call_impl) ------
# Upstream: no upstream issue known for dynamo's (settings, not a bug); AOTAutograd's: pytorch/pytorch#149751.

# Training and evaluation mode, with and without checkpointing, static then dynamic shapes: a handful of graphs for the
# one code object all decoder layers share; dynamo's default limit of 8 would silently send later ones to eager.
RECOMPILE_LIMIT = 64
# A layer that fails to compile (an architecture or op the compiler cannot handle) runs eagerly, with the compiler's
# warning in the log, instead of ending a training run: compiling is a speed-up, never a requirement.
SUPPRESS_COMPILE_ERRORS = True
# bitsandbytes' 4-bit product is a torch.autograd.Function, which dynamo captures as `autograd_function_apply`, and
# AOTAutograd's cache bypasses every graph holding one unless torch._functorch.config's
# autograd_cache_allow_custom_autograd_functions is on (off by default while PyTorch rolls it out,
# pytorch/pytorch#149751; delete this when it defaults on). Bypassed, every process traces and partitions the
# compiled layers again even with their kernels in the cache. benchmarks/README.md has the measurements.
CACHE_CUSTOM_AUTOGRAD_FUNCTIONS = True


@contextlib.contextmanager
def compiler_settings() -> Iterator[None]:
    """Dynamo's settings for the compiled decoder layers (RECOMPILE_LIMIT, SUPPRESS_COMPILE_ERRORS) and AOTAutograd's
    (CACHE_CUSTOM_AUTOGRAD_FUNCTIONS), the previous values restored on exit, so the rest of the process compiles with
    its own. Entered at every call of a compiled layer, so unguarded: in_compiler_settings runs the guard once, when
    it wraps a function."""
    config, aot_config = torch._dynamo.config, torch._functorch.config
    previous = config.suppress_errors, config.recompile_limit
    previous_cache = aot_config.autograd_cache_allow_custom_autograd_functions
    config.suppress_errors = SUPPRESS_COMPILE_ERRORS
    config.recompile_limit = max(previous[1], RECOMPILE_LIMIT)
    aot_config.autograd_cache_allow_custom_autograd_functions = CACHE_CUSTOM_AUTOGRAD_FUNCTIONS
    try:
        yield
    finally:
        config.suppress_errors, config.recompile_limit = previous
        aot_config.autograd_cache_allow_custom_autograd_functions = previous_cache


def in_compiler_settings(compiled: Callable) -> Callable:
    """`compiled` (a torch.compile'd function) with each call, where dynamo compiles, under compiler_settings."""
    check_compiler_settings()

    def run(*args, **kwargs):
        with compiler_settings():
            return compiled(*args, **kwargs)

    return run


def compile_in_place(module) -> None:
    """module.compile(), each call of the compiled module under compiler_settings: dynamo's settings are scoped to the
    runs that compile, instead of set for the whole process."""
    check_module_compile()
    module.compile()
    module._compiled_call_impl = in_compiler_settings(module._compiled_call_impl)


def check_compiler_settings() -> None:
    config = torch._dynamo.config
    for setting in ("suppress_errors", "recompile_limit"):
        _require(hasattr(config, setting), "torch", f"torch._dynamo.config.{setting}", "compiler_settings")
    setting = "autograd_cache_allow_custom_autograd_functions"
    has = hasattr(torch._functorch.config, setting)
    _require(has, "torch", f"torch._functorch.config.{setting}", "compiler_settings")


def check_module_compile() -> None:
    from torch import nn

    name = "compile_in_place"
    sets = "_compiled_call_impl" in _names(getattr(nn.Module, "compile", None))
    _require(sets, "torch", "nn.Module.compile's _compiled_call_impl", name)
    calls = "_compiled_call_impl" in _names(getattr(nn.Module, "_wrapped_call_impl", None))
    _require(calls, "torch", "nn.Module.__call__'s use of _compiled_call_impl", name)


# --- transformers 5.23.0: a layer's checkpoint function, GradientCheckpointingLayer._gradient_checkpointing_func
# Upstream: no upstream issue known for inductor's failure to partition a checkpointed layer ("Node ... was invalid,
# but is output"); torch.utils.checkpoint disables dynamo around itself
# (https://github.com/pytorch/pytorch/issues/135816).


def checkpoint_around_compiled(layer, compile_forward: Callable[[Callable], Callable], split=None) -> None:
    """Checkpoint a compiled decoder layer around its compiled forward instead of inside it.

    Compiled whole, a checkpointed layer puts torch's checkpoint into the graph, and on the H100 (torch 2.11, flex
    attention, LoRA) inductor failed to partition it, so every checkpointed layer ran eagerly: 32 examples per step
    ran at 7,405 tokens/s against 10,125 at 8. The layer's checkpoint function is replaced by one that stays eager
    (hidden from the compiler) and calls compile_forward(the layer class's forward), the graph the layer runs without
    checkpointing; the layer's own checkpoint function (with its settings) still decides what is kept.

    `split(hidden_states, keywords)` (finetune.layout.documents) may cut a call into parts, each checkpointed on
    its own and their outputs joined along the tokens; None runs the call whole.
    """
    checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
    if getattr(checkpoint, "recomputes_compiled", False):
        return
    check_checkpoint_function(layer)

    @torch.compiler.disable
    def checkpoint_compiled_forward(forward, *args):  # forward: functools.partial(Layer.forward, layer, **kwargs)
        if not isinstance(forward, functools.partial):
            raise _changed("transformers", "the forward a layer checkpoints", "checkpoint_around_compiled")
        compiled = compile_forward(forward.func)
        parts = split(args[0], forward.keywords) if split is not None and len(args) == 1 else None
        if not parts:
            return checkpoint(functools.partial(compiled, *forward.args, **forward.keywords), *args)
        outputs = [
            checkpoint(functools.partial(compiled, *forward.args, **keywords), part) for part, keywords in parts
        ]
        _require(all(isinstance(output, torch.Tensor) for output in outputs), "transformers",
                 "a decoder layer's forward returning its hidden states", "checkpoint_around_compiled")  # fmt: skip
        return torch.cat(outputs, dim=1)

    checkpoint_compiled_forward.recomputes_compiled = True
    layer._gradient_checkpointing_func = checkpoint_compiled_forward


def check_checkpoint_function(layer) -> None:
    name = "checkpoint_around_compiled"
    what = "GradientCheckpointingLayer._gradient_checkpointing_func"
    _require(hasattr(layer, "_gradient_checkpointing_func"), "transformers", what, name)
    calls = "_gradient_checkpointing_func" in _names(getattr(type(layer), "forward", None))
    _require(calls, "transformers", what, name)


# --- transformers 5.23.0: a backbone's forward, replaced on the instance (for TRL 1.16's padded DPO batches) ---------
# Upstream: TRL's DPO collator pads since padding_free was disabled in DPO
# (https://github.com/huggingface/trl/issues/2469).

BACKBONE_KEYWORDS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache")


def wrap_forward(backbone, make_forward: Callable[[Callable], Callable]) -> None:
    """Route a transformers backbone's calls through make_forward(its forward), set on the instance (which
    nn.Module's call looks up), so the module, its hooks and the model around it stay as they are."""
    check_backbone_forward(backbone)
    backbone.forward = make_forward(backbone.forward)


def attention_implementation(config) -> str | None:
    """The attention a transformers model runs (its config's private _attn_implementation, guarded by
    check_backbone_forward where the backbone is wrapped)."""
    return config._attn_implementation


def check_backbone_forward(backbone) -> None:
    from torch import nn

    name = "wrap_forward"
    looks_up = "forward" in _names(getattr(nn.Module, "_call_impl", None))
    _require(looks_up, "torch", "nn.Module.__call__'s lookup of forward", name)
    parameters = inspect.signature(type(backbone).forward).parameters
    takes = set(BACKBONE_KEYWORDS) <= set(parameters)
    more = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    _require(takes and more, "transformers", f"{type(backbone).__name__}.forward's keywords", name)
    attention = hasattr(getattr(backbone, "config", None), "_attn_implementation")
    _require(attention, "transformers", "config._attn_implementation", name)


# --- bitsandbytes 0.50.2: Linear4bit, its weights dequantized once (its dtype contract re-implemented) ---------------
# Upstream: no upstream issue known.


class DequantizedLinear(torch.nn.Linear):
    """A frozen linear layer holding a 4-bit layer's dequantized weights, with bitsandbytes' dtype contract: the
    product is taken in the weights' dtype and returned in the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    @classmethod
    def frozen(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> DequantizedLinear:
        """A layer holding `weight` (out x in) and `bias` as they are, frozen."""
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias, requires_grad=False)
        return layer


def dequantize_base(model) -> int:
    """Replace each bitsandbytes 4-bit linear layer by a bf16 layer holding its dequantized weights; returns how many.

    bitsandbytes dequantizes a 4-bit weight to the compute dtype on every forward and backward call and multiplies
    with that; this does it once. The products are the same (the NF4 weights' bf16 values, the same matmul), so
    training is still QLoRA's, at the memory of a bf16 copy: planned only where the step's longest batch fits
    beside it (finetune.layout.speed.keeps_dequantized_copy). What it saves is two dequantize kernels and their
    Python per layer call, and it leaves no custom op inside the compiled layers.
    """
    import bitsandbytes as bnb

    check_dequantize()

    def copy(layer) -> DequantizedLinear:
        dtype = layer.compute_dtype or torch.bfloat16
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        return DequantizedLinear.frozen(weight, None if layer.bias is None else layer.bias.data.to(dtype))

    return _replace_4bit_layers(model, copy)


def _replace_4bit_layers(model, replacement: Callable[[Any], torch.nn.Module | None]) -> int:
    """Put replacement(layer) in the place of each bitsandbytes 4-bit linear layer it returns a module for; returns
    how many it replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = replacement(child) if isinstance(child, bnb.nn.Linear4bit) else None
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
    return replaced


def check_dequantize() -> None:
    import bitsandbytes as bnb

    name = "dequantize_base"
    computes = "compute_dtype" in _parameters(bnb.nn.Linear4bit.__init__)
    contract = {"compute_dtype", "matmul_4bit", "to"} <= _names(getattr(bnb.nn.Linear4bit, "forward", None))
    _require(computes and contract, "bitsandbytes", "Linear4bit's compute_dtype and output dtype", name)
    _require("quant_state" in _parameters(bnb.nn.Params4bit.__new__), "bitsandbytes", "Params4bit.quant_state", name)
    signature = _parameters(getattr(bnb.functional, "dequantize_4bit", None))[:2] == ["A", "quant_state"]
    _require(signature, "bitsandbytes", "functional.dequantize_4bit(A, quant_state)", name)


# --- bitsandbytes 0.50.2: Linear4bit's product, its dequantization re-implemented in torch operations -------------
# Upstream: no upstream issue known. bitsandbytes' CUDA product is a custom op the compiler cannot see into.


def traced_4bit_weight(
    quantized: Sequence[torch.Tensor], blocksize: int, shape: tuple[int, ...], absmax_blocksize: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """A 4-bit weight dequantized as bitsandbytes' kernels do it: each 4-bit index (the high half of a byte first)
    looked up in the code, times its block's float32 absmax, cast to `dtype`. `quantized`: (packed indices, absmax,
    code), then, when the absmax is itself quantized (double quantization, `absmax_blocksize` set), its 8-bit
    values' scales, code and offset, as code[value] * scale + offset.

    Written with lookups in the code and element-wise operations only (bitsandbytes' own torch version scatters
    into a buffer), so that the compiler fuses it into one kernel and may recompute it for the backward pass instead
    of saving it. Each byte is broadcast against its two shifts rather than indexed through a range over the
    weight's positions: compiled on the GPU, such a range became an int64 tensor the size of the weight
    (benchmarks/README.md).
    """
    packed, absmax, code, *nested = quantized
    if absmax_blocksize is not None:
        scales, absmax_code, offset = nested
        blocks = torch.arange(absmax.numel(), device=absmax.device) // absmax_blocksize
        absmax = absmax_code[absmax.long()] * scales[blocks] + offset
    shifts = 4 - 4 * torch.arange(2, device=packed.device, dtype=torch.uint8)  # the high half of each byte first
    indices = (packed.view(-1, 1) >> shifts) & 0xF
    values = code[indices.long()].view(-1, blocksize) * absmax.view(-1, 1)
    return values.view(shape).to(dtype)


class Traced4bitProduct(torch.autograd.Function):
    """x @ W.T for a 4-bit W dequantized in each pass, forward and backward, as bitsandbytes' MatMul4Bit does: what
    is saved for the backward pass is the 4-bit weight, never its dequantized copy (eager runs)."""

    @staticmethod
    def forward(ctx, x, bias, blocksize, shape, absmax_blocksize, *quantized):  # the bias frozen, as the weight
        ctx.layout = blocksize, shape, absmax_blocksize
        ctx.save_for_backward(*quantized)
        return torch.nn.functional.linear(x, traced_4bit_weight(quantized, *ctx.layout, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        weight = traced_4bit_weight(ctx.saved_tensors, *ctx.layout, grad.dtype)
        return grad @ weight, None, None, None, None, *[None] * len(ctx.saved_tensors)


class Traced4bitLinear(torch.nn.Linear):
    """A frozen bitsandbytes 4-bit linear layer whose product the compiler can see: the same 4-bit storage and
    quantization state, dequantized in each pass by traced_4bit_weight, with Linear4bit's dtype contract (the
    product in the compute dtype, returned in the input's).

    A torch.nn.Linear, as Linear4bit is, so that PEFT puts LoRA on it when the stages install the plan before
    adding the adapter; its `weight` is the 4-bit layer's packed parameter, whose integer dtype keeps the adapter in
    float32, as on Linear4bit."""

    def __init__(self, layer):
        super().__init__(layer.in_features, layer.out_features, bias=False, device="meta")
        self.weight = layer.weight
        self.compute_dtype = layer.compute_dtype or torch.bfloat16
        quantized, self.layout = _state_tensors(layer.weight.data, layer.weight.quant_state)
        self.quantized_names = ("packed", "absmax", "code", "absmax_scales", "absmax_code", "offset")[: len(quantized)]
        for name, tensor in zip(self.quantized_names, quantized, strict=True):
            self.register_buffer(name, tensor, persistent=False)  # the 4-bit layer's own storage, not copies
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.data, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized = [getattr(self, name) for name in self.quantized_names]
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if not torch.compiler.is_compiling():
            return Traced4bitProduct.apply(x.to(self.compute_dtype), bias, *self.layout, *quantized).to(x.dtype)
        # Compiled: dequantized inside a checkpoint, which tags its operations for recomputation, so the partitioner
        # dequantizes again for the backward pass instead of keeping the bf16 weight.
        dequantize = functools.partial(_weight_from, self.layout, self.compute_dtype)
        weight = torch.utils.checkpoint.checkpoint(dequantize, *quantized, use_reentrant=False)
        return torch.nn.functional.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)


def _weight_from(layout: tuple, dtype: torch.dtype, *quantized: torch.Tensor) -> torch.Tensor:
    return traced_4bit_weight(quantized, *layout, dtype)


def _state_tensors(packed: torch.Tensor, state) -> tuple[list[torch.Tensor], tuple]:
    """traced_4bit_weight's tensors and layout (blocksize, shape, absmax blocksize) for a bitsandbytes 4-bit weight."""
    quantized = [packed.view(torch.uint8).reshape(-1), state.absmax, state.code]
    if state.nested:
        quantized += [state.state2.absmax, state.state2.code, state.offset]
    return quantized, (state.blocksize, tuple(state.shape), state.state2.blocksize if state.nested else None)


def trace_4bit_products(model) -> int:
    """Replace each bitsandbytes 4-bit linear layer by a Traced4bitLinear on the same storage; returns how many.

    bitsandbytes' CUDA product of a 4-bit weight over 1,536 tokens is Python around three kernels and an addition
    (the nested absmax, the weight, the matmul), which the compiler cannot see into and which the CPU issues one by
    one at every pass. Traced, a compiled layer dequantizes each weight in a kernel of its own making and keeps only
    the matmul outside, with bitsandbytes' values (tests/test_traced_4bit.py holds them bit for bit to its CPU
    kernels and to the format by hand, check_traced_4bit to its CUDA kernels where there is a GPU) and the 4-bit
    layer's memory. A weight whose size is not a whole number of blocks stays bitsandbytes'.
    """
    check_traced_4bit()

    def traced(layer) -> Traced4bitLinear | None:
        state = layer.weight.quant_state
        return Traced4bitLinear(layer) if state is not None and state.shape.numel() % state.blocksize == 0 else None

    return _replace_4bit_layers(model, traced)


def check_traced_4bit() -> None:
    """bitsandbytes' quantization state has the fields read here, and its kernels (CUDA's where there is a GPU, else
    the CPU's) dequantize a small weight, plain and double-quantized, to what traced_4bit_weight computes (the
    packing order, code and absmax)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    name = "trace_4bit_products"
    fields = {"absmax", "shape", "code", "blocksize", "offset", "state2"} <= set(_parameters(QuantState.__init__))
    _require(fields and "nested" in _names(QuantState.__init__), "bitsandbytes", "QuantState's fields", name)
    has_compute_dtype = "compute_dtype" in _parameters(bnb.nn.Linear4bit.__init__)
    _require(has_compute_dtype, "bitsandbytes", "Linear4bit.compute_dtype", name)
    quantize, dequantize = (getattr(bnb.functional, f, None) for f in ("quantize_4bit", "dequantize_4bit"))
    _require(callable(quantize) and callable(dequantize), "bitsandbytes", "functional.(de)quantize_4bit", name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = torch.linspace(-1, 1, 2 * 64 * 256, device=device).reshape(256, -1) ** 3
    for nested in (False, True):
        packed, state = quantize(weight, blocksize=64, compress_statistics=nested, quant_type="nf4")
        quantized, layout = _state_tensors(packed, state)
        same = torch.equal(traced_4bit_weight(quantized, *layout, torch.float32), dequantize(packed, state))
        _require(same, "bitsandbytes", "the 4-bit format (dequantize_4bit's values)", name)


# --- bert-score 0.3.13: BERTScorer's model, tokenizer and idf weights, and its scoring loop re-implemented --------
# Upstream: no upstream issue known (https://github.com/Tiiiger/bert_score/pull/69 moved the padding to the GPU; the
# per-sentence tokenization and the copies to the CPU remain).

# The names bert_score.utils.bert_cos_score_idf and sent_encode use in 0.3.13, which bertscore_pair_f1 reproduces.
BERTSCORE_LOOP = frozenset({
    "append", "arange", "cat", "cpu", "device", "dict", "enumerate", "expand", "get_bert_embedding",
    "greedy_cos_idf", "item", "len", "list", "long", "max", "next", "no_grad", "pad_sequence", "parameters", "print",
    "range", "set", "size", "sorted", "split", "stack", "sum", "tensor", "to", "torch", "tqdm", "unsqueeze", "zip",
})  # fmt: skip
BERTSCORE_TOKENS = frozenset({
    "GPT2Tokenizer", "NotImplementedError", "RobertaTokenizer", "build_inputs_with_special_tokens", "encode",
    "isinstance", "max_len", "model_max_length", "parse", "strip", "trans_version", "version",
})  # fmt: skip


def set_bertscore_dtype(scorer, dtype: torch.dtype) -> None:
    """Run a BERTScorer's model in `dtype`: bert-score loads it in float32 and offers no setting for it."""
    check_bertscore(scorer)
    scorer._model.to(dtype)


def bertscore_pair_f1(scorer, candidates: list[str], references: list[str], batch_size: int) -> torch.Tensor:
    """BERTScorer.score's F1 for candidate/reference pairs, with bert-score's model, tokenizer, layer, idf weights,
    greedy matching (bert_score.utils.greedy_cos_idf) and baseline, but a faster loop around them.

    bert-score's own loop (utils.bert_cos_score_idf) tokenizes one sentence per call and copies every sentence's
    embeddings to the CPU and back; with roberta-large on an H100 that was two thirds of the time
    (benchmarks/results/bertscore_profile_bert_score_loop_h100.txt). Here the sentences are tokenized in one call
    and the embeddings stay on the model's device. Sentences are deduplicated and batched longest first, as
    bert-score does. tests/test_metrics.py checks the scores equal BERTScorer.score's.
    """
    from bert_score.utils import bert_encode, greedy_cos_idf
    from torch.nn.utils.rnn import pad_sequence
    from tqdm.auto import tqdm

    check_bertscore(scorer)
    tokenizer, model = scorer._tokenizer, scorer._model
    device = next(model.parameters()).device
    if scorer.idf:
        idf_weights = scorer._idf_dict
    else:
        idf_weights = defaultdict(lambda: 1.0)
        idf_weights[tokenizer.sep_token_id] = 0.0
        idf_weights[tokenizer.cls_token_id] = 0.0
    sentences = sorted(set(candidates) | set(references), key=lambda text: len(text.split(" ")), reverse=True)
    token_ids = _token_ids(tokenizer, sentences)
    encoded: dict[str, tuple] = {}
    batches = range(0, len(sentences), batch_size)
    for start in tqdm(batches, desc="bertscore", unit="batch", disable=None):  # the slow part: the model's passes
        ids = [torch.tensor(row) for row in token_ids[start : start + batch_size]]
        lengths = [len(row) for row in ids]
        padded = pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id).to(device)
        mask = (torch.arange(padded.shape[1]) < torch.tensor(lengths)[:, None]).long().to(device)
        embeddings = bert_encode(model, padded, attention_mask=mask, all_layers=scorer.all_layers)
        for offset, length in enumerate(lengths):
            row = token_ids[start + offset]
            encoded[sentences[start + offset]] = (embeddings[offset, :length], [idf_weights[i] for i in row])

    def stack(texts: list[str]):
        embeddings = pad_sequence([encoded[text][0] for text in texts], batch_first=True, padding_value=2.0)
        idf = pad_sequence([torch.tensor(encoded[text][1], dtype=torch.float) for text in texts], batch_first=True)
        lengths = torch.tensor([len(encoded[text][1]) for text in texts])
        mask = torch.arange(embeddings.shape[1]) < lengths[:, None]
        return embeddings, mask.to(device), idf.to(device)

    scores = []
    with torch.no_grad():
        for start in range(0, len(references), batch_size):
            precision_recall_f1 = greedy_cos_idf(
                *stack(references[start : start + batch_size]),
                *stack(candidates[start : start + batch_size]),
                scorer.all_layers,
            )
            scores.append(torch.stack(precision_recall_f1, dim=-1).cpu())
    all_scores = torch.cat(scores)
    if scorer.rescale_with_baseline:
        all_scores = (all_scores - scorer.baseline_vals) / (1 - scorer.baseline_vals)
    return all_scores[..., 2]


def _token_ids(tokenizer, sentences: list[str]) -> list[list[int]]:
    """bert_score.utils.sent_encode's token ids for many sentences, in one tokenizer call."""
    from transformers import GPT2Tokenizer, RobertaTokenizer

    byte_level = isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer))
    extra = {"add_prefix_space": True} if byte_level else {}
    texts = [sentence.strip() for sentence in sentences]
    return tokenizer(texts, add_special_tokens=True, max_length=tokenizer.model_max_length, truncation=True, **extra)[
        "input_ids"
    ]


def check_bertscore(scorer=None) -> None:
    from bert_score import BERTScorer, utils

    name = "bertscore_pair_f1"
    loop = _names(getattr(utils, "bert_cos_score_idf", None)) == BERTSCORE_LOOP
    _require(loop, "bert-score", "utils.bert_cos_score_idf", name)
    _require(_names(getattr(utils, "sent_encode", None)) == BERTSCORE_TOKENS, "bert-score", "utils.sent_encode", name)
    encode = _parameters(getattr(utils, "bert_encode", None)) == ["model", "x", "attention_mask", "all_layers"]
    _require(encode, "bert-score", "utils.bert_encode(model, x, attention_mask, all_layers)", name)
    greedy = _parameters(getattr(utils, "greedy_cos_idf", None)) == [
        "ref_embedding", "ref_masks", "ref_idf", "hyp_embedding", "hyp_masks", "hyp_idf", "all_layers",
    ]  # fmt: skip
    _require(greedy, "bert-score", "utils.greedy_cos_idf's arguments", name)
    private = {"_tokenizer", "_model", "_idf_dict", "all_layers"}
    _require(private <= _names(BERTScorer.__init__), "bert-score", "BERTScorer's _model, _tokenizer, _idf_dict", name)
    scores = _names(getattr(BERTScorer, "score", None))
    rescales = {"bert_cos_score_idf", "baseline_vals", "rescale_with_baseline"} <= scores
    _require(rescales, "bert-score", "BERTScorer.score's rescaling", name)
    if scorer is not None:
        found = all(hasattr(scorer, attribute) for attribute in ("_model", "_tokenizer", "_idf_dict"))
        _require(found, "bert-score", "BERTScorer's _model, _tokenizer, _idf_dict", name)


# --- trl 1.16.0: DPOTrainer's frozen copy of the adapter it trains, an adapter named "ref" -------------------------
# Upstream: no upstream issue known (the name is fixed in DPOTrainer.__init__, not a setting).

REFERENCE_ADAPTER = "ref"


def reference_adapter_name(model) -> str:
    """The name of the frozen copy of the loaded adapter that TRL 1.16's DPOTrainer reads the reference from."""
    check_reference_adapter()
    if REFERENCE_ADAPTER not in model.peft_config:
        raise _changed("trl", "DPOTrainer's frozen reference adapter (none on this model)", "reference_adapter_name")
    return REFERENCE_ADAPTER


def check_reference_adapter() -> None:
    from trl import DPOTrainer

    _require(
        REFERENCE_ADAPTER in _constants(DPOTrainer.__init__),
        "trl",
        "the name of DPOTrainer's frozen adapter copy",
        "reference_adapter_name",
    )


# --- trl 1.16.0: SFTTrainer refuses padding_free with max_length unless it packs ----------------------------------
# Upstream: the refusal came with https://github.com/huggingface/trl/pull/5359 ("truncate before the collator"), and
# TRL 1.16's own dataset preparation cuts unpacked examples anyway; no issue asks to lift it.


def padding_free_sft_trainer(make_trainer: Callable[[], Any], args) -> Any:
    """An SFTTrainer (`make_trainer()`) whose unpacked padding-free examples are cut to args.max_length.

    TRL 1.16 refuses that combination, so the trainer is built with max_length None (the route its message offers),
    its tokenized examples are then cut as its preparation cuts them (truncate_examples), and max_length is put back
    so the run's arguments record it. Other settings build the trainer unchanged.
    """
    if not args.padding_free or args.packing or args.max_length is None:
        return make_trainer()
    check_padding_free_refusal()
    max_length, args.max_length = args.max_length, None
    try:
        trainer = make_trainer()
    finally:
        args.max_length = max_length
    trainer.train_dataset = truncate_examples(trainer.train_dataset, max_length, args.truncation_mode)
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = truncate_examples(trainer.eval_dataset, max_length, args.truncation_mode)
    return trainer


def truncate_examples(dataset, max_length: int, mode: str):
    """Tokenized examples cut to max_length tokens (`keep_start` or `keep_end`), dropping any left with no label, as
    SFTTrainer._prepare_dataset cuts unpacked examples."""
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    dataset = dataset.map(lambda row: {"input_ids": row["input_ids"][cut], "labels": row["labels"][cut]})
    return dataset.filter(lambda row: any(label != -100 for label in row["labels"]))


def check_padding_free_refusal() -> None:
    from trl import SFTTrainer

    refusal = any("is not enforced" in str(constant) for constant in _constants(SFTTrainer.__init__))
    _require(refusal, "trl", "SFTTrainer's refusal of padding_free with max_length", "padding_free_sft_trainer")
    cuts = {"truncation_mode", "max_length"} <= _names(SFTTrainer._prepare_dataset)
    _require(cuts, "trl", "SFTTrainer._prepare_dataset's truncation", "padding_free_sft_trainer")
