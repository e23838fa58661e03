"""Lever ablation of the fast training layout: every lever of finetune.layout.speed measured ON and OFF, each run in
a fresh process, with a keep / delete verdict per lever.

    python benchmarks/ablation.py                                # one CUDA GPU: every lever, 3 repeats
    python benchmarks/ablation.py --levers compiled,flex_attention --repeats 5
    python benchmarks/ablation.py --cold-cache                   # every process starts with an empty inductor cache
    python benchmarks/ablation.py --tiny --out /tmp/ablation     # CPU smoke test of the flow; verdicts mean nothing
    python benchmarks/ablation.py --summarise OUT/ablation.json   # verdicts from the runs a stopped ablation saved
    python benchmarks/ablation.py --resume SAVED/ablation.json --out OUT   # its missing runs, on the same GPU kind
    python benchmarks/ablation.py --stop-after-s 540 ...         # inside a lent GPU's 10-minute call; then --resume

A run is `benchmarks/throughput.py --sections variants --variants NAME` in its own process, on one model built once;
repeats alternate ON, OFF / OFF, ON (ABBA). Results: OUT/ablation.json (every run) and OUT/ablation.md (verdicts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from gpu_proof import default_model_dir  # noqa: E402
from throughput import VARIANTS, min_median_max  # noqa: E402

MIN_GAIN = 0.03  # what a lever must buy beyond the runs' own spread to be worth its code
CHILD_TIMEOUT_S = 3600  # a 7B run loads, compiles and trains in minutes: an hour means it hung


@dataclass(frozen=True)
class Lever:
    what: str
    on: str  # the throughput.VARIANTS run with the lever
    off: str  # the same run without it
    judged_on: str = "rates"  # or "rates_incl_build": a lever for the warm-up, which the steady rates leave out


LEVERS = {
    "bf16_weights": Lever("bf16 copy of the 4-bit weights", "fast", "fast_4bit"),
    "bf16_embeddings": Lever("frozen embedding and head held in bf16", "fast", "fast_float32_embeddings"),
    "offloaded_checkpoints": Lever(
        "checkpointed layers' inputs in host memory (planned where the 4-bit weights stay 4-bit: a small budget)",
        "fast",
        "fast_checkpoints_on_gpu",
    ),
    "document_runs": Lever(
        "a batch too long to recompute whole recomputed in runs of documents (planned at small budgets: whole-step "
        "batches instead of accumulated micro-batches)",
        "fast",
        "fast_whole_recompute",
    ),
    "compiled": Lever("compiled decoder layers", "fast", "fast_eager"),
    "traced_4bit": Lever(
        "a candidate: bitsandbytes' 4-bit products dequantized inside the compiled layers (ON), not by its own kernels"
        " (the fast layout); measure at 6 GiB, where the weights stay 4-bit",
        "fast_traced_4bit",
        "fast",
    ),
    "dpo_traced_4bit": Lever(
        "the same candidate for DPO; measure at 10 GiB, where the weights stay 4-bit", "dpo_traced_4bit", "dpo_fast"
    ),
    "inputs_require_grad": Lever(
        "a candidate for the warm-up: the first layer's input requires grad as the others' do, so the compiled layers"
        " trace half as many graphs (ON), for one more input gradient a step",
        "fast_inputs_require_grad",
        "fast",
        judged_on="rates_incl_build",
    ),
    "aot_cache_custom_functions": Lever(
        "AOTAutograd's cache for graphs holding bitsandbytes' 4-bit product (a custom autograd function); measure at "
        "6 GiB, where the weights stay 4-bit",
        "fast",
        "fast_aot_cache_bypassed",
        judged_on="rates_incl_build",
    ),
    "flex_attention": Lever("flex attention", "fast", "fast_sdpa"),
    "fused_adamw": Lever("fused AdamW instead of the written paged_adamw_8bit", "fast", "fast_paged_adamw_8bit"),
    "loader_workers": Lever("batches collated in loader worker processes", "fast", "fast_loader_in_process"),
    "walk_modules_once": Lever("WalkModulesOnce", "fast", "fast_walk_modules_each_step"),
    "selective_checkpointing": Lever(
        "checkpointing only the layers a batch needs", "fast", "fast_all_layers_checkpointed"
    ),
    "fast_layout": Lever(
        "the fast layout instead of the seeds' (at a small --memory-budget-gib: batch 1)", "fast", "low_memory"
    ),
    "dpo_padding_free": Lever("DPO pairs packed padding-free", "dpo_fast", "dpo_padded"),
    "dpo_without_dropout": Lever(
        "DPO's batches checkpointed for activations without the adapter's dropout, which TRL's disable_dropout zeroes "
        "(measure at 24 GiB, where the rest of the plan is the same)",
        "dpo_fast",
        "dpo_dropout_counted",
    ),
    "dpo_precomputed_reference": Lever("DPO reference log-probs precomputed", "dpo_fast", "dpo_reference_per_step"),
}
NOT_MEASURED = {"token_balanced_shares": "needs 2 GPUs, not measured on one"}
TINY_LEVERS = ("compiled", "dpo_padding_free")  # one lever of each stage: the smoke test covers both
PREPARED_ROWS = "data/prepared"  # under a run's work folder (params.yaml paths.prepared)


@dataclass(frozen=True)
class Settings:
    work: Path
    out: Path
    model_dir: Path
    tiny: bool
    cold_cache: bool
    budget_gib: float | None  # every run plans within and is capped at this much GPU memory; None: the whole GPU

    @property
    def inductor_cache(self) -> Path:
        return self.work / "inductor_cache"

    @property
    def adapter(self) -> Path:
        return self.work / "prepare" / "work" / "adapter_variants"  # where the prepare run's SFT variant saves it


# ---------------------------------------------------------------------------------------------- pure rules


def stage_of(lever: Lever) -> str:
    return VARIANTS[lever.on].get("stage", "sft")


def run_order(levers: list[str], repeats: int) -> list[tuple[str, int]]:
    """(variant, repeat) in running order: each variant once per repeat (levers sharing an ON variant share its
    run), each lever's ON before its OFF, and every odd repeat reversed, so that over two repeats all variants sit
    at the same mean position (ABBA) and a drift over time favours none."""
    sequence = list(dict.fromkeys(variant for name in levers for variant in (LEVERS[name].on, LEVERS[name].off)))
    return [(variant, repeat) for repeat in range(repeats) for variant in (sequence[::-1] if repeat % 2 else sequence)]


def pending(order: list[tuple[str, int]], runs: list[dict]) -> list[tuple[int, tuple[str, int]]]:
    """(position, (variant, repeat)) of the running order that no saved run measured: a run a stop cut short saved
    nothing, so it runs again."""
    done = {(run["variant"], run["repeat"]) for run in runs if run["role"] == "measured"}
    return [(position, step) for position, step in enumerate(order) if step not in done]


def relative_spread(rates: list[float]) -> float:
    return (max(rates) - min(rates)) / statistics.median(rates)


def verdict(on_rates: list[float | None], off_rates: list[float | None]) -> dict:
    """The house rule: a lever stays if its median ON rate beats the median OFF rate by MIN_GAIN more than the
    larger relative spread of the two sides. A side with no runs, or a run with no rate, gives "error"."""
    if not on_rates or not off_rates or not all(on_rates) or not all(off_rates):
        return {"verdict": "error"}
    gain = statistics.median(on_rates) / statistics.median(off_rates) - 1
    spread = max(relative_spread(on_rates), relative_spread(off_rates))
    return {
        "gain": gain,
        "spread": spread,
        "verdict": "keep" if gain >= MIN_GAIN + spread else "delete",
        "off_faster": gain < 0,
    }


# ---------------------------------------------------------------------------------------------- one run


def child_environment(cache: Path) -> dict:
    environment = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(cache),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }
    environment.pop("TRITON_CACHE_DIR", None)  # triton's kernels then live in the inductor cache and go with it
    return environment


def rows_digest(work: Path) -> str | None:
    """One hash of the prepared rows a run trained on (finetune.training.resume.digest): equal digests, equal rows."""
    from finetune.training.resume import digest

    prepared = work / PREPARED_ROWS
    return digest(prepared) if prepared.is_dir() else None


def child_command(settings: Settings, variant: str, run_dir: Path, prepare: bool) -> list[str]:
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--sections", "variants", "--variants", variant]
    command += ["--out", str(run_dir / "out"), "--work", str(run_dir / "work"), "--model-dir", str(settings.model_dir)]
    if not prepare:  # the prepare run builds the model and saves the adapter the others start from
        command += ["--reuse-model", "--adapter", str(settings.adapter)]
    if settings.budget_gib is not None:
        command += ["--memory-budget-gib", str(settings.budget_gib)]
    return command + (["--tiny"] if settings.tiny else [])


def outcome(exit_status: int | None, result_file: Path, variant: str) -> dict:
    """The variant's entry of the child's throughput.json, or the reason there is none."""
    if exit_status is None:
        return {"error": f"no result within {CHILD_TIMEOUT_S} s"}
    if not result_file.is_file():
        return {"error": f"exit status {exit_status}, no throughput.json"}
    variants = json.loads(result_file.read_text()).get("variants", {})
    return variants.get(variant) or {"error": f"exit status {exit_status}, no result"}


def run_process(settings: Settings, variant: str, label: str, prepare: bool = False) -> dict:
    """One throughput.py process running `variant`; its result, with its log in OUT/logs/LABEL.log."""
    run_dir = settings.work / label
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cache = settings.inductor_cache
    if settings.cold_cache:  # what a first `dvc repro` on a fresh machine meets
        shutil.rmtree(cache, ignore_errors=True)
    log = settings.out / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"ablation: {label} ({variant}) ...", flush=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        try:
            code = subprocess.run(
                child_command(settings, variant, run_dir, prepare),
                cwd=REPO,
                env=child_environment(cache),
                stdout=stream,
                stderr=subprocess.STDOUT,
                timeout=CHILD_TIMEOUT_S,
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    record = {
        "variant": variant,
        "label": label,
        "exit_status": code,
        "process_wall_s": round(time.perf_counter() - started, 1),
        "rows_digest": rows_digest(run_dir / "work"),
        "log": str(log),
        **outcome(code, run_dir / "out" / "throughput.json", variant),
    }
    if not prepare:  # its data are regenerated from seed 0 by every run; the prepare run's adapter is still needed
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"ablation: {label}: {record.get('tokens_per_s', record.get('error'))}", flush=True)
    return record


# ---------------------------------------------------------------------------------------------- summary


def side(runs: list[dict], variant: str) -> dict:
    chosen = [run for run in runs if run["variant"] == variant]
    peaks = [run["peak_memory_gib"] for run in chosen if run.get("peak_memory_gib") is not None]
    return {
        "rates": [run.get("tokens_per_s") for run in chosen],
        "rates_incl_build": [run.get("tokens_per_s_incl_build") for run in chosen],
        "peak_gib": max(peaks) if peaks else None,
    }


def summarise(levers: list[str], measured: list[dict]) -> list[dict]:
    summaries = []
    for name in levers:
        lever = LEVERS[name]
        on, off = side(measured, lever.on), side(measured, lever.off)
        summaries.append(
            {
                "lever": name,
                "what": lever.what,
                "stage": stage_of(lever),
                "on": lever.on,
                "off": lever.off,
                "on_side": on,
                "off_side": off,
                "judged_on": lever.judged_on,
                **verdict(on[lever.judged_on], off[lever.judged_on]),
            }
        )
    return summaries


def peak_text(gib: float | None) -> str:
    return "–" if gib is None else f"{gib:.2f}"


def verdict_text(summary: dict) -> str:
    judged = " (on the rates incl. build)" if summary.get("judged_on") == "rates_incl_build" else ""
    if summary["verdict"] == "delete" and summary["off_faster"]:
        return f"**delete** (OFF is faster){judged}"
    return f"**{summary['verdict']}**{judged}"


def lever_row(summary: dict) -> str:
    on, off = summary["on_side"], summary["off_side"]
    judged = summary["verdict"] != "error"
    cells = [
        f"{summary['what']} (`{summary['on']}` vs `{summary['off']}`)",
        summary["stage"],
        min_median_max(on["rates"]),
        min_median_max(off["rates"]),
        f"{peak_text(on['peak_gib'])} / {peak_text(off['peak_gib'])}",
        f"{summary['gain']:+.1%}" if judged else "–",
        f"{summary['spread']:.1%}" if judged else "–",
        verdict_text(summary),
        min_median_max(on["rates_incl_build"]),
        min_median_max(off["rates_incl_build"]),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict) -> str:
    versions = result["versions"]
    device = versions.get("gpu") or "CPU"
    lines = ["# Lever ablation of `speed: fast` (benchmarks/ablation.py)", ""]
    if result["tiny"]:
        lines += [f"**Smoke run on {device} with the tiny model: the verdicts mean nothing.**", ""]
    if result["cold_cache"]:
        cache = "emptied before every process (--cold-cache)"
    elif result.get("warm_up", True):
        cache = "warm (filled first by one unmeasured run of each variant)"
    else:
        cache = "filled by the measured runs themselves (--no-warm-up: a variant's first run compiles it)"
    budget = f"{result['memory_budget_gib']:g} GiB (--memory-budget-gib)" if result["memory_budget_gib"] else "all"
    lines += [
        f"Date: {result['date']}. Device: {device} ({versions.get('gpu_memory_gib')} GiB); "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("gpu", "gpu_memory_gib"))
        + ".",
        f"Each run is one fresh process (`benchmarks/throughput.py --sections variants`, {result['steps']} "
        f"optimizer steps), {result['repeats']} repeat(s) per variant in ABBA order; inductor cache {cache}; "
        f"GPU memory: {budget}.",
        f"Verdict: gain = median ON / median OFF − 1; spread = (max − min) / median, the larger side's; keep if "
        f"gain ≥ {MIN_GAIN:.0%} + spread. Rates are steady-state non-padding tokens/s; the last two columns "
        "include building the trainer and compiling. Peak GiB is the highest of a side's runs.",
        "",
        "| lever | stage | ON tokens/s min / med / max | OFF tokens/s min / med / max | peak GiB ON / OFF | gain "
        "| spread | verdict | ON incl. build min / med / max | OFF incl. build min / med / max |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        *[lever_row(summary) for summary in result["levers"]],
        *[f"| {name} | sft | – | – | – | – | – | {reason} | – | – |" for name, reason in NOT_MEASURED.items()],
        "",
        "Same rows in every run: " + ("yes" if result["same_rows"] else "**no**") + f". Order: {result['order']}.",
    ]
    if result.get("calls", 1) > 1:
        lines += [f"Runs from {result['calls']} calls on one GPU kind (--resume), each with its own prepare run."]
    planned = len(result["order"].split(", "))
    if result.get("measured_runs", planned) < planned:
        lines += [f"**Stopped early: {result['measured_runs']} of the {planned} measured runs finished.**"]
    failed = [run for run in result["runs"] if "error" in run]
    lines += [f"- {run['label']} ({run['variant']}): {run['error']} (log {run['log']})" for run in failed]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, 1 repeat, a couple of levers")
    parser.add_argument("--levers", default=None, help=f"comma-separated, some of {', '.join(LEVERS)}")
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 3, 1 with --tiny)")
    parser.add_argument("--cold-cache", action="store_true", help="empty the inductor cache before every process")
    parser.add_argument("--out", default=os.environ.get("OUT") or "ablation_out")
    parser.add_argument("--work", default=None, help="scratch and inductor cache (default /tmp/ablation[_tiny])")
    parser.add_argument("--model-dir", default=None, help="where the random model is built once")
    parser.add_argument("--memory-budget-gib", type=float, default=None, help="GPU memory every run plans within")
    parser.add_argument(
        "--no-warm-up", action="store_true", help="no unmeasured run per variant first (steady rates skip compiling)"
    )
    parser.add_argument(
        "--stop-after-s",
        type=float,
        default=None,
        help="start no run that would end past this many seconds, going by this call's longest run (a lent GPU's "
        "call limit); what ran is saved for --resume",
    )
    parser.add_argument("--summarise", default=None, help="only write the verdicts of this saved ablation.json")
    parser.add_argument(
        "--resume", default=None, help="run what this saved ablation.json lacks, with its settings, into --out"
    )
    args = parser.parse_args(argv)
    saved = json.loads(Path(args.resume).read_text()) if args.resume else None
    if saved:  # the saved call's settings, so that its runs and these are one ablation
        args.levers, args.repeats, args.tiny = ",".join(saved["levers_asked"]), saved["repeats"], saved["tiny"]
        args.cold_cache, args.no_warm_up = saved["cold_cache"], not saved["warm_up"]
        args.memory_budget_gib = saved["memory_budget_gib"]
    args.saved = saved
    args.levers = args.levers.split(",") if args.levers else list(TINY_LEVERS if args.tiny else LEVERS)
    unknown = [name for name in args.levers if name not in LEVERS]
    if unknown:
        parser.error(f"--levers: unknown {', '.join(unknown)}; choose from {', '.join(LEVERS)}")
    args.repeats = args.repeats or (1 if args.tiny else 3)
    return args


def prepared_versions(settings: Settings) -> dict:
    """gpu_proof.versions() as the prepare run recorded it: the parent never touches the GPU, the children have it."""
    result_file = settings.work / "prepare" / "out" / "throughput.json"
    return json.loads(result_file.read_text())["versions"] if result_file.is_file() else {}


def finish(result: dict, out: Path) -> int:
    """Verdicts from the measured runs in `result` (all of them, or those saved before a stop), into OUT."""
    measured = [run for run in result["runs"] if run["role"] == "measured"]
    result["levers"] = summarise(result["levers_asked"], measured)
    result["not_measured"] = NOT_MEASURED
    result["same_rows"] = len({run["rows_digest"] for run in result["runs"] if run["rows_digest"]}) == 1
    result["measured_runs"] = len(measured)
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result), flush=True)
    return 1 if any(summary["verdict"] == "error" for summary in result["levers"]) else 0


def room_for_another(runs_this_call: list[dict], elapsed_s: float, stop_after_s: float | None) -> bool:
    """Whether a run started now ends by `stop_after_s`, if it takes as long as the longest of this call's runs
    after its prepare run (or as the prepare run, which also builds the model, before any other)."""
    if stop_after_s is None:
        return True
    walls = [run["process_wall_s"] for run in runs_this_call if run["role"] != "prepare"]
    walls = walls or [run["process_wall_s"] for run in runs_this_call]
    return elapsed_s + max(walls, default=0.0) <= stop_after_s


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.summarise:
        saved = Path(args.summarise).resolve()
        return finish(json.loads(saved.read_text()), saved.parent)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        work=Path(args.work or ("/tmp/ablation_tiny" if args.tiny else "/tmp/ablation")).resolve(),
        out=out,
        model_dir=Path(args.model_dir or default_model_dir(args.tiny)).resolve(),
        tiny=args.tiny,
        cold_cache=args.cold_cache,
        budget_gib=args.memory_budget_gib,
    )
    order = run_order(args.levers, args.repeats)
    result = args.saved or {
        "what": "finetune.layout.speed's levers, each ON vs OFF, one fresh process per run (benchmarks/ablation.py)",
        "date": time.strftime("%Y-%m-%d"),
        "tiny": args.tiny,
        "cold_cache": args.cold_cache,
        "warm_up": not args.no_warm_up,
        "memory_budget_gib": args.memory_budget_gib,
        "levers_asked": args.levers,
        "repeats": args.repeats,
        "steps": 3 if args.tiny else 24,  # throughput.py's own steps per variant
        "order": ", ".join(f"{variant}#{repeat}" for variant, repeat in order),
        "runs": [],
    }
    to_run = pending(order, result["runs"])
    if args.saved and not to_run:
        return finish(result, out)
    result["calls"] = result.get("calls", 0) + 1

    def save() -> None:
        (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    call = {"call": result["calls"]}  # on resuming, the saved runs' calls come first
    prepare = {**run_process(settings, "fast", "prepare", prepare=True), "role": "prepare", **call}
    result["runs"].append(prepare)
    versions = prepared_versions(settings)
    earlier = result.setdefault("versions", versions)
    save()
    if "error" in prepare:
        print(f"ablation: the prepare run failed: {prepare['error']}; see {prepare['log']}", file=sys.stderr)
        return 1
    if versions.get("gpu") != earlier.get("gpu"):
        message = f"ablation: --resume: the saved runs ran on {earlier.get('gpu')}, this is {versions.get('gpu')}"
        print(message, file=sys.stderr)
        return 2

    def out_of_time(label: str) -> bool:
        this_call = [run for run in result["runs"] if run.get("call") == result["calls"]]
        if room_for_another(this_call, time.monotonic() - started, args.stop_after_s):
            return False
        print(f"ablation: {label} would end past --stop-after-s {args.stop_after_s:g}; finish with --resume")
        return True

    if not args.cold_cache and not args.no_warm_up:  # measured runs find their graphs compiled, as later repros do
        for variant in dict.fromkeys(variant for _, (variant, _) in to_run if variant != "fast"):  # prepare ran fast
            if out_of_time(f"warm_up_{variant}"):
                return finish(result, out)
            warm_up = run_process(settings, variant, f"warm_up_{variant}")
            result["runs"].append({**warm_up, "role": "cache warm-up", **call})
            save()
    for position, (variant, repeat) in to_run:
        if out_of_time(f"{variant}_r{repeat}"):
            break
        run = run_process(settings, variant, f"{variant}_r{repeat}")
        result["runs"].append({**run, "role": "measured", "repeat": repeat, "position": position, **call})
        save()
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
