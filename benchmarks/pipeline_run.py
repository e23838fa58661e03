"""Run the pipeline's training and evaluation stages in dvc.yaml's order without DVC, timing each: for a machine where
DVC is not installed (the lent GPU machine), or to time one recipe end to end. Left out: params_check (it compares
params.yaml with conf/ through DVC's composer), report (the page) and publish.

    python benchmarks/pipeline_run.py PARAMS [--stages sft,dpo,...] [--out DIR]

Each stage runs as `python -m stages.NAME [ARG] PARAMS` in its own process, as DVC would run it; the timings and the
stages' metrics files are written to --out (timings.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def stage_commands(params: dict) -> list[tuple[str, list[str]]]:
    """(DVC stage name, command arguments) in the order `dvc repro` runs them for these params (less the stages the
    module docstring leaves out)."""
    rounds = list(params["self_rewarding"]["rounds"])
    commands = [("embedded", ["stages.embedded"]), ("prepare", ["stages.prepare"]), ("base", ["stages.base"]),
                ("sft", ["stages.sft"]), ("preference_data", ["stages.preference_data"]), ("dpo", ["stages.dpo"])]
    commands += [("generate@" + variant, ["stages.generate", variant]) for variant in ("base", "sft", "dpo")]
    for name in rounds:
        commands += [(f"self_rewarding_pairs@{name}", ["stages.self_rewarding_pairs", name]),
                     (f"self_rewarding_dpo@{name}", ["stages.self_rewarding_dpo", name])]
    commands += [("self_rewarding_report", ["stages.self_rewarding_report"]), ("evaluate", ["stages.evaluate"])]
    return commands  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params")
    parser.add_argument("--stages", help="comma-separated DVC stage names to run (default: all)")
    parser.add_argument("--out", default="pipeline_run_out")
    options = parser.parse_args()
    params = yaml.safe_load(Path(options.params).read_text())
    wanted = set(options.stages.split(",")) if options.stages else None
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name, command in stage_commands(params):
        if wanted is not None and name not in wanted:
            continue
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", *command, options.params], check=False)
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"=== {name}: {timings[name]} s (exit {run.returncode})", flush=True)
        if run.returncode != 0:
            timings["failed"] = name
            break
    timings["total"] = round(sum(v for v in timings.values() if isinstance(v, float)), 1)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    for path in (params["paths"]["eval_metrics"], params["paths"]["data_metrics"]):
        if Path(path).is_file():
            shutil.copy(path, out / Path(path).name)
    for stage in ("sft", "dpo"):
        summary = Path(params["paths"][f"{stage}_metrics"]) / "metrics.json"
        if summary.is_file():
            shutil.copy(summary, out / f"{stage}_metrics.json")


if __name__ == "__main__":
    main()
