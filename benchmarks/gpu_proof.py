"""GPU proof: the project's own sft and dpo stages, QLoRA on a Mistral-7B-shaped model with random weights.

Run from the repository root on a CUDA machine with the project installed (`pip install -e .`):

    python benchmarks/gpu_proof.py             # 7B shape, 4-bit NF4, paged_adamw_8bit; into $OUT or ./gpu_proof_out
    python benchmarks/gpu_proof.py --tiny      # the same flow on a tiny model, CPU is fine (a smoke test)

No model hub is needed: a MistralConfig with Mistral-7B-v0.1's shape is initialised at random in bf16 directly on
the GPU and saved with save_pretrained (safetensors), with a BPE tokenizer built by the project's own
finetune.embedded.tiny_model.train_tokenizer on the embedded corpus (its ids stay below the 32000 rows of the
embedding). Then `python -m stages.{embedded,prepare,sft,dpo} PARAMS` run as subprocesses on a params file derived
from params.yaml (model.name_or_path = that folder, load_in_4bit true, paths in a scratch folder, few steps), and the
DVCLive curves they write are summarised in gpu_proof.json and gpu_proof.md.

The random-weight losses say nothing about quality: the proof is that the stages run end to end in 4 bits on a 7B
shape, with finite, moving losses, non-zero gradients, and the memory and throughput they need.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Mistral-7B-v0.1's published shape, as shipped for the recipes' dry run; token ids come from the project tokenizer.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rope_theta", "sliding_window", "rms_norm_eps", "hidden_act",
    "tie_word_embeddings",
)
_PUBLISHED = json.loads((REPO / "recipes" / "architectures" / "mistralai--Mistral-7B-v0.1.json").read_text())
MISTRAL_7B = {key: _PUBLISHED[key] for key in ARCHITECTURE_FIELDS}
TINY = dict(MISTRAL_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096)

TOKENIZER_VOCAB = 2048
REPO_INPUT_PATHS = ("probe_prompts",)  # paths.* keys that name files of the repository, not outputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, 3 steps each: a CPU smoke test of the flow")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_proof_out", help="summary folder ($OUT)")
    parser.add_argument("--work", default=None, help="scratch folder: data, adapters, curves (default /tmp/gpu_proof)")
    parser.add_argument("--model-dir", default=None,
                        help="where the random model is saved (default /dev/shm/mistral-7b-random when it has room)")
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--dpo-steps", type=int, default=None)
    parser.add_argument("--sft-rows", type=int, default=400, help="embedded.sft_rows")
    parser.add_argument("--preference-rows", type=int, default=300, help="embedded.preference_rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-model", action="store_true", help="keep the saved random model afterwards")
    return parser.parse_args(argv)


def default_model_dir(tiny: bool) -> Path:
    name = "mistral-tiny-random" if tiny else "mistral-7b-random"
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 20 * 2**30:
            return shm / name  # RAM-backed: writing and re-reading 14.5 GB is then seconds, not minutes
    except OSError:
        pass
    return Path("/tmp") / name


# ---------------------------------------------------------------------------------------------- params file


def write_params(args, work: Path, model_dir: Path):
    """params.yaml with the model, paths, data size and trainer settings of the proof; validated by load_config."""
    from ruamel.yaml import YAML

    from finetune.core.config import load_config

    yaml = YAML(typ="safe", pure=True)
    params = yaml.load((REPO / "params.yaml").read_text(encoding="utf-8"))
    # Every output into the scratch folder (same relative layout); inputs that ship with the repo stay where they are.
    params["paths"] = {
        key: str(REPO / value) if key in REPO_INPUT_PATHS else str(work / value)
        for key, value in params["paths"].items()
    }
    params["paths"]["base_model"] = str(model_dir)
    params["embedded"].update({"seed": args.seed, "sft_rows": args.sft_rows, "preference_rows": args.preference_rows})
    params["model"].update({"name_or_path": str(model_dir), "revision": None, "trust_remote_code": False,
                            "load_in_4bit": True})
    embedded = Path(params["paths"]["embedded"])
    params["data"]["sft"]["source"] = str(embedded / "dolly.jsonl")
    params["data"]["preferences"]["source"] = str(embedded / "ultrafeedback.jsonl")
    # The seed-000 7B recipe: LoRA r16/alpha32/dropout 0.05 on the attention projections.
    params["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05,
                      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    sft = {k: v for k, v in params["sft"]["trainer"].items() if k != "num_train_epochs"}  # scheduler, warmup
    sft.update({
        "max_length": 1024,
        "max_steps": args.sft_steps,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "learning_rate": 2.0e-4,
        "lr_scheduler_type": "cosine",
        "optim": "paged_adamw_8bit",
        "bf16": True,
        "activation_checkpointing": True,
        "logging_steps": 1,
        "save_steps": 100000,
        "save_total_limit": 1,
        "seed": args.seed,
    })
    params["sft"]["trainer"] = sft
    dpo = {k: v for k, v in params["dpo"]["trainer"].items() if k != "num_train_epochs"}
    dpo.update({
        "beta": 0.1,
        "max_length": 1024,
        "max_steps": args.dpo_steps,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "learning_rate": 5.0e-6,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "optim": "paged_adamw_8bit",
        "bf16": True,
        "activation_checkpointing": True,
        "logging_steps": 1,
        "save_steps": 100000,
        "save_total_limit": 1,
        "seed": args.seed,
    })
    params["dpo"]["trainer"] = dpo
    path = work / "params.gpu_proof.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = YAML(typ="safe", pure=True)
    writer.default_flow_style = False
    with path.open("w", encoding="utf-8") as out:
        writer.dump(params, out)
    return path, load_config(path)  # fail here, not in a stage, if a key is off


# ---------------------------------------------------------------------------------------------- random model


def build_random_model(arch: dict, embedded: Path, model_dir: Path, seed: int) -> dict:
    """A MistralForCausalLM of shape `arch`, random bf16 weights made on the GPU, saved with a project tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from finetune.embedded.files import read_corpus
    from finetune.embedded.tiny_model import train_tokenizer

    started = time.perf_counter()
    texts, _ = read_corpus(embedded)
    tokenizer = train_tokenizer(texts, TOKENIZER_VOCAB)
    assert len(tokenizer) <= arch["vocab_size"], "tokenizer ids must index the embedding"
    tokenizer_s = time.perf_counter() - started

    config = MistralConfig(
        **arch,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,  # as Mistral-7B-v0.1: load_tokenizer pads with unk
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - started
    n_params = model.num_parameters()

    shutil.rmtree(model_dir, ignore_errors=True)
    started = time.perf_counter()
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    save_s = time.perf_counter() - started
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())

    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "parameters": n_params,
        "dtype": str(dtype).replace("torch.", ""),
        "init_device": device,
        "tokenizer_vocab": len(tokenizer),
        "saved_bytes": size,
        "saved_to": str(model_dir),
        "tokenizer_s": round(tokenizer_s, 2),
        "init_s": round(init_s, 2),
        "save_s": round(save_s, 2),
    }


# ---------------------------------------------------------------------------------------------- stages


def run_stage(stage: str, params_path: Path, env: dict, cwd: Path) -> float:
    """`python -m stages.STAGE PARAMS` (the repository on PYTHONPATH); its wall time in seconds. Fails loudly.

    The stages run in the scratch folder, not in the repository: every path in the params file is absolute, and
    DVCLive then finds no DVC repository to attach to. Inside one, Live() asks git for the current commit, which
    fails in a checkout without commits (the device machine's copy of the working tree is one).
    """
    print(f"\n=== stages.{stage} ===", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}", str(params_path)], cwd=cwd, env=env)
    seconds = time.perf_counter() - started
    print(f"=== stages.{stage}: exit {result.returncode} after {seconds:.1f} s ===", flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"stages.{stage} exited with {result.returncode}")
    return seconds


# ---------------------------------------------------------------------------------------------- summary


def read_tsv(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as rows:
        reader = csv.reader(rows, delimiter="\t")
        header = next(reader, None)
        if header is None:
            return []
        return [(int(float(r[0])), float(r[1])) for r in reader if len(r) >= 2]


def curve_summary(metrics_dir: Path) -> dict:
    """Steps, first/last loss, grad norms, tokens/s and peak memory from a stage's DVCLive folder."""
    plots = metrics_dir / "plots" / "metrics"
    final = json.loads((metrics_dir / "metrics.json").read_text(encoding="utf-8"))
    loss = read_tsv(plots / "loss.tsv")
    grad = read_tsv(plots / "grad_norm.tsv")
    peak = read_tsv(plots / "peak_memory_gib.tsv")
    train = final.get("train", {})
    runtime = train.get("runtime")
    tokens = final.get("num_tokens")
    peak_values = [v for _, v in peak] + ([final["peak_memory_gib"]] if "peak_memory_gib" in final else [])
    grads = [v for _, v in grad]
    summary = {
        "steps": final.get("step"),
        "logged_steps": len(loss),
        "first_loss": loss[0][1] if loss else None,
        "last_loss": loss[-1][1] if loss else None,
        "min_loss": min(v for _, v in loss) if loss else None,
        "mean_train_loss": train.get("loss"),
        "all_losses_finite": all(math.isfinite(v) for _, v in loss) if loss else None,
        "grad_norm_first": grads[0] if grads else None,
        "grad_norm_last": grads[-1] if grads else None,
        "grad_norm_min": min(grads) if grads else None,
        "grad_norm_max": max(grads) if grads else None,
        "grad_norm_all_positive": all(g > 0 and math.isfinite(g) for g in grads) if grads else None,
        "num_tokens": tokens,
        "train_runtime_s": runtime,
        "tokens_per_s": round(tokens / runtime, 1) if tokens and runtime else None,
        "tokens_per_optimizer_step": round(tokens / final["step"], 1) if tokens and final.get("step") else None,
        "samples_per_s": train.get("samples_per_second"),
        "steps_per_s": train.get("steps_per_second"),
        "peak_memory_gib": round(max(peak_values), 3) if peak_values else None,
    }
    if "rewards" in final:
        rewards = final["rewards"]
        summary["final"] = {
            "rewards_chosen": rewards.get("chosen"),
            "rewards_rejected": rewards.get("rejected"),
            "rewards_margins": rewards.get("margins"),
            "rewards_accuracies": rewards.get("accuracies"),
        }
        margins = read_tsv(plots / "rewards" / "margins.tsv")
        accuracies = read_tsv(plots / "rewards" / "accuracies.tsv")
        summary["margins_first_last"] = [margins[0][1], margins[-1][1]] if margins else None
        summary["accuracies_mean"] = (sum(v for _, v in accuracies) / len(accuracies)) if accuracies else None
    return summary


def versions() -> dict:
    import importlib.metadata as md

    import torch

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "dvclive",
                 "tokenizers", "huggingface-hub"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found["gpu"] = props.name
        found["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            found["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found["driver"] = None
    else:
        found["gpu"] = None
    return found


def fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(result: dict) -> str:
    v, m, w = result["versions"], result["model"], result["wall_s"]
    sft, dpo = result["sft"], result["dpo"]
    lines = [
        f"# GPU proof: QLoRA SFT -> DPO on a {m['shape']}-shaped Mistral (random weights)",
        "",
        f"{v.get('gpu')} ({v.get('gpu_memory_gib')} GiB), driver {v.get('driver')}, CUDA {v.get('cuda')}; torch "
        f"{v['torch']}, transformers {v['transformers']}, peft {v['peft']}, trl {v['trl']}, bitsandbytes "
        f"{v['bitsandbytes']}, datasets {v['datasets']}, dvclive {v['dvclive']}.",
        f"Model: {m['parameters']:,} parameters, random {m['dtype']} weights made on {m['init_device']}, "
        + ("loaded by the stages in 4-bit NF4 (double quant, bf16 compute); optim paged_adamw_8bit, bf16"
           if v.get("gpu")
           else "loaded unquantized in float32 on the CPU (the stages' CPU fallback); optim adamw_torch")
        + "; LoRA r16/alpha32/dropout 0.05 on q,k,v,o; activation checkpointing.",
        "",
        "| | SFT | DPO |",
        "| --- | --- | --- |",
        f"| optimizer steps | {fmt(sft['steps'])} | {fmt(dpo['steps'])} |",
        "| batch x grad. accumulation | 1 x 4 | 1 x 2 |",
        f"| first / last loss | {fmt(sft['first_loss'])} / {fmt(sft['last_loss'])} | "
        f"{fmt(dpo['first_loss'])} / {fmt(dpo['last_loss'])} |",
        f"| grad norm min / max (all > 0) | {fmt(sft['grad_norm_min'])} / {fmt(sft['grad_norm_max'])} "
        f"({sft['grad_norm_all_positive']}) | {fmt(dpo['grad_norm_min'])} / {fmt(dpo['grad_norm_max'])} "
        f"({dpo['grad_norm_all_positive']}) |",
        f"| tokens (num_tokens) | {fmt(sft['num_tokens'])} | {fmt(dpo['num_tokens'])} |",
        f"| train runtime, s | {fmt(sft['train_runtime_s'])} | {fmt(dpo['train_runtime_s'])} |",
        f"| tokens/s | {fmt(sft['tokens_per_s'])} | {fmt(dpo['tokens_per_s'])} |",
        f"| peak GPU memory, GiB | {fmt(sft['peak_memory_gib'])} | {fmt(dpo['peak_memory_gib'])} |",
        f"| stage wall time, s (load + train + save) | {fmt(w['sft'], 3)} | {fmt(w['dpo'], 3)} |",
    ]
    final = dpo.get("final") or {}
    lines += [
        "",
        f"DPO at the last step: rewards/chosen {fmt(final.get('rewards_chosen'))}, rewards/rejected "
        f"{fmt(final.get('rewards_rejected'))}, rewards/margins {fmt(final.get('rewards_margins'))}, "
        f"rewards/accuracies {fmt(final.get('rewards_accuracies'))}.",
        "",
        f"Wall time, s: embedded {fmt(w['embedded'], 3)}, random model init + save {fmt(w['build_model'], 3)} "
        f"(save {fmt(m['save_s'], 3)}, {m['saved_bytes'] / 2**30:.1f} GiB), prepare {fmt(w['prepare'], 3)}, "
        f"sft {fmt(w['sft'], 3)}, dpo {fmt(w['dpo'], 3)}, total {fmt(w['total'], 3)}.",
        "",
        "Random weights: the losses show the stages train (finite, moving, non-zero gradients), not model quality.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    started_all = time.perf_counter()
    if args.sft_steps is None:
        args.sft_steps = 3 if args.tiny else 30
    if args.dpo_steps is None:
        args.dpo_steps = 3 if args.tiny else 24
    work = Path(args.work or ("/tmp/gpu_proof_tiny" if args.tiny else "/tmp/gpu_proof")).resolve()
    out = Path(args.out).resolve()
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir(args.tiny)
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_proof: no CUDA device; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    params_path, cfg = write_params(args, work, model_dir)
    print(f"gpu_proof: params {params_path}, model {model_dir}, out {out}", flush=True)

    wall = {}
    wall["embedded"] = run_stage("embedded", params_path, env, work)
    print("\n=== random model ===", flush=True)
    started = time.perf_counter()
    model_info = build_random_model(TINY if args.tiny else MISTRAL_7B, Path(cfg.paths.embedded), model_dir,
                                    args.seed)
    wall["build_model"] = time.perf_counter() - started
    model_info["shape"] = "tiny" if args.tiny else "Mistral-7B-v0.1"
    print(f"random model: {json.dumps(model_info)}", flush=True)
    for stage in ("prepare", "sft", "dpo"):
        wall[stage] = run_stage(stage, params_path, env, work)
    wall["total"] = time.perf_counter() - started_all
    wall = {k: round(v, 1) for k, v in wall.items()}

    data_metrics = json.loads(Path(cfg.paths.data_metrics).read_text(encoding="utf-8"))
    result = {
        "what": "the project's stages.sft and stages.dpo (QLoRA) on a "
                + ("tiny" if args.tiny else "Mistral-7B-v0.1") + "-shaped model with random weights",
        "tiny": args.tiny,
        "versions": versions(),
        "model": model_info,
        "data": {name: {k: data_metrics[name].get(k) for k in ("rows_read", "kept", "train", "test")}
                 for name in ("sft", "preferences") if name in data_metrics},
        "settings": {
            "model": {"load_in_4bit": cfg.model.load_in_4bit, "quantization": "nf4, double quant, bf16 compute"},
            "lora": dataclasses.asdict(cfg.lora),
            "sft_trainer": cfg.sft.trainer,
            "dpo_trainer": cfg.dpo.trainer,
            "dpo_max_prompt_length": cfg.dpo.max_prompt_length,
            "embedded_rows": {"sft": cfg.embedded.sft_rows, "preferences": cfg.embedded.preference_rows},
        },
        "sft": curve_summary(Path(cfg.paths.sft_metrics)),
        "dpo": curve_summary(Path(cfg.paths.dpo_metrics)),
        "wall_s": wall,
    }
    (out / "gpu_proof.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_proof.md").write_text(markdown(result), encoding="utf-8")
    for stage, folder in (("sft", cfg.paths.sft_metrics), ("dpo", cfg.paths.dpo_metrics)):
        shutil.copy(Path(folder) / "metrics.json", out / f"{stage}_metrics.json")
    shutil.copy(params_path, out / "params.gpu_proof.yaml")
    if not args.keep_model:
        shutil.rmtree(model_dir, ignore_errors=True)
    print("\n" + markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
