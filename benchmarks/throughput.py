"""Throughput benchmark: the project's sft, dpo, generation and BERTScore code, seed layout vs finetune.layout.speed.

    python benchmarks/throughput.py                  # on a CUDA machine: Mistral-7B shape, random weights
    python benchmarks/throughput.py --tiny           # the same flow on a tiny model; a CPU smoke test

Every configuration runs through the pipeline's code: finetune.training.sft.build_trainer /
finetune.training.dpo.build_trainer with the trainer keywords finetune.layout.speed.plan makes of the seed-000 recipe
(`as_written` is the seed's layout: batch 1 x accumulation 8, every layer checkpointed),
finetune.evaluation.generation.load_variant + generate_answers, and finetune.evaluation.metrics.bertscore_f1. The
model is a random-weight Mistral-7B-v0.1 shape (no hub here), loaded once in 4 bits and reused, so the benchmark
measures steps rather than loading. The data are instruction-like: token lengths drawn
log-normal (median about 250, a tail clipped at 1024), the text taken from the embedded corpus.

Reported per configuration: non-padding tokens/s (TRL's own `num_tokens` count) over the steps after a warm-up that
compiled no new graph, peak GPU memory (torch.cuda.max_memory_allocated), MFU against the H100's dense bf16 peak,
loss and grad norms. The SFT seed and fast runs see the same examples in the same order at the same effective
batch, so their per-step losses are compared (same math). Results go to OUT/throughput.json and OUT/throughput.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import idle_gaps  # noqa: E402
from gpu_proof import MISTRAL_7B, TINY, build_random_model, default_model_dir, versions  # noqa: E402

from finetune import overrides  # noqa: E402
from finetune.layout.speed import TRACED_4BIT  # noqa: E402

AOT_CACHE_DEFAULT = overrides.CACHE_CUSTOM_AUTOGRAD_FUNCTIONS  # what every variant runs with but one

SEED_RECIPE = "seed000-mistral-dolly-dpo"
H100_BF16_DENSE_FLOPS = 989.4e12  # the H100 SXM's published dense bf16 peak; MFU is measured against it
MAX_LENGTH = 1024
EFFECTIVE_BATCH = 8  # the seed recipe's 1 x 8
# Optimizer steps of the training section's runs; the rows written for them follow (benchmarks/peers.py reuses them).
RUN_STEPS = {"sft_fast": 96, "sft_seed": 6, "sft_low": 2, "dpo_fast": 24, "dpo_seed": 3}
TINY_RUN_STEPS = {"sft_fast": 6, "sft_seed": 3, "sft_low": 1, "dpo_fast": 3, "dpo_seed": 2}


# ---------------------------------------------------------------------------------------------- data


def corpus_words(embedded: Path) -> list[str]:
    from finetune.embedded.files import read_corpus

    texts, _ = read_corpus(embedded)
    return " ".join(texts).split()


def lognormal_tokens(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))


def text_of_tokens(rng: random.Random, words: list[str], tokens: int, tokens_per_word: float) -> str:
    count = max(1, round(tokens / tokens_per_word))
    start = rng.randrange(0, len(words) - count - 1) if len(words) > count + 1 else 0
    return " ".join(words[start : start + count])


def write_instruction_data(
    folder: Path, words: list[str], tokenizer, sft_rows: int, pairs: int, seed: int, full_length_rows: int
) -> dict:
    """prepared/sft_train.jsonl, preferences_train.jsonl and a full-length sft_train.jsonl in folder/long/."""
    from finetune.data.rows import PREFERENCES_TRAIN, SFT_TRAIN, write_jsonl

    rng = random.Random(seed)
    sample = " ".join(words[:2000])
    tokens_per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 2000

    def sft_row(i: int, total: int) -> dict:
        prompt_tokens = max(8, int(total * rng.uniform(0.1, 0.4)))
        return {
            "id": f"sft-{i}",
            "category": "benchmark",
            "prompt": [{"role": "user", "content": text_of_tokens(rng, words, prompt_tokens, tokens_per_word)}],
            "completion": [
                {"role": "assistant", "content": text_of_tokens(rng, words, total - prompt_tokens, tokens_per_word)}
            ],
        }

    rows = [sft_row(i, lognormal_tokens(rng, 250, 0.7, 24, MAX_LENGTH)) for i in range(sft_rows)]
    long_rows = [sft_row(i, MAX_LENGTH + 64) for i in range(full_length_rows)]  # cut to max_length by TRL
    preference_rows = []
    for i in range(pairs):
        prompt = text_of_tokens(rng, words, lognormal_tokens(rng, 120, 0.6, 8, 400), tokens_per_word)
        turn = [{"role": "user", "content": prompt}]
        answers = [
            text_of_tokens(rng, words, lognormal_tokens(rng, 220, 0.6, 8, 600), tokens_per_word) for _ in range(2)
        ]
        preference_rows.append(
            {
                "id": f"pair-{i}",
                "category": "benchmark",
                "prompt": turn,
                "chosen": [{"role": "assistant", "content": answers[0]}],
                "rejected": [{"role": "assistant", "content": answers[1]}],
            }
        )
    write_jsonl(folder / SFT_TRAIN, rows)
    write_jsonl(folder / PREFERENCES_TRAIN, preference_rows)
    write_jsonl(folder / "long" / SFT_TRAIN, long_rows)

    def lengths(texts):
        return sorted(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    sft_lengths = lengths([r["prompt"][0]["content"] + " " + r["completion"][0]["content"] for r in rows])
    pair_lengths = lengths([r["prompt"][0]["content"] + " " + r["chosen"][0]["content"] for r in preference_rows])

    def summary(values):
        return {
            "rows": len(values),
            "mean": round(statistics.fmean(values), 1),
            "p50": values[len(values) // 2],
            "p90": values[int(len(values) * 0.9)],
            "max": values[-1],
        }

    return {
        "sft_tokens": summary(sft_lengths),
        "dpo_prompt_plus_chosen_tokens": summary(pair_lengths),
        "tokens_per_word": round(tokens_per_word, 3),
    }


# ---------------------------------------------------------------------------------------------- config


def benchmark_params(work: Path, model_dir: Path, tiny: bool) -> dict:
    """The seed-000 recipe, with paths in the scratch folder and the random model; validated by load_config."""
    from finetune.tools.dry_run import compose_params

    params = compose_params(SEED_RECIPE)
    # Outputs into the scratch folder; the probe prompts ship with the repository.
    params["paths"] = {
        key: str((REPO if key == "probe_prompts" else work) / value) for key, value in params["paths"].items()
    }
    params["model"].update({"name_or_path": str(model_dir), "revision": None, "load_in_4bit": True})
    for round_ in params.get("self_rewarding", {}).get("rounds", {}).values():  # they start from output paths
        round_["start"] = str(work / round_["start"])
    for section in ("sft", "dpo"):
        trainer = params[section]["trainer"]
        trainer.pop("num_train_epochs", None)
        trainer.update(
            {
                "save_steps": 100000,
                "save_total_limit": 1,
                "seed": 0,
                "max_length": MAX_LENGTH,
                "eval_strategy": "no",  # no validation split is written here, and evaluating is not what is measured
            }
        )
        if tiny:
            trainer.update({"optim": "adamw_torch", "bf16": False})
    params["sft"]["trainer"]["lr_scheduler_type"] = "constant"  # the loss comparison must not depend on max_steps
    params["dpo"]["trainer"]["lr_scheduler_type"] = "constant"
    params["dpo"]["trainer"].pop("warmup_steps", None)
    params["sft"]["trainer"].pop("warmup_steps", None)
    return params


def config_of(params: dict, **sections):
    from finetune.tools.dry_run import validate_params

    merged = json.loads(json.dumps(params))
    for path, value in sections.items():
        section, key = path.split("__")
        merged[section][key] = value
    return validate_params(merged)


# ---------------------------------------------------------------------------------------------- measuring


class CachedModel:
    """load_model for the trainers, loading the quantized model once and handing back the bare model each time."""

    def __init__(self, load_model):
        self.load_model = load_model
        self.model = None

    def __call__(self, model_cfg, *, for_training: bool, gradient_checkpointing: bool = False, sharded: bool = False):
        if sharded:
            raise ValueError("the throughput benchmark runs one process; FSDP runs are benchmarks/multi_gpu.py's")
        if self.model is None:
            self.model = self.load_model(model_cfg, for_training=for_training, gradient_checkpointing=True)
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()
        return self.model

    def release(self, trainer_model) -> None:
        """Take the LoRA layers out again, so the next configuration starts from the bare model."""
        import torch
        from peft import PeftModel

        from finetune.overrides import DequantizedLinear

        if isinstance(trainer_model, PeftModel):
            self.model = trainer_model.unload()
        hooks = getattr(self.model, "_forward_pre_hooks", {})
        hooks.clear()  # the per-batch checkpointing hook of finetune.layout.speed, if installed
        for module in self.model.modules():  # and the compiled decoder layers
            module._compiled_call_impl = None
        self.model.set_attn_implementation("sdpa")
        embeddings = self.model.get_input_embeddings().weight.dtype
        if any(isinstance(module, DequantizedLinear) for module in self.model.modules()):
            self.model = None  # the 4-bit layers were replaced: load them again for the next configuration
        elif getattr(self.model, "is_loaded_in_4bit", False) and embeddings != torch.float32:
            self.model = None  # finetune.layout.embeddings undid PEFT's float32 upcast: load them again


def step_meter():
    """Marks each optimizer step (time, TRL's token count, compilations so far) and keeps each step's loss, without
    making the GPU wait: the Trainer's running loss sum is copied on the GPU and read after training. Only the last
    step waits for the GPU, so the last mark is not early. (A synchronising meter, or logging every step, adds a wait
    per step that the stages, logging every `logging_steps`, do not have.)"""
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def __init__(self):
            self.trainer = None
            self.marks: list[tuple[float, int, int]] = []
            self.loss_sums: list[tuple[object, bool]] = []  # (running sum after the step, reset by logging after it)
            self.retries: list[int] = []  # the CUDA allocator's retries so far (a host-side count: no GPU wait)
            self.pinned: list[tuple[int, float]] = []  # pinned host blocks created so far, and seconds doing it

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), 0, compilations()))
            self.retries.append(allocator_retries())
            self.pinned.append(pinned_pool_growth())

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if state.global_step >= state.max_steps and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(self.trainer._total_train_tokens), compilations()))
            self.loss_sums.append((self.trainer._tr_loss.detach().clone(), bool(control.should_log)))
            self.retries.append(allocator_retries())
            self.pinned.append(pinned_pool_growth())

        def retries_per_step(self) -> list[int]:
            """Each step's allocator retries: a cudaMalloc that failed, so the allocator freed its cached blocks
            (synchronising the GPU) and tried again, which a step near the memory cap may pay."""
            return [end - start for start, end in zip(self.retries, self.retries[1:])]

        def pinned_growth_per_step(self) -> dict[str, list]:
            """Each step's new pinned host blocks and the seconds cudaHostAlloc took for them: offloaded
            checkpoints grow the host pool until it holds the most any step has needed of each power-of-two
            size, after which a run never pays it again."""
            pairs = list(zip(self.pinned, self.pinned[1:]))
            return {
                "pinned_blocks_per_step": [end[0] - start[0] for start, end in pairs],
                "pinned_alloc_seconds_per_step": [round(end[1] - start[1], 3) for start, end in pairs],
            }

        def losses(self) -> list[float]:
            """Each step's loss: the growth of the Trainer's running sum, which logging resets to zero."""
            losses, previous = [], 0.0
            for running, reset in self.loss_sums:
                losses.append(float(running) - previous)
                previous = 0.0 if reset else float(running)
            return losses

    return StepMeter()


def warmup_profiler(steps: int, path: Path, caches: dict | None = None):
    """cProfile over training's first `steps` optimizer steps (compiling or loading the compiled graphs, first
    allocations), or all of a shorter run, written to `path` as the functions with the most time in and under
    them, then in themselves; headed by what the compile caches held at the start (`caches`)."""
    import cProfile
    import io
    import pstats

    from transformers import TrainerCallback

    class WarmupProfile(TrainerCallback):
        def __init__(self):
            self.profile = cProfile.Profile()
            self.written = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.profile.enable()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                self.write(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if not self.written:
                self.write(state.global_step)

        def write(self, last_step: int) -> None:
            self.written = True
            self.profile.disable()
            report = io.StringIO()
            for order in ("cumulative", "tottime"):
                pstats.Stats(self.profile, stream=report).sort_stats(order).print_stats(60)
            path.parent.mkdir(parents=True, exist_ok=True)
            header = f"cProfile of optimizer steps 1-{last_step}, main thread"
            if caches is not None:
                header += f"; {describe_compile_caches(caches)}"
            path.write_text(header + "\n" + report.getvalue())

    return WarmupProfile()


COMPILE_CACHES = ("fxgraph", "aotautograd")  # inductor's compiled graphs, AOTAutograd's joint graphs


def compile_cache_state() -> dict:
    """How many graphs torch's on-disk compile caches hold now (in TORCHINDUCTOR_CACHE_DIR): a run that starts with
    none compiles every graph, so its warm-up is a first run's, not a later `dvc repro`'s."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    root = Path(cache_dir())
    counts = {name: sum(1 for entry in (root / name).rglob("*") if entry.is_file()) for name in COMPILE_CACHES}
    return {"dir": str(root), **counts}


def describe_compile_caches(caches: dict) -> str:
    held = ", ".join(f"{caches[name]} {name}" for name in COMPILE_CACHES)
    return f"compile caches at the start: {held} entries in {caches['dir']}" + (
        " (cold: every graph compiles)" if not caches["fxgraph"] else ""
    )


def allocator_retries() -> int:
    import torch

    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


def pinned_pool_growth() -> tuple[int, float]:
    """Pinned host blocks the CUDA host allocator has created so far, and the seconds it spent in cudaHostAlloc
    for them ((0, 0.0) on a CPU)."""
    import torch

    if not torch.cuda.is_available():
        return 0, 0.0
    stats = torch.cuda.host_memory_stats()
    return stats.get("num_host_alloc", 0), stats.get("host_alloc_time.total", 0) / 1e6  # microseconds


def compilations() -> int:
    """Graphs dynamo has captured plus graphs inductor has compiled or loaded so far in this process."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return counters["frames"]["total"] + inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_hit"]


def steady_rate(marks: list[tuple[float, int, int]], warmup: int, pinned_blocks: list[int] | None = None) -> dict:
    """Tokens/s over the steps after `warmup` that compiled nothing: a step that meets a new graph (a new mode, a
    batch long enough to need checkpointing) compiles once, which a real run pays once in hours; those steps are
    counted apart, as compile time. With each step's new pinned host blocks, also the rate over the steady steps
    that created none, the state a long run reaches once its host pool holds what its steps need."""
    all_steps = [(end[0] - start[0], end[1] - start[1], end[2] != start[2]) for start, end in zip(marks, marks[1:])]
    steps = all_steps[warmup:]
    steady = [(seconds, tokens) for seconds, tokens, compiled in steps if not compiled]
    seconds = sum(s for s, _ in steady)
    rates = {
        "tokens_per_s": round(sum(t for _, t in steady) / seconds, 1) if seconds else None,
        "steady_steps": len(steady),
        "compiling_steps_after_warmup": len(steps) - len(steady),
        "compiling_seconds_after_warmup": round(sum(s for s, _, c in steps if c), 2),
        "step_seconds": [round(s, 3) for s, _, _ in steps],
        "warmup_step_seconds": [round(s, 3) for s, _, _ in all_steps[:warmup]],  # compiling, or loading the cache
    }
    if pinned_blocks is not None:
        grown = pinned_blocks[warmup:]
        settled = [
            (s, t) for (s, t, compiled), blocks in zip(steps, grown, strict=True) if not compiled and not blocks
        ]
        settled_seconds = sum(s for s, _ in settled)
        rates["pinned_growth_steps_after_warmup"] = len(steady) - len(settled)
        rates["tokens_per_s_without_pinned_growth"] = (
            round(sum(t for _, t in settled) / settled_seconds, 1) if settled_seconds else None
        )
    return rates


def reset_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_state() -> dict:
    """What may make a later run in one process faster than an earlier one (the allocator's pool and retries, the
    SM clock and temperature through NVML when it is there); empty on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    state = {
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
        "allocator_retries": allocator_retries(),
    }
    for key, read in (("sm_clock_mhz", torch.cuda.clock_rate), ("temperature_c", torch.cuda.temperature)):
        try:
            state[key] = read()
        except Exception:  # no pynvml, or one of NVML's own errors: the state is a clue, not a result
            state[key] = None
    return state


def min_median_max(rates: list[float | None]) -> str:
    """"min / median / max" of the rates measured ("–" when none was): how the benchmarks report repeats."""
    known = [rate for rate in rates if rate]
    if not known:
        return "–"
    return " / ".join(f"{value:,.0f}" for value in (min(known), statistics.median(known), max(known)))


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def flops_per_token(shape, mean_tokens: float, passes: float) -> float:
    """Model FLOPs per token: matmuls 2N per forward pass (LoRA trains no frozen-weight gradients, so a training
    step is 2 passes, 4N) plus causal attention 2 * layers * T * hidden per pass."""
    matmul_params = shape.quantized_params + shape.vocab * shape.hidden
    return passes * (2 * matmul_params + 2 * shape.layers * mean_tokens * shape.hidden)


def with_inputs_requiring_grad(install, on: bool):
    """The warm-up candidate `inputs_require_grad`, not planned yet: after the plan's install, the frozen embeddings'
    output requires grad (transformers' enable_input_require_grads), so the first decoder layer's input is of the same
    kind as the later layers' and dynamo traces each compiled graph once, not once per kind of input."""
    if not on:
        return install

    def install_then_require_grad(model) -> None:
        install(model)
        model.enable_input_require_grads()

    return install_then_require_grad


def train_run(
    name: str,
    stage: str,
    cfg,
    trainer_kwargs: dict,
    speed_plan,
    install,
    cache: CachedModel,
    warmup: int,
    adapter_out: Path | None = None,
    reference_batches: tuple[int, ...] = (),
    walk_modules_each_step: bool = False,
    warmup_profile: Path | None = None,
) -> dict:
    """Build the stage's trainer with these keywords, train, and measure (and TRL's reference pass again at each of
    `reference_batches` pairs per batch; with `walk_modules_each_step`, without the stages' WalkModulesOnce; with
    `warmup_profile`, the main thread's Python over the `warmup` steps profiled into that file)."""
    from trl import DPOConfig, SFTConfig

    from finetune.training import dpo as dpo_training
    from finetune.training import sft as sft_training
    from finetune.training.runs import WalkModulesOnce, trainer_args

    reset_memory()
    output_dir = str(Path(cfg.paths.checkpoints) / name)
    config_cls = SFTConfig if stage == "sft" else DPOConfig
    args = trainer_args(config_cls, stage, trainer_kwargs, output_dir)
    module = sft_training if stage == "sft" else dpo_training
    meter = step_meter()
    caches_before = compile_cache_state()
    started = time.perf_counter()
    trainer = module.build_trainer(cfg, args, resume=False, speed=speed_plan, install=install)
    build = time.perf_counter() - started  # for fast DPO this includes TRL's reference log-prob precompute
    if walk_modules_each_step:
        trainer.remove_callback(WalkModulesOnce)
    trainer.add_callback(meter)
    meter.trainer = trainer
    if warmup_profile is not None:
        trainer.add_callback(warmup_profiler(warmup, warmup_profile, caches_before))
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    history = [entry for entry in trainer.state.log_history if "loss" in entry]  # every logging_steps
    marks = meter.marks
    pinned = meter.pinned_growth_per_step()
    rate = steady_rate(marks, warmup if len(marks) > warmup + 2 else 0, pinned["pinned_blocks_per_step"])
    result = {
        "name": name,
        "stage": stage,
        "compile_caches_before": caches_before,
        "layout": dataclasses.asdict(speed_plan) if speed_plan else None,
        "trainer": {
            k: trainer_kwargs.get(k)
            for k in (
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "activation_checkpointing",
                "padding_free",
                "precompute_ref_log_probs",
                "optim",
                "bf16",
                "max_length",
                "logging_steps",
                "dataloader_num_workers",
            )
        },
        "steps": len(marks) - 1,
        "tokens_total": marks[-1][1] if marks else 0,
        "step_tokens": [end[1] - start[1] for start, end in zip(marks, marks[1:])],
        "build_s": round(build, 2),
        "train_wall_s": round(wall, 2),
        "tokens_per_s_incl_build": round(marks[-1][1] / (wall + build), 1) if marks else None,
        "tokens_per_s_overall": round(marks[-1][1] / wall, 1) if marks else None,
        **rate,
        "peak_memory_gib": peak_gib(),
        "allocator_retries_per_step": meter.retries_per_step(),
        **pinned,
        "losses": [round(loss, 5) for loss in meter.losses()],
        "logged_losses": [round(entry["loss"], 5) for entry in history],
        "grad_norms": [round(entry.get("grad_norm", float("nan")), 5) for entry in history],
    }
    if stage == "dpo" and trainer.args.precompute_ref_log_probs:
        result.update(with_reference_pass(trainer, result["tokens_per_s"]))
    if reference_batches:
        result["reference_pass_by_batch"] = {size: reference_pass(trainer, size) for size in reference_batches}
    if adapter_out is not None:
        trainer.save_model(str(adapter_out))
    cache.release(trainer.model)
    del trainer
    reset_memory()
    print(
        f"[{name}] {json.dumps({k: result[k] for k in ('tokens_per_s', 'peak_memory_gib', 'steps')})}",
        flush=True,
    )
    return result


def with_reference_pass(trainer, training_rate: float | None) -> dict:
    """Precomputed reference log-probs are paid once, before training: that pass timed again (a second time if the
    first compiled a graph), and 1 / (1/training + 1/reference) tokens/s, a rate comparable with the seed layout's
    per-step reference."""
    reference = reference_pass(trainer)
    if reference["compiled_during_pass"]:
        reference = reference_pass(trainer)
    combined = 1 / (1 / training_rate + 1 / reference["tokens_per_s"]) if training_rate else None
    return {
        "reference_pass": reference,
        "tokens_per_s_training_only": training_rate,
        "tokens_per_s": round(combined, 1) if combined else None,
    }


def reference_pass(trainer, batch_size: int | None = None) -> dict:
    """TRL's reference log-prob precompute loop (DPOTrainer.compute_ref_log_probs over the train set), timed."""
    import torch
    from torch.utils.data import DataLoader

    batch_size = batch_size or trainer.args.precompute_ref_batch_size or trainer.args.per_device_train_batch_size
    loader = DataLoader(trainer.train_dataset, batch_size=batch_size, collate_fn=trainer.data_collator)
    device = trainer.accelerator.device
    trainer.model.eval()
    tokens, compiled_before = 0, compilations()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items()}
        trainer.compute_ref_log_probs(trainer.model, batch)
        tokens += int(batch["attention_mask"].sum())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    trainer.model.train()
    compiled = compilations() != compiled_before
    print(f"[reference pass] batch {batch_size}: {tokens / seconds:,.0f} tokens/s, compiled {compiled}", flush=True)
    return {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "compiled_during_pass": compiled,
    }


def same_math(seed_run: dict, fast_run: dict, tolerance: float) -> dict:
    steps = min(len(seed_run["losses"]), len(fast_run["losses"]))
    pairs = list(zip(seed_run["losses"][:steps], fast_run["losses"][:steps]))
    worst = max((abs(a - b) / abs(a) for a, b in pairs), default=None)
    return {
        "steps": steps,
        "seed_losses": seed_run["losses"][:steps],
        "fast_losses": fast_run["losses"][:steps],
        "max_relative_difference": round(worst, 5) if worst is not None else None,
        "tolerance": tolerance,
        "within_tolerance": worst is not None and worst <= tolerance,
    }


# ---------------------------------------------------------------------------------------------- sections


def on_this_device(chosen):
    """A plan made for a notional GPU (--tiny on a CPU) with sdpa attention: flex attention has no CPU backward."""
    import torch

    return chosen if torch.cuda.is_available() else dataclasses.replace(chosen, attention="sdpa")


def planned_gpu_bytes(budget_gib: float | None) -> int:
    """The GPU memory the layouts plan for: the GPU's, or `budget_gib` capped on the allocator as the stages cap
    `memory_budget_gib` (finetune.layout.speed.memory_budget). On a CPU (--tiny) there is no GPU to plan for; a
    notional 80 GB GPU exercises the same planning code."""
    from finetune.layout.speed import GIB, gpu_memory_bytes, memory_budget

    return memory_budget(gpu_memory_bytes(), budget_gib) or 80 * GIB


def run_training(
    cfg_params: dict, work: Path, cache: CachedModel, shape, tiny: bool, steps: dict, planned_gpu: int
) -> dict:
    from finetune.layout.speed import installer, plan
    from finetune.model.loading import use_4bit

    results: dict = {}
    cfg = config_of(cfg_params)
    quantized = use_4bit(cfg.model)

    seed_sft = dict(cfg.sft.trainer)
    fast_sft, fast_sft_plan = plan("sft", seed_sft, "fast", shape, planned_gpu, quantized)
    fast_sft_plan = on_this_device(fast_sft_plan)
    low_sft, low_sft_plan = plan("sft", seed_sft, "low_memory", shape, planned_gpu, quantized)
    _, seed_sft_plan = plan("sft", seed_sft, "as_written", shape, planned_gpu, quantized)

    # The low-memory and seed layouts first: 4-bit runs in a process that has not compiled anything yet.
    results["sft_seed"] = train_run(
        "sft_seed", "sft", cfg, {**seed_sft, "max_steps": steps["sft_seed"]}, seed_sft_plan, None, cache, warmup=1
    )
    long_cfg = dataclasses.replace(
        cfg, paths=dataclasses.replace(cfg.paths, prepared=str(Path(cfg.paths.prepared) / "long"))
    )
    results["sft_low_memory"] = train_run(
        "sft_low_memory",
        "sft",
        long_cfg,
        {**low_sft, "max_steps": steps["sft_low"]},
        low_sft_plan,
        None,
        cache,
        warmup=0,
    )
    results["sft_fast"] = train_run(
        "sft_fast",
        "sft",
        cfg,
        {**fast_sft, "max_steps": steps["sft_fast"]},
        fast_sft_plan,
        installer(fast_sft_plan, shape),
        cache,
        warmup=4,  # compiling: the first shape, then dynamic shapes
        adapter_out=work / "adapter_fast",
    )
    results["same_math"] = same_math(results["sft_seed"], results["sft_fast"], tolerance=0.02)

    dpo_cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_adapter=str(work / "adapter_fast")))
    seed_dpo = dict(cfg.dpo.trainer)
    fast_dpo, fast_dpo_plan = plan("dpo", seed_dpo, "fast", shape, planned_gpu, quantized)
    fast_dpo_plan = on_this_device(fast_dpo_plan)
    _, seed_dpo_plan = plan("dpo", seed_dpo, "as_written", shape, planned_gpu, quantized)
    results["dpo_fast"] = train_run(
        "dpo_fast",
        "dpo",
        dpo_cfg,
        {**fast_dpo, "max_steps": steps["dpo_fast"]},
        fast_dpo_plan,
        installer(fast_dpo_plan, shape),
        cache,
        warmup=4,
    )
    results["dpo_seed"] = train_run(
        "dpo_seed", "dpo", dpo_cfg, {**seed_dpo, "max_steps": steps["dpo_seed"]}, seed_dpo_plan, None, cache, warmup=1
    )
    return results


# name -> what differs from the stage's own fast layout (finetune.layout.speed.plan + installer):
# "plan" fields replaced, "shape" fields of the model shape it plans for
EAGER_4BIT = {
    "compiled": False,
    "attention": "sdpa",
    "base_weights": "as loaded",
}  # the fast layout before compiling
VARIANTS = {
    "fast": {},
    "low_memory": {"requested": "low_memory"},  # the seeds' layout: what the fast layout replaces at small budgets
    "fast_profiled": {"profile": True},
    "fast_profiled_python": {"profile": True, "python_frames": True},
    # Steps 12-15 of throughput.py's rows: step 14 (4,237 tokens) recomputes in runs of documents at 6 GiB; on the
    # H100 (2026-12-05) it took 2.2 s against 0.5-0.65 s for the whole-batch steps.
    "fast_profiled_runs": {"profile": True, "profile_steps": (12, 15)},
    # The warm-up steps' Python: with its graphs in the cache the project's took 36-52 s on the H100, Unsloth's 6-17.
    "fast_warmup_profiled": {"warmup_profile": True},
    "fast_logging_every_step": {"kwargs": {"logging_steps": 1}},
    "fast_loader_in_process": {
        "kwargs": {"dataloader_num_workers": 0, "dataloader_persistent_workers": False},
        "plan": {"batches_from": "as written"},
    },
    # The written 8-bit optimizer, planned without the fused states' room (adapter not counted).
    "fast_paged_adamw_8bit": {
        "shape": {"adapter_params": 0}, "kwargs": {"optim": "paged_adamw_8bit"}, "plan": {"optimizer": "as written"}
    },
    # A candidate for the 6 GiB plan, not a lever: fused AdamW where the plan keeps the 8-bit one because the longest
    # batch needs runs of documents; its float32 states are not planned for (the allocator cap still holds).
    "fast_fused_adamw_in_runs": {
        "kwargs": {"optim": "adamw_torch_fused"}, "plan": {"optimizer": "adamw_torch_fused (for paged_adamw_8bit)"}
    },
    # A candidate for the plans whose weights stay 4-bit (6 GiB SFT, 10 GiB DPO): bitsandbytes' products with the
    # dequantization inside the compiled layers (finetune.overrides.trace_4bit_products).
    "fast_traced_4bit": {"plan": {"base_weights": TRACED_4BIT}},
    # A candidate for the warm-up: every compiled layer's input requires grad, so they trace 2 graphs, not 4.
    "fast_inputs_require_grad": {"inputs_require_grad": True},
    # AOTAutograd's cache bypassed, as torch does by default, for graphs holding bitsandbytes' 4-bit product.
    "fast_aot_cache_bypassed": {"cache_custom_autograd_functions": False},
    "fast_sdpa": {"plan": {"attention": "sdpa"}},
    # Planned as where no bf16 copy fits: the 4-bit weights, with the batch, checkpointing and offloading that go
    # with them (not only the weights changed on the copy's plan).
    "fast_4bit": {"bf16_copy": False},
    # The copy kept where it costs the whole-step batch (DPO at 24 GiB: 4 x 2 pairs with it, 8 x 1 in 4-bit).
    "fast_bf16_copy": {"bf16_copy": True},
    # PEFT's float32 upcast of the embedding and head
    "fast_float32_embeddings": {"plan": {"embeddings": "as loaded"}},
    # The trainer settings' own choice, which the layout keeps: planned with the inputs on the GPU.
    "fast_checkpoints_on_gpu": {"trainer": {"activation_checkpointing_kwargs": {"offload": False}}},
    # Planned as for a model whose layers attend differently: no runs of documents, so smaller micro-batches.
    "fast_whole_recompute": {"shape": {"uniform_attention": False}},
    "fast_eager": {"plan": {"compiled": False}},
    "fast_walk_modules_each_step": {"walk_modules_each_step": True},
    # A zero budget makes checkpoint_as_needed checkpoint every layer of every batch, as the seed layout does.
    "fast_all_layers_checkpointed": {
        "kwargs": {"activation_checkpointing": True},
        "plan": {"checkpointing": "all layers", "memory_budget_gib": 0.0},
    },
    "eager_4bit_sdpa": {"plan": EAGER_4BIT},
    "fast_effective_batch_32": {"trainer": {"gradient_accumulation_steps": 32}},
    "dpo_fast": {"stage": "dpo"},
    "dpo_bf16_copy": {"stage": "dpo", "bf16_copy": True},
    "dpo_padded": {"stage": "dpo", "plan": {"padding_free": False}},
    "dpo_traced_4bit": {"stage": "dpo", "plan": {"base_weights": TRACED_4BIT}},
    # Each DPO batch checkpointed as if the adapter's dropout ran (as planned before TRL's disable_dropout was
    # counted); the weights, batch and optimizer stay the new plan's, which at 24 GiB are the old plan's too.
    "dpo_dropout_counted": {"stage": "dpo", "plan": {"adapter_dropout": True}},
    "dpo_reference_per_step": {"stage": "dpo", "kwargs": {"precompute_ref_log_probs": False}},
    "dpo_profiled": {"stage": "dpo", "profile": True},
    "dpo_reference_batches": {"stage": "dpo", "reference_batches": (1, 2, 4, 8, 16)},
    "dpo_eager_4bit_sdpa": {"stage": "dpo", "plan": EAGER_4BIT},
}


def run_variants(
    cfg_params: dict,
    work: Path,
    out: Path,
    cache: CachedModel,
    shape,
    steps: int,
    save,
    names: list[str],
    planned_gpu: int,
    adapter: Path | None = None,
) -> dict:
    """The fast layout with one thing changed at a time (`plan` fields, trainer keywords before planning, `kwargs`
    after it); `*_profiled*` runs finetune.training.runs.ProfileSteps over steps 8-11 (or the variant's
    `profile_steps`), writing OUT/profile_NAME/ with benchmarks/idle_gaps.py's report of where the GPU waited. DPO
    variants start from the SFT adapter `adapter`, or else from the one the first SFT variant writes."""
    import torch

    from finetune.layout.speed import installer, plan
    from finetune.model.loading import use_4bit
    from finetune.training.runs import PROFILE_ENV, PROFILE_STACKS_ENV, PROFILE_STEPS_ENV, PROFILED_STEPS

    results = {}
    adapter = adapter or work / "adapter_variants"
    if not adapter.exists() and (work / "adapter_fast").exists():  # the training section's SFT adapter
        adapter = work / "adapter_fast"
    for position, name in enumerate(names):
        torch._dynamo.reset()  # compile each variant afresh: dynamo's guards do not see inductor's options
        variant = VARIANTS[name]
        key = name if name not in results else f"{name}#{names[:position].count(name) + 1}"  # a variant run again
        stage = variant.get("stage", "sft")
        cfg = config_of(cfg_params, **variant.get("config", {}))
        if stage == "dpo":
            cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_adapter=str(adapter)))
        section = cfg.sft if stage == "sft" else cfg.dpo
        trainer = {**section.trainer, **variant.get("trainer", {})}
        requested = variant.get("requested", "fast")
        planned_shape = dataclasses.replace(shape, **variant.get("shape", {}))
        copy = variant.get("bf16_copy")
        fast, chosen = plan(stage, trainer, requested, planned_shape, planned_gpu, use_4bit(cfg.model), bf16_copy=copy)
        chosen = on_this_device(dataclasses.replace(chosen, **variant.get("plan", {})))
        first_profiled, last_profiled = variant.get("profile_steps", PROFILED_STEPS)
        run_steps = last_profiled + 1 if variant.get("profile") else steps
        arguments = {
            "name": f"variant_{name}",
            "stage": stage,
            "cfg": cfg,
            "trainer_kwargs": {**fast, **variant.get("kwargs", {}), "max_steps": run_steps},
            "speed_plan": chosen,
            "install": with_inputs_requiring_grad(installer(chosen, shape), variant.get("inputs_require_grad", False)),
            "cache": cache,
            "warmup": 4,  # the first steps compile: static, then dynamic shapes
            "adapter_out": adapter if stage == "sft" and not adapter.exists() else None,
            "reference_batches": variant.get("reference_batches", ()),
            "walk_modules_each_step": variant.get("walk_modules_each_step", False),
            "warmup_profile": out / f"profile_{name}" / "warmup_cprofile.txt" if variant.get("warmup_profile") else None,
        }
        if variant.get("profile"):
            os.environ[PROFILE_ENV] = str(out / f"profile_{name}")
            os.environ[PROFILE_STACKS_ENV] = "1" if variant.get("python_frames") else "0"
            os.environ[PROFILE_STEPS_ENV] = f"{first_profiled}-{last_profiled}"
        overrides.CACHE_CUSTOM_AUTOGRAD_FUNCTIONS = variant.get("cache_custom_autograd_functions", AOT_CACHE_DEFAULT)
        try:
            before = gpu_state()
            run = train_run(**arguments)
            results[key] = {
                k: run.get(k)
                for k in (
                    "tokens_per_s",
                    "tokens_per_s_training_only",
                    "tokens_per_s_incl_build",
                    "peak_memory_gib",
                    "steady_steps",
                    "compiling_steps_after_warmup",
                    "compiling_seconds_after_warmup",
                    "step_seconds",  # after the warm-up: a slow step shows here, not only in the rate
                    "warmup_step_seconds",
                    "compile_caches_before",
                    "step_tokens",
                    "allocator_retries_per_step",
                    "pinned_blocks_per_step",
                    "pinned_alloc_seconds_per_step",
                    "pinned_growth_steps_after_warmup",
                    "tokens_per_s_without_pinned_growth",
                    "losses",
                    "grad_norms",
                    "reference_pass",
                    "reference_pass_by_batch",
                )
                if k in run
            }
            results[key].update(
                process_id=os.getpid(),  # tests/test_ablation.py checks that each run had its own process
                position_in_process=position,
                gpu_before=before,
                gpu_after=gpu_state(),
            )
        except Exception as error:
            traceback.print_exc()
            results[key] = {"error": f"{type(error).__name__}: {error}"}
            cache.model = None
            reset_memory()
        finally:
            os.environ.pop(PROFILE_ENV, None)
            os.environ.pop(PROFILE_STACKS_ENV, None)
            os.environ.pop(PROFILE_STEPS_ENV, None)
        trace = out / f"profile_{name}" / "trace_rank0.json.gz"
        if trace.is_file():  # where the GPU waited, next to the profile
            (trace.parent / "idle_gaps.txt").write_text(idle_gaps.report(trace))
        save(results)
    return results


def run_generation(cfg_params: dict, work: Path, prompts: int, tiny: bool) -> dict:
    import torch

    from finetune.data.rows import SFT_TRAIN, read_jsonl
    from finetune.evaluation.generation import generate_answers, load_variant, render_prompt

    results = {}
    rows = read_jsonl(Path(cfg_params["paths"]["prepared"]) / SFT_TRAIN)
    adapter = str(work / "adapter_fast")
    for name, speed, batch, count in (
        ("generate_fast", "fast", 512, prompts),
        ("generate_seed", "as_written", 32, 64),
    ):
        generation = {**cfg_params["evaluate"]["generation"], "max_new_tokens": 128, "batch_size": batch}
        generation["speed"] = speed
        cfg = config_of(cfg_params, evaluate__generation=generation)
        reset_memory()
        started = time.perf_counter()
        model, tokenizer = load_variant(cfg.model, adapter, cfg.evaluate.generation.speed)
        load_s = time.perf_counter() - started
        texts = [render_prompt(tokenizer, rows[i % len(rows)]["prompt"]) for i in range(count)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        answers = generate_answers(model, tokenizer, texts, cfg.evaluate.generation)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        new_tokens = sum(answer["new_tokens"] for answer in answers)
        results[name] = {
            "speed": speed,
            "prompts": len(texts),
            "batch_size": batch,
            "max_new_tokens": 128,
            "load_s": round(load_s, 1),
            "generate_s": round(seconds, 2),
            "new_tokens": new_tokens,
            "new_tokens_per_s": round(new_tokens / seconds, 1),
            "peak_memory_gib": peak_gib(),
            "weights": type(model).__name__,
        }
        print(f"[{name}] {json.dumps(results[name])}", flush=True)
        del model
        reset_memory()
    return results


def random_roberta_large(folder: Path, tokenizer_source: Path, tiny: bool) -> Path:
    """roberta-large's shape with random weights, and a word-piece-free tokenizer that BERTScore can use."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.add_special_tokens({"cls_token": "<cls>", "sep_token": "<sep>", "mask_token": "<mask>"})
    shape = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    if tiny:
        shape = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
    config = RobertaConfig(
        vocab_size=max(50265, len(tokenizer)),
        max_position_embeddings=514,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = RobertaModel(config)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run_bertscore(
    work: Path, model_dir: Path, words: list[str], pairs: int, tiny: bool, profile_to: Path | None = None
) -> dict:
    from finetune.evaluation.metrics import bertscore_f1
    from finetune.tools.dry_run import default_section

    folder = random_roberta_large(work / "roberta-large-random", model_dir, tiny)
    layers = 4 if tiny else 17
    rng = random.Random(1)
    predictions = [text_of_tokens(rng, words, lognormal_tokens(rng, 60, 0.5, 5, 250), 1.0) for _ in range(pairs)]
    references = [text_of_tokens(rng, words, lognormal_tokens(rng, 60, 0.5, 5, 250), 1.0) for _ in range(pairs)]
    results = {}
    scores = {}
    for name, dtype in (("bertscore_fp32", "float32"), ("bertscore_fast", "auto")):
        settings = default_section(
            "evaluate.bertscore", model=str(folder), num_layers=layers, batch_size=256, dtype=dtype
        )
        bertscore_f1(predictions[:64], references[:64], settings)  # load and warm up
        started = time.perf_counter()
        scores[name] = bertscore_f1(predictions, references, settings)
        seconds = time.perf_counter() - started
        results[name] = {
            "pairs": pairs,
            "seconds": round(seconds, 2),
            "pairs_per_s": round(pairs / seconds, 1),
            "dtype": dtype,
            "layers": settings.num_layers,
        }
        print(f"[{name}] {json.dumps(results[name])}", flush=True)
    results["max_abs_difference_fast_vs_fp32"] = round(
        max(abs(a - b) for a, b in zip(scores["bertscore_fp32"], scores["bertscore_fast"])), 6
    )
    if profile_to is not None:  # where the time goes, and how batch size moves it
        import cProfile
        import io
        import pstats

        for batch in (64, 1024):
            settings = default_section("evaluate.bertscore", model=str(folder), num_layers=layers, batch_size=batch)
            started = time.perf_counter()
            bertscore_f1(predictions, references, settings)
            results[f"bertscore_fast_batch_{batch}"] = {"pairs_per_s": round(pairs / (time.perf_counter() - started))}
        settings = default_section("evaluate.bertscore", model=str(folder), num_layers=layers, batch_size=256)
        profiler = cProfile.Profile()
        profiler.runcall(bertscore_f1, predictions, references, settings)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        profile_to.write_text(text.getvalue())
        print(text.getvalue(), flush=True)
    return results


# ---------------------------------------------------------------------------------------------- report


def padding_of(trainer: dict, layout: dict | None) -> str:
    if trainer.get("padding_free"):
        return "padding-free"
    if layout and layout.get("padding_free"):  # finetune.layout.speed.pack_padded_batches: TRL pads, the model packs
        return "padding-free (packed in the model)"
    return "padded"


def markdown(result: dict) -> str:
    lines = [
        "# Throughput: seed layout vs `speed: fast` (benchmarks/throughput.py)",
        "",
        f"Device: {result['versions'].get('gpu')} ({result['versions'].get('gpu_memory_gib')} GiB); "
        f"{', '.join(f'{k} {v}' for k, v in result['versions'].items() if k not in ('gpu', 'gpu_memory_gib'))}.",
        f"Date: {result['date']}. Model: {result['model']['shape']} shape, random weights, "
        f"{result['model']['parameters']:,} parameters, 4-bit NF4 for training. Recipe: {SEED_RECIPE} "
        f"(LoRA r{result['lora']['r']} on {', '.join(result['lora']['target_modules'])}).",
        "",
        "| configuration | layout | tokens/s, non-padding (incl. trainer setup) | MFU | peak GiB | steps "
        "| loss first → last |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for key in ("sft_seed", "sft_fast", "sft_low_memory", "dpo_seed", "dpo_fast"):
        run = result.get("training", {}).get(key)
        if not run:
            continue
        t = run["trainer"]
        layout = (
            f"{t['per_device_train_batch_size']} x {t['gradient_accumulation_steps']}, "
            f"{padding_of(t, run['layout'])}, checkpointing "
            f"{run['layout']['checkpointing'] if run['layout'] else t['activation_checkpointing']}"
            + (", ref log-probs precomputed" if t.get("precompute_ref_log_probs") else "")
            + (
                f", compiled layers, {run['layout']['attention']}, base weights {run['layout']['base_weights']}"
                if run["layout"] and run["layout"].get("compiled")
                else ""
            )
            + f", {t.get('optim')}"
            + (f", {t['dataloader_num_workers']} loader workers" if t.get("dataloader_num_workers") else "")
        )
        losses = run["losses"]
        lines.append(
            f"| {key} | {layout} | {run['tokens_per_s']:,.0f} ({run['tokens_per_s_incl_build']:,.0f} incl. "
            f"setup) | {run.get('mfu', 0):.1%} | "
            f"{run['peak_memory_gib']} | {run['steps']} | {losses[0]:.3f} → {losses[-1]:.3f} |"
        )
    lines.append("")
    speedups = result.get("speedups", {})
    if speedups:
        lines.append("Speed-ups in the same run: " + ", ".join(f"{k} {v}x" for k, v in speedups.items()) + ".")
    same = result.get("training", {}).get("same_math")
    if same:
        lines.append(
            f"Same math (SFT seed vs fast, first {same['steps']} optimizer steps, same examples): largest "
            f"relative loss difference {same['max_relative_difference']} (tolerance {same['tolerance']})."
        )
    dpo_fast = result.get("training", {}).get("dpo_fast", {})
    if dpo_fast.get("reference_pass"):
        lines.append(
            f"DPO fast = 1 / (1 / training steps + 1 / reference pass): training steps "
            f"{dpo_fast['tokens_per_s_training_only']:,.0f} tokens/s, TRL's reference pass "
            f"{dpo_fast['reference_pass']['tokens_per_s']:,.0f} tokens/s."
        )
    lines.append(
        "Rates are over the steps after the warm-up (4 steps for the fast layouts, 1 for the seed's, 0 for "
        "low-memory) that compiled no new graph (compiling steps after the warm-up: "
        + ", ".join(
            f"{key} {run['compiling_steps_after_warmup']}"
            for key, run in result.get("training", {}).items()
            if isinstance(run, dict) and "compiling_steps_after_warmup" in run
        )
        + "). The trainers log every `logging_steps` of the recipe, as the stages do; the per-step losses come from "
        "the Trainer's running loss, read after training, so measuring makes no step wait for the GPU."
    )
    for key, run in result.get("variants", {}).items():
        if "error" in run:
            lines.append(f"- variant {key}: {run['error']}")
        else:
            parts = ""
            if run.get("reference_pass"):
                parts = (f" (training steps {run['tokens_per_s_training_only']:,.0f}, reference pass "
                         f"{run['reference_pass']['tokens_per_s']:,.0f})")  # fmt: skip
            caches = run.get("compile_caches_before")
            lines.append(
                f"- variant {key}: {run['tokens_per_s']:,.0f} tokens/s{parts}, peak {run['peak_memory_gib']} GiB"
                + (f"; {describe_compile_caches(caches)}" if caches else "")
            )
    if result.get("carried_over"):
        lines.append(f"- {result['carried_over']}")
    generation = result.get("generation", {})
    for key, run in generation.items():
        lines.append(
            f"- {key}: {run['new_tokens_per_s']:,.0f} new tokens/s ({run['weights']}, {run['prompts']} "
            f"prompts, batch {run['batch_size']}, {run['max_new_tokens']} new tokens max, peak "
            f"{run['peak_memory_gib']} GiB)"
        )
    bert = result.get("bertscore", {})
    for key in ("bertscore_fp32", "bertscore_fast"):
        if key in bert:
            lines.append(
                f"- {key}: {bert[key]['pairs_per_s']:,.0f} pairs/s ({bert[key]['pairs']} pairs, "
                f"{bert[key]['dtype']}, layer {bert[key]['layers']})"
            )
    if "max_abs_difference_fast_vs_fp32" in bert:
        lines.append(f"- BERTScore fast vs fp32: largest difference {bert['max_abs_difference_fast_vs_fp32']}")
    if result.get("errors"):
        lines += ["", "Errors:", *[f"- {k}: {v}" for k, v in result["errors"].items()]]
    return "\n".join(lines) + "\n"


def saved_model_info(model_dir: Path) -> dict:
    """What build_random_model reports that a saved model still tells: its parameter count (counted on the meta
    device, so nothing is loaded) and where it is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {"parameters": model.num_parameters(), "saved_to": str(model_dir), "reused": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or "throughput_out")
    parser.add_argument("--work", default=None)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--sections", default="training,generation,bertscore")
    parser.add_argument("--variants", default=None, help=f"with --sections variants: some of {', '.join(VARIANTS)}")
    parser.add_argument("--reuse-model", action="store_true", help="load the model in --model-dir, do not build one")
    parser.add_argument("--adapter", default=None, help="the SFT adapter DPO variants start from")
    parser.add_argument("--memory-budget-gib", type=float, default=None, help="plan within and cap the GPU at this")
    args = parser.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("throughput: no CUDA device; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or ("/tmp/throughput_tiny" if args.tiny else "/tmp/throughput")).resolve()
    shutil.rmtree(work, ignore_errors=True)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir(args.tiny)

    from finetune.layout.speed import attention_for_varying_shapes, model_shape
    from finetune.model.loading import load_model, load_tokenizer
    from finetune.training import dpo as dpo_training
    from finetune.training import sft as sft_training
    from stages import embedded

    params = benchmark_params(work, model_dir, args.tiny)
    params["embedded"].update({"sft_rows": 300, "preference_rows": 40})
    params_path = work / "params.yaml"
    work.mkdir(parents=True)
    params_path.write_text(json.dumps(params))
    cwd = os.getcwd()
    os.chdir(work)  # DVCLive and the trainers write relative to here; every configured path is absolute anyway
    try:
        embedded.main(str(params_path))
        started = time.perf_counter()
        if args.reuse_model:
            model_info = saved_model_info(model_dir)
        else:
            model_info = build_random_model(
                TINY if args.tiny else MISTRAL_7B, Path(params["paths"]["embedded"]), model_dir, seed=0
            )
        model_info["shape"] = "tiny" if args.tiny else "Mistral-7B-v0.1"
        model_info["build_s"] = round(time.perf_counter() - started, 1)
        cfg = config_of(params)
        tokenizer = load_tokenizer(cfg.model)
        words = corpus_words(Path(params["paths"]["embedded"]))
        steps = TINY_RUN_STEPS if args.tiny else RUN_STEPS
        data = write_instruction_data(
            Path(params["paths"]["prepared"]),
            words,
            tokenizer,
            sft_rows=steps["sft_fast"] * EFFECTIVE_BATCH,
            pairs=steps["dpo_fast"] * EFFECTIVE_BATCH,
            seed=0,
            full_length_rows=steps["sft_low"] * EFFECTIVE_BATCH,
        )
        shape = model_shape(cfg.model, lora_cfg=cfg.lora)
        planned_gpu = planned_gpu_bytes(args.memory_budget_gib)
        attention_for_varying_shapes()  # as finetune.layout.speed.layout does in every training stage
        result = {
            "what": "stages.sft / stages.dpo / finetune.evaluation.generation / finetune.evaluation.metrics "
            "on a random-weight model: the seed "
            "recipe's layout vs finetune.layout.speed's fast and low-memory layouts, in one process",
            "date": time.strftime("%Y-%m-%d"),
            "versions": versions(),
            "model": model_info,
            "shape": dataclasses.asdict(shape),
            "memory_budget_gib": args.memory_budget_gib,  # None: the whole GPU
            "lora": dataclasses.asdict(cfg.lora),
            "data": data,
            "errors": {},
        }

        def save():
            (out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            (out / "throughput.md").write_text(markdown(result), encoding="utf-8")

        sections = args.sections.split(",")
        if "training" in sections:
            cache = CachedModel(load_model)
            # the stages' own trainers, minus reloading 7B weights
            sft_training.load_model = dpo_training.load_model = cache
            try:
                result["training"] = run_training(params, work, cache, shape, args.tiny, steps, planned_gpu)
            except Exception as error:  # keep what was measured; report the rest
                traceback.print_exc()
                result["errors"]["training"] = f"{type(error).__name__}: {error}"
            finally:
                sft_training.load_model = dpo_training.load_model = load_model
                cache.model = None
                reset_memory()
            training = result.get("training", {})
            for key, run in training.items():
                if key.startswith(("sft", "dpo")) and run.get("tokens_per_s"):
                    mean_tokens = (
                        data["sft_tokens"]["mean"]
                        if key.startswith("sft")
                        else data["dpo_prompt_plus_chosen_tokens"]["mean"]
                    )
                    passes = 2 if key.startswith("sft") else 3  # DPO: policy forward + backward, reference forward
                    run["mfu"] = round(
                        run["tokens_per_s"] * flops_per_token(shape, mean_tokens, passes) / H100_BF16_DENSE_FLOPS, 4
                    )
            result["speedups"] = {
                stage: round(training[f"{stage}_fast"]["tokens_per_s"] / training[f"{stage}_seed"]["tokens_per_s"], 2)
                for stage in ("sft", "dpo")
                if training.get(f"{stage}_fast", {}).get("tokens_per_s")
                and training.get(f"{stage}_seed", {}).get("tokens_per_s")
            }
            save()
        if "variants" in sections:
            cache = CachedModel(load_model)
            sft_training.load_model = dpo_training.load_model = cache

            def save_variants(variants):
                result["variants"] = variants
                save()

            try:
                chosen = args.variants.split(",") if args.variants else list(VARIANTS)
                adapter = Path(args.adapter).resolve() if args.adapter else None
                steps = 3 if args.tiny else 24
                run_variants(params, work, out, cache, shape, steps, save_variants, chosen, planned_gpu, adapter)
            finally:
                sft_training.load_model = dpo_training.load_model = load_model
                cache.model = None
                reset_memory()
            print(json.dumps(result["variants"], indent=1), flush=True)
            save()
        if "generation" in sections:
            try:
                result["generation"] = run_generation(params, work, prompts=64 if args.tiny else 2048, tiny=args.tiny)
            except Exception as error:
                traceback.print_exc()
                result["errors"]["generation"] = f"{type(error).__name__}: {error}"
            save()
        if "bertscore" in sections:
            try:
                result["bertscore"] = run_bertscore(
                    work,
                    model_dir,
                    words,
                    pairs=256 if args.tiny else 4096,
                    tiny=args.tiny,
                    profile_to=out / "bertscore_profile.txt" if "bertscore_profile" in sections else None,
                )
            except Exception as error:
                traceback.print_exc()
                result["errors"]["bertscore"] = f"{type(error).__name__}: {error}"
            save()
    finally:
        os.chdir(cwd)
    print(markdown(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
