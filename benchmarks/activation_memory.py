"""Activation memory per token of the seed recipe's LoRA decoder layer, counted exactly, against the planner's model.

    python benchmarks/activation_memory.py            # Mistral-7B shape, bf16, 256 tokens (CPU, about 4 minutes)
    python benchmarks/activation_memory.py --tiny     # smoke test

The layout planner (finetune/layout/speed.py) sizes batches and checkpointing from per-token arithmetic. This
counts what autograd really keeps for the backward pass: every tensor a saved-tensor hook sees, once per storage,
parameters excluded. Counting needs no GPU: what a layer saves depends on its operators, not on the device. Each
count runs a 1-layer and a 2-layer model of the shape, bf16 weights (the fast layout's dequantized copy), the seed
recipe's LoRA, two rows laid end to end as a padding-free batch does; the difference is one decoder layer. The rest
(final norm, head and loss) is counted on the model with its decoder layers taken out. Compiled: each decoder layer
through torch.compile, as the fast layout runs them. Not counted: what exists only during the backward pass (the
logits' gradients) and the allocator's slack; a GPU run's peak includes both.
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model: a smoke test of the flow")
    parser.add_argument("--tokens", type=int, default=256, help="tokens in the counted batch (two rows)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "activation_memory_out")
    return parser.parse_args(argv)


def saved_bytes(arch: dict, layers: int, tokens: int, lora, compiled: bool, checkpointed: bool) -> int:
    """Bytes of the distinct storages autograd saves in one training forward pass (parameters excluded)."""
    import torch
    from peft import get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from finetune.model.loading import build_lora_config, decoder_layers

    torch.manual_seed(0)
    config = MistralConfig(**{**arch, "num_hidden_layers": max(layers, 1)}, attn_implementation="sdpa")
    model = get_peft_model(MistralForCausalLM(config).to(torch.bfloat16), build_lora_config(lora))
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if layers == 0:  # the rest alone: the head and loss see a hidden state that needs a gradient, as in training
        model.get_base_model().model.layers = torch.nn.ModuleList()
        model.enable_input_require_grads()
    if compiled:
        for layer in decoder_layers(model):
            layer.compile()
    model.train()
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved: dict[int, torch.Tensor] = {}  # held until counted, so no storage is freed and its address reused

    def count(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            saved.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    first = tokens // 2
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    positions = torch.cat([torch.arange(first), torch.arange(tokens - first)])[None]  # two rows, padding-free
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        model(input_ids=ids, position_ids=positions, labels=ids)
    return sum(tensor.untyped_storage().nbytes() for tensor in saved.values())


def measure(arch: dict, tokens: int, lora) -> dict:
    """Per-token bytes of one decoder layer and of the rest, for each variant."""
    results = {}
    for name, compiled, dropout, checkpointed in VARIANTS:
        variant_lora = lora if dropout is None else dataclasses.replace(lora, dropout=dropout)
        started = time.perf_counter()
        none, one, two = (saved_bytes(arch, n, tokens, variant_lora, compiled, checkpointed) for n in (0, 1, 2))
        results[name] = {
            "lora_dropout": variant_lora.dropout,
            "layer_bytes_per_token": round((two - one) / tokens),
            "first_layer_bytes_per_token": round((one - none) / tokens),
            "rest_bytes_per_token": round(none / tokens),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"[activation_memory] {name}: {results[name]}", flush=True)
    return results


def planner_model(arch: dict) -> dict:
    """The planner's per-token terms for the same shape."""
    from finetune.layout.speed import CHECKPOINT_BYTES, LOGIT_BYTES, ModelShape, layer_bytes_per_token

    shape = ModelShape(0, 0, arch["num_hidden_layers"], arch["hidden_size"], arch["intermediate_size"],
                       arch["vocab_size"])  # fmt: skip
    return {
        "layer_bytes_per_token": round(layer_bytes_per_token(shape)),
        "checkpointed_layer_bytes_per_token": round(CHECKPOINT_BYTES * shape.hidden),
        "logit_bytes_per_token": round(LOGIT_BYTES * shape.vocab),
    }


def markdown(result: dict) -> str:
    model = result["planner"]
    lines = [
        "# Activation memory per token (benchmarks/activation_memory.py)",
        "",
        f"Date: {result['date']}. Shape: {result['shape']}, bf16 weights, LoRA r{result['lora']['r']} / alpha "
        f"{result['lora']['alpha']} on {', '.join(result['lora']['target_modules'])}, {result['tokens']} tokens as "
        "two padding-free rows, SDPA attention. Bytes autograd saves for the backward pass, counted by a saved-tensor "
        "hook (each storage once, parameters excluded). A decoder layer: the 2-layer model minus the 1-layer one; the "
        "first layer saves less, as its input (the frozen embedding's output) needs no gradient; rest: the model "
        "with no decoder layer (final norm, head and loss, the embedding's output needing a gradient as it does in "
        "training).",
        "",
        "| variant | LoRA dropout | a decoder layer, bytes/token | the first layer | rest, bytes/token |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[
            f"| {name} | {row['lora_dropout']:g} | {row['layer_bytes_per_token']:,} | "
            f"{row['first_layer_bytes_per_token']:,} | {row['rest_bytes_per_token']:,} |"
            for name, row in result["variants"].items()
        ],
        "",
        f"The planner's model for this shape: {model['layer_bytes_per_token']:,} bytes/token per unchecked layer "
        f"(ACTIVATION_BYTES x (hidden + intermediate)), {model['checkpointed_layer_bytes_per_token']:,} per "
        f"checkpointed layer, {model['logit_bytes_per_token']:,} for the logits and their gradient in float32.",
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
