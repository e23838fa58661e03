"""Peer engines on the project's benchmark: TRL 1.16 (with and without Liger) and Unsloth, SFT and DPO, beside the
project's own stage trainers (`project`, `project_dpo`: speed fast, planned within the budget), each engine and GPU
memory budget in a fresh process, measured alike.

    python benchmarks/peers.py --unsloth-site DIR      # CUDA: Mistral-7B shape, every engine, budgets 6,24,48 GiB
    python benchmarks/peers.py --unsloth-site DIR --engines project,unsloth_d0_ckpt,trl_liger --budgets 6,24,48
    python benchmarks/peers.py --engines trl,unsloth_d0 --budgets 24,none --repeats 5
    python benchmarks/peers.py --tiny [--unsloth-site DIR]  # CPU smoke test: tiny model, whole device

Every engine trains on throughput.py's rows (write_instruction_data, seed 0, its fast runs' row counts), its
random-weight model and the seed-000 recipe: NF4 with double quantization, bf16 compute, LoRA r16 / alpha 32 /
dropout 0.05 on the seven projections, 8 examples per optimizer step, max length 1024, constant learning rate,
seed 0, 2 loader workers. The script re-invokes itself (`--one ENGINE --budget GIB`) for each run, in a fixed order
that `--repeats` goes through again; a run capped at a budget that goes out of memory is recorded as a result.
Non-padding tokens are counted by one forward pre-hook for every engine. Reported: steady tokens/s after a 4-step
warm-up (DPO: 1 / (1/training + 1/TRL's reference pass)), tokens/s including trainer setup and compilation, peak
GiB, per-step losses; into OUT/peers.json (every repeat) and OUT/peers.md (min / median / max over repeats, and the
project's median against the best peer's at each budget, beside the 1.5x that issue 24 aims for).

Unsloth 2026.10.9 pins transformers<=5.17, trl<=1.15 and datasets<5, so its runs import from their own folder
(DIR, put first on their PYTHONPATH), which `bash benchmarks/unsloth_site.sh DIR` installs. Without a GPU, Unsloth
trains on its CPU backend (bf16 LoRA, no 4-bit): the --tiny runs check the calls made to it, not its GPU kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from gpu_proof import MISTRAL_7B, TINY, build_random_model, default_model_dir, versions  # noqa: E402
from throughput import (  # noqa: E402
    EFFECTIVE_BATCH,
    MAX_LENGTH,
    RUN_STEPS,
    CachedModel,
    TINY_RUN_STEPS,
    benchmark_params,
    compile_cache_state,
    config_of,
    corpus_words,
    min_median_max,
    on_this_device,
    peak_gib,
    planned_gpu_bytes,
    reset_memory,
    saved_model_info,
    steady_rate,
    step_meter,
    with_reference_pass,
    write_instruction_data,
)


@dataclass(frozen=True)
class Engine:
    library: str  # "project": the stages' trainers, laid out fast; "trl": TRL 1.16's; "unsloth": its patched TRL 1.15
    stage: str  # "sft" or "dpo"
    checkpointing: bool | str = False  # activation checkpointing; Unsloth's "unsloth" offloads activations to the CPU
    liger: bool = False  # TRL's use_liger_kernel
    dropout: float = 0.05  # LoRA dropout: the recipe's; Unsloth's fast path wants 0
    fused_preference_loss: bool = False  # Unsloth's opt-in DPO log-probs from hidden states, never whole logits


ENGINES = {
    "project": Engine("project", "sft"),
    "trl": Engine("trl", "sft"),
    "trl_ckpt": Engine("trl", "sft", checkpointing=True),
    "trl_liger": Engine("trl", "sft", liger=True),
    "unsloth": Engine("unsloth", "sft"),
    "unsloth_ckpt": Engine("unsloth", "sft", checkpointing="unsloth"),
    "unsloth_d0": Engine("unsloth", "sft", dropout=0.0),
    "unsloth_d0_ckpt": Engine("unsloth", "sft", checkpointing="unsloth", dropout=0.0),
    "project_dpo": Engine("project", "dpo"),
    "trl_dpo": Engine("trl", "dpo"),
    "trl_ckpt_dpo": Engine("trl", "dpo", checkpointing=True),
    "trl_liger_dpo": Engine("trl", "dpo", liger=True),
    "unsloth_dpo": Engine("unsloth", "dpo"),
    "unsloth_ckpt_dpo": Engine("unsloth", "dpo", checkpointing="unsloth"),
    "unsloth_d0_dpo": Engine("unsloth", "dpo", dropout=0.0),
    "unsloth_d0_ckpt_dpo": Engine("unsloth", "dpo", checkpointing="unsloth", dropout=0.0),
    "unsloth_d0_ckpt_fused_dpo": Engine(
        "unsloth", "dpo", checkpointing="unsloth", dropout=0.0, fused_preference_loss=True
    ),
}
CPU_ENGINES = ("project", "trl", "trl_ckpt", "project_dpo", "trl_dpo", "unsloth_d0_ckpt", "unsloth_d0_ckpt_dpo")
TARGET_RATIO = 1.5  # issue 24: the project at least 1.5x the best peer that fits each budget
STEPS = {"sft": 32, "dpo": 24}  # as the 2026-12-04 peer run on the H200; DPO's 24 see every pair once
TINY_STEPS = {"sft": 6, "dpo": 3}  # every tiny row once
WARMUP_STEPS = 4  # as throughput.py's fast runs
RECIPE_FILE = "peers_recipe.json"
UNSLOTH_ENV = {"UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1"}  # no calls home from a measured run
VERSION_PACKAGES = ("liger-kernel", "unsloth", "unsloth_zoo", "cut-cross-entropy", "xformers", "flash-attn")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=None, help=f"comma list of {', '.join(ENGINES)} (default: all)")
    parser.add_argument("--budgets", default=None, help="GPU GiB per run, comma list; none = whole GPU (6,24,48)")
    parser.add_argument("--repeats", type=int, default=None, help="passes through the whole order (3; --tiny 1)")
    parser.add_argument("--sft-steps", type=int, default=None, help="optimizer steps (32; --tiny 6)")
    parser.add_argument("--dpo-steps", type=int, default=None, help="optimizer steps (24, every pair once; --tiny 3)")
    parser.add_argument("--unsloth-site", type=Path, default=None, help="folder Unsloth and its pins are installed in")
    parser.add_argument("--tiny", action="store_true", help="tiny model, few steps, the engines a CPU runs")
    parser.add_argument("--out", default=os.environ.get("OUT") or "peers_out")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default /tmp/peers[_tiny])")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--reuse-model", action="store_true", help="use the model in --model-dir, do not build one")
    parser.add_argument(
        "--stop-after-s",
        type=float,
        default=None,
        help="start no run that would end past this many seconds, going by the longest run so far (a lent GPU's "
        "call limit)",
    )
    parser.add_argument("--one", choices=tuple(ENGINES), help=argparse.SUPPRESS)  # a child: one engine, one budget
    parser.add_argument("--budget", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_budget(text: str) -> float | None:
    return None if text == "none" else float(text)


def budget_label(budget_gib: float | None) -> str:
    return "none" if budget_gib is None else f"{budget_gib:g}"


# ---------------------------------------------------------------------------------------------- the parent


def skip_reason(engine: Engine, unsloth_site: Path | None) -> str | None:
    """Why `engine` cannot run on this machine, or None when it can."""
    import torch

    reasons = []
    if engine.liger and not torch.cuda.is_available():
        reasons.append("no CUDA device")
    if engine.liger and importlib.util.find_spec("liger_kernel") is None:
        reasons.append("liger-kernel is not installed")
    if engine.library == "unsloth" and not (unsloth_site and (unsloth_site / "unsloth").is_dir()):
        reasons.append("no Unsloth install (--unsloth-site DIR)")
    return "; ".join(reasons) or None


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def prepare(work: Path, model_dir: Path, tiny: bool, steps: dict, reuse_model: bool) -> dict:
    """throughput.py's scratch set-up: its params, embedded corpus, random model and rows, by the same calls."""
    from finetune.data.rows import PREFERENCES_TRAIN, SFT_TRAIN
    from finetune.model.loading import load_tokenizer
    from stages import embedded

    params = benchmark_params(work, model_dir, tiny)
    params["embedded"].update({"sft_rows": 300, "preference_rows": 40})  # as throughput.py's main: same corpus
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params_path = work / "params.yaml"
    params_path.write_text(json.dumps(params))
    cwd = os.getcwd()
    os.chdir(work)  # the embedded stage writes relative to here; every configured path is absolute
    try:
        embedded.main(str(params_path))
    finally:
        os.chdir(cwd)
    embedded_dir = Path(params["paths"]["embedded"])
    if reuse_model:
        model_info = saved_model_info(model_dir)
    else:
        model_info = build_random_model(TINY if tiny else MISTRAL_7B, embedded_dir, model_dir, seed=0)
    model_info["shape"] = "tiny" if tiny else "Mistral-7B-v0.1"
    cfg = config_of(params)
    prepared = Path(params["paths"]["prepared"])
    # throughput.py's rows for its runs' steps (its low-memory run's long rows come before the DPO pairs from the same
    # random stream): the same counts give the same rows, md5 for md5.
    data_steps = TINY_RUN_STEPS if tiny else RUN_STEPS
    data = write_instruction_data(
        prepared,
        corpus_words(embedded_dir),
        load_tokenizer(cfg.model),
        sft_rows=data_steps["sft_fast"] * EFFECTIVE_BATCH,
        pairs=data_steps["dpo_fast"] * EFFECTIVE_BATCH,
        seed=0,
        full_length_rows=data_steps["sft_low"] * EFFECTIVE_BATCH,
    )
    data["md5"] = {name: md5_of(prepared / name) for name in (SFT_TRAIN, PREFERENCES_TRAIN)}
    recipe = {**recipe_of(cfg, prepared, Path(params["paths"]["checkpoints"]), steps), "params": str(params_path)}
    (work / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
    return {"model": model_info, "data": data, "recipe": recipe}


def recipe_of(cfg, prepared: Path, checkpoints: Path, steps: dict) -> dict:
    """What a run reads of the validated seed-000 config, as JSON: Unsloth's runs cannot validate it themselves
    (their TRL 1.15 lacks TRL 1.16's keywords)."""
    return {
        "model": dataclasses.asdict(cfg.model),
        "lora": dataclasses.asdict(cfg.lora),
        "prepared": str(prepared),
        "checkpoints": str(checkpoints),
        "steps": steps,
        "sft": {key: cfg.sft.trainer[key] for key in ("learning_rate", "logging_steps")},
        "dpo": {key: cfg.dpo.trainer[key] for key in ("learning_rate", "logging_steps", "beta", "loss_type")},
    }


def run_child(name: str, budget_gib: float | None, args, repeat: int) -> dict:
    """`peers.py --one NAME --budget GIB` in a fresh process; what it wrote, or why it wrote nothing."""
    result_path = args.work / "results" / f"{repeat}-{name}-{budget_label(budget_gib)}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--budget", budget_label(budget_gib),
               "--work", str(args.work), "--result", str(result_path)] + (["--tiny"] if args.tiny else [])  # fmt: skip
    env = dict(os.environ)
    if ENGINES[name].library == "unsloth":  # its pinned transformers, trl and datasets shadow the project's
        paths = [str(args.unsloth_site.resolve()), env.get("PYTHONPATH")]
        env.update(UNSLOTH_ENV, PYTHONPATH=os.pathsep.join(path for path in paths if path))
        if ENGINES[name].fused_preference_loss:
            env["UNSLOTH_FUSED_PREFERENCE_LOSS"] = "1"
    started = time.perf_counter()
    exit_code = subprocess.run(command, cwd=args.work, env=env).returncode
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        result = {"error": f"the run exited with {exit_code} and wrote no result"}
    return {**result, "process_s": round(time.perf_counter() - started, 1)}


def run_order(engines: list[str], budgets: list[float | None], repeats: int) -> list[tuple[int, str, float | None]]:
    """The whole order of engines and budgets, then reversed, and so on (ABBA): over two repeats every run sits at the
    same mean position, so a drift of the machine, or a call stopped at its limit, favours no engine."""
    sequence = [(name, budget) for name in engines for budget in budgets]
    return [
        (repeat, name, budget)
        for repeat in range(repeats)
        for name, budget in (sequence[::-1] if repeat % 2 else sequence)
    ]


def save(result: dict, out: Path) -> None:
    (out / "peers.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "peers.md").write_text(markdown(result), encoding="utf-8")


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.one:
        return child_main(args)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("peers: no CUDA device; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    requested = args.engines.split(",") if args.engines else list(CPU_ENGINES if args.tiny else ENGINES)
    if unknown := [name for name in requested if name not in ENGINES]:
        print(f"peers: unknown engines {unknown}; known: {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    budgets = [parse_budget(text) for text in (args.budgets or ("none" if args.tiny else "6,24,48")).split(",")]
    repeats = args.repeats or (1 if args.tiny else 3)
    args.work = (args.work or Path("/tmp/peers_tiny" if args.tiny else "/tmp/peers")).resolve()
    model_dir = (args.model_dir or default_model_dir(args.tiny)).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skipped = {name: reason for name in ENGINES if (reason := skip_reason(ENGINES[name], args.unsloth_site))}
    steps = dict(TINY_STEPS if args.tiny else STEPS)
    steps.update({stage: value for stage, value in (("sft", args.sft_steps), ("dpo", args.dpo_steps)) if value})
    setup = prepare(args.work, model_dir, args.tiny, steps, args.reuse_model)
    result = {
        "what": "peer engines on benchmarks/throughput.py's rows, model and recipe; one process per run",
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        **setup,
        "engines": {name: dataclasses.asdict(engine) for name, engine in ENGINES.items()},
        "skipped": skipped,
        "settings": {"budgets_gib": budgets, "repeats": repeats, "warmup_steps": WARMUP_STEPS, "steps": steps},
        "runs": [],
    }
    save(result, out)  # the set-up and what cannot run here, even if no run follows
    for repeat, name, budget in run_order([n for n in requested if n not in skipped], budgets, repeats):
        longest = max((run["process_s"] for run in result["runs"]), default=0.0)
        if args.stop_after_s is not None and time.monotonic() - started + longest > args.stop_after_s:
            result["stopped_early"] = f"before {name} at {budget_label(budget)} GiB, repeat {repeat} (--stop-after-s)"
            print(f"[peers] stopped {result['stopped_early']}", flush=True)
            save(result, out)
            break
        run = {"repeat": repeat, "engine": name, "budget_gib": budget, **run_child(name, budget, args, repeat)}
        result["runs"].append(run)
        print(f"[peers] {name} at {budget_label(budget)} GiB, repeat {repeat}: "
              f"{run.get('error') or run.get('tokens_per_s')} tokens/s", flush=True)  # fmt: skip
        save(result, out)  # after every run: a later crash or time limit keeps what was measured
    print(markdown(result), flush=True)
    failed = [run for run in result["runs"] if "error" in run and not run["error"].startswith("OOM")]
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- one run (a child)


def child_main(args) -> int:
    """Run one engine at one budget and write its result (an OOM is a result too); exit 1 on any other error."""
    engine = ENGINES[args.one]
    if engine.library == "unsloth":
        import unsloth  # noqa: F401  before transformers, trl and peft, which it patches

    budget_gib = parse_budget(args.budget)
    recipe = json.loads((args.work / RECIPE_FILE).read_text())
    try:
        result = measure(args.one, engine, recipe, budget_gib)
        exit_code = 0
    except Exception as error:
        traceback.print_exc()
        result = {"error": out_of_memory_at(error, budget_gib) or f"{type(error).__name__}: {str(error)[:2000]}"}
        exit_code = 0 if result["error"].startswith("OOM") else 1
    args.result.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return exit_code


def out_of_memory_at(error: BaseException, budget_gib: float | None) -> str | None:
    import torch

    if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()):
        return None
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
    return f"OOM at {budget_label(budget_gib if budget_gib is not None else round(gpu_gib))} GiB"


def measure(name: str, engine: Engine, recipe: dict, budget_gib: float | None) -> dict:
    """Load the 4-bit base model within the budget, build the engine's trainer, train, and measure as throughput.py."""
    from finetune.layout.speed import GIB, gpu_memory_bytes, memory_budget

    allowed = memory_budget(gpu_memory_bytes(), budget_gib)  # before loading: the model counts against the budget
    caches = compile_cache_state()
    reset_memory()
    layout = None
    if engine.library == "project":
        trainer, layout, setup_s = project_trainer(engine, recipe, budget_gib)
    else:
        model = load_base_model(engine, recipe)
        started = time.perf_counter()
        trainer = build_trainer(engine, model, recipe)
        setup_s = time.perf_counter() - started  # LoRA, tokenizing, (DPO) TRL's reference log-probs
    meter = step_meter()
    meter.trainer = trainer
    trainer.add_callback(meter)
    forwards = count_tokens(trainer)
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    step_tokens = tokens_per_step(forwards, len(meter.marks) - 1)
    marks = [(seconds, sum(step_tokens[:i]), compiled) for i, (seconds, _, compiled) in enumerate(meter.marks)]
    losses = meter.losses()
    pinned = meter.pinned_growth_per_step()
    result = {
        "engine": name,
        "process_id": os.getpid(),  # every run its own process
        "settings": dataclasses.asdict(engine),
        "budget_gib": budget_gib,
        "allowed_gib": round(allowed / GIB, 2) if allowed else None,
        "trainer": trainer_summary(trainer),
        "layout": layout,
        "steps": len(step_tokens),
        "tokens_total": sum(step_tokens),
        "trainer_tokens_total": meter.marks[-1][1],  # the trainer's own count (0 in Unsloth's SFT trainer)
        "step_tokens": step_tokens,
        "compile_caches_before": caches,
        "setup_s": round(setup_s, 2),
        "train_wall_s": round(train_s, 2),
        "tokens_per_s_incl_setup": round(sum(step_tokens) / (setup_s + train_s), 1),
        **steady_rate(marks, WARMUP_STEPS if len(marks) > WARMUP_STEPS + 2 else 0, pinned["pinned_blocks_per_step"]),
        "peak_memory_gib": peak_gib(),
        "allocator_retries_per_step": meter.retries_per_step(),
        **pinned,
        "losses": [round(loss, 5) for loss in losses],
        "first_loss": round(losses[0], 5),
        "last_loss": round(losses[-1], 5),
        "versions": {**versions(), **package_versions(VERSION_PACKAGES)},
    }
    if engine.stage == "dpo":
        result.update(with_reference_pass(trainer, result["tokens_per_s"]))
    return result


def count_tokens(trainer) -> list[tuple[int, object]]:
    """(optimizer steps done, non-padding tokens) of every training forward, from a forward pre-hook on the model:
    the attention mask's sum, or the row's length for padding-free rows (position ids, no mask). One count for every
    engine, since Unsloth's SFT trainer leaves TRL's own at 0; the sums stay on the device until training ends."""
    import torch

    forwards = []

    def hook(module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return  # a reference pass, which DPO's rate times apart
        mask = kwargs.get("attention_mask")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        forwards.append((trainer.state.global_step, mask.sum() if mask is not None else input_ids.numel()))

    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    return forwards


def tokens_per_step(forwards: list[tuple[int, object]], steps: int) -> list[int]:
    counts = [0] * steps
    for step, tokens in forwards:
        counts[step] += int(tokens)
    return counts


def trainer_summary(trainer) -> dict:
    """The layout each engine settled on (Unsloth chooses padding-free or padded itself)."""
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "padding_free", "max_length", "optim",
            "gradient_checkpointing",  # the name both transformers versions keep (5.23 mirrors its new name into it)
            "use_liger_kernel", "precompute_ref_log_probs", "learning_rate", "dataloader_num_workers")  # fmt: skip
    summary = {key: getattr(trainer.args, key, None) for key in keys}
    summary["optim"] = getattr(summary["optim"], "value", summary["optim"])  # an enum in TrainingArguments
    summary["attention"] = getattr(trainer.model.config, "_attn_implementation", None)
    return summary


def package_versions(names) -> dict:
    import importlib.metadata as metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


# ---------------------------------------------------------------------------------------------- engines


def project_trainer(engine: Engine, recipe: dict, budget_gib: float | None):
    """The sft or dpo stage's own trainer (finetune.training), laid out by the fast plan within `budget_gib`, its
    4-bit model loaded before the timer as the peers' are; DPO starts from a fresh LoRA adapter, as theirs do.
    Returns (trainer, the plan, setup seconds)."""
    from peft import get_peft_model
    from trl import DPOConfig, SFTConfig

    from finetune.layout.speed import installer, model_shape, plan
    from finetune.model.loading import build_lora_config, load_model, use_4bit
    from finetune.training import dpo as dpo_training
    from finetune.training import sft as sft_training
    from finetune.training.runs import trainer_args

    cfg = config_of(json.loads(Path(recipe["params"]).read_text()))
    cache = CachedModel(load_model)
    model = cache(cfg.model, for_training=True)
    if engine.stage == "dpo":
        adapter = Path(recipe["checkpoints"]) / "project_fresh_adapter"
        fresh = get_peft_model(model, build_lora_config(cfg.lora))
        fresh.save_pretrained(str(adapter))
        cache.release(fresh)
        cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, sft_adapter=str(adapter)))
    sft_training.load_model = dpo_training.load_model = cache  # the stages' trainers on the model loaded above
    shape = model_shape(cfg.model, lora_cfg=cfg.lora)
    section = cfg.sft if engine.stage == "sft" else cfg.dpo
    gpu_bytes = planned_gpu_bytes(budget_gib)
    keywords, chosen = plan(engine.stage, section.trainer, "fast", shape, gpu_bytes, use_4bit(cfg.model))
    chosen = on_this_device(chosen)
    keywords = {**keywords, "max_steps": recipe["steps"][engine.stage]}
    config_class = SFTConfig if engine.stage == "sft" else DPOConfig
    args = trainer_args(config_class, engine.stage, keywords, str(Path(recipe["checkpoints"]) / "project"))
    module = sft_training if engine.stage == "sft" else dpo_training
    started = time.perf_counter()
    trainer = module.build_trainer(cfg, args, resume=False, speed=chosen, install=installer(chosen, shape))
    return trainer, dataclasses.asdict(chosen), time.perf_counter() - started


def load_base_model(engine: Engine, recipe: dict):
    """The quantized base model, before the timed setup: TRL's as transformers loads it (TRL does not call
    prepare_model_for_kbit_training), Unsloth's through FastLanguageModel."""
    import torch

    from finetune.core.config import ModelConfig
    from finetune.model.loading import load_model, use_4bit

    model_cfg = ModelConfig(**recipe["model"])
    if engine.library == "trl":
        return load_model(model_cfg, for_training=False)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=model_cfg.name_or_path,
        max_seq_length=MAX_LENGTH,
        load_in_4bit=use_4bit(model_cfg),  # NF4, double quantization, compute in `dtype`
        dtype=torch.bfloat16 if torch.cuda.is_available() else None,
    )
    return model


def build_trainer(engine: Engine, model, recipe: dict):
    """The engine's SFT or DPO trainer over the recipe's rows, with the project's tokenizer (so every engine reads
    the same tokens) and a fresh LoRA adapter."""
    from finetune.core.config import LoraConfig, ModelConfig
    from finetune.data.rows import PREFERENCES_TRAIN, SFT_TRAIN, load_split
    from finetune.model.loading import build_lora_config, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(**recipe["model"]))
    lora = dataclasses.replace(LoraConfig(**recipe["lora"]), dropout=engine.dropout)
    if engine.library == "unsloth":
        model = unsloth_lora(model, engine, lora)
    if engine.stage == "sft":
        rows = load_split(recipe["prepared"], SFT_TRAIN, columns=("prompt", "completion"))
    else:
        rows = load_split(recipe["prepared"], PREFERENCES_TRAIN, columns=("prompt", "chosen", "rejected"))
    args = training_args(engine, recipe)
    peft_config = build_lora_config(lora) if engine.library == "trl" else None  # Unsloth's LoRA is already on
    from trl import DPOTrainer, SFTTrainer

    if engine.stage == "sft" and engine.library == "trl":
        from finetune.overrides import padding_free_sft_trainer  # rows cut to max_length, as the project's SFT

        return padding_free_sft_trainer(
            lambda: SFTTrainer(
                model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
            ),
            args,
        )
    if engine.stage == "sft":
        return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    return DPOTrainer(
        model=model, ref_model=None, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
    )


def unsloth_lora(model, engine: Engine, lora):
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        use_gradient_checkpointing=engine.checkpointing,
        random_state=0,
        max_seq_length=MAX_LENGTH,
    )


def training_args(engine: Engine, recipe: dict):
    """SFTConfig / DPOConfig: the recipe's learning rate (and DPO beta and losses), 8 examples in one batch."""
    import torch
    from trl import DPOConfig, SFTConfig

    from finetune.layout.speed import FUSED_ADAMW

    cuda = torch.cuda.is_available()
    keywords = {
        **recipe[engine.stage],
        "output_dir": str(Path(recipe["checkpoints"]) / "peers"),
        "max_steps": recipe["steps"][engine.stage],
        "per_device_train_batch_size": EFFECTIVE_BATCH,
        "gradient_accumulation_steps": 1,
        "lr_scheduler_type": "constant",
        "seed": 0,
        "optim": FUSED_ADAMW if cuda else "adamw_torch",  # the project's fast layout's AdamW
        "bf16": cuda,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 2,
        "dataloader_persistent_workers": True,
    }
    if engine.library == "trl":  # Unsloth's runs take checkpointing from its get_peft_model, as its own examples do
        keywords["activation_checkpointing"] = engine.checkpointing
        keywords["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    if engine.liger:
        keywords["use_liger_kernel"] = True
    if engine.stage == "dpo":
        return DPOConfig(**keywords, max_length=MAX_LENGTH, precompute_ref_log_probs=True)
    if engine.library == "trl":
        return SFTConfig(**keywords, padding_free=True, max_length=MAX_LENGTH)
    return SFTConfig(**keywords, max_length=MAX_LENGTH)  # padding_free unset: Unsloth chooses


# ---------------------------------------------------------------------------------------------- report


def table_row(name: str, budget: float | None, runs: list[dict]) -> str:
    """One engine at one budget over its repeats; runs without a rate (OOM, errors) are counted and named."""
    dpo = ENGINES[name].stage == "dpo"
    done = [run for run in runs if run.get("tokens_per_s")]
    failed = sorted({run.get("error", "no rate") for run in runs if not run.get("tokens_per_s")})
    cells = ["-"] * (6 if dpo else 5)
    if done:
        median = statistics.median
        peak = max((run["peak_memory_gib"] for run in done), key=lambda gib: gib or 0)  # None on a CPU
        cells = [
            min_median_max([run["tokens_per_s"] for run in done]),
            f"{median(run['tokens_per_s_incl_setup'] for run in done):,.0f}",
            *(
                [f"{median(run['tokens_per_s_training_only'] for run in done):,.0f} / "
                 f"{median(run['reference_pass']['tokens_per_s'] for run in done):,.0f}"]
                if dpo else []
            ),
            "-" if peak is None else str(peak),
            f"{done[0]['first_loss']:.3f} → {done[0]['last_loss']:.3f}",
        ]  # fmt: skip
    cells.append(f"{len(runs) - len(done)} of {len(runs)}: {'; '.join(failed)}" if failed else "")
    budget_text = "whole GPU" if budget is None else f"{budget:g}"
    return f"| {name} | {describe(ENGINES[name])} | {budget_text} | " + " | ".join(cells) + " |"


def against_peers(runs: list[dict], rate: str = "tokens_per_s") -> list[dict]:
    """Per stage and budget where the project ran: its median `rate`, the best peer's (the highest median among
    the peers with a rate there; an engine that went out of memory does not fit) and the ratio of the two."""
    rates: dict[tuple[str, float | None], list[float]] = {}
    for run in runs:
        if run.get(rate):  # an OOM or failed run has none
            rates.setdefault((run["engine"], run["budget_gib"]), []).append(run[rate])
    medians = {key: statistics.median(rated) for key, rated in rates.items()}
    rows = []
    for (name, budget), project in medians.items():
        if ENGINES[name].library != "project":
            continue
        stage = ENGINES[name].stage
        peers = {
            peer: rate
            for (peer, at), rate in medians.items()
            if at == budget and ENGINES[peer].stage == stage and ENGINES[peer].library != "project"
        }
        best = max(peers, key=peers.get) if peers else None
        ratio = project / peers[best] if best else None
        rows.append({"stage": stage, "budget_gib": budget, "project_engine": name, "project": project,
                     "best_peer": best, "best_peer_rate": peers.get(best), "ratio": ratio})  # fmt: skip
    return rows


def describe(engine: Engine) -> str:
    if engine.library == "project":
        return "the stage's trainer, speed fast (planned within the budget)"
    library = {"trl": "TRL 1.16", "unsloth": "Unsloth (TRL 1.15)"}[engine.library]
    checkpointing = {False: "no ckpt", True: "ckpt", "unsloth": 'ckpt "unsloth" (offloaded)'}[engine.checkpointing]
    padding = "padding-free" if engine.stage == "sft" and engine.library == "trl" else None
    parts = [library, "+ Liger" if engine.liger else None, padding, checkpointing, f"dropout {engine.dropout:g}"]
    parts.append("fused preference loss" if engine.fused_preference_loss else None)
    return ", ".join(part for part in parts if part)


def markdown(result: dict) -> str:
    settings = result["settings"]
    lines = [
        "# Peers on the project's benchmark (benchmarks/peers.py)",
        "",
        f"Date: {result['date']}. Device: {result['versions'].get('gpu') or 'CPU'}. Model: "
        f"{result['model']['shape']} shape, random weights. Rows: benchmarks/throughput.py's (md5 "
        f"{', '.join(f'{k} {v}' for k, v in result['data']['md5'].items())}). Steps: SFT {settings['steps']['sft']}, "
        f"DPO {settings['steps']['dpo']}; rates over the steps after a {settings['warmup_steps']}-step warm-up "
        f"that compiled nothing; {settings['repeats']} repeat(s), each engine and budget in a fresh process.",
        "",
    ]
    if "stopped_early" in result:
        lines += [f"**Stopped early, {result['stopped_early']}: {len(result['runs'])} runs finished.**", ""]
    for stage, title in (("sft", "SFT (non-padding tokens/s)"), ("dpo", "DPO (chosen + rejected tokens/s)")):
        groups: dict[tuple[str, float | None], list[dict]] = {}
        for run in result["runs"]:
            if ENGINES[run["engine"]].stage == stage:
                groups.setdefault((run["engine"], run["budget_gib"]), []).append(run)
        if not groups:
            continue
        dpo_header = " training / reference pass (median) |" if stage == "dpo" else ""
        lines += [
            f"## {title}",
            "",
            f"| engine | settings | budget GiB | tokens/s min / median / max | incl. setup (median) |{dpo_header} "
            "peak GiB | loss first → last | failed |",
            "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if stage == "dpo" else "") + " ---: | --- | --- |",
            *[table_row(name, budget, runs) for (name, budget), runs in groups.items()],
            "",
        ]
    # DPO's headline rate includes the reference pass, so the steps without pinned-pool growth compare SFT only.
    sft_runs = [run for run in result["runs"] if ENGINES[run["engine"]].stage == "sft"]
    for title, rows in (
        (f"The project against the best peer (target: {TARGET_RATIO:g}x)", against_peers(result["runs"])),
        (
            "SFT over the steady steps that created no pinned host block (a long run's state once its host pool "
            "holds what its steps need)",
            against_peers(sft_runs, "tokens_per_s_without_pinned_growth"),
        ),
    ):
        if not rows:
            continue
        lines += [
            f"## {title}",
            "",
            "| stage | budget GiB | project tokens/s (median) | best peer | its tokens/s (median) | ratio |",
            "| --- | ---: | ---: | --- | ---: | ---: |",
        ]
        for row in rows:
            budget_text = "whole GPU" if row["budget_gib"] is None else f"{row['budget_gib']:g}"
            peer = ["none ran", "-", "-"]
            if row["best_peer"]:
                peer = [row["best_peer"], f"{row['best_peer_rate']:,.0f}", f"{row['ratio']:.2f}x"]
            cells = [row["stage"].upper(), budget_text, f"{row['project']:,.0f}", *peer]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if result["skipped"]:
        lines += ["Not run here: " + "; ".join(f"{name} ({why})" for name, why in result["skipped"].items()), ""]
    lines += ["## Versions", "", "- parent: " + versions_text(result["versions"])]
    for library in ("project", "trl", "unsloth"):
        run = next((r for r in result["runs"] if "versions" in r and ENGINES[r["engine"]].library == library), None)
        if run:
            lines.append(f"- {library} runs: " + versions_text(run["versions"]))
    return "\n".join(lines) + "\n"


def versions_text(found: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in found.items() if version is not None)


if __name__ == "__main__":
    sys.exit(main())
