"""Scoring candidate answers and turning the scores into DPO pairs: an LLM judge, PairRM, reward models, references.

The pieces of preference-data generation and self-rewarding DPO (Yuan et al., 2024) that are pure computation:

- the additive 0–5 judge rubric (`judge_prompt`), parsing its verdict (`parse_judge_score`) and averaging several
  sampled verdicts with the unparseable ones excluded and counted (`mean_judge_score`);
- three rankers that need no LLM judge: PairRM (`PairRMModel`, `pairrm_scores`), any one-label sequence-classification
  reward model (`reward_model_scores`), and the project's own metrics against a gold answer (`reference_scores`, the
  offline default);
- chosen = best, rejected = worst (`build_pair`), with ties dropped;
- candidate shuffling against position bias (`shuffled_order`, `in_shuffled_order`).

No I/O and no DVC here: the stages read and write the files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DebertaV2Model, DebertaV2PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MAX_JUDGE_SCORE = 5.0

# ---------------------------------------------------------------------------------------------------------------------
# LLM-as-a-judge (self-rewarding)
# ---------------------------------------------------------------------------------------------------------------------

_JUDGE_TEMPLATE = """\
Assess how well the answer below responds to the user's request. Award points with this additive rubric; each \
criterion that holds adds one point, for a total from 0 to 5:

1. The answer is on topic and offers at least some information that bears on the request, even if it leaves a lot \
out or includes some irrelevant material.
2. The answer deals with a substantial part of the request, though it does not fully resolve it.
3. The answer handles the essential parts of the request in a useful way, even if it is not polished, complete or \
expert.
4. The answer is written as an AI assistant would write it: it addresses the request directly and thoroughly, is \
clear and well organised, and could be improved only a little in focus, concision or structure.
5. The answer is precisely fitted to the request, with nothing superfluous, and reads as the work of a knowledgeable \
expert: insightful, engaging and of high quality.

<request>
{instruction}
</request>

<answer>
{response}
</answer>

First explain your assessment in at most 100 words. Then, on the last line, give the total in the form \
"Score: <points>"."""


def judge_prompt(instruction: str, response: str) -> str:
    """The user turn asking a judge to grade `response` to `instruction` on the additive 0–5 rubric."""
    return _JUDGE_TEMPLATE.format(instruction=instruction.strip(), response=response.strip())


# "Score: 4", "score:3", "**Score:** 4", "Score: **4.5**", "Score = 4/5", "Score: 4 out of 5"
_SCORE = re.compile(
    r"\bscore\s*(?:\*\*|__)?\s*[:=]\s*(?:\*\*|__)?\s*(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?",
    re.IGNORECASE,
)


def parse_judge_score(text: str) -> float | None:
    """The judge's score: the number after the last "Score:" in `text`; None if absent or outside 0..5.

    A fraction counts only out of 5 ("Score: 4/5" is 4.0; "Score: 8/10" is None, as the rubric asks for 0–5 points).
    """
    matches = list(_SCORE.finditer(text or ""))
    if not matches:
        return None
    value, denominator = matches[-1].groups()
    if denominator is not None and float(denominator) != MAX_JUDGE_SCORE:
        return None
    score = float(value)
    return score if 0.0 <= score <= MAX_JUDGE_SCORE else None


def mean_judge_score(judgments: Sequence[str]) -> tuple[float | None, int]:
    """(mean of the parseable scores or None if there is none, number of unparseable judgments)."""
    scores = [parse_judge_score(text) for text in judgments]
    parsed = [score for score in scores if score is not None]
    mean = math.fsum(parsed) / len(parsed) if parsed else None
    return mean, len(scores) - len(parsed)


def judge_scores(
    instructions: Sequence[str],
    candidates: Sequence[Sequence[str]],
    judge: Callable[[list[str]], Sequence[Sequence[str]]],
) -> tuple[list[list[float | None]], int, list[list[list[str]]]]:
    """Every candidate graded by `judge`, which maps rubric prompts (user turns) to several verdicts each.

    All prompts go to `judge` in one call, so it can batch them. Returns (per prompt, per candidate: the mean
    parseable score or None; the number of unparseable verdicts; the verdicts themselves, kept for inspection).
    """
    questions = [judge_prompt(instruction, answer) for instruction, answers in zip(instructions, candidates)
                 for answer in answers]  # fmt: skip
    verdicts = list(judge(questions)) if questions else []
    if len(verdicts) != len(questions):
        raise ValueError(f"judge_scores: the judge answered {len(verdicts)} of {len(questions)} prompts")
    scores: list[list[float | None]] = []
    kept: list[list[list[str]]] = []
    unparseable, position = 0, 0
    for answers in candidates:
        row_scores, row_verdicts = [], []
        for _ in answers:
            texts = list(verdicts[position])
            position += 1
            mean, failed = mean_judge_score(texts)
            unparseable += failed
            row_scores.append(mean)
            row_verdicts.append(texts)
        scores.append(row_scores)
        kept.append(row_verdicts)
    return scores, unparseable, kept


# ---------------------------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------------------------


def _usable(score: float | None) -> bool:
    return score is not None and not math.isnan(score)


def build_pair(candidates: Sequence[str], scores: Sequence[float | None]) -> dict[str, Any] | None:
    """The DPO pair of one prompt: chosen = highest score, rejected = lowest.

    Candidates scored None (or NaN) are ignored. Among equally scored candidates the lowest index wins, for chosen and
    rejected alike, so the result does not depend on anything but the inputs. None when fewer than two candidates are
    scored or all scores are equal (a tie: the caller drops the prompt and counts it).
    """
    if len(candidates) != len(scores):
        raise ValueError(f"build_pair: {len(candidates)} candidates but {len(scores)} scores")
    scored = [(float(score), index) for index, score in enumerate(scores) if _usable(score)]
    if len(scored) < 2:
        return None
    best = max(score for score, _ in scored)
    worst = min(score for score, _ in scored)
    if best == worst:
        return None
    chosen = min(index for score, index in scored if score == best)
    rejected = min(index for score, index in scored if score == worst)
    return {
        "chosen": candidates[chosen],
        "rejected": candidates[rejected],
        "chosen_index": chosen,
        "rejected_index": rejected,
        "chosen_score": best,
        "rejected_score": worst,
        "margin": best - worst,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Position bias
# ---------------------------------------------------------------------------------------------------------------------


def shuffled_order(n: int, rng) -> list[int]:
    """A random permutation of range(n): position k shows the original candidate order[k].

    `rng` is a `random.Random` or a `numpy.random.Generator`; the same seed gives the same order.
    """
    if hasattr(rng, "permutation"):  # numpy Generator
        return [int(i) for i in rng.permutation(n)]
    return rng.sample(range(n), n)


def unshuffle(values: Sequence, order: Sequence[int]) -> list:
    """Results given in shown order (values[k] belongs to the candidate shown at position k), in original order."""
    if sorted(order) != list(range(len(values))):
        raise ValueError("unshuffle: order is not a permutation of the values' positions")
    result: list = [None] * len(values)
    for position, original in enumerate(order):
        result[original] = values[position]
    return result


def in_shuffled_order(candidates: Sequence[str], rng, score: Callable[[list[str]], Sequence[float]]) -> list[float]:
    """`score` applied to the candidates shown in a random order, its per-candidate results mapped back to input
    order."""
    order = shuffled_order(len(candidates), rng)
    shown = [candidates[i] for i in order]
    return unshuffle(list(score(shown)), order)


# ---------------------------------------------------------------------------------------------------------------------
# PairRM
# ---------------------------------------------------------------------------------------------------------------------

SOURCE_PREFIX, CANDIDATE1_PREFIX, CANDIDATE2_PREFIX = "<|source|>", "<|candidate1|>", "<|candidate2|>"
CANDIDATE_PREFIX = "<|candidate|>"
PAIRRM_SPECIAL_TOKENS = (SOURCE_PREFIX, CANDIDATE_PREFIX, CANDIDATE1_PREFIX, CANDIDATE2_PREFIX)
PAIRRM_SOURCE_MAX_TOKENS = 1224
PAIRRM_CANDIDATE_MAX_TOKENS = 412
PAIRRM_MAX_TOKENS = PAIRRM_SOURCE_MAX_TOKENS + 2 * PAIRRM_CANDIDATE_MAX_TOKENS  # 2048


class PairRMModel(DebertaV2PreTrainedModel):
    """PairRM (Jiang et al., 2023, LLM-Blender): a DeBERTa-v3 pairwise ranker; logit > 0 means candidate 1 is better.

    Written for transformers 5 (the llm-blender package breaks on it), after the `DebertaV2PairRM` class of the
    `llm-blender/PairRM-hf` checkpoint: the same parameter names (`pretrained_model.*`, `head_layer.1.*`,
    `head_layer.4.*`) and config attributes (`n_tasks`, `drop_out`, `source_prefix_id`, `cand1_prefix_id`,
    `cand2_prefix_id`, `cand_prefix_id`), so that checkpoint should load, though it has not been tried offline here.
    A checkpoint saved by this class round-trips through `save_pretrained` / `from_pretrained` (tested).

    Input, one row per comparison (see `encode_pairrm`):
    `[CLS] <|source|> source [SEP] [CLS] <|candidate1|> answer 1 [SEP] [CLS] <|candidate2|> answer 2 [SEP]`.
    The last hidden states at the three prefix tokens are the pooled representations; one MLP scores
    (source, candidate 1) and (source, candidate 2) from their concatenations, and the logit is the difference of the
    two scores, averaged over the `n_tasks` outputs.
    """

    base_model_prefix = "pretrained_model"

    def __init__(self, config):
        super().__init__(config)
        self.n_tasks = getattr(config, "n_tasks", 1)
        dropout = getattr(config, "drop_out", 0.05)
        self.pretrained_model = DebertaV2Model(config)
        hidden = config.hidden_size
        # Same layout as the published head: Dropout, Linear(2h, h), Tanh, Dropout, Linear(h, n_tasks)
        self.head_layer = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * hidden, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, self.n_tasks),
        )
        self.post_init()

    def _prefix_states(self, states: torch.Tensor, input_ids: torch.Tensor, token_id: int, name: str) -> torch.Tensor:
        """The hidden state at `token_id` in every row, which must hold it exactly once."""
        counts = (input_ids == token_id).sum(dim=1)
        if not bool((counts == 1).all()):
            raise ValueError(
                f"PairRMModel: every row needs exactly one {name} token (id {token_id}); got {counts.tolist()}"
            )
        rows, columns = torch.where(input_ids == token_id)
        return states[rows, columns]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.ne(0).any(dim=0)  # columns that are padding in every row change nothing: drop them
        input_ids, attention_mask = input_ids[:, keep], attention_mask[:, keep]
        if token_type_ids is not None:
            token_type_ids = token_type_ids[:, keep]
        states = self.pretrained_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        ).last_hidden_state
        config = self.config
        source = self._prefix_states(states, input_ids, config.source_prefix_id, SOURCE_PREFIX)
        first = self._prefix_states(states, input_ids, config.cand1_prefix_id, CANDIDATE1_PREFIX)
        second = self._prefix_states(states, input_ids, config.cand2_prefix_id, CANDIDATE2_PREFIX)
        left = self.head_layer(torch.cat([source, first], dim=-1))
        right = self.head_layer(torch.cat([source, second], dim=-1))
        return SequenceClassifierOutput(logits=(left - right).mean(dim=-1))


def pairrm_config_ids(tokenizer) -> dict[str, int]:
    """The config attributes PairRMModel needs, from a tokenizer that has PairRM's special tokens."""
    ids = {
        "source_prefix_id": SOURCE_PREFIX,
        "cand_prefix_id": CANDIDATE_PREFIX,
        "cand1_prefix_id": CANDIDATE1_PREFIX,
        "cand2_prefix_id": CANDIDATE2_PREFIX,
    }
    result = {key: tokenizer.convert_tokens_to_ids(token) for key, token in ids.items()}
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in result.values():
        raise ValueError(f"pairrm_config_ids: the tokenizer lacks some of {PAIRRM_SPECIAL_TOKENS}")
    return result


def _without_markers(text: str) -> str:
    """Text with PairRM's marker strings removed: a second marker in a row would corrupt the pooling."""
    for token in PAIRRM_SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text


def encode_pairrm(
    tokenizer,
    sources: Sequence[str],
    firsts: Sequence[str],
    seconds: Sequence[str],
    source_max_tokens: int = PAIRRM_SOURCE_MAX_TOKENS,
    candidate_max_tokens: int = PAIRRM_CANDIDATE_MAX_TOKENS,
) -> dict[str, torch.Tensor]:
    """Padded `input_ids` and `attention_mask` for PairRM, as the PairRM-hf model card's `tokenize_pair` builds them.

    The source is cut to `source_max_tokens`; the candidates share the rest of the `source_max_tokens +
    2 * candidate_max_tokens` budget (2048) equally, so each gets 412 tokens at least and more when the source is
    short. Each segment is the tokenizer's own `[CLS] … [SEP]` encoding, truncated at the end.
    """
    if not len(sources) == len(firsts) == len(seconds):
        raise ValueError("encode_pairrm: sources, firsts and seconds must be equally long")
    total = source_max_tokens + 2 * candidate_max_tokens
    rows = []
    for source, first, second in zip(sources, firsts, seconds):
        source_ids = tokenizer.encode(
            SOURCE_PREFIX + _without_markers(source), max_length=source_max_tokens, truncation=True
        )
        budget = (total - len(source_ids)) // 2
        first_ids = tokenizer.encode(CANDIDATE1_PREFIX + _without_markers(first), max_length=budget, truncation=True)
        second_ids = tokenizer.encode(CANDIDATE2_PREFIX + _without_markers(second), max_length=budget, truncation=True)
        rows.append(source_ids + first_ids + second_ids)
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.inference_mode()
def pairrm_logits(
    model, tokenizer, sources: Sequence[str], firsts: Sequence[str], seconds: Sequence[str], batch_size: int = 8
) -> list[float]:
    """PairRM's raw logit per row (> 0: `firsts[i]` beats `seconds[i]`), in input order. Position bias not removed."""
    model.eval()
    logits: list[float] = []
    for start in range(0, len(sources), batch_size):
        end = start + batch_size
        batch = encode_pairrm(tokenizer, sources[start:end], firsts[start:end], seconds[start:end])
        batch = {key: value.to(model.device) for key, value in batch.items()}
        logits += model(**batch).logits.float().tolist()
    return logits


def pairrm_preference(model, tokenizer, source: str, a: str, b: str) -> float:
    """How much better `a` is than `b`, both orders averaged: (logit(a, b) - logit(b, a)) / 2, antisymmetric in a,
    b."""
    ab, ba = pairrm_logits(model, tokenizer, [source, source], [a, b], [b, a])
    return (ab - ba) / 2


def pairrm_scores(
    model, tokenizer, source: str, candidates: Sequence[str], rng, *, both_orders: bool = True, batch_size: int = 8
) -> list[float]:
    """One score per candidate, in input order: its mean preference logit against every other candidate.

    With `both_orders` (the default) every pair is compared in both positions and the two logits averaged, which
    cancels position bias exactly (n·(n-1) comparisons). Without it each pair is compared once (half the cost),
    the candidates being shown in a random order drawn from `rng`, as TRL's former PairRMJudge did.
    One candidate scores 0.0.
    """
    n = len(candidates)
    if n < 2:
        return [0.0] * n

    def score(shown: list[str]) -> list[float]:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        ordered = pairs + [(j, i) for i, j in pairs] if both_orders else pairs
        logits = pairrm_logits(
            model,
            tokenizer,
            [source] * len(ordered),
            [shown[i] for i, _ in ordered],
            [shown[j] for _, j in ordered],
            batch_size,
        )
        totals = [0.0] * n
        weight = 0.5 if both_orders else 1.0
        for (i, j), logit in zip(ordered, logits):
            totals[i] += weight * logit
            totals[j] -= weight * logit
        return [total / (n - 1) for total in totals]

    return in_shuffled_order(candidates, rng, score)


# ---------------------------------------------------------------------------------------------------------------------
# Reward models and references
# ---------------------------------------------------------------------------------------------------------------------


def reward_model_text(tokenizer, prompt: str, response: str) -> tuple[str, bool]:
    """(text to score, whether the tokenizer should add special tokens): the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False), False  # the template has its own BOS
    return f"{prompt}\n\n{response}", True


@torch.inference_mode()
def reward_model_scores(
    model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int, max_length: int | None = None
) -> list[float]:
    """The reward of each (prompt, response): the logit of a one-label sequence-classification model, in input order.

    Rows are batched by length and right-padded. Decoder models (Mistral, Llama) read the last non-pad token, so the
    model's config needs a pad id: if it has none, the tokenizer's pad (or EOS) id is set on it.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"reward_model_scores: {len(prompts)} prompts but {len(responses)} responses")
    if getattr(model.config, "num_labels", 1) != 1:
        raise ValueError(f"reward_model_scores: the model has {model.config.num_labels} labels, a reward model has 1")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    model.eval()
    texts = [reward_model_text(tokenizer, prompt, response) for prompt, response in zip(prompts, responses)]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]))
    scores: list[float] = [0.0] * len(texts)
    for start in tqdm(range(0, len(order), batch_size), desc="reward model", unit="batch", disable=None):
        indices = order[start : start + batch_size]
        add_special = texts[indices[0]][1]
        batch = tokenizer(
            [texts[i][0] for i in indices],
            return_tensors="pt",
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            add_special_tokens=add_special,
        )
        batch = {key: value.to(model.device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}
        logits = model(**batch).logits.float()
        for i, value in zip(indices, logits[:, 0].tolist()):
            scores[i] = value
    return scores


def reference_scores(candidates: Sequence[str], reference: str, settings=None) -> list[float]:
    """Each candidate's similarity to the gold answer: the mean of SQuAD token F1 and ROUGE-L
    (finetune.evaluation.metrics).

    With a `BertScoreConfig` as `settings`, BERTScore F1 joins the mean (loads a model: not the cheap default).
    """
    from finetune.evaluation.metrics import bertscore_f1, rouge_l, token_f1

    references = [reference] * len(candidates)
    columns = [[token_f1(candidate, reference) for candidate in candidates], rouge_l(candidates, references)]
    if settings is not None:
        columns.append(bertscore_f1(candidates, references, settings))
    return [math.fsum(values) / len(values) for values in zip(*columns)]


__all__ = [
    "PairRMModel",
    "build_pair",
    "encode_pairrm",
    "in_shuffled_order",
    "judge_prompt",
    "judge_scores",
    "mean_judge_score",
    "pairrm_config_ids",
    "pairrm_logits",
    "pairrm_preference",
    "pairrm_scores",
    "parse_judge_score",
    "reference_scores",
    "reward_model_scores",
    "shuffled_order",
    "unshuffle",
]
