"""Multi-GPU proof: the sft, dpo and generate stages on 1 and 2 GPUs of one machine, run as `dvc repro` runs them.

    python benchmarks/multi_gpu.py            # on a machine with 2+ GPUs: Mistral-7B shape, random weights
    python benchmarks/multi_gpu.py --strategies ddp,fsdp   # 2-GPU runs of each strategy (fsdp: FSDP2 sharding)
    python benchmarks/multi_gpu.py --tiny     # a tiny model; on a CPU one process (a smoke test of the flow)

`python -m stages.sft PARAMS` with `distributed.processes: 1` and then `2` (the stage re-runs itself under
`accelerate launch`), on the same data, seed-000 recipe and `sft.speed: fast`, so both runs take the same optimizer
steps over the same examples (each GPU takes a share of every step: finetune.layout.balance splits it by tokens).
From the DVCLive curves the stage writes at the recipe's logging interval: non-padding tokens/s over the intervals
after the first four steps (TRL's num_tokens, summed over GPUs) and the logged losses; peak memory per GPU is polled
from nvidia-smi; the two adapters are compared weight by weight. Then a kill-and-resume check on 2 GPUs with the last
strategy (resume_on), dpo on 2 GPUs, and generate on 1 and 2 GPUs with greedy decoding, whose answers must be
identical. Writes OUT/multi_gpu.json and OUT/multi_gpu.md (multi_gpu_ddp_fsdp.* for `--strategies ddp,fsdp`).
`--profile` profiles steps 8-11 of each sft run (finetune.training.runs.ProfileSteps; benchmarks/idle_gaps.py reads the
traces) and leaves the logging intervals that hold them out of the rate.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from gpu_proof import MISTRAL_7B, TINY, build_random_model, default_model_dir, versions  # noqa: E402
from throughput import EFFECTIVE_BATCH, benchmark_params, corpus_words, write_instruction_data  # noqa: E402

LOGS = Path(os.environ.get("OUT") or "multi_gpu_out") / "logs"  # each stage's full output


class GpuMemoryPoller:
    """The largest memory.used nvidia-smi reports for each GPU while a stage runs."""

    def __init__(self):
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10,
                ).stdout  # fmt: skip
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.strip().splitlines():
                index, used = (int(part) for part in line.split(","))
                self.peaks[index] = max(self.peaks.get(index, 0), used)
            time.sleep(0.5)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_stage(
    args: list[str], params: dict, params_path: Path, cwd: Path, env: dict, timeout: float | None = None
) -> dict:
    """Runs the stage, its output streamed to LOGS/NAME.log as it goes. After `timeout` seconds the stage is sent
    SIGABRT, on which Python's faulthandler writes every thread's stack to that log: where a stalled run was."""
    params_path.write_text(json.dumps(params))
    command = [sys.executable, "-m", *args, str(params_path)]
    print(f"$ {' '.join(command)}", flush=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{params_path.stem}.log"
    started = time.perf_counter()
    with GpuMemoryPoller() as poller, log_path.open("w") as log:
        stage = subprocess.Popen(
            command, cwd=cwd, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            returncode = stage.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stage.send_signal(signal.SIGABRT)
            stage.wait()
            raise RuntimeError(f"{' '.join(args)} still running after {timeout:.0f} s; stacks in {log_path}")
    seconds = time.perf_counter() - started
    log_text = log_path.read_text()
    tail = log_text[-4000:]
    sharding = [line.removeprefix("fsdp: ") for line in log_text.splitlines() if line.startswith("fsdp: ")]
    if returncode != 0:
        print(tail, flush=True)
        raise RuntimeError(f"{' '.join(args)} exited with {returncode}")
    run = {"wall_s": round(seconds, 1), "gpu_peak_mib": poller.peaks, "log_tail": tail[-800:]}
    if sharding:  # what finetune.training.runs.ReportSharding logged
        run["sharding"] = sharding[0]
    return run


def read_curve(folder: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) rows of a DVCLive curve."""
    path = folder / "plots" / "metrics" / f"{name}.tsv"
    with path.open() as handle:
        return [(int(row["step"]), float(row[name.split("/")[-1]])) for row in csv.DictReader(handle, delimiter="\t")]


def training_summary(metrics_dir: Path, warmup: int = 4, profiled: range = range(0)) -> dict:
    """Logged losses, and tokens/s from the stage's own tokens_per_second curve over the logging intervals that
    start after `warmup` (compiling: the first shape, then dynamic shapes) and hold no `profiled` step (the profiler
    slows them)."""
    losses = sorted(dict(read_curve(metrics_dir, "loss")).items())  # a resumed run logs its replayed steps again
    tokens = dict(read_curve(metrics_dir, "num_tokens"))
    rates = dict(read_curve(metrics_dir, "tokens_per_second"))
    logged = sorted(tokens)
    intervals = [(start, end) for start, end in zip(logged, logged[1:]) if end in rates]  # (start, end] each
    kept = [(a, b) for a, b in intervals if a >= warmup and not any(a < step <= b for step in profiled)]
    kept = kept or intervals[1:] or intervals  # a short smoke run
    seconds = sum((tokens[end] - tokens[start]) / rates[end] for start, end in kept)
    counted = sum(tokens[end] - tokens[start] for start, end in kept)
    return {
        "steps": losses[-1][0],
        "logged_steps": [step for step, _ in losses],
        "losses": [round(value, 5) for _, value in losses],
        "grad_norm_min": min(value for _, value in read_curve(metrics_dir, "grad_norm")),
        "tokens": int(max(tokens.values())),
        "tokens_per_s": round(counted / seconds, 1) if seconds else None,
        "rate_steps": sum(end - start for start, end in kept),
    }


def adapter_difference(first: Path, second: Path) -> dict:
    """Relative differences ||a - b|| / ||a|| between two saved adapters: of all their weights together, and the
    largest and median of single LoRA weights."""
    import torch
    from safetensors.torch import load_file

    a, b = (load_file(str(folder / "adapter_model.safetensors")) for folder in (first, second))
    if a.keys() != b.keys():
        raise ValueError(f"{first} and {second} hold different weights")
    each = sorted(float((a[key].float() - b[key].float()).norm() / a[key].float().norm()) for key in a)
    whole_a, whole_b = (torch.cat([weights[key].float().flatten() for key in sorted(a)]) for weights in (a, b))
    return {
        "all_weights": round(float((whole_a - whole_b).norm() / whole_a.norm()), 5),
        "largest_single": round(each[-1], 5),
        "median_single": round(each[len(each) // 2], 5),
    }


def read_answers(path: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def peaks(by_gpu: dict) -> str:
    return ", ".join(f"GPU {gpu}: {mib:,}" for gpu, mib in by_gpu.items())


def rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}"  # None: too few steps after the warm-up


def markdown(result: dict) -> str:
    sft = result.get("sft", {})
    strategies = result.get("strategies", ["ddp"])
    lines = [f"# Multi-GPU: the stages on 1 and 2 GPUs, 2-GPU strategies {', '.join(strategies)} "
             "(benchmarks/multi_gpu.py)", ""]  # fmt: skip
    v = result["versions"]
    lines.append(f"Device: {v.get('gpu')} x {result.get('gpus')}; torch {v.get('torch')}, transformers "
                 f"{v.get('transformers')}, trl {v.get('trl')}, peft {v.get('peft')}, "
                 f"accelerate {v.get('accelerate')}, "
                 f"bitsandbytes {v.get('bitsandbytes')}. Date {result['date']}. Model {result['model']['shape']} "
                 f"shape, random weights, 4-bit NF4; recipe seed000 with sft.speed fast.")  # fmt: skip
    if result.get("sft_trainer"):
        lines[-1] += f" sft.trainer also set: {json.dumps(result['sft_trainer'])}."
    if any(isinstance(run, dict) and "tokens_per_s" in run for run in sft.values()):
        lines += ["", "| run | GPUs | strategy | examples per optimizer step | non-padding tokens/s | peak memory per "
                  "GPU (MiB, nvidia-smi) | steps | wall s | date |",
                  "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | --- |"]  # fmt: skip
    for key, run in sft.items():
        if isinstance(run, dict) and "tokens_per_s" in run:
            lines.append(f"| sft | {run['gpus']} | {run.get('strategy', '-')} | "
                         f"{run.get('effective_batch', EFFECTIVE_BATCH)} | "
                         f"{rate(run['tokens_per_s'])} | {peaks(run['gpu_peak_mib'])} | {run['steps']} | "
                         f"{run['wall_s']} | {run.get('date', result['date'])} |")  # fmt: skip
    lines.append("")
    for key, run in sft.items():
        if isinstance(run, dict) and "sharding" in run:
            lines.append(f"- sft {key}: {run['sharding']}.")
    for key, scaling in sft.items():
        if key.startswith("scaling"):
            adapters = scaling.get("adapter_difference")
            lines.append(f"- Scaling 1 -> 2 GPUs ({scaling.get('strategy', 'ddp')}) at {scaling['effective_batch']} "
                         f"examples per step: {scaling['scaling']}x. Loss trajectories (same steps, same examples): "
                         f"largest relative difference {scaling['max_relative_loss_difference']}.")  # fmt: skip
            if adapters:
                lines[-1] += (f" Adapters after the last step, relative difference: all weights together "
                              f"{adapters['all_weights']}, single LoRA weights median {adapters['median_single']}, "
                              f"largest {adapters['largest_single']}.")  # fmt: skip
    if "dpo" in result:
        d = result["dpo"]
        lines.append(f"DPO on {d['gpus']} GPUs: {d['steps']} steps, {rate(d['tokens_per_s'])} tokens/s, losses "
                     f"{d['losses'][0]} -> {d['losses'][-1]}, peak {d['gpu_peak_mib']} MiB"
                     + (f"; {d['sharding']}." if "sharding" in d else "."))  # fmt: skip
    if "resume" in result:
        r = result["resume"]
        adapters = r.get("adapter_difference")
        lines.append(f"Resume ({r['strategy']}, {r['gpus']} GPUs): {r['processes_killed']} processes killed after "
                     f"{r['killed_after']}; the rerun logged {r['resumed_from']!r} and ended after {r['steps']} "
                     "steps.")  # fmt: skip
        if adapters:
            lines[-1] += (f" Against an uninterrupted run: largest relative loss difference after the checkpoint "
                          f"{r['max_relative_loss_difference_after_checkpoint']}; adapters, all weights together "
                          f"{adapters['all_weights']}, largest single {adapters['largest_single']}.")  # fmt: skip
    if "generate" in result:
        g = result["generate"]
        lines.append(f"Generation (greedy) on 1 and {g['gpus']} GPUs: {g['answers']} answers, identical: "
                     f"{g['identical']}; wall {g['wall_s_1']} s vs {g['wall_s_n']} s.")  # fmt: skip
    if result.get("notes"):
        lines += ["", *[f"Note: {note}" for note in result["notes"]]]
    if result.get("errors"):
        lines += ["", "Errors:", *[f"- {k}: {v}" for k, v in result["errors"].items()]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or "multi_gpu_out")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--accumulations",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[EFFECTIVE_BATCH],
        help="effective batches (examples per optimizer step) to compare 1 and 2 GPUs at; the seed's is 8",
    )
    parser.add_argument(
        "--strategies",
        type=lambda text: [part for part in text.split(",") if part],
        default=["ddp"],
        help="comma-separated distributed.strategy values to run on 2 GPUs: ddp, fsdp",
    )
    parser.add_argument(
        "--sft-trainer", type=json.loads, default={}, help="JSON: sft.trainer values for these runs (a DDP setting)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile optimizer steps 8-11 of each sft run into OUT/profiles/NAME"
    )
    parser.add_argument("--stage-timeout", type=float, default=None, help="seconds before a stage's stacks are dumped")
    parser.add_argument(
        "--skip", default="", help="comma-separated parts to leave out: dpo, generate, resume, sft_1gpu, sft_2gpu"
    )
    args = parser.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count()
    skip = set(args.skip.split(","))
    one_gpu_only = {"sft_2gpu", "dpo", "generate"} <= skip  # e.g. timing the 1-GPU stage on a 1-GPU machine
    if not args.tiny and gpus < 2 and not one_gpu_only:
        print("multi_gpu: needs 2 GPUs; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    steps = args.steps or (4 if args.tiny else 30)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/multi_gpu_tiny" if args.tiny else "/tmp/multi_gpu").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = default_model_dir(args.tiny)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))  # fmt: skip

    from finetune.data.rows import PREFERENCES_TEST, PREFERENCES_TRAIN, SFT_TEST, SFT_TRAIN, read_jsonl, write_jsonl
    from finetune.model.loading import load_tokenizer
    from finetune.tools.dry_run import validate_params
    from finetune.training.runs import PROFILE_ENV, ProfileSteps
    from stages import embedded

    params = benchmark_params(work, model_dir, args.tiny)
    params["embedded"].update({"sft_rows": 300, "preference_rows": 40})
    params["sft"]["speed"] = params["dpo"]["speed"] = "fast"
    for section in ("sft", "dpo"):
        # The recipe's logging interval, as the stages run; the 1- and 2-GPU losses are compared at each logged step.
        # A smoke run is too short for it: a point per step.
        if args.tiny:
            params[section]["trainer"]["logging_steps"] = 1
        if args.tiny and gpus:  # on GPUs the tiny model trains as the recipe says (bf16 is what FSDP shards with)
            params[section]["trainer"].update(bf16=True, optim="paged_adamw_8bit")
    params["evaluate"]["generation"].update({"max_new_tokens": 64, "batch_size": 64, "speed": "fast"})
    params_path = work / "params.yaml"
    params_path.write_text(json.dumps(params))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        embedded.main(str(params_path))
    finally:
        os.chdir(cwd)
    model_info = build_random_model(TINY if args.tiny else MISTRAL_7B, Path(params["paths"]["embedded"]), model_dir, 0)
    model_info["shape"] = "tiny" if args.tiny else "Mistral-7B-v0.1"
    cfg = validate_params(params)
    prepared = Path(cfg.paths.prepared)
    write_instruction_data(prepared, corpus_words(Path(params["paths"]["embedded"])), load_tokenizer(cfg.model),
                           sft_rows=steps * max(args.accumulations), pairs=8 * EFFECTIVE_BATCH, seed=0,
                           full_length_rows=0)  # fmt: skip
    write_jsonl(prepared / SFT_TEST, read_jsonl(prepared / SFT_TRAIN)[:96])
    write_jsonl(prepared / PREFERENCES_TEST, read_jsonl(prepared / PREFERENCES_TRAIN)[:16])

    result = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "gpus": max(gpus, 1),
              "strategies": args.strategies, "model": model_info, "errors": {}}  # fmt: skip
    if args.sft_trainer:
        result["sft_trainer"] = args.sft_trainer
    results_name = "_".join(["multi_gpu"] + ([] if args.strategies == ["ddp"] else args.strategies))

    def save():
        (out / f"{results_name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{results_name}.md").write_text(markdown(result))

    def variant(processes: int, name: str, strategy: str = "ddp", **sections) -> dict:
        changed = json.loads(json.dumps(params))
        changed["distributed"]["processes"] = processes
        changed["distributed"]["strategy"] = strategy
        changed["paths"]["sft_metrics"] = str(work / "metrics" / f"sft_{name}")
        changed["paths"]["sft_adapter"] = str(work / "models" / f"sft_{name}")
        for round_ in changed.get("self_rewarding", {}).get("rounds", {}).values():  # the chain starts at SFT
            if round_["start"] == params["paths"]["sft_adapter"]:
                round_["start"] = changed["paths"]["sft_adapter"]
        changed["paths"]["generations"] = str(work / "generations" / name)
        for key, value in sections.items():
            section, field = key.split("__")
            changed[section][field] = value
        return changed

    runs = [(1, "ddp")] if "sft_1gpu" not in skip or gpus < 2 else []
    if gpus >= 2 and "sft_2gpu" not in skip:
        runs += [(2, strategy) for strategy in args.strategies]

    def run_name(processes: int, strategy: str) -> str:
        return f"{processes}gpu" + ("" if strategy == "ddp" else f"_{strategy}")

    result["sft"] = {}
    for accumulation in args.accumulations:
        trainer = {**params["sft"]["trainer"], "max_steps": steps, "gradient_accumulation_steps": accumulation,
                   **args.sft_trainer}  # fmt: skip
        suffix = "" if accumulation == EFFECTIVE_BATCH else f"_batch{accumulation}"
        try:
            for processes, strategy in runs:
                name = run_name(processes, strategy) + suffix
                run_params = variant(processes, name, strategy, sft__trainer=trainer)
                profiler = ProfileSteps(out / "profiles" / name) if args.profile else None
                run_env = {**env, PROFILE_ENV: str(profiler.folder)} if profiler else env
                run = run_stage(["stages.sft"], run_params, work / f"params_sft_{name}.yaml", work, run_env,
                                timeout=args.stage_timeout)  # fmt: skip
                profiled = range(profiler.first, profiler.first + profiler.count) if profiler else range(0)
                run.update(training_summary(Path(run_params["paths"]["sft_metrics"]), profiled=profiled),
                           gpus=processes, strategy=strategy, effective_batch=accumulation)  # fmt: skip
                result["sft"][name] = run
                print(f"[sft {name}] {json.dumps({k: run[k] for k in ('tokens_per_s', 'gpu_peak_mib', 'steps')})}",
                      flush=True)  # fmt: skip
                save()
            for processes, strategy in runs[1:] if runs and runs[0][0] == 1 else []:
                name = run_name(processes, strategy) + suffix
                one, two = result["sft"][f"1gpu{suffix}"], result["sft"][name]
                pairs = list(zip(one["losses"], two["losses"]))
                result["sft"]["scaling" + name.removeprefix(f"{processes}gpu")] = {
                    "strategy": strategy,
                    "effective_batch": accumulation,
                    "scaling": round(two["tokens_per_s"] / one["tokens_per_s"], 2),
                    "max_relative_loss_difference": round(max(abs(a - b) / abs(a) for a, b in pairs), 5),
                    "adapter_difference": adapter_difference(
                        work / "models" / f"sft_1gpu{suffix}", work / "models" / f"sft_{name}"
                    ),
                }
        except Exception as error:
            result["errors"][f"sft_batch{accumulation}"] = f"{type(error).__name__}: {error}"
        save()

    if "resume" not in skip:
        resume_on(2 if gpus >= 2 else 1, args.strategies[-1], variant, work, params, env, result, save)
        save()
    n, strategy = runs[-1] if runs else (1, "ddp")
    if "dpo" not in skip:
        dpo_on(n, strategy, run_name(n, strategy), variant, work, params, env, result)
        save()
    if "generate" not in skip:
        generate_on(n, run_name(n, strategy), variant, work, env, result)
        save()
    if not args.tiny:
        shutil.rmtree(model_dir, ignore_errors=True)
    print(markdown(result), flush=True)
    return 1 if result["errors"] else 0


def dpo_on(n: int, strategy: str, sft_run: str, variant, work: Path, params: dict, env: dict, result: dict) -> None:
    """stages.dpo on n GPUs with `strategy`, from the adapter of the SFT run `sft_run`."""
    try:
        base = variant(n, sft_run, strategy)
        base["paths"]["dpo_metrics"] = str(work / "metrics" / f"dpo_{n}gpu")
        base["paths"]["dpo_adapter"] = str(work / "models" / f"dpo_{n}gpu")
        base["dpo"]["trainer"] = {**params["dpo"]["trainer"], "max_steps": 10}
        run = run_stage(["stages.dpo"], base, work / "params_dpo.yaml", work, env)
        run.update(training_summary(Path(base["paths"]["dpo_metrics"])), gpus=n, strategy=strategy)
        result["dpo"] = run
    except Exception as error:
        result["errors"]["dpo"] = f"{type(error).__name__}: {error}"


def resume_on(n: int, strategy: str, variant, work: Path, params: dict, env: dict, result: dict, save) -> None:
    """stages.sft on n GPUs with `strategy`, killed once it has saved a checkpoint, then run again as `dvc repro`
    would rerun it: it must resume from that checkpoint and end where an uninterrupted run ends (the same losses
    after the checkpoint, the same adapter)."""
    save_steps, steps = 3, 8
    trainer = {**params["sft"]["trainer"], "max_steps": steps, "save_steps": save_steps, "logging_steps": 1}
    try:
        runs = {}
        for name in ("resumed", "uninterrupted"):
            run_params = variant(n, f"{strategy}_{name}", strategy, sft__trainer=trainer)
            run_params["paths"]["checkpoints"] = str(work / "checkpoints" / name)
            params_path = work / f"params_sft_{strategy}_{name}.yaml"
            if name == "resumed":
                killed = run_until_checkpoint(run_params, params_path, work, env, save_steps)
            run = run_stage(["stages.sft"], run_params, params_path, work, env)
            run.update(training_summary(Path(run_params["paths"]["sft_metrics"]), warmup=0))
            runs[name] = run
            if name == "resumed":
                log = (LOGS / f"{params_path.stem}.log").read_text()
                resumed_from = re.findall(r"resuming from \S+?checkpoint-\d+", log)  # each process prints it
                result["resume"] = {"gpus": n, "strategy": strategy, **killed, "steps": run["steps"],
                                    "resumed_from": resumed_from[0] if resumed_from else None,
                                    "losses_resumed": run["losses"]}  # fmt: skip
                save()
        after = slice(save_steps, steps)
        pairs = list(zip(runs["resumed"]["losses"][after], runs["uninterrupted"]["losses"][after]))
        result["resume"].update(
            losses_uninterrupted=runs["uninterrupted"]["losses"],
            max_relative_loss_difference_after_checkpoint=round(max(abs(a - b) / abs(b) for a, b in pairs), 5),
            adapter_difference=adapter_difference(
                work / "models" / f"sft_{strategy}_resumed", work / "models" / f"sft_{strategy}_uninterrupted"
            ),
        )
    except Exception as error:
        result["errors"]["resume"] = f"{type(error).__name__}: {error}"


def run_until_checkpoint(params: dict, params_path: Path, cwd: Path, env: dict, save_steps: int) -> dict:
    """Start stages.sft and kill it with every process it started (the launcher and each GPU's worker, which
    torch's launcher starts in sessions of their own), as a crash or a pre-empted machine would, as soon as the
    Trainer has finished writing its first checkpoint. Returns that checkpoint and how many processes died."""
    import psutil

    params_path.write_text(json.dumps(params))
    done = Path(params["paths"]["checkpoints"]) / "sft" / f"checkpoint-{save_steps}" / "trainer_state.json"
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{params_path.stem}_killed.log").open("w") as log:
        stage = subprocess.Popen([sys.executable, "-m", "stages.sft", str(params_path)], cwd=cwd, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        while not done.is_file():
            if stage.poll() is not None:
                raise RuntimeError(f"stages.sft ended (exit {stage.returncode}) before saving {done.parent.name}")
            time.sleep(0.2)
        processes = [psutil.Process(stage.pid), *psutil.Process(stage.pid).children(recursive=True)]
        for process in processes:
            process.kill()
        psutil.wait_procs(processes, timeout=60)
    return {"killed_after": done.parent.name, "processes_killed": len(processes)}


def generate_on(n: int, sft_run: str, variant, work: Path, env: dict, result: dict) -> None:
    """stages.generate sft on 1 and n GPUs, from the adapter of the SFT run `sft_run`: greedy answers must be
    identical."""
    try:
        walls, answers = {}, {}
        for processes in sorted({1, n}):
            run_params = variant(processes, sft_run)  # one SFT adapter, generated on 1 and n GPUs
            run_params["paths"]["generations"] = str(work / "generations" / f"{processes}gpu")
            run = run_stage(["stages.generate", "sft"], run_params, work / f"params_gen_{processes}.yaml", work, env)
            walls[processes] = run["wall_s"]
            answers[processes] = read_answers(Path(run_params["paths"]["generations"]) / "sft.jsonl")
        result["generate"] = {"gpus": n, "answers": len(answers[1]), "identical": answers[1] == answers[n],
                              "wall_s_1": walls[1], "wall_s_n": walls[n]}  # fmt: skip
    except Exception as error:
        result["errors"]["generate"] = f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())
