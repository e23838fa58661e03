"""Loading the model and tokenizer and building the LoRA and 4-bit configs: the setup sft, dpo and evaluate share."""

from __future__ import annotations

import logging
import os

import torch

from finetune.core.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

# Mistral's [INST] format, for models that ship no template of their own (base models, the embedded model).
# A system turn is folded into the first user turn, as Mistral-Instruct expects. The prompt ends at "[/INST]" and
# every assistant turn ends with EOS, so prompt and completion split cleanly and the model learns to stop.
MISTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system -%}{{- '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] + eos_token -}}"
    "{%- else -%}{{- raise_exception('roles must be system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# Name parts of the optimizers bitsandbytes provides (paged, 8-bit): they need CUDA.
CUDA_ONLY_OPTIMIZERS = ("paged_", "8bit", "bnb")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def load_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer with a chat template and a pad token that is not EOS.

    A pad token equal to EOS is the classic reason fine-tuned models never stop: the collator masks padding out of
    the labels, and with it every EOS. Mistral has no pad token, so we reuse its unk token, which needs no new
    embedding row.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if not tokenizer.chat_template:
        tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise ValueError(f"{model_cfg.name_or_path}: the tokenizer has no pad token and no unk token to pad with")
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def build_bnb_config(sharded: bool = False):
    """QLoRA's quantization: 4-bit NormalFloat weights, double quantization, bf16 compute.

    `sharded` (FSDP): the packed 4-bit values are stored in bf16-typed tensors instead of uint8 ones. The bytes are
    the same; FSDP shards and gathers only floating-point tensors, and keeps a layer's bf16 weights in one flat
    buffer with its other bf16 parameters.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16 if sharded else torch.uint8,
    )


def build_lora_config(lora_cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def use_4bit(model_cfg: ModelConfig) -> bool:
    """Whether to load in 4 bits: asked for, and possible (bitsandbytes' 4-bit kernels need CUDA)."""
    if model_cfg.load_in_4bit and not has_cuda():
        log.warning("model.load_in_4bit: no CUDA device, so the model loads unquantized in float32 on the CPU")
    return model_cfg.load_in_4bit and has_cuda()


def load_model(
    model_cfg: ModelConfig, *, for_training: bool, gradient_checkpointing: bool = False, sharded: bool = False
):
    """The causal LM from a hub id or a local folder: safetensors only, remote code only if allowed.

    For training a 4-bit model, PEFT's prepare_model_for_kbit_training freezes the base weights and upcasts the
    norms so the LoRA gradients are stable. `sharded`: the model is about to be sharded with FSDP (see
    build_bnb_config); each process still quantizes the whole model onto its own GPU first, so the 4-bit model must
    fit one GPU while it loads.
    """
    from transformers import AutoModelForCausalLM

    quantized = use_4bit(model_cfg)
    kwargs = {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "use_safetensors": True,
        "dtype": torch.bfloat16 if has_cuda() else torch.float32,
    }
    if quantized:
        kwargs["quantization_config"] = build_bnb_config(sharded)
    if has_cuda():  # straight onto the GPU: a 7B model never passes through host memory in full
        local_rank = os.environ.get("LOCAL_RANK")  # under `accelerate launch`, this process's GPU
        kwargs["device_map"] = {"": int(local_rank) if local_rank is not None else torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)
    if quantized and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


def decoder_layers(model) -> list:
    """The model's decoder layers: the units that checkpointing, compilation and FSDP work on."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
