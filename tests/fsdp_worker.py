"""Run by tests/test_fsdp.py under torchrun with 2 CPU processes (gloo): a tiny LoRA model sharded with FSDP2 the way
accelerate shards it for the Trainer (each decoder layer a unit, then the root, bf16 mixed precision), one training
step, then the stages' sharding summary and adapter saving. Rank 0 writes what it saw to the JSON file given as the
first argument; the adapter goes to the second."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import torch


def tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = get_peft_model(MistralForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():  # LoRA B starts at zero; make every weight distinct
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    return model


def main(report: str, adapter_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from finetune.model.loading import decoder_layers
    from finetune.training.launch import rank, sharding_summary
    from finetune.training.runs import gathered_trainable_weights, save_adapter

    dist.init_process_group("gloo")  # without CUDA, FSDP2's default mesh is the CPUs
    model = tiny_lora_model()
    whole = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    unsharded_summary = sharding_summary(model)
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=precision)
    fully_shard(model, mp_policy=precision)
    local_shapes = {name: tuple(p.to_local().shape) for name, p in model.named_parameters() if p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, fused=True)
    model(input_ids=torch.arange(16).view(2, 8)).logits.float().pow(2).mean().backward()
    grad_dtypes = sorted({str(p.grad.dtype) for p in model.parameters() if p.requires_grad})
    optimizer.step()  # lr 0: the weights stay those of the unsharded model

    gathered = gathered_trainable_weights(model)
    trainer = SimpleNamespace(
        is_fsdp_enabled=True, model=model, processing_class=SimpleNamespace(save_pretrained=lambda folder: None)
    )
    save_adapter(trainer, adapter_dir)
    if rank() == 0:
        result = {
            "unsharded_summary": unsharded_summary,
            "summary": sharding_summary(model),
            "local_shapes": local_shapes,
            "whole_shapes": {name: tuple(t.shape) for name, t in whole.items()},
            "grad_dtypes": grad_dtypes,
            "gathered_names": sorted(gathered) == sorted(whole),
            "gathered_equal": all(torch.equal(gathered[name], whole[name]) for name in whole),
        }
        with open(report, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
