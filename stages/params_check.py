"""params_check: refuse a params.yaml that conf/ does not compose (a hand edit, or a conf/ edit not yet composed).

`dvc repro` never recomposes params.yaml from conf/; this stage depends on conf/, so an edit there alone reruns it and
stops the pipeline with one line saying what to run instead. Under `dvc exp run` DVC has just composed params.yaml.

    dvc repro params_check   # or: python -m stages.params_check
"""

from __future__ import annotations

import sys

from finetune.core.config import load_config
from finetune.core.errors import exit_on_error


@exit_on_error
def main(params_path: str = "params.yaml") -> None:
    load_config(params_path)  # the loader compares params.yaml with what conf/ composes
    print(f"params_check: {params_path} is what conf/ composes")


if __name__ == "__main__":
    main(*sys.argv[1:])
