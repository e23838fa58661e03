"""report: the results page a person opens instead of reading JSON, and the versions the run used.

Reads params `recipe`, `model`, `report` and `paths`; paths.eval_metrics, paths.data_metrics, the SFT and DPO
curves and summaries (paths.sft_metrics, paths.dpo_metrics), paths.reports/side_by_side.csv and
paths.reports/plots/rounds.csv. Writes
  paths.reports/index.html      the setup, the three variants' scores, the deltas with their intervals, the win
                                rates, the categories, the training curves, report.examples held-out answers side by
                                side and the self-rewarding rounds: one file, charts drawn now (inline SVG), no script,
                                so it opens offline
  paths.reports/versions.json   the versions of Python, torch, transformers, peft, trl, bitsandbytes, datasets and dvc

    dvc repro report         # or: python -m stages.report
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error
from finetune.core.files import write_json, write_text
from finetune.results.page import load_results, render_page
from finetune.results.versions import package_versions


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    cfg = load_config(params_path)
    versions = package_versions()
    results = load_results(cfg, versions)
    reports = Path(cfg.paths.reports)
    write_text(reports / "index.html", render_page(results))
    write_json(reports / "versions.json", versions)
    print(f"report: open {reports / 'index.html'} in a browser (it needs no network)")


if __name__ == "__main__":
    main(*sys.argv[1:])  # optional: another params file
