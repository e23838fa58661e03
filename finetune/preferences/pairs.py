"""Preference pairs from a policy's own answers: K sampled answers per instruction, ranked, best against worst.

The one implementation behind stage preference_data and every self-rewarding round (stages.self_rewarding):

- `load_ranker` loads what the configured ranker needs (nothing for `reference`; PairRM, a reward model or a judge
  LLM; the policy itself for a judge without a model, the self-rewarding setting);
- `rank_candidates` scores every candidate with it, in one place for all four rankers;
- `build_pairs` turns the scores into UltraFeedback-binarized rows (ties and unusable rows dropped and counted);
- `generate_pairs` does all of it for one policy and writes nothing; `write_pairs` writes the files.

The scoring itself (rubric, parsing, PairRM, reward models, reference metrics, pair choice) is
finetune.preferences.ranking.
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finetune.core.config import GenerationConfig, ModelConfig, RankerConfig
from finetune.core.errors import ConfigError
from finetune.core.files import write_json
from finetune.data.formats import InvalidRow, from_ultrafeedback
from finetune.data.rows import GENERATED_PAIRS, write_jsonl
from finetune.preferences.ranking import (
    build_pair,
    judge_scores,
    pairrm_config_ids,
    pairrm_scores,
    reference_scores,
    reward_model_scores,
)

CANDIDATES_FILE = "candidates.jsonl"  # every prompt with all its candidates, scores and outcome (ties included)
METRICS_FILE = "metrics.json"


@dataclass
class Ranking:
    """Per prompt, per candidate: a score (None: not ranked, e.g. an empty answer or only unparseable verdicts)."""

    scores: list[list[float | None]]
    judgments: list[list[list[str]]] | None = None  # judge only: the raw verdicts of every candidate
    verdicts: int = 0  # judge only: verdicts asked for
    unparseable: int = 0  # judge only: verdicts without a valid "Score: X", excluded from the means
    notes: list[str] = field(default_factory=list)


def select_prompts(
    rows: list[dict[str, Any]], n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """n rows drawn by `seed` among those whose id is not in `exclude` (all of them if fewer), in file order."""
    pool = [row for row in rows if row["id"] not in exclude]
    if len(pool) <= n:
        return pool
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), n))]


def instruction_text(prompt: list[dict[str, str]]) -> str:
    """What a ranker reads as the request: the prompt's turns joined (a system turn first, if there is one)."""
    return "\n\n".join(message["content"] for message in prompt)


# ---------------------------------------------------------------------------------------------------------------------
# Loading rankers
# ---------------------------------------------------------------------------------------------------------------------


def _dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _on_device(model):
    import torch

    return (model.to("cuda") if torch.cuda.is_available() else model).eval()


def _load(settings: RankerConfig, model_class):
    """(model, tokenizer) of the ranker's checkpoint, safetensors only; a failure is a one-line ConfigError."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model, revision=settings.revision)
        model = model_class.from_pretrained(
            settings.model, revision=settings.revision, use_safetensors=True, dtype=_dtype()
        )
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = f"{settings.name} model {settings.model!r}"
        raise ConfigError(f"ranker.model: cannot load {what} (safetensors only): {reason}") from None
    return model, tokenizer


def load_pairrm(settings: RankerConfig):
    """(PairRMModel, tokenizer) from a PairRM-hf-style checkpoint: safetensors weights, PairRM's marker tokens.

    Config files without the marker ids (a DeBERTa checkpoint saved elsewhere) get them from the tokenizer.
    """
    from finetune.preferences.ranking import PairRMModel

    model, tokenizer = _load(settings, PairRMModel)
    try:
        ids = pairrm_config_ids(tokenizer)
    except ValueError as error:
        raise ConfigError(f"ranker.model: {settings.model}: {error}") from None
    for key, value in ids.items():
        if getattr(model.config, key, None) is None:
            setattr(model.config, key, value)
        elif getattr(model.config, key) != value:
            raise ConfigError(
                f"ranker.model: {settings.model}: config {key} is {getattr(model.config, key)} but its tokenizer "
                f"gives {value}"
            )
    return _on_device(model), tokenizer


def load_reward_model(settings: RankerConfig):
    """(one-label sequence-classification model, tokenizer), in bf16 on CUDA and float32 on a CPU."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = _load(settings, AutoModelForSequenceClassification)
    if model.config.num_labels != 1:
        raise ConfigError(
            f"ranker.model: {settings.model} has {model.config.num_labels} labels; a reward model has one"
        )
    return _on_device(model), tokenizer


def load_ranker(settings: RankerConfig, model_cfg: ModelConfig, policy=None):
    """What `rank_candidates` needs for `settings`: None, (model, tokenizer), or `policy` for a self-judge.

    A judge with a model of its own is loaded like the policy (same 4-bit and remote-code settings).
    """
    if settings.name == "reference":
        return None
    if settings.name == "pairrm":
        return load_pairrm(settings)
    if settings.name == "reward_model":
        return load_reward_model(settings)
    if settings.name == "judge":
        if settings.model is None:
            if policy is None:
                raise ValueError("load_ranker: a self-judge needs the policy")
            return policy
        from finetune.evaluation.generation import load_variant

        judge_cfg = replace(model_cfg, name_or_path=settings.model, revision=settings.revision)
        return load_variant(judge_cfg, None)
    raise ValueError(f"load_ranker: unknown ranker {settings.name!r}")


def free_memory() -> None:
    """Collect models the caller has dropped: on a GPU a 7B policy and a 7B ranker need not share memory."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------------------------------


def _judge(model, tokenizer, settings: RankerConfig, seed: int):
    """A `judge` for finetune.preferences.ranking.judge_scores: each rubric prompt, in the model's chat template,
    sampled `settings.judgments` times."""
    from finetune.evaluation.generation import render_prompt, sample_candidates, sampling

    gen = sampling(settings, seed)

    def judge(questions: list[str]) -> list[list[str]]:
        texts = [render_prompt(tokenizer, [{"role": "user", "content": question}]) for question in questions]
        samples = sample_candidates(model, tokenizer, texts, settings.judgments, gen)
        return [[sample["prediction"] for sample in verdicts] for verdicts in samples]

    return judge


def _spread(values: Sequence, kept: list[list[int]], sizes: list[int]) -> list[list]:
    """Flat per-kept-candidate values back into per-prompt lists, None where a candidate was not ranked."""
    result, position = [], 0
    for indices, size in zip(kept, sizes):
        row: list = [None] * size
        for index in indices:
            row[index] = values[position]
            position += 1
        result.append(row)
    return result


def rank_candidates(
    settings: RankerConfig,
    ranker,
    prompts: Sequence[list[dict[str, str]]],
    candidates: Sequence[Sequence[str]],
    references: Sequence[str],
    seed: int,
) -> Ranking:
    """Scores for every candidate of every prompt with the configured ranker (higher is better).

    `ranker` is what `load_ranker` gave. Empty answers are not ranked (None): no pair may hold an empty turn.
    `references` (the gold answers) are read by the reference ranker only; `seed` drives PairRM's shuffled order
    and the judge's sampling.
    """
    from tqdm.auto import tqdm

    if not len(prompts) == len(candidates) == len(references):
        raise ValueError("rank_candidates: prompts, candidates and references must be equally long")
    kept = [[i for i, answer in enumerate(answers) if answer.strip()] for answers in candidates]
    sizes = [len(answers) for answers in candidates]
    shown = [[answers[i] for i in indices] for answers, indices in zip(candidates, kept)]
    instructions = [instruction_text(prompt) for prompt in prompts]

    if settings.name == "reference":
        flat = [score for answers, gold in zip(shown, references) for score in reference_scores(answers, gold)]
        return Ranking(scores=_spread(flat, kept, sizes))
    if settings.name == "pairrm":
        model, tokenizer = ranker
        rng = random.Random(seed)
        flat = []
        for instruction, answers in tqdm(list(zip(instructions, shown)), desc="pairrm", disable=None):
            flat += pairrm_scores(
                model, tokenizer, instruction, answers, rng,
                both_orders=settings.both_orders, batch_size=settings.batch_size,
            )  # fmt: skip
        return Ranking(scores=_spread(flat, kept, sizes))
    if settings.name == "reward_model":
        model, tokenizer = ranker
        flat_prompts = [instruction for instruction, answers in zip(instructions, shown) for _ in answers]
        flat_answers = [answer for answers in shown for answer in answers]
        limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None  # else: "no limit"
        flat = reward_model_scores(model, tokenizer, flat_prompts, flat_answers, settings.batch_size, limit)
        return Ranking(scores=_spread(flat, kept, sizes))
    if settings.name == "judge":
        model, tokenizer = ranker
        scores, unparseable, verdicts = judge_scores(instructions, shown, _judge(model, tokenizer, settings, seed))
        flat_scores = [score for row in scores for score in row]
        flat_verdicts = [texts for row in verdicts for texts in row]
        return Ranking(
            scores=_spread(flat_scores, kept, sizes),
            judgments=_spread(flat_verdicts, kept, sizes),
            verdicts=len(flat_verdicts) * settings.judgments,
            unparseable=unparseable,
        )
    raise ValueError(f"rank_candidates: unknown ranker {settings.name!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------------------


def pair_row(row: dict[str, Any], candidates: list[str], scores: list[float | None], pair: dict) -> dict[str, Any]:
    """An UltraFeedback-binarized row: prompt string, chosen/rejected conversations, scores, all candidates."""
    turns = row["prompt"]
    return {
        "prompt_id": row["id"],
        "prompt": turns[-1]["content"],
        "chosen": [*turns, {"role": "assistant", "content": pair["chosen"]}],
        "rejected": [*turns, {"role": "assistant", "content": pair["rejected"]}],
        "score_chosen": pair["chosen_score"],
        "score_rejected": pair["rejected_score"],
        "all_generated_responses": candidates,
        "all_scores": scores,
        "margin": pair["margin"],
        "category": row["category"],
    }


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def build_pairs(
    rows: Sequence[dict[str, Any]], candidates: Sequence[list[str]], ranking: Ranking
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(pair rows, one record per prompt with its outcome, counts): chosen = best, rejected = worst.

    A prompt whose ranked answers all score the same (or with fewer than two ranked) is a tie: dropped and counted.
    A pair the UltraFeedback reader would reject (what dpo reads it with) is dropped and counted as invalid.
    """
    pairs, records = [], []
    counts = {"ties_dropped": 0, "invalid_dropped": 0}
    for number, (row, answers, scores) in enumerate(zip(rows, candidates, ranking.scores)):
        pair = build_pair(answers, scores)
        outcome = "pair"
        if pair is None:
            outcome = "tie"
            counts["ties_dropped"] += 1
        else:
            record = pair_row(row, answers, scores, pair)
            if ranking.judgments is not None:
                record["all_judgments"] = ranking.judgments[number]
            try:
                from_ultrafeedback(record)
            except InvalidRow:
                outcome = "invalid"
                counts["invalid_dropped"] += 1
            else:
                pairs.append(record)
        records.append(
            {
                "prompt_id": row["id"],
                "prompt": row["prompt"][-1]["content"],
                "candidates": answers,
                "scores": scores,
                **({"judgments": ranking.judgments[number]} if ranking.judgments is not None else {}),
                "outcome": outcome,
            }
        )
    return pairs, records, counts


def pair_metrics(
    settings: RankerConfig, rows: Sequence, candidates: Sequence[list[str]], ranking: Ranking, pairs: list, counts
) -> dict[str, Any]:
    """What a set of generated pairs looks like: counts, tie rate, scores, the chosen-rejected gap, lengths."""
    scored = [score for row in ranking.scores for score in row if score is not None and not math.isnan(score)]
    answers = [answer for row in candidates for answer in row]
    return {
        "ranker": settings.name,
        "prompts": len(rows),
        "candidates": len(candidates[0]) if candidates else 0,
        "pairs": len(pairs),
        "ties_dropped": counts["ties_dropped"],
        "tie_rate": counts["ties_dropped"] / len(rows) if rows else None,
        "invalid_dropped": counts["invalid_dropped"],
        "empty_candidates": sum(not answer.strip() for answer in answers),
        "mean_score": _mean(scored),
        "mean_score_chosen": _mean([p["score_chosen"] for p in pairs]),
        "mean_score_rejected": _mean([p["score_rejected"] for p in pairs]),
        "mean_gap": _mean([p["margin"] for p in pairs]),
        "mean_response_words": _mean([float(len(answer.split())) for answer in answers]),
        "judgments": ranking.verdicts,
        "unparseable_judgments": ranking.unparseable,
        "unparseable_rate": ranking.unparseable / ranking.verdicts if ranking.verdicts else None,
    }


def generate_pairs(
    model_cfg: ModelConfig,
    adapter: str | None,
    rows: list[dict[str, Any]],
    k: int,
    gen: GenerationConfig,
    ranker: RankerConfig,
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The policy (base model + `adapter`) samples k answers per row's prompt, `ranker` scores them, best vs worst.

    Returns (pair rows, per-prompt records, metrics). The policy is freed before another ranker model loads.
    """
    from finetune.evaluation.generation import load_variant, render_prompt, sample_candidates

    model, tokenizer = load_variant(model_cfg, adapter)
    texts = [render_prompt(tokenizer, row["prompt"]) for row in rows]
    samples = sample_candidates(model, tokenizer, texts, k, gen)
    candidates = [[answer["prediction"] for answer in answers] for answers in samples]
    self_judge = ranker.name == "judge" and ranker.model is None
    if not self_judge:
        model = None
        free_memory()
    ranker_model = load_ranker(ranker, model_cfg, policy=(model, tokenizer) if self_judge else None)
    ranking = rank_candidates(
        ranker,
        ranker_model,
        [row["prompt"] for row in rows],
        candidates,
        [row["completion"][-1]["content"] for row in rows],
        gen.seed,
    )
    model = ranker_model = None
    free_memory()
    pairs, records, counts = build_pairs(rows, candidates, ranking)
    return pairs, records, pair_metrics(ranker, rows, candidates, ranking, pairs, counts)


def write_pairs(folder: str | Path, pairs: list[dict], records: list[dict], metrics: dict[str, Any]) -> None:
    """folder/pairs.jsonl (what dpo trains on), folder/candidates.jsonl (every prompt), folder/metrics.json."""
    folder = Path(folder)
    write_jsonl(folder / GENERATED_PAIRS, pairs, drop=())
    write_jsonl(folder / CANDIDATES_FILE, records, drop=())
    write_json(folder / METRICS_FILE, metrics)
