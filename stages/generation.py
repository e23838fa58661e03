"""Answers and log-probabilities of one model variant (base, sft or dpo), batched, with the exact prompts used."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from stages.config import GenerationConfig, ModelConfig
from stages.modeling import load_model, load_tokenizer

VARIANTS = ("base", "sft", "dpo")


def load_variant(model_cfg: ModelConfig, adapter: str | None):
    """(model, tokenizer) for inference: the base model, with a LoRA adapter on top unless adapter is None."""
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, for_training=False)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text exactly as the model sees it (chat template, generation prompt, BOS included)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _by_length(texts: Sequence[str]) -> list[int]:
    """Indices sorted by prompt length, so each batch pads little."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: Sequence[str], gen: GenerationConfig) -> list[dict]:
    """One answer per rendered prompt, in input order: {"prediction", "new_tokens", "hit_max_new_tokens"}.

    Prompts are left-padded (right padding would put pad tokens between a prompt and its answer) and already carry
    their BOS, so the tokenizer adds no second one.
    """
    tokenizer.padding_side = "left"
    torch.manual_seed(gen.seed)
    sampling = (
        {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p}
        if gen.do_sample
        else {"do_sample": False}
    )
    results: list[dict | None] = [None] * len(prompts)
    order = _by_length(prompts)
    progress = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=None)
    for indices in _batches(order, gen.batch_size):
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        output = model.generate(
            **batch,
            max_new_tokens=gen.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        for row, index in enumerate(indices):
            tokens = new_tokens[row]
            finished = (tokens == tokenizer.eos_token_id).nonzero()
            length = int(finished[0]) + 1 if len(finished) else int((tokens != tokenizer.pad_token_id).sum())
            results[index] = {
                "prediction": tokenizer.decode(tokens[:length], skip_special_tokens=True).strip(),
                "new_tokens": length,
                "hit_max_new_tokens": not len(finished),
            }
        progress.update(len(indices))
    progress.close()
    return results  # type: ignore[return-value]


@torch.inference_mode()
def completion_logps(
    model, tokenizer, prompts: Sequence[list], answers: Sequence[str], batch_size: int
) -> list[float]:
    """Summed log-probability of each answer (with its EOS) after its prompt, tokenized as TRL's DPO does it.

    The answer tokens are those after the prompt rendered with the generation prompt, within the rendered
    prompt + answer conversation.
    """
    sequences, starts = [], []
    for prompt, answer in zip(prompts, answers):
        conversation = [*prompt, {"role": "assistant", "content": answer}]
        sequences.append(tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"])
        starts.append(
            len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"])
        )
    totals: list[float] = []
    for indices in tqdm(list(_batches(range(len(sequences)), batch_size)), desc="log-probs", disable=None):
        width = max(len(sequences[i]) for i in indices)
        input_ids = torch.full((len(indices), width), tokenizer.pad_token_id)
        scored = torch.zeros((len(indices), width), dtype=torch.bool)
        for row, i in enumerate(indices):
            input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            scored[row, starts[i] : len(sequences[i])] = True
        attention_mask = torch.arange(width)[None, :] < torch.tensor([len(sequences[i]) for i in indices])[:, None]
        logits = model(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.long().to(model.device)
        ).logits
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logps = logps.gather(-1, input_ids[:, 1:, None].to(model.device))[..., 0]
        totals += (token_logps * scored[:, 1:].to(model.device)).sum(dim=1).tolist()
    return totals


def sample_candidates(model, tokenizer, prompts: Sequence[str], k: int, gen: GenerationConfig) -> list[list[dict]]:
    """K sampled answers per rendered prompt (each prompt repeated K times, sampled in one seeded run).

    The same prompts, K and settings give the same candidates: generate_answers seeds torch with gen.seed and batches
    in a fixed order. Returns, in input order, a list of K answers per prompt, as generate_answers gives them.
    """
    if k < 1:
        raise ValueError(f"sample_candidates: k must be at least 1, got {k}")
    repeated = [prompt for prompt in prompts for _ in range(k)]
    answers = generate_answers(model, tokenizer, repeated, dataclasses.replace(gen, do_sample=True))
    return [answers[i * k : (i + 1) * k] for i in range(len(prompts))]
