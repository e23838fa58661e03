"""How sft and dpo use the GPU: the same training run as params describe, laid out to be fast within its memory.

The recipes write the seeds' layout: batch 1 with gradient accumulation and activation checkpointing, which keeps a
7B QLoRA run under 6 GiB but leaves an 80 GB GPU mostly idle. `speed: fast` keeps every example, optimizer step
and loss normalisation of that run and changes only the layout:

- one real batch of (per-device batch x accumulation) examples instead of accumulated micro-batches (transformers
  normalises the loss by the tokens of the whole optimizer step either way, so the gradients are the same);
- batches are padding-free: examples are laid end to end with restarting position ids, which transformers turns
  into a block-diagonal causal mask, so no example attends to another and no compute goes to padding (SFT through
  TRL's padding-free collator; DPO, whose TRL 1.16 collator always pads, through pack_padded_batches);
- activation checkpointing only for the layers and batches that need it: before each forward pass the batch's
  token count decides how many decoder layers recompute their activations, so short batches run at full speed and
  the longest possible batch still fits; a batch too long for a layer to recompute whole recomputes in runs of
  whole documents (finetune.layout.documents), so small budgets keep whole-step batches too;
- the decoder layers compiled with torch.compile, attention through PyTorch's flex attention (which skips the
  masked blocks of a padding-free batch instead of computing them), the 4-bit weights dequantized once into a bf16
  copy where it leaves room for the step as one batch (keeps_dequantized_copy), and AdamW as PyTorch's fused step
  (FUSED_ADAMW). Each gives the same numbers as before up to float rounding (the fused step's float32 states drop
  the 8-bit rounding of bitsandbytes' states); what each bought is in benchmarks/results/ (throughput.md, the
  profiles of the eager, compiled and fast steps, and the lever ablation in ablation_h200/);
- under QLoRA with autocast, the frozen embedding and head held in the bf16 they were loaded in
  (finetune.layout.embeddings): the same numbers bit for bit, 0.52 GB less for a 7B model and no bf16 copy of the head
  at each step;
- the next batches collated in LOADER_WORKERS processes, unless the trainer settings choose;
- on several GPUs, each SFT step's examples split among them by token count (finetune.layout.balance), so that no GPU
  waits for one with longer examples: the same examples per step, only which GPU takes which changes.

Where no real batch fits even so (about 5 GiB for a 7B model), fast runs batch 1, still compiled and padding-free;
wherever the 4-bit weights stay 4-bit, the written optimizer stays for its smaller states. `speed: low_memory` is
the seeds' layout (batch 1, every layer checkpointed); `as_written` changes nothing; `auto` (the default) is fast on
a GPU and as written on a CPU. The memory model below takes its per-token terms from what autograd saves, counted on
the 7B shape as the layout trains it (benchmarks/results/activation_memory.md), and the fused LM head's tile from
TRL's code; it predicts the one GPU peak measured with these versions that it can (the seeds' layout on an H100)
within 2%.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from finetune.core.errors import ConfigError
from finetune.layout.documents import DocumentRuns, document_block_mask
from finetune.layout.embeddings import HELD_IN_BF16
from finetune.model.loading import CUDA_ONLY_OPTIMIZERS, decoder_layers

GIB = 2**30
# Bytes autograd saves per token per decoder layer, per unit of (hidden + intermediate) size, for the seed recipe's
# LoRA layer (dropout 0.05) under QLoRA, counted on the Mistral-7B shape by benchmarks/activation_memory.py (its
# results file: 290,664 compiled, 472,936 eager), rounded up; and where the adapter's dropout does not run in training
# (LoRA dropout 0, or DPO's disable_dropout), which saves no masks and no dropped inputs (227,176 and 317,288).
COMPILED_ACTIVATION_BYTES = 16.0
EAGER_ACTIVATION_BYTES = 26.0
COMPILED_NO_DROPOUT_BYTES = 12.5
EAGER_NO_DROPOUT_BYTES = 17.5
# PEFT's prepare_model_for_kbit_training upcasts the embedding and norms to float32, so a QLoRA model's residual
# stream runs in float32; an unquantized model's stays bf16. A checkpointed layer keeps only its input, one value of
# the stream per hidden unit.
QLORA_STREAM_BYTES = 4
BF16_STREAM_BYTES = 2
# TRL 1.16's fused LM head (trl.trainer.utils.add_fused_lm_head, which its SFT and DPO trainers install) never holds
# the whole logits: it projects LOGIT_TILE_TOKENS tokens at a time into a bf16 tile as wide as the vocabulary
# (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE), and keeps per token the head's input and, in the backward pass,
# its float32 gradient; the final norm keeps its input.
LOGIT_TILE_TOKENS = 4096
LOGIT_TILE_BYTES = 2
# NF4 weights with double-quantised absmax, per parameter.
NF4_BYTES = 0.53
# Share of the GPU the plan may fill; the rest is the CUDA context, the allocator's slack and the optimizer states.
USABLE_SHARE = 0.85
# How checkpointed layers recompute: whole, or a batch longer than fits in runs of whole documents.
WHOLE_BATCHES = "whole batches"
IN_RUNS = "in runs of whole documents for batches over {tokens} tokens (finetune.layout.documents)"
# Optimizers that compute AdamW, which the fast layout runs as PyTorch's fused AdamW: a few multi-tensor kernels per
# step instead of bitsandbytes' Python loop over every LoRA tensor (448 for r16 on the seven projections of a
# 32-layer model), during which the GPU waits. The 8-bit and paged variants
# exist to save optimizer-state memory, which for a LoRA adapter is small (float32 states for 42M parameters:
# 0.34 GB); the fused step keeps those states in float32, i.e. without 8-bit rounding.
FUSED_ADAMW = "adamw_torch_fused"
# The fused step's two float32 states per adapter parameter, all in PyTorch's allocator (bitsandbytes' paged states
# live outside it).
FUSED_STATES_BYTES = 8
ADAMW_OPTIMIZERS = (
    "adamw_torch", FUSED_ADAMW, "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
)  # fmt: skip


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a causal LM."""

    quantized_params: int  # the decoder's linear weights (4-bit under QLoRA)
    other_params: int  # embeddings, head, norms: kept in float32 by prepare_model_for_kbit_training
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    embedding_params: int = 0  # of other_params, the input embedding's and the head's (once if tied)
    head_params: int = 0  # the head's, tied or not
    stream_bytes: int = QLORA_STREAM_BYTES  # bytes per value of the residual stream as it trains
    uniform_attention: bool = True  # every layer attends alike: one block mask serves all (finetune.layout.documents)
    adapter_params: int = 0  # the LoRA adapter's trainable parameters (0: not counted)
    adapter_dropout: bool = True  # the adapter's LoRA dropout rate is over 0 (unknown: counted as on)


def model_shape(model_cfg, quantized: bool = True, lora_cfg=None) -> ModelShape:
    """The shape of the configured model, counted on the meta device (no weights are read); `quantized`: it trains
    under QLoRA (a float32 residual stream); `lora_cfg`: the adapter whose parameters to count, as PEFT builds it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    head = model.get_output_embeddings()
    linear = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )
    total = sum(parameter.numel() for parameter in model.parameters())
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), head) if m is not None}
    text = config.get_text_config()
    uniform_attention = _uniform_sliding_window(config) is not _NO_MASK_OF_OURS
    # Last: PEFT adds its layers to the model in place.
    adapter_params = _adapter_params(model, lora_cfg) if lora_cfg is not None else 0
    return ModelShape(
        quantized_params=linear,
        other_params=total - linear,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        vocab=text.vocab_size,
        embedding_params=sum(embeddings.values()),
        head_params=head.weight.numel() if head is not None else 0,
        stream_bytes=QLORA_STREAM_BYTES if quantized else BF16_STREAM_BYTES,
        uniform_attention=uniform_attention,
        adapter_params=adapter_params,
        adapter_dropout=lora_cfg is None or lora_cfg.dropout > 0,
    )


def _adapter_params(meta_model, lora_cfg) -> int:
    """The trainable parameters PEFT gives `meta_model` (on the meta device, so nothing is allocated)."""
    from accelerate import init_empty_weights
    from peft import get_peft_model

    from finetune.model.loading import build_lora_config

    with init_empty_weights():
        adapted = get_peft_model(meta_model, build_lora_config(lora_cfg))
    return sum(parameter.numel() for parameter in adapted.parameters() if parameter.requires_grad)


def static_bytes(
    shape: ModelShape, quantized: bool, dequantized: bool = False, shards: int = 1, embeddings_bf16: bool = False
) -> float:
    """Weights on the GPU before the first batch (`dequantized`: the 4-bit weights held as their bf16 values;
    `embeddings_bf16`: the frozen embedding and head held in bf16, finetune.layout.embeddings).

    With the weights sharded across `shards` GPUs (FSDP), each holds its share plus, while a layer runs, that
    layer's gathered weights.
    """
    per_param = NF4_BYTES if quantized and not dequantized else 2.0
    float32_params = shape.other_params - (shape.embedding_params if embeddings_bf16 else 0)
    whole = shape.quantized_params * per_param + float32_params * 4.0 + (shape.other_params - float32_params) * 2.0
    if shards == 1:
        return whole
    return whole / shards + shape.quantized_params * per_param / shape.layers


def layer_bytes_per_token(shape: ModelShape, compiled: bool = False, dropout: bool = True) -> float:
    if dropout:
        per_unit = COMPILED_ACTIVATION_BYTES if compiled else EAGER_ACTIVATION_BYTES
    else:
        per_unit = COMPILED_NO_DROPOUT_BYTES if compiled else EAGER_NO_DROPOUT_BYTES
    return per_unit * (shape.hidden + shape.intermediate)


def head_bytes_per_token(shape: ModelShape) -> float:
    """The final norm's and the head's input, and the head input's float32 gradient."""
    return (2 * shape.stream_bytes + 4) * shape.hidden


@dataclass(frozen=True)
class Activations:
    """How a layout keeps what the backward pass needs: the memory model's switches."""

    compiled: bool = False  # the decoder layers run through torch.compile, which saves less
    offloaded: bool = False  # the checkpointed layers' inputs wait for their recompute in host memory
    float32_head: bool = False  # QLoRA's float32 head, which autocast copies to bf16 while it runs
    in_runs: bool = False  # a long batch may recompute in runs of documents (finetune.layout.documents)
    dropout: bool = True  # the adapter's dropout runs, so its masks and dropped inputs are saved


def batch_bytes(
    shape: ModelShape, tokens: int, checkpointed_layers: int, how: Activations = Activations(),
    run_tokens: int | None = None,
) -> float:  # fmt: skip
    """Activation memory of one forward/backward pass over `tokens` tokens with the first layers checkpointed, each
    recomputed in runs of at most `run_tokens` tokens (None: whole).

    The backward pass starts at the head, with every unchecked layer's saved activations and every checkpointed
    layer's input alive, plus the fused LM head's logits tile (and a float32 head's bf16 copy). The first layers are
    the last to run backward: by the time one of them recomputes its activations, the unchecked layers' are freed,
    so the peak is the larger of the two moments.
    """
    checkpoint = 0 if how.offloaded else shape.stream_bytes * shape.hidden
    layer = layer_bytes_per_token(shape, how.compiled, how.dropout)
    unchecked = shape.layers - checkpointed_layers
    tile = min(tokens, LOGIT_TILE_TOKENS) * shape.vocab * LOGIT_TILE_BYTES
    head_copy = shape.head_params * 2.0 if how.float32_head else 0.0
    at_the_head = tokens * (unchecked * layer + checkpointed_layers * checkpoint + head_bytes_per_token(shape))
    # A recomputing layer: its activations, the checkpointed inputs, and the float32 gradient flowing back; in runs,
    # one run's activations, and the runs' input gradients beside the gradient of the whole output.
    recomputed = tokens if run_tokens is None else min(run_tokens, tokens)
    gradients = 4 if recomputed == tokens else 8
    recomputing = recomputed * layer + tokens * (checkpointed_layers * checkpoint + gradients * shape.hidden)
    return max(at_the_head + tile + head_copy, recomputing if checkpointed_layers else 0)


def run_capacity(shape: ModelShape, tokens: int, budget: float, how: Activations) -> int | None:
    """The longest run (a multiple of 64 tokens) in which every checkpointed layer may recompute a `tokens`-token
    batch within `budget` bytes; None when even runs of 64 do not fit."""
    for run in range(tokens // 64 * 64, 0, -64):
        if batch_bytes(shape, tokens, shape.layers, how, run_tokens=run) <= budget:
            return run
    return None


def layers_to_checkpoint(
    shape: ModelShape, tokens: int, budget: float, how: Activations = Activations()
) -> int | None:
    """The fewest decoder layers to checkpoint so a `tokens`-token batch fits in `budget` bytes; None if none do."""
    for checkpointed in range(shape.layers + 1):
        if batch_bytes(shape, tokens, checkpointed, how) <= budget:
            return checkpointed
    return None


def keeps_dequantized_copy(
    shape: ModelShape, quantized: bool, gpu_bytes: int, longest_batch: int, embeddings_bf16: bool = False,
    dropout: bool = True,
) -> bool:  # fmt: skip
    """Whether the fast layout holds the 4-bit weights as one bf16 copy: where the step's longest possible batch
    (`longest_batch` tokens) still fits beside it with every layer checkpointed on the GPU and recomputing whole.

    The copy spares every product its dequantizing (SFT 7,229 to 9,158 tokens/s at the same batch on an H100,
    benchmarks/README.md) at 3.8x the 4-bit weights' memory; where it would cost a smaller batch, runs of documents
    or offloaded checkpoints, the weights stay 4-bit.
    """
    if not quantized:
        return False
    budget = gpu_bytes * USABLE_SHARE - static_bytes(shape, True, True, embeddings_bf16=embeddings_bf16)
    how = Activations(compiled=True, float32_head=not embeddings_bf16, dropout=dropout)
    return layers_to_checkpoint(shape, longest_batch, budget, how) is not None


def disables_dropout(stage: str, trainer: dict[str, Any]) -> bool:
    """Whether the stage's trainer sets every dropout of the model to 0: TRL's DPOTrainer does unless the trainer
    settings turn DPOConfig's disable_dropout off (TRL's default: on); its SFTTrainer never does."""
    if stage != "dpo":
        return False
    from trl import DPOConfig

    return bool(trainer.get("disable_dropout", DPOConfig.disable_dropout))


@dataclass(frozen=True)
class SpeedPlan:
    """The resolved layout: recorded in the stage's DVCLive params and printed."""

    requested: str
    mode: str  # fast | low_memory | as_written
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    padding_free: bool
    checkpointing: str  # "off", "all layers", or "as memory needs (up to N tokens without)"
    max_tokens_per_batch: int  # the longest batch the layout can meet (tokens incl. padding)
    tokens_without_checkpointing: int | None  # batches up to this many tokens run with no layer checkpointed
    memory_budget_gib: float | None
    reason: str
    compiled: bool = False  # decoder layers run through torch.compile (see compile_decoder_layers)
    attention: str = "sdpa"  # the attention implementation the layout sets
    base_weights: str = "as loaded"  # or BF16_COPY, or TRACED_4BIT
    embeddings: str = "as loaded"  # or HELD_IN_BF16 (finetune.layout.embeddings)
    checkpoints: str = "on the GPU"  # or OFFLOADED: where checkpointed layers' inputs wait for their recompute
    recompute: str = WHOLE_BATCHES  # or how long batches recompute in runs of documents (IN_RUNS)
    optimizer: str = "as written"  # or the optimizer the layout runs instead (see FUSED_ADAMW)
    sharding: str = "none"  # or how FSDP shards the weights across the GPUs (see FSDP_SETTINGS)
    batches_from: str = "as written"  # or LOADER_WORKERS processes (see the fast layout in plan)
    shares: str = "in sampler order"  # or BALANCED_SHARES: how each step's examples are split across the GPUs
    adapter_dropout: bool = True  # its dropout runs in training (off: LoRA dropout 0, or DPO's disable_dropout)


# distributed.strategy fsdp: TrainingArguments' FSDP settings. FSDP2 (PyTorch's fully_shard, the version transformers
# supports); each decoder layer its own unit (accelerate wraps the model's _no_split_modules), its weights gathered
# for its forward and again for its backward; checkpoints whole, so they do not depend on the number of GPUs.
FSDP_SETTINGS = {
    "fsdp": True,
    "fsdp_config": {
        "version": 2,
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,  # transformers cannot load bitsandbytes weights onto the meta device
    },
}
# The fast layout collates the next batches in this many worker processes, unless the trainer settings choose: in
# the training process each collation is time the GPU waits.
LOADER_WORKERS = 2
BALANCED_SHARES = "by token count (finetune.layout.balance)"
OFFLOADED = "offloaded to pinned host memory (activation_checkpointing_kwargs offload)"
BF16_COPY = "nf4, dequantized once to bf16"  # finetune.overrides.dequantize_base
# A candidate, not planned yet (benchmarks/README.md): finetune.overrides.trace_4bit_products
TRACED_4BIT = "nf4, dequantized inside the compiled layers"
SHARDING = "FSDP2: weights, gradients and optimizer states sharded across the GPUs, each layer gathered as it runs"


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan(
    stage: str,
    trainer: dict[str, Any],
    requested: str,
    shape: ModelShape | None,
    gpu_bytes: int | None,
    quantized: bool,
    world: int = 1,
    sharded: bool = False,
    bf16_copy: bool | None = None,
) -> tuple[dict[str, Any], SpeedPlan]:
    """The trainer keywords for `requested` speed, and the plan that explains them.

    stage is "sft" (padding-free batches of single sequences) or "dpo" (batches of chosen + rejected pairs, which
    TRL pads and pack_padded_batches packs). Without a GPU, or with `as_written`, the keywords are returned
    unchanged, except that with `world` processes each one takes its share of every optimizer step, and with
    `sharded` (distributed.strategy fsdp) they shard the weights (FSDP_SETTINGS).

    Sharded, the fast layout keeps the 4-bit weights as they are (a bf16 copy would undo what sharding saves) and
    runs the layers uncompiled (the compiled layers are only measured with whole weights on each GPU). Otherwise
    `bf16_copy` None keeps a bf16 copy of the 4-bit weights where keeps_dequantized_copy finds room for it; True or
    False decides (the benchmarks' ablation of the copy).
    """
    per_device = int(trainer.get("per_device_train_batch_size", 8))
    accumulation = int(trainer.get("gradient_accumulation_steps", 1))
    if (per_device * accumulation) % world:
        raise ConfigError(
            f"{stage}.trainer: per_device_train_batch_size x gradient_accumulation_steps = "
            f"{per_device * accumulation} "
            f"examples per optimizer step cannot be split evenly across distributed.processes = {world}"
        )
    effective = per_device * accumulation // world  # examples per optimizer step on each GPU
    max_length = int(trainer.get("max_length") or 1024)
    sequences = 2 if stage == "dpo" else 1
    written = dict(trainer)
    sharded = sharded and world > 1
    optimizer = "as written"
    if sharded:
        for key, value in FSDP_SETTINGS.items():
            written.setdefault(key, copy.deepcopy(value))  # TrainingArguments rewrites fsdp_config in place
        optim = str(written.get("optim", ""))
        # bitsandbytes' kernels take each weight as a plain tensor, which FSDP2's sharded weights are not
        # (bitsandbytes issue 1633).
        if any(marker in optim for marker in CUDA_ONLY_OPTIMIZERS):
            if optim not in ADAMW_OPTIMIZERS:
                raise ConfigError(
                    f"{stage}.trainer.optim: {optim} is a bitsandbytes optimizer, which cannot step FSDP's sharded "
                    "weights; use an AdamW variant or distributed.strategy ddp"
                )
            written["optim"] = FUSED_ADAMW
            optimizer = f"{FUSED_ADAMW} (for {optim}: bitsandbytes' optimizers cannot step sharded weights)"
    elif world > 1:
        written.setdefault("ddp_find_unused_parameters", False)  # LoRA: the frozen weights have no gradients
    if world > 1:  # the same optimizer step, split across the GPUs
        if effective % per_device:
            per_device = math.gcd(per_device, effective)
        accumulation = effective // per_device
        written.update(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation)

    dropout = (shape is None or shape.adapter_dropout) and not disables_dropout(stage, trainer)

    def unchanged(reason: str) -> tuple[dict[str, Any], SpeedPlan]:
        checkpointing = "all layers" if trainer.get("activation_checkpointing") else "off"
        return written, SpeedPlan(
            requested,
            "as_written",
            per_device,
            accumulation,
            bool(trainer.get("padding_free", False)),
            checkpointing,
            per_device * sequences * max_length,
            None,
            None,
            reason,
            optimizer=optimizer,
            sharding=SHARDING if sharded else "none",
            adapter_dropout=dropout,
        )

    if requested == "as_written":
        return unchanged("speed: as_written")
    if gpu_bytes is None or shape is None:
        return unchanged("no CUDA device: the trainer settings run as written")

    embeddings_bf16 = quantized and not sharded and bool(trainer.get("bf16") or trainer.get("fp16"))
    if bf16_copy is None:
        longest = effective * sequences * max_length
        bf16_copy = keeps_dequantized_copy(shape, quantized, gpu_bytes, longest, embeddings_bf16, dropout)
    dequantized = bf16_copy and quantized and not sharded
    shards = world if sharded else 1
    budget_gib = round((gpu_bytes * USABLE_SHARE - static_bytes(shape, quantized, dequantized, shards)) / GIB, 2)
    low_memory = {
        **written,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": effective,
        "activation_checkpointing": True,
    }
    low_plan = SpeedPlan(
        requested,
        "low_memory",
        1,
        effective,
        False,
        "all layers",
        sequences * max_length,
        0,
        budget_gib,
        "",
        optimizer=optimizer,
        sharding=SHARDING if sharded else "none",
        adapter_dropout=dropout,
    )
    if requested == "low_memory":
        return low_memory, SpeedPlan(**{**asdict(low_plan), "reason": "speed: low_memory"})

    # fast: the largest real batch whose longest possible form fits once enough layers are checkpointed; batch 1
    # when none does, still padding-free and compiled. Under QLoRA with autocast, the frozen embedding and head go
    # back to the bf16 they were loaded in. Where the 4-bit weights stay 4-bit (no room for their bf16 copy), memory
    # binds: the written optimizer stays unless its fused replacement's states fit (they are memory), and the
    # checkpointed layers' inputs wait for their recompute in pinned host memory (one copy out in the forward pass,
    # one back in the backward), unless the trainer settings choose.
    budget = gpu_bytes * USABLE_SHARE - static_bytes(shape, quantized, dequantized, shards, embeddings_bf16)
    checkpoint_kwargs = written.get("activation_checkpointing_kwargs") or {}
    may_offload = quantized and not dequantized and not sharded and isinstance(checkpoint_kwargs, dict)
    may_offload = may_offload and "offload" not in checkpoint_kwargs
    # Compiled and padding-free, a checkpointed layer can recompute a batch too long to fit in runs of whole
    # documents, as long as a run holds the longest document.
    how = Activations(
        compiled=not sharded, offloaded=may_offload, float32_head=quantized and not embeddings_bf16,
        in_runs=not sharded and shape.uniform_attention, dropout=dropout,
    )  # fmt: skip
    for batch in _divisors_descending(effective):
        worst = batch * sequences * max_length
        tight = layers_to_checkpoint(shape, worst, budget, how) is None
        runs = tight and how.in_runs and (run_capacity(shape, worst, budget, how) or 0) >= max_length
        if tight and not runs and (batch > 1 or budget <= 0):
            continue
        written_optim = written.get("optim")
        swappable = written_optim in ADAMW_OPTIMIZERS and written_optim != FUSED_ADAMW
        roomy = not tight and (dequantized or not quantized)  # a GPU with room for the bf16 weights
        # AdamW as the fused step: with the bf16 copy the reserve holds its float32 states; with the 4-bit weights,
        # where the longest batch still fits after they come out of the activations' budget.
        batch_budget = budget
        if swappable and not tight and not roomy and shape.adapter_params:
            states = shape.adapter_params * FUSED_STATES_BYTES
            if layers_to_checkpoint(shape, worst, budget - states, how) is not None:
                batch_budget = budget - states
        fused_adamw = swappable and (batch_budget < budget or roomy)
        free_tokens = 0
        while free_tokens < worst and batch_bytes(shape, free_tokens + 64, 0, how) <= batch_budget:
            free_tokens += 64
        whole_tokens = free_tokens  # the longest batch every checkpointed layer recomputes whole
        while runs and batch_bytes(shape, whole_tokens + 64, shape.layers, how) <= batch_budget:
            whole_tokens += 64
        kwargs = {
            **written,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": effective // batch,
            "activation_checkpointing": free_tokens < worst,
        }
        offloaded = how.offloaded and free_tokens < worst
        if offloaded:
            kwargs["activation_checkpointing_kwargs"] = {**checkpoint_kwargs, "offload": True}
        if fused_adamw:
            kwargs["optim"], optimizer = FUSED_ADAMW, f"{FUSED_ADAMW} (for {written_optim})"
        batches_from = "as written"
        if "dataloader_num_workers" not in written:
            kwargs.update(dataloader_num_workers=LOADER_WORKERS, dataloader_persistent_workers=True)
            batches_from = f"{LOADER_WORKERS} worker processes"
        if stage == "sft":
            kwargs["padding_free"] = True
        else:
            # The reference log-probs in one no-grad pass before training, instead of a reference forward per step.
            # Not across several processes: TRL 1.16 shares rank 0's cache file path of an in-memory dataset, which
            # the other ranks cannot open (measured on 2 GPUs, benchmarks/results/multi_gpu.md).
            kwargs["precompute_ref_log_probs"] = world == 1
        checkpointing = "off" if free_tokens >= worst else f"as memory needs (up to {free_tokens} tokens without)"
        return kwargs, SpeedPlan(
            requested,
            "fast",
            batch,
            effective // batch,
            True,
            checkpointing,
            worst,
            min(free_tokens, worst),
            round(batch_budget / GIB, 2),
            f"{gpu_bytes / GIB:.0f} GiB GPU: batch {batch} x accumulation {effective // batch} "
            f"(= the configured {per_device} x {accumulation})"
            + (", every layer checkpointed for the longest batches" if tight else "")
            + (", which recompute in runs of documents" if runs else ""),
            compiled=how.compiled,
            attention="flex_attention",
            base_weights=BF16_COPY if dequantized else "as loaded",
            embeddings=HELD_IN_BF16 if embeddings_bf16 else "as loaded",
            checkpoints=OFFLOADED if offloaded else "on the GPU",
            recompute=IN_RUNS.format(tokens=whole_tokens) if runs else WHOLE_BATCHES,
            optimizer=optimizer,
            sharding=SHARDING if sharded else "none",
            batches_from=batches_from,
            # Padding-free rows cost their tokens, so equal tokens per GPU is equal work (see finetune.layout.balance).
            # A sampler the trainer settings name (train_sampling_strategy) is theirs to choose.
            shares=BALANCED_SHARES
            if stage == "sft" and world > 1 and "train_sampling_strategy" not in written
            else "in sampler order",
            adapter_dropout=dropout,
        )
    reason = f"{gpu_bytes / GIB:.0f} GiB GPU: no room beside the weights, so the seeds' layout"
    return low_memory, SpeedPlan(**{**asdict(low_plan), "reason": reason})


def checkpoint_as_needed(
    model, shape: ModelShape, budget: float, packs_padding: bool = False, how: Activations = Activations()
) -> None:
    """Before each training forward pass, checkpoint only as many decoder layers as the batch's size requires.

    Needs activation checkpointing enabled (it installs the recompute function); this hook then switches the
    per-layer flags, so a short batch recomputes nothing. With `packs_padding` (pack_padded_batches installed), a
    padded batch that will be packed counts only its real tokens. With `how.compiled` (compile_decoder_layers), a
    checkpointed layer recomputes through its compiled forward (finetune.overrides.checkpoint_around_compiled), and
    with `how.in_runs` a batch too long for that recomputes in runs of whole documents (finetune.layout.documents).
    """
    from finetune.overrides import checkpoint_around_compiled

    layers = decoder_layers(model)
    if not layers:
        return
    cache: dict[int, tuple[int, int | None]] = {}  # per bucket of tokens: (layers checkpointed, run capacity)
    runs = DocumentRuns(_uniform_sliding_window(model.config)) if how.compiled and how.in_runs else None

    def choose(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if ids is None or not module.training:
            return None
        mask = kwargs.get("attention_mask")
        tokens = int(mask.sum()) if packs_padding and _packable(ids, mask, kwargs) else int(ids.numel())
        bucket = math.ceil(tokens / 256) * 256
        if bucket not in cache:
            needed = layers_to_checkpoint(shape, bucket, budget, how)
            capacity = run_capacity(shape, bucket, budget, how) if needed is None and runs is not None else None
            cache[bucket] = (len(layers) if needed is None else min(needed, len(layers)), capacity)
        checkpointed, capacity = cache[bucket]
        if runs is not None:
            runs.capacity = capacity
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = index < checkpointed
            if how.compiled and layer.gradient_checkpointing:
                checkpoint_around_compiled(layer, _compiled, split=runs.split if runs is not None else None)
        return None

    model.register_forward_pre_hook(choose, with_kwargs=True)


def torch_compiled_forward(forward):
    """torch.compile of a layer class's forward: one function, shared by all the class's layers, each call under the
    compiled layers' dynamo settings (finetune.overrides.compiler_settings)."""
    import torch

    from finetune.overrides import in_compiler_settings

    return in_compiler_settings(torch.compile(forward))


_compiled = functools.cache(torch_compiled_forward)


def memory_budget(gpu_bytes: int | None, budget_gib: float | None) -> int | None:
    """The bytes a run may use: `budget_gib` when it is set and smaller than the GPU, capped on PyTorch's allocator
    so that one large GPU stands in for a smaller one (a run that outgrows it fails as it would there)."""
    if gpu_bytes is None or budget_gib is None or budget_gib * GIB >= gpu_bytes:
        return gpu_bytes
    import torch

    torch.cuda.set_per_process_memory_fraction(budget_gib * GIB / gpu_bytes)
    return int(budget_gib * GIB)


def gpu_memory_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def attention_for_varying_shapes() -> None:
    """Keep scaled-dot-product attention off cuDNN for training runs.

    cuDNN's attention builds an execution plan for each new input shape, and padding-free or padded batches of
    instruction data have a new shape at nearly every step, so training would re-plan at nearly every step.
    PyTorch's flash and memory-efficient kernels need no plans.
    """
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def layout(
    model_cfg, stage: str, trainer: dict[str, Any], requested: str, sharded: bool = False,
    budget_gib: float | None = None, lora_cfg=None,
):  # fmt: skip
    """(trainer keywords, plan, install) for a stage; `install(model)` adds the per-batch checkpointing hook.
    `sharded`: this process trains with FSDP (finetune.training.launch.shards_weights). `budget_gib`: the GPU memory
    to plan within, enforced on the allocator (memory_budget), or None for all the GPU has. `lora_cfg`: the adapter
    trained, whose optimizer states the plan counts.

    Prints the plan: which layout runs, and why, belongs in the log of every run.
    """
    from finetune.model.loading import use_4bit
    from finetune.training.launch import world_size

    attention_for_varying_shapes()
    gpu = memory_budget(gpu_memory_bytes(), budget_gib)
    quantized = use_4bit(model_cfg)
    shape = model_shape(model_cfg, quantized, lora_cfg) if gpu is not None and requested != "as_written" else None
    kwargs, chosen = plan(stage, trainer, requested, shape, gpu, quantized, world=world_size(), sharded=sharded)
    print(
        f"{stage}: speed {chosen.mode} ({chosen.reason}): batch {chosen.per_device_train_batch_size} x accumulation "
        f"{chosen.gradient_accumulation_steps}, padding-free {chosen.padding_free}, "
        f"checkpointing {chosen.checkpointing}, compiled {chosen.compiled}, base weights {chosen.base_weights}, "
        f"embeddings {chosen.embeddings}, checkpoints {chosen.checkpoints}, "
        f"recompute {chosen.recompute}, optimizer {chosen.optimizer}, "
        f"batches from {chosen.batches_from}, sharding {chosen.sharding}"
        + (f", each step split across the GPUs {chosen.shares}" if world_size() > 1 else "")
    )
    return kwargs, chosen, installer(chosen, shape)


def activations_of(chosen: SpeedPlan, shape: ModelShape) -> Activations:
    """The memory model's switches for a fast plan (a QLoRA head not held in bf16 is float32)."""
    return Activations(
        compiled=chosen.compiled,
        offloaded=chosen.checkpoints == OFFLOADED,
        float32_head=chosen.embeddings != HELD_IN_BF16 and shape.stream_bytes == QLORA_STREAM_BYTES,
        in_runs=chosen.recompute != WHOLE_BATCHES,
        dropout=chosen.adapter_dropout,
    )


def installer(chosen: SpeedPlan, shape: ModelShape | None):
    """`install(model)`: applies the plan to a loaded model (bf16 copy, attention, compiled layers, packing of padded
    batches, per-batch checkpointing hook)."""

    def install(model) -> None:
        if chosen.base_weights == BF16_COPY:
            from finetune.overrides import dequantize_base

            dequantize_base(model)
        elif chosen.base_weights == TRACED_4BIT:
            from finetune.overrides import trace_4bit_products

            trace_4bit_products(model)
        if chosen.embeddings != "as loaded":
            from finetune.layout.embeddings import hold_frozen_embeddings_in_bf16

            hold_frozen_embeddings_in_bf16(model)
        if chosen.attention != "sdpa":
            model.set_attn_implementation(chosen.attention)
        if chosen.compiled:
            compile_decoder_layers(model)
        if chosen.padding_free:
            pack_padded_batches(model.base_model)
        if chosen.mode == "fast" and chosen.checkpointing != "off":
            budget = chosen.memory_budget_gib * GIB
            how = activations_of(chosen, shape)
            checkpoint_as_needed(model, shape, budget, packs_padding=chosen.padding_free, how=how)

    return install


def pack_padded_batches(backbone) -> None:
    """Run the decoder stack on a right-padded batch as one padding-free row, and hand back the padded shape.

    TRL 1.16's DPO collator pads chosen and rejected sequences to the longest of the batch (its own padding_free is
    disabled), and its loss reads per-row log-probs of the padded shape. This wrapper around the backbone's forward
    (the model minus its LM head) lays the rows' real tokens end to end with restarting position ids, so the
    decoder layers see a block-diagonal causal mask and no padding, then scatters the hidden states back into the
    padded rows (zeros at padding, where TRL's labels are -100 and nothing is scored). Each real token meets the
    same weights, positions and attended tokens as in the padded batch, so the log-probs are the padded run's up to
    float rounding (tests/test_speed.py), for the training steps and the reference pass alike. Batches without
    padding, left-padded ones and cached generation run unchanged.

    Under flex attention, every padding-free row (packed here, or by TRL's SFT collator) gets its block mask from
    document_block_mask instead of transformers' compiled create_block_mask, whose compile can stall for minutes on
    the first long row.
    """
    from finetune.overrides import wrap_forward

    window = _uniform_sliding_window(backbone.config)
    wrap_forward(backbone, lambda padded_forward: _packing_forward(backbone, padded_forward, window))


def _packing_forward(backbone, padded_forward, window):
    """pack_padded_batches' forward around the backbone's own (`padded_forward`)."""

    def forward(input_ids=None, attention_mask=None, **kwargs):
        if kwargs.get("use_cache") is None:  # the config's default decides, as in the model's own forward
            kwargs["use_cache"] = bool(getattr(backbone.config, "use_cache", False))
        if _packable(input_ids, attention_mask, kwargs):
            real = attention_mask.bool()
            kwargs["position_ids"] = (attention_mask.cumsum(dim=1) - 1)[real].unsqueeze(0)
            kwargs["attention_mask"] = _block_mask_for(backbone, window, kwargs)
            outputs = padded_forward(input_ids=input_ids[real].unsqueeze(0), **kwargs)
            packed = outputs.last_hidden_state
            hidden = packed.new_zeros(*real.shape, packed.size(-1))
            hidden[real] = packed[0]
            outputs.last_hidden_state = hidden
            return outputs
        if attention_mask is None and _is_padding_free_row(kwargs):
            attention_mask = _block_mask_for(backbone, window, kwargs)
        return padded_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return forward


_NO_MASK_OF_OURS = object()  # the model's attention or layer types need transformers' own mask


def _uniform_sliding_window(config):
    """The sliding window every layer uses (None: full causal attention), or _NO_MASK_OF_OURS when layers differ."""
    layer_types = set(getattr(config, "layer_types", None) or ())
    if len(layer_types) > 1 or layer_types - {"full_attention", "sliding_attention"}:
        return _NO_MASK_OF_OURS
    if layer_types == {"full_attention"}:
        return None
    return getattr(config, "sliding_window", None)


def _block_mask_for(backbone, window, kwargs):
    """document_block_mask for the row's position ids under flex attention; None (transformers builds it) otherwise."""
    from finetune.overrides import attention_implementation

    if window is _NO_MASK_OF_OURS or attention_implementation(backbone.config) != "flex_attention":
        return None
    return document_block_mask(kwargs["position_ids"], window)


def _is_padding_free_row(kwargs) -> bool:
    """Position ids given (documents laid end to end), nothing cached, no embeddings of its own."""
    if kwargs.get("position_ids") is None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        return False
    return kwargs.get("inputs_embeds") is None and kwargs.get("cache_position") is None


def _packable(input_ids, attention_mask, kwargs) -> bool:
    """A right-padded 2-D batch with padding, no cache, positions or embeddings of its own, no extra outputs."""
    if input_ids is None or attention_mask is None or attention_mask.dim() != 2:
        return False
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        return False
    if any(kwargs.get(key) is not None for key in ("position_ids", "inputs_embeds", "cache_position")):
        return False
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return False
    import torch

    padding = attention_mask == 0
    # Right padding only: once a row has padding it has nothing else (left padding shifts the padded run's
    # positions, so packing would not be the same computation). Both checks in one device-to-host copy.
    has_padding, left_padded = torch.stack([padding.any(), (padding[:, :-1] & ~padding[:, 1:]).any()]).tolist()
    return has_padding and not left_padded


def compile_decoder_layers(model) -> int:
    """Compile each decoder layer in place with torch.compile; returns how many.

    A QLoRA step in eager mode is bound by Python, not by the GPU: every decoder layer calls seven LoRA wrappers
    around bitsandbytes matmuls, each with its own casts, dropout and scaling, and the GPU waits on the CPU issuing
    them. Compiled, a
    layer's casts, dropout and scaling are fused and its Python runs once per graph call. All layers share one
    compiled graph (torch's "regional compilation"), so compiling costs one layer's time, paid in the first steps;
    batches of new lengths reuse it through dynamic shapes. Compiling in place keeps the modules, hooks and the
    per-layer checkpointing flags where PEFT and the Trainer expect them.
    """
    from finetune.overrides import compile_in_place

    layers = decoder_layers(model)
    for layer in layers:
        # Each compiled layer's calls run under its dynamo settings (a raised recompile limit; a layer that fails to
        # compile runs eagerly), restored after each call: finetune.overrides.compiler_settings.
        compile_in_place(layer)
    return len(layers)


def speed_record(chosen: SpeedPlan | None) -> dict[str, Any] | None:
    """The plan as the run's DVCLive params (metrics/STAGE/params.yaml, untracked, beside the curves); the tracked
    record `dvc exp show` reads is metrics/STAGE/layout.json (finetune.training.records)."""
    return None if chosen is None else {"speed": asdict(chosen)}
