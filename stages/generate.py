"""generate: one variant's answers and preference log-probabilities, for the evaluate stage.

    python -m stages.generate base|sft|dpo [PARAMS]      # dvc repro generate@sft

Reads params `model`, `evaluate.generation`, `dpo.max_prompt_length` and `paths`; the variant's model (the base
model, plus paths.sft_adapter or paths.dpo_adapter); the held-out test split, the probe prompts and the held-out
preference pairs. Writes paths.generations/VARIANT.jsonl (one answer per prompt, with the exact prompt text) and
paths.generations/VARIANT_preferences.jsonl (summed log-probabilities of each pair's chosen and rejected answer,
from which evaluate derives the implicit DPO rewards). Each variant is its own DVC stage, so training a new
adapter never regenerates the base model's answers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.core.config import load_config
from finetune.core.errors import ConfigError, exit_on_error
from finetune.data.rows import HELD_OUT, evaluation_prompts, read_jsonl, write_jsonl
from finetune.evaluation.comparison import VARIANTS
from finetune.evaluation.generation import completion_logps, generate_answers, load_variant, render_prompt
from finetune.training.launch import is_main_process, join_processes, relaunch
from finetune.training.runs import truncate_prompt


@exit_on_error
def main(variant: str, params_path: str = "params.yaml") -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    cfg = load_config(params_path)
    launched = relaunch("stages.generate", [variant, params_path], cfg.distributed)
    if launched is not None:
        sys.exit(launched)
    join_processes()
    adapter = {"base": None, "sft": cfg.paths.sft_adapter, "dpo": cfg.paths.dpo_adapter}[variant]
    model, tokenizer = load_variant(cfg.model, adapter, cfg.evaluate.generation.speed)
    out_dir = Path(cfg.paths.generations)

    prompts = evaluation_prompts(cfg.paths.prepared, cfg.paths.probe_prompts, cfg.evaluate.split)
    texts = [render_prompt(tokenizer, row["prompt"]) for row in prompts]
    answers = generate_answers(model, tokenizer, texts, cfg.evaluate.generation)
    pairs = read_jsonl(Path(cfg.paths.prepared) / HELD_OUT[cfg.evaluate.split][1])
    pair_prompts = [truncate_prompt(pair["prompt"], tokenizer, cfg.dpo.max_prompt_length) for pair in pairs]
    batch = cfg.evaluate.generation.batch_size
    chosen = completion_logps(model, tokenizer, pair_prompts, [p["chosen"][-1]["content"] for p in pairs], batch)
    rejected = completion_logps(model, tokenizer, pair_prompts, [p["rejected"][-1]["content"] for p in pairs], batch)
    if not is_main_process():  # every process holds all results; one writes them
        return
    write_jsonl(
        out_dir / f"{variant}.jsonl",
        ({**row, "prompt_text": text, **answer} for row, text, answer in zip(prompts, texts, answers)),
        drop=("prompt",),
    )
    write_jsonl(
        out_dir / f"{variant}_preferences.jsonl",
        (
            {"id": pair["id"], "category": pair["category"], "chosen_logp": c, "rejected_logp": r}
            for pair, c, r in zip(pairs, chosen, rejected)
        ),
    )
    print(f"generate {variant}: {len(answers)} answers, {len(pairs)} preference pairs scored")


if __name__ == "__main__":
    main(*sys.argv[1:])
