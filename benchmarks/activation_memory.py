"""Activation memory per token of the seed recipe's LoRA decoder layer, counted exactly, against the planner's model.

    python benchmarks/activation_memory.py            # Mistral-7B shape, QLoRA as trained, 256 tokens (CPU, ~4 min)
    python benchmarks/activation_memory.py --tiny     # smoke test

The layout planner (finetune/layout/speed.py) sizes batches and checkpointing from per-token arithmetic. This
counts what autograd really keeps for the backward pass: every tensor a saved-tensor hook sees, once per storage,
parameters excluded. Counting needs no GPU: what a layer saves depends on its operators and dtypes, not on the
device. Each count builds the model as the fast layout trains it (pipeline_model: PEFT's QLoRA preparation, the
bf16 copy of the 4-bit weights, the seed recipe's LoRA, TRL's fused LM head, bf16 autocast) with 0, 1 and 2 decoder
layers, and runs two rows laid end to end as a padding-free batch does, at two batch sizes: the growth is the
per-token cost, the difference between 2 and 1 layers is one decoder layer, and the 0-layer model is the rest
(final norm, head and loss). Compiled: each decoder layer through torch.compile, as the fast layout runs them. Not
counted: what exists only while it runs (the fused head's logits tile, the gradients) and the allocator's slack;
a GPU run's peak includes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from gpu_proof import MISTRAL_7B, TINY, versions  # noqa: E402
from throughput import SEED_RECIPE  # noqa: E402

# (name, compiled, LoRA dropout or None for the recipe's, every layer checkpointed)
VARIANTS = (
    ("eager", False, None, False),
    ("eager, dropout 0", False, 0.0, False),
    ("compiled", True, None, False),
    ("compiled, dropout 0", True, 0.0, False),
    ("checkpointed", False, None, True),
)
TRAINER_HEAD_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what TRL 1.16's SFTTrainer asks of its fused LM head


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model: a smoke test of the flow")
    parser.add_argument("--tokens", type=int, default=256, help="tokens in the counted batch (two rows)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "activation_memory_out")
    return parser.parse_args(argv)


def pipeline_model(arch: dict, layers: int, lora, compiled: bool, checkpointed: bool):
    """The model as the fast layout trains a 7B QLoRA run, built on the CPU: loaded in bf16; prepared by PEFT's
    prepare_model_for_kbit_training, which upcasts every weight that is not 4-bit to float32 (so the residual stream
    runs in float32); the decoder's projections held as the fast layout's bf16 copy of the 4-bit weights
    (DequantizedLinear); the seed LoRA; TRL's fused LM head, as its SFTTrainer adds it. `layers` 0: the embedding,
    final norm and head alone, the embedding's output needing a gradient as a decoder layer's input does."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import MistralConfig, MistralForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from finetune.model.loading import build_lora_config, decoder_layers
    from finetune.overrides import DequantizedLinear

    torch.manual_seed(0)
    config = MistralConfig(**{**arch, "num_hidden_layers": max(layers, 1)}, attn_implementation="sdpa")
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, DequantizedLinear.frozen(child.weight.data.to(torch.bfloat16)))
    model = get_peft_model(model, build_lora_config(lora))
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if layers == 0:
        model.get_base_model().model.layers = torch.nn.ModuleList()
        model.enable_input_require_grads()
    add_fused_lm_head(model.get_base_model(), outputs=TRAINER_HEAD_OUTPUTS)
    if compiled:
        for layer in decoder_layers(model):
            layer.compile()
    return model.train()


def saved_bytes(model, tokens: int) -> int:
    """Bytes of the distinct storages autograd saves in one training forward pass over `tokens` tokens laid end to
    end as two rows, under bf16 autocast as the trainer runs it (parameters excluded)."""
    import torch

    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved: dict[int, torch.Tensor] = {}  # held until counted, so no storage is freed and its address reused

    def count(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            saved.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    torch.manual_seed(1)
    first = tokens // 2
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    positions = torch.cat([torch.arange(first), torch.arange(tokens - first)])[None]  # two rows, padding-free
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, position_ids=positions, labels=ids, fused_lm_head=True)
    return sum(tensor.untyped_storage().nbytes() for tensor in saved.values())


def per_token(model, tokens: int) -> tuple[float, float]:
    """(bytes per token, bytes that do not grow with the tokens): saved_bytes at `tokens` and twice as many."""
    once, twice = saved_bytes(model, tokens), saved_bytes(model, 2 * tokens)
    slope = (twice - once) / tokens
    return slope, once - slope * tokens


def measure(arch: dict, tokens: int, lora) -> dict:
    """Per-token bytes of one decoder layer and of the rest, for each variant."""
    results = {}
    for name, compiled, dropout, checkpointed in VARIANTS:
        variant_lora = lora if dropout is None else dataclasses.replace(lora, dropout=dropout)
        started = time.perf_counter()
        (none, fixed), (one, _), (two, _) = (
            per_token(pipeline_model(arch, n, variant_lora, compiled, checkpointed), tokens) for n in (0, 1, 2)
        )
        results[name] = {
            "lora_dropout": variant_lora.dropout,
            "layer_bytes_per_token": round(two - one),
            "first_layer_bytes_per_token": round(one - none),
            "rest_bytes_per_token": round(none),
            "rest_fixed_bytes": round(fixed),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"[activation_memory] {name}: {results[name]}", flush=True)
    return results


def planner_model(arch: dict) -> dict:
    """The planner's per-token terms for the same shape, under QLoRA."""
    from finetune.layout.speed import (
        LOGIT_TILE_BYTES, LOGIT_TILE_TOKENS, ModelShape, head_bytes_per_token, layer_bytes_per_token,
    )  # fmt: skip

    shape = ModelShape(0, 0, arch["num_hidden_layers"], arch["hidden_size"], arch["intermediate_size"],
                       arch["vocab_size"])  # fmt: skip
    return {
        "compiled_layer_bytes_per_token": round(layer_bytes_per_token(shape, compiled=True)),
        "eager_layer_bytes_per_token": round(layer_bytes_per_token(shape)),
        "checkpointed_layer_bytes_per_token": shape.stream_bytes * shape.hidden,
        "head_bytes_per_token": round(head_bytes_per_token(shape)),
        "logit_tile_bytes": LOGIT_TILE_TOKENS * shape.vocab * LOGIT_TILE_BYTES,
    }


def markdown(result: dict) -> str:
    model = result["planner"]
    lines = [
        "# Activation memory per token (benchmarks/activation_memory.py)",
        "",
        f"Date: {result['date']}. Shape: {result['shape']}, as the fast layout trains it under QLoRA: loaded in bf16, "
        "prepared by PEFT (every weight but the 4-bit projections upcast to float32, so the residual stream runs in "
        "float32), the projections as the bf16 copy of the 4-bit weights, "
        f"LoRA r{result['lora']['r']} / alpha {result['lora']['alpha']} on "
        f"{', '.join(result['lora']['target_modules'])}, bf16 autocast, TRL 1.16's fused LM head; "
        f"{result['tokens']} and {2 * result['tokens']} tokens as two padding-free rows, SDPA attention. Bytes "
        "autograd saves for the backward pass, counted by a saved-tensor hook (each storage once, parameters "
        "excluded); per token: the growth from the smaller batch to the larger. A decoder layer: the 2-layer model "
        "minus the 1-layer one; the first layer saves less, as its input (the frozen embedding's output) needs no "
        "gradient; rest: the model with no decoder layer (final norm, head and loss). What exists only while it "
        "runs is not counted: the fused head's logits tile and the gradients.",
        "",
        "| variant | LoRA dropout | a decoder layer, bytes/token | the first layer | rest, bytes/token |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[
            f"| {name} | {row['lora_dropout']:g} | {row['layer_bytes_per_token']:,} | "
            f"{row['first_layer_bytes_per_token']:,} | {row['rest_bytes_per_token']:,} |"
            for name, row in result["variants"].items()
        ],
        "",
        f"The planner's model for this shape (finetune/layout/speed.py): {model['compiled_layer_bytes_per_token']:,} "
        f"bytes/token per unchecked compiled layer and {model['eager_layer_bytes_per_token']:,} per eager one, "
        f"{model['checkpointed_layer_bytes_per_token']:,} per checkpointed layer, "
        f"{model['head_bytes_per_token']:,} for the final norm and head (with the head input's float32 gradient), "
        f"and one logits tile of {model['logit_tile_bytes']:,} bytes (fewer for batches under its 4,096 tokens).",
        "",
        "Versions: " + ", ".join(f"{key} {value}" for key, value in result["versions"].items() if value),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from finetune.tools.dry_run import default_section

    arch = TINY if args.tiny else MISTRAL_7B
    lora = default_section("lora", SEED_RECIPE)
    result = {
        "what": "bytes autograd saves per token, one LoRA decoder layer and the rest, against the planner's model",
        "date": time.strftime("%Y-%m-%d"),
        "shape": "tiny" if args.tiny else "Mistral-7B-v0.1",
        "tokens": args.tokens,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": list(lora.target_modules)},
        "variants": measure(arch, args.tokens, lora),
        "planner": planner_model(arch),
        "versions": versions(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "activation_memory.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "activation_memory.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
