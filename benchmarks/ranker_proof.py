"""GPU proof of the pairrm and reward_model rankers: random-weight models of the real architectures, no hub.

Run from the repository root (the project importable):

    python benchmarks/ranker_proof.py            # real shapes, bf16 on CUDA: PairRM (DeBERTa-v3-large, 0.44B) and a
                                                 # Mistral-7B-shaped MistralForSequenceClassification (num_labels=1)
    python benchmarks/ranker_proof.py --tiny     # the same flow on tiny shapes, CPU is fine (tests run it)

Each model is built from a shipped architecture config (recipes/architectures/llm-blender--PairRM-hf.json and
mistralai--Mistral-7B-v0.1.json) with random weights, saved with save_pretrained (safetensors) next to a tokenizer
trained here on the embedded corpus (PairRM: a [CLS] … [SEP] BPE tokenizer with PairRM's marker tokens; reward model:
the project's own BPE tokenizer with Mistral's chat template; both vocabularies are far below the embeddings' rows).
Then the stage's own code loads and runs them: finetune.preferences.pairs.load_ranker (from_pretrained, safetensors
only) and finetune.preferences.pairs.rank_candidates on a few dozen candidate sets made from the embedded corpus, and
build_pairs.

Written to $OUT (or --out): ranker_proof.json and ranker_proof.md with device, versions, parameter counts, shapes,
timings, peak memory, whether every score is finite, and position-bias checks: with both orders the scores must not
depend on the shuffling seed; PairRM's averaged preference must be antisymmetric; batch sizes must not change the
reward. Random weights say nothing about quality; the proof is that the code paths run at the real shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARCHITECTURES = REPO / "recipes" / "architectures"
PAIRRM_ARCHITECTURE = ARCHITECTURES / "llm-blender--PairRM-hf.json"
REWARD_ARCHITECTURE = ARCHITECTURES / "mistralai--Mistral-7B-v0.1.json"
TINY_PAIRRM = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
               "position_buckets": 32, "pooler_hidden_size": 64, "vocab_size": 4096}  # fmt: skip
TINY_REWARD = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 4096}  # fmt: skip
TOKENIZER_VOCAB = 2048
PAIRRM_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings", "position_buckets", "relative_attention")  # fmt: skip
REWARD_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, a CPU smoke test of the same flow")
    parser.add_argument("--out", default=os.environ.get("OUT") or "ranker_proof_out", help="results folder ($OUT)")
    parser.add_argument("--work", default=None, help="where the random checkpoints go (default /dev/shm if room)")
    parser.add_argument("--sets", type=int, default=None, help="candidate sets (default 48; --tiny 4)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def work_dir(tiny: bool) -> Path:
    shm = Path("/dev/shm")
    if not tiny and shm.is_dir() and shutil.disk_usage(shm).free > 24 * 2**30:
        return shm / "ranker_proof"  # RAM-backed: the 14.5 GB reward model saves and loads in seconds
    return Path("/tmp/ranker_proof")


# ---------------------------------------------------------------------------------------------- data and tokenizers


def candidate_sets(n: int, seed: int, repeats: int) -> tuple[list[list[dict]], list[list[str]], list[str]]:
    """(prompts, candidates, references) from the embedded corpus: each instruction with its own answer, another
    row's answer, half of its answer, a refusal, and its answer `repeats` times (at 40, long enough to be truncated by
    PairRM's 412-token candidate limit: the real shapes then run the full 2048-token rows)."""
    from finetune.embedded.corpus import make_dolly_rows

    rows = [r for r in make_dolly_rows(seed, 4 * n) if isinstance(r.get("response"), str) and r["response"].strip()]
    rows = rows[:n]
    prompts, candidates, references = [], [], []
    for i, row in enumerate(rows):
        context = f"\n\n{row['context']}" if row.get("context") else ""
        prompts.append([{"role": "user", "content": row["instruction"] + context}])
        answer, other = row["response"], rows[(i + 1) % len(rows)]["response"]
        words = answer.split()
        candidates.append([answer, other, " ".join(words[: max(1, len(words) // 2)]), "I do not know.",
                           " ".join([answer] * repeats)])  # fmt: skip
        references.append(answer)
    return prompts, candidates, references


def corpus_texts(seed: int) -> list[str]:
    from finetune.embedded.corpus import make_dolly_rows

    return [" ".join(str(v) for v in row.values() if isinstance(v, str)) for row in make_dolly_rows(seed, 400)]


def pairrm_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer that frames every text as [CLS] … [SEP], as DeBERTa-v3's does, with PairRM's
    marker tokens as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from finetune.preferences.ranking import PAIRRM_SPECIAL_TOKENS

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", *PAIRRM_SPECIAL_TOKENS]
    core = Tokenizer(models.BPE(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))  # fmt: skip
    cls_id, sep_id = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
        mask_token="[MASK]", additional_special_tokens=list(PAIRRM_SPECIAL_TOKENS), model_max_length=2048,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- models


def _device_and_dtype():
    import torch

    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_random_model(model_cls, config, tokenizer, folder: Path) -> dict:
    """`model_cls(config)` with random weights made on the device in the run's dtype, saved with its tokenizer."""
    import torch

    device, dtype = _device_and_dtype()
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in bf16 directly: a 7B model in float32 would need 29 GB first
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    _sync()
    init_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_s = time.perf_counter() - started
    del model
    _free()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"parameters": parameters, "init_s": round(init_s, 2), "save_s": round(save_s, 2), "saved_bytes": size,
            "init_device": device, "dtype": str(dtype).replace("torch.", "")}  # fmt: skip


def architecture(path: Path, tiny_overrides: dict | None) -> dict:
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    values.pop("architectures", None)
    values.pop("torch_dtype", None)
    return values | (tiny_overrides or {})


# ---------------------------------------------------------------------------------------------- checks


def _max_abs_diff(a: list[list], b: list[list]) -> float:
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x is not None and y is not None]
    return max(diffs) if diffs else 0.0


def _all_finite(scores: list[list]) -> bool:
    return all(math.isfinite(s) for row in scores for s in row if s is not None)


def _ranked(scores: list[list]) -> int:
    return sum(s is not None for row in scores for s in row)


def _timed(function, *args, **kwargs):
    _sync()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    _sync()
    return result, time.perf_counter() - started


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _pair_summary(rows_prompts, candidates, ranking) -> dict:
    from finetune.preferences.pairs import build_pairs

    rows = [{"id": f"set{i}", "prompt": p, "completion": [{"role": "assistant", "content": "-"}], "category": "x"}
            for i, p in enumerate(rows_prompts)]  # fmt: skip
    pairs, _, counts = build_pairs(rows, candidates, ranking)
    return {"pairs": len(pairs), **counts}


def prove_pairrm(args, folder: Path, prompts, candidates, references, texts) -> dict:
    from transformers import DebertaV2Config

    from finetune.preferences.pairs import load_ranker, rank_candidates
    from finetune.preferences.ranking import PairRMModel, pairrm_config_ids, pairrm_preference
    from finetune.tools.dry_run import default_section

    tokenizer = pairrm_tokenizer(texts)
    values = architecture(PAIRRM_ARCHITECTURE, TINY_PAIRRM if args.tiny else None)
    assert len(tokenizer) <= values["vocab_size"], "tokenizer ids must index the embedding"
    config = DebertaV2Config(**values, **pairrm_config_ids(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    built = save_random_model(PairRMModel, config, tokenizer, folder)

    settings = default_section("preference_data.ranker", name="pairrm", model=str(folder),
                               batch_size=16 if not args.tiny else 8)  # fmt: skip
    unused = default_section("model", name_or_path="unused", load_in_4bit=False)
    _reset_peak()
    ranker, load_s = _timed(load_ranker, settings, unused)
    model, tok = ranker
    both, both_s = _timed(rank_candidates, settings, ranker, prompts, candidates, references, args.seed)
    other_seed = rank_candidates(settings, ranker, prompts, candidates, references, args.seed + 1)
    single_settings = dataclasses.replace(settings, both_orders=False)
    single, single_s = _timed(rank_candidates, single_settings, ranker, prompts, candidates, references, args.seed)
    single_again = rank_candidates(single_settings, ranker, prompts, candidates, references, args.seed)
    single_other = rank_candidates(single_settings, ranker, prompts, candidates, references, args.seed + 1)
    source = prompts[0][0]["content"]
    ab = pairrm_preference(model, tok, source, candidates[0][0], candidates[0][1])
    ba = pairrm_preference(model, tok, source, candidates[0][1], candidates[0][0])
    comparisons = sum(len(row) * (len(row) - 1) for row in candidates)
    return {
        "architecture": {key: values[key] for key in PAIRRM_SHAPE_KEYS},
        "tokenizer_vocab": len(tokenizer),
        "model": built,
        "loaded_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "loaded_device": str(next(model.parameters()).device),
        "load_s": round(load_s, 2),
        "candidate_sets": len(candidates),
        "candidates_per_set": len(candidates[0]),
        "both_orders": {
            "comparisons": comparisons,
            "seconds": round(both_s, 2),
            "comparisons_per_s": round(comparisons / both_s, 1),
            "all_finite": _all_finite(both.scores),
            "ranked": _ranked(both.scores),
            "max_abs_diff_other_shuffle_seed": _max_abs_diff(both.scores, other_seed.scores),
            "max_abs_score": max(abs(s) for row in both.scores for s in row),
            **_pair_summary(prompts, candidates, both),
        },
        "single_order": {
            "comparisons": comparisons // 2,
            "seconds": round(single_s, 2),
            "all_finite": _all_finite(single.scores),
            "max_abs_diff_same_seed": _max_abs_diff(single.scores, single_again.scores),
            "max_abs_diff_other_seed": _max_abs_diff(single.scores, single_other.scores),  # position bias at work
        },
        "antisymmetry": {"a_vs_b": ab, "b_vs_a": ba, "sum": ab + ba},
        "peak_memory_gib": _peak_gib(),
    }


def prove_reward_model(args, folder: Path, prompts, candidates, references, texts) -> dict:
    from transformers import MistralConfig, MistralForSequenceClassification

    from finetune.embedded.tiny_model import train_tokenizer
    from finetune.preferences.pairs import load_ranker, rank_candidates
    from finetune.tools.dry_run import default_section

    tokenizer = train_tokenizer(texts, TOKENIZER_VOCAB)
    values = architecture(REWARD_ARCHITECTURE, TINY_REWARD if args.tiny else None)
    assert len(tokenizer) <= values["vocab_size"], "tokenizer ids must index the embedding"
    values |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = MistralConfig(**values, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    built = save_random_model(MistralForSequenceClassification, config, tokenizer, folder)

    settings = default_section("preference_data.ranker", name="reward_model", model=str(folder), batch_size=8)
    unused = default_section("model", name_or_path="unused", load_in_4bit=False)
    _reset_peak()
    ranker, load_s = _timed(load_ranker, settings, unused)
    model, _ = ranker
    ranking, seconds = _timed(rank_candidates, settings, ranker, prompts, candidates, references, args.seed)
    one_by_one = rank_candidates(dataclasses.replace(settings, batch_size=1), ranker, prompts[:4],
                                 candidates[:4], references[:4], args.seed)  # fmt: skip
    responses = sum(len(row) for row in candidates)
    return {
        "architecture": {key: values[key] for key in REWARD_SHAPE_KEYS}
        | {"num_labels": 1, "class": "MistralForSequenceClassification"},
        "tokenizer_vocab": len(tokenizer),
        "model": built,
        "loaded_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "loaded_device": str(next(model.parameters()).device),
        "load_s": round(load_s, 2),
        "responses": responses,
        "seconds": round(seconds, 2),
        "responses_per_s": round(responses / seconds, 1),
        "all_finite": _all_finite(ranking.scores),
        "ranked": _ranked(ranking.scores),
        "distinct_scores": len({round(s, 4) for row in ranking.scores for s in row}),
        "max_abs_diff_batch_1_vs_8": _max_abs_diff(one_by_one.scores, ranking.scores[:4]),
        **_pair_summary(prompts, candidates, ranking),
        "peak_memory_gib": _peak_gib(),
    }


# ---------------------------------------------------------------------------------------------- report


def versions() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "tokenizers", "safetensors"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    found["gpu"] = torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else None
    return found


def markdown(result: dict) -> str:
    p, r, v = result["pairrm"], result["reward_model"], result["versions"]
    b, s = p["both_orders"], p["single_order"]
    pa, ra = p["architecture"], r["architecture"]
    device = f"{v['gpu'] or 'CPU'} ({result['mode']})"
    lines = [
        "# Ranker proof: PairRM and a reward model through the preference-data code",
        "",
        (
            f"Device: {device}; torch {v['torch']}, transformers {v['transformers']}, CUDA {v['cuda']}. "
            f"Total {result['wall_s']} s. Random weights: the numbers prove the code paths, not quality."
        ),
        "",
        "| | PairRM (DebertaV2 pairwise) | reward model (MistralForSequenceClassification) |",
        "|---|---|---|",
        f"| parameters | {p['model']['parameters']:,} | {r['model']['parameters']:,} |",
        (
            f"| shape | hidden {pa['hidden_size']}, {pa['num_hidden_layers']} layers, {pa['num_attention_heads']} "
            f"heads, vocab {pa['vocab_size']} | hidden {ra['hidden_size']}, {ra['num_hidden_layers']} layers, "
            f"{ra['num_attention_heads']}/{ra['num_key_value_heads']} heads, vocab {ra['vocab_size']} |"
        ),
        (
            f"| loaded as | {p['loaded_dtype']} on {p['loaded_device']} in {p['load_s']} s | {r['loaded_dtype']} on "
            f"{r['loaded_device']} in {r['load_s']} s |"
        ),
        (
            f"| work | {b['comparisons']} comparisons ({p['candidate_sets']} sets x {p['candidates_per_set']}, both "
            f"orders) in {b['seconds']} s, {b['comparisons_per_s']}/s | {r['responses']} responses in "
            f"{r['seconds']} s, {r['responses_per_s']}/s |"
        ),
        f"| all scores finite | {b['all_finite']} | {r['all_finite']} |",
        (
            f"| pairs / ties / invalid | {b['pairs']} / {b['ties_dropped']} / {b['invalid_dropped']} | "
            f"{r['pairs']} / {r['ties_dropped']} / {r['invalid_dropped']} |"
        ),
        f"| peak GPU memory (GiB) | {p['peak_memory_gib']} | {r['peak_memory_gib']} |",
        "",
        "Position bias and consistency:",
        (
            f"- PairRM, both orders: max score change under another shuffling seed "
            f"{b['max_abs_diff_other_shuffle_seed']:.3g} (largest |score| {b['max_abs_score']:.3g}); averaged "
            f"preference a-vs-b + b-vs-a = {p['antisymmetry']['sum']:.3g}."
        ),
        (
            f"- PairRM, one order per pair ({s['comparisons']} comparisons, {s['seconds']} s): the same seed changes "
            f"scores by {s['max_abs_diff_same_seed']:.3g}, another seed by {s['max_abs_diff_other_seed']:.3g} (the "
            "position bias that both orders cancel)."
        ),
        f"- Reward model: batch size 1 vs 8 changes scores by at most {r['max_abs_diff_batch_1_vs_8']:.3g}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("ranker_proof: no CUDA device; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    started = time.perf_counter()
    work = Path(args.work) if args.work else work_dir(args.tiny)
    work.mkdir(parents=True, exist_ok=True)
    sets = args.sets or (4 if args.tiny else 48)
    prompts, candidates, references = candidate_sets(sets, args.seed, repeats=2 if args.tiny else 40)
    texts = corpus_texts(args.seed)
    result = {"mode": "tiny" if args.tiny else "real shapes", "versions": versions()}
    try:
        result["pairrm"] = prove_pairrm(args, work / "pairrm", prompts, candidates, references, texts)
        _free()
        result["reward_model"] = prove_reward_model(
            args, work / "reward_model", prompts, candidates, references, texts
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranker_proof.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "ranker_proof.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    ok = result["pairrm"]["both_orders"]["all_finite"] and result["reward_model"]["all_finite"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
