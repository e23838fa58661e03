"""Answers and log-probabilities of one model variant (base, sft or dpo), batched, with the exact prompts used."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from finetune.core.config import GenerationConfig, ModelConfig
from finetune.model.loading import load_model, load_tokenizer

# Merged bf16 weights are used when they take at most this share of the GPU, leaving the rest to the KV cache.
MERGED_WEIGHTS_SHARE = 0.5


def merge_for_speed(model_cfg: ModelConfig, speed: str) -> bool:
    """Whether to generate from bf16 weights with the adapter merged in, rather than 4-bit weights + adapter.

    Decoding reads every weight once per token; from 4-bit weights bitsandbytes first dequantises all of them, which
    bounds generation far below what the GPU can do. Merged bf16 weights need 2 bytes per parameter. The adapter was
    trained on the 4-bit base, so merged answers can differ slightly from the 4-bit model's (as in any deployment of
    a merged QLoRA model); `speed: as_written` generates from exactly the trained setup.
    """
    from finetune.layout.speed import gpu_memory_bytes, model_shape

    if speed in ("as_written", "low_memory"):
        return False
    gpu = gpu_memory_bytes()
    if gpu is None:
        return speed == "fast"  # on a CPU the model is unquantized already; merging only saves the adapter's work
    shape = model_shape(model_cfg)
    weights = 2 * (shape.quantized_params + shape.other_params)
    return speed == "fast" or weights <= MERGED_WEIGHTS_SHARE * gpu


def load_variant(model_cfg: ModelConfig, adapter: str | None, speed: str = "as_written"):
    """(model, tokenizer) for inference: the base model, with a LoRA adapter on top unless adapter is None.

    With `speed` auto or fast (evaluate.generation.speed), the adapter is merged into unquantized bf16 weights when
    merge_for_speed says so.
    """
    tokenizer = load_tokenizer(model_cfg)
    merged = merge_for_speed(model_cfg, speed)
    if merged:
        model_cfg = dataclasses.replace(model_cfg, load_in_4bit=False)
    print(f"generation: {'adapter merged into unquantized weights' if merged else 'weights as trained'} "
          f"(speed {speed})")
    model = load_model(model_cfg, for_training=False)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merged:
            model = model.merge_and_unload()
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
    pending = my_share(list(_batches(order, gen.batch_size)))
    progress = tqdm(total=sum(map(len, pending)), desc="generate", unit="prompt", disable=None)
    while pending:
        indices = pending.pop(0)
        batch = tokenizer([prompts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        try:
            output = model.generate(
                **batch,
                max_new_tokens=gen.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
        except torch.cuda.OutOfMemoryError:
            # A batch of long prompts can outgrow the KV cache; halve it and go on rather than lose the run.
            if len(indices) == 1:
                raise
            del batch
            torch.cuda.empty_cache()
            half = len(indices) // 2
            pending[:0] = [indices[:half], indices[half:]]
            progress.write(f"generate: out of GPU memory at batch {len(indices)}; retrying as two of {half}")
            continue
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
    return gather_results(results)  # type: ignore[return-value]


def my_share(batches: list) -> list:
    """This process's batches when several share the work (round robin), else all of them.

    Whole batches are shared out, never re-cut: each batch is exactly the one a single process would run, so greedy
    answers are the same on one GPU or several.
    """
    from finetune.training.launch import rank, world_size

    return batches[rank() :: world_size()]


def gather_results(results: list) -> list:
    """Every process's filled-in entries merged into one list, the same on all processes."""
    from finetune.training.launch import world_size

    if world_size() == 1:
        return results
    import torch.distributed as dist

    shares: list = [None] * world_size()
    dist.all_gather_object(shares, results)
    return [next((share[i] for share in shares if share[i] is not None), None) for i in range(len(results))]


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
    totals: list[float | None] = [None] * len(sequences)
    for indices in tqdm(my_share(list(_batches(range(len(sequences)), batch_size))), desc="log-probs", disable=None):
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
        for i, total in zip(indices, (token_logps * scored[:, 1:].to(model.device)).sum(dim=1).tolist()):
            totals[i] = total
    return gather_results(totals)


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


def sampling(settings, seed: int) -> GenerationConfig:
    """Sampled generation from a config section's max_new_tokens, batch_size, temperature and top_p, with `seed`."""
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=seed,
        speed="as_written",  # unused: the caller has loaded the model already (load_variant takes the speed)
    )
