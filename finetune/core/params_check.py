"""params.yaml must be what conf/ composes: a hand edit or a stale file stops the stage instead of running silently.

With DVC's Hydra composition on (`hydra.enabled` in .dvc/config), params.yaml is generated: every `dvc exp run`
rewrites it from conf/config.yaml + the chosen recipe + its `-S` overrides, and `dvc repro` runs it as it is. Two
traps follow, and both used to pass without a word:

- a value edited by hand in params.yaml is discarded by the next `dvc exp run` (which composes from conf/);
- a value edited in conf/ is ignored by `dvc repro`, which runs the stale params.yaml.

So, outside `dvc exp run`, the loader composes conf/ with the recipe params.yaml names (through DVC's own composer,
`dvc.utils.hydra.compose_and_dump`, exactly as `dvc exp run -S recipe=NAME` does) and compares the result with
params.yaml key by key; any difference stops the stage with one line naming the key and both values, and what to run.

Under `dvc exp run` (DVC sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV for the stages it runs) there is nothing to
check: DVC composed params.yaml from this very conf/ (queued and --temp runs carry both in the same stash commit),
and the `-S` overrides it applied on top are legitimately in params.yaml; with `--no-hydra` the user chose to run
params.yaml as it is. The `-S` values an experiment left in the workspace (or `dvc exp apply` brought back) are not
in conf/, so a later `dvc repro` refuses them too: the next `dvc exp run` would drop them, so they belong in conf/
(or on that run's command line). DVC overwrites a hand-edited params.yaml before any stage of `dvc exp run` starts,
so that discard cannot be seen from here; the first `dvc repro` or `python -m stages.NAME` after the edit is where
it is caught.

The check applies only to a DVC repository's own params.yaml (the file next to .dvc/, the one Hydra writes) with
Hydra on; any other params file (a test's, a copy) is read as it is, and so is a repository with Hydra off, where
params.yaml is the source. `python -m stages.params_check` runs the check alone.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from finetune.core.errors import ConfigError

PARAMS_NAME = "params.yaml"  # the file DVC's Hydra composition writes (ParamsDependency.DEFAULT_PARAMS_FILE)
EXP_RUN_VARIABLES = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")  # set by `dvc exp run` for the stages it runs
_ABSENT = object()
_PLAIN = re.compile(r"^[A-Za-z0-9_./-]+$")  # a Hydra override value that needs no quotes, unless Hydra reads it as
_NOT_A_STRING = re.compile(r"^([-+]?[0-9._]+([eE][-+]?[0-9]+)?|true|false|null|[-+]?inf|nan)$", re.IGNORECASE)  # these


def hydra_settings(root: Path) -> dict[str, Any] | None:
    """The [hydra] section of the DVC repository at `root` when its composition is on, else None."""
    from dvc.config import Config
    from dvc.config import ConfigError as DvcConfigError

    try:
        hydra = dict(Config(dvc_dir=str(root / ".dvc")).get("hydra", {}))
    except DvcConfigError:
        return None  # DVC itself reports a broken config; nothing to compare against here
    return hydra if hydra.get("enabled") else None


def applies_to(path: str | Path) -> dict[str, Any] | None:
    """Hydra's settings when `path` is a DVC repository's own params.yaml, composed by Hydra, outside `dvc exp run`."""
    if any(os.environ.get(name) for name in EXP_RUN_VARIABLES):
        return None
    path = Path(path).resolve()
    if path.name != PARAMS_NAME or not (path.parent / ".dvc").is_dir():
        return None
    return hydra_settings(path.parent)


def compose(root: Path, hydra: dict[str, Any], overrides: list[str]) -> Any:
    """conf/ composed with `overrides` and dumped by DVC's own function, read back as load_config reads params.yaml."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from ruamel.yaml import YAML

    module = hydra.get("config_module")
    config_dir = None if module else str(root / hydra.get("config_dir", "conf"))
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / PARAMS_NAME
        try:
            compose_and_dump(
                output,
                config_dir,
                module,
                hydra.get("config_name", "config"),
                str(root / hydra.get("plugins_path", "")),
                overrides,
            )
        except (HydraException, OmegaConfBaseException) as error:
            where = module or os.path.relpath(config_dir, root) + "/"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"{PARAMS_NAME}: {where} does not compose with {' '.join(overrides) or 'no overrides'}: "
                              f"{reason}") from None
        return YAML(typ="safe", pure=True).load(output.read_text(encoding="utf-8"))


def differences(ours: Any, theirs: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, params.yaml's value, the composed value) wherever they differ; _ABSENT where a side lacks it."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = []
        for key in [*theirs, *(key for key in ours if key not in theirs)]:
            name = f"{prefix}.{key}" if prefix else str(key)
            found += differences(ours.get(key, _ABSENT), theirs.get(key, _ABSENT), name)
        return found
    same = ours == theirs and isinstance(ours, bool) == isinstance(theirs, bool)
    return [] if same else [(prefix or "params", ours, theirs)]


def _shown(value: Any) -> str:
    return "nothing" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def _override(key: str, value: Any, composed: Any) -> str | None:
    """The `-S` argument (Hydra's override syntax) that puts params.yaml's `value` on top of conf/, or None for a list
    or a mapping."""
    if value is _ABSENT:
        return f"-S '~{key}'"
    if isinstance(value, (dict, list)):
        return None
    if value is None or isinstance(value, (bool, int, float)):
        text = json.dumps(value)
    elif _PLAIN.match(value) and not _NOT_A_STRING.match(value):
        text = value
    else:
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    setting = ("+" if composed is _ABSENT else "") + f"{key}={text}"
    return f'-S "{setting}"' if "'" in setting else f"-S {setting}"


def check_params(path: str | Path, raw: Any) -> None:
    """Raise ConfigError, in one line, when `path` is the repository's generated params.yaml and `raw` (its loaded
    content) is not what conf/ composes with the recipe it names. Does nothing anywhere else (see the module doc)."""
    hydra = applies_to(path)
    if hydra is None:
        return
    root = Path(path).resolve().parent
    recipe = raw.get("recipe") if isinstance(raw, dict) else None
    choice = [f"recipe={recipe}"] if isinstance(recipe, str) and _PLAIN.match(recipe) else []
    found = differences(raw, compose(root, hydra, choice))
    if not found:
        return
    key, ours, theirs = found[0]
    others = [name for name, _, _ in found[1:]]
    more = f"; {len(others)} more {'key differs' if len(others) == 1 else 'keys differ'}: " if others else ""
    more += ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    rerun = "dvc exp run"
    if choice and compose(root, hydra, []).get("recipe") != recipe:  # plain `dvc exp run` composes the default
        rerun += f" -S recipe={recipe}"
    keep = [_override(k, v, c) for k, v, c in found if k != "recipe"]
    passed = f" or pass them: `{rerun} {' '.join(keep)}`" if keep and len(keep) <= 3 and all(keep) else ""
    raise ConfigError(
        f"{PARAMS_NAME}: {key} is {_shown(ours)} but conf/ composes {_shown(theirs)}{more}. params.yaml is generated "
        f"from conf/ by `dvc exp run`, and `dvc repro` never recomposes it: to run conf/ as it is, run `{rerun}`; "
        f"to keep params.yaml's values, put them in conf/ (then `{rerun}`){passed}"
    )
