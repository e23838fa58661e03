"""distributed.strategy fsdp: the plan's FSDP settings, the 4-bit storage FSDP needs, and FSDP2 itself on two CPU
processes (tests/fsdp_worker.py): the sharding summary the stages log, and the adapter saved whole from the shards.
(The Trainer runs FSDP on GPUs only; benchmarks/multi_gpu.py --strategies fsdp runs the stages so on 2 GPUs.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_speed import MISTRAL_7B, SEED
from trl import SFTConfig

from finetune.core.config import ConfigError, load_config
from finetune.layout.speed import FSDP_SETTINGS, GIB, plan
from finetune.model.loading import build_bnb_config
from finetune.training.runs import trainer_args

REPO = Path(__file__).resolve().parents[1]


def test_fsdp_shards_the_weights_and_keeps_the_other_levers_of_the_fast_layout():
    ddp_kwargs, ddp = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True, world=2)
    kwargs, sharded = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True, world=2, sharded=True)
    assert "fsdp" not in ddp_kwargs and ddp.sharding == "none" and ddp.base_weights != "as loaded"
    assert kwargs["fsdp"] is True and kwargs["fsdp_config"]["version"] == 2
    assert "ddp_find_unused_parameters" not in kwargs
    # The 4-bit weights stay 4-bit and sharded, so each GPU has more room for activations than DDP's bf16 copy.
    assert sharded.base_weights == "as loaded" and not sharded.compiled and sharded.sharding.startswith("FSDP2")
    assert sharded.memory_budget_gib > ddp.memory_budget_gib
    assert (sharded.padding_free, sharded.attention) == (True, "flex_attention")
    assert kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] * 2 == 8

    args = trainer_args(SFTConfig, "sft", kwargs, "unused")  # TRL's config takes them as they are
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    assert args.fsdp_plugin_args["state_dict_type"] == "FULL_STATE_DICT"
    # TrainingArguments rewrites its fsdp_config in place; the plan's settings are left as they were.
    assert set(FSDP_SETTINGS["fsdp_config"]) == {"version", "reshard_after_forward", "state_dict_type",
                                                "cpu_ram_efficient_loading"}  # fmt: skip

    alone, single = plan("sft", SEED, "fast", MISTRAL_7B, 80 * GIB, quantized=True, world=1, sharded=True)
    assert "fsdp" not in alone and single.sharding == "none"  # one process has nothing to shard across
    written, as_written = plan("dpo", SEED, "as_written", MISTRAL_7B, 80 * GIB, quantized=True, world=2, sharded=True)
    assert written["fsdp"] is True and as_written.sharding != "none"  # the strategy holds whatever the speed


def test_fsdp_never_runs_a_bitsandbytes_optimizer():
    # bitsandbytes' optimizers hand each weight to their CUDA kernels as a plain tensor, which FSDP2's sharded weights
    # are not (bitsandbytes issue 1633): the AdamW ones become PyTorch's fused AdamW in every layout, the others are
    # a config error.
    for speed in ("low_memory", "as_written", "fast"):
        kwargs, chosen = plan("sft", SEED, speed, MISTRAL_7B, 24 * GIB, quantized=True, world=2, sharded=True)
        assert kwargs["optim"] == "adamw_torch_fused" and "paged_adamw_8bit" in chosen.optimizer, speed
    kwargs, _ = plan("sft", SEED, "low_memory", MISTRAL_7B, 24 * GIB, quantized=True, world=2)
    assert kwargs["optim"] == "paged_adamw_8bit"  # DDP keeps what the recipe wrote
    lion = {**SEED, "optim": "paged_lion_8bit"}
    with pytest.raises(ConfigError, match=r"sft.trainer.optim: paged_lion_8bit is a bitsandbytes optimizer"):
        plan("sft", lion, "fast", MISTRAL_7B, 24 * GIB, quantized=True, world=2, sharded=True)


def test_the_strategy_is_checked_by_the_config_loader(tmp_path):
    from conftest import write_params

    path = write_params(tmp_path, lambda p: p["distributed"].update(processes=2, strategy="fsdp"))
    assert load_config(path).distributed.strategy == "fsdp"
    path = write_params(tmp_path, lambda p: p["distributed"].update(strategy="zero3"))
    with pytest.raises(ConfigError, match="distributed.strategy"):
        load_config(path)


def test_4bit_weights_are_stored_in_bf16_tensors_when_sharded():
    assert build_bnb_config(sharded=True).bnb_4bit_quant_storage == torch.bfloat16  # FSDP shards floats only
    assert build_bnb_config().bnb_4bit_quant_storage == torch.uint8


@pytest.mark.slow
def test_two_processes_shard_the_adapter_and_save_it_whole(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from fsdp_worker import tiny_lora_model
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    report, adapter = tmp_path / "report.json", tmp_path / "adapter"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "fsdp_worker.py"), str(report), str(adapter)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    seen = json.loads(report.read_text())
    assert seen["unsharded_summary"] is None
    assert seen["summary"] == "3 FSDP units across 2 processes; 2 of 2 decoder layers are units of their own"
    for name, shape in seen["local_shapes"].items():  # each process holds half of every LoRA weight
        assert shape[0] * 2 == seen["whole_shapes"][name][0] and shape[1:] == seen["whole_shapes"][name][1:]
    assert seen["grad_dtypes"] == ["torch.float32"]  # computed in bf16, reduced and kept in the weights' float32
    assert seen["gathered_names"] and seen["gathered_equal"]

    expected = get_peft_model_state_dict(tiny_lora_model())
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
