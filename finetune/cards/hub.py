"""What the publish stage sends to the Hugging Face Hub: the folder, checked against its inputs, and the push.

The folder holds model/ (the model card and the sft/ and dpo/ adapters) and dataset/ (the dataset card and the
preference pairs). It is written whole or not at all, and only from adapters and metrics that match the params.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from finetune.cards.model_card import DATA_KEYS, EVAL_KEYS, build_dataset_card, build_model_card, missing_keys
from finetune.core.config import Config, PublishConfig
from finetune.core.errors import ConfigError, DataError, ProjectError
from finetune.core.files import atomic_path, read_json, write_json
from finetune.data.rows import PREFERENCES_TEST, PREFERENCES_TRAIN, is_local_source, read_jsonl

TOKEN_VARIABLE = "HF_TOKEN"
MODEL_DIR, DATASET_DIR, PUBLISHED_FILE = "model", "dataset", "published.json"
# What an adapter folder ships: the adapter, its tokenizer and chat template. Not PEFT's boilerplate README.md (the
# model card replaces it) nor training_args.bin (a pickle of the trainer's settings).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SPLIT_FILES = {"train": PREFERENCES_TRAIN, "test": PREFERENCES_TEST}
DEFAULT_COLUMNS = ["id", "category", "prompt", "chosen", "rejected"]  # shown when both splits are empty
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


# ---------------------------------------------------------------------------------------------------------------------
# Checks, before anything is written


def check_push_settings(settings: PublishConfig, environ: dict[str, str]) -> str:
    """The token for a push; a missing repo id or token is a one-line error naming the key or the variable."""
    if not settings.model_repo:
        raise ConfigError("publish.model_repo: must be set to push (e.g. your-name/mistral-7b-dpo), got null")
    for key in ("model_repo", "dataset_repo"):
        repo_id = getattr(settings, key)
        if repo_id is not None and not REPO_ID.fullmatch(repo_id):
            raise ConfigError(f"publish.{key}: must be a hub repository id NAMESPACE/NAME, got {repo_id!r}")
    token = environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        raise ProjectError(
            f"publish.push is true but the {TOKEN_VARIABLE} environment variable is not set; "
            f"run with {TOKEN_VARIABLE}=<a write token> in the environment"
        )
    return token


def read_metrics(path: str, required: tuple[str, ...], stage: str) -> dict[str, Any]:
    """A metrics file that holds every key in `required`; else a one-line error naming the stage to re-run."""
    metrics = read_json(path, stage)
    missing = missing_keys(metrics, required)
    if missing:
        raise DataError(f"{path}: no {missing[0]}; re-run dvc repro {stage}")
    return metrics


def check_adapter(folder: Path, cfg: Config) -> None:
    """The adapter exists and was trained with the params the card will show."""
    stage = "dpo" if folder == Path(cfg.paths.dpo_adapter) else "sft"
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise DataError(f"{folder}: no {name}; run dvc repro {stage}")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    trained = {
        "model.name_or_path": config.get("base_model_name_or_path"),
        "lora.r": config.get("r"),
        "lora.alpha": config.get("lora_alpha"),
    }
    expected = {"model.name_or_path": cfg.model.name_or_path, "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha}
    for key, value in expected.items():
        if trained[key] != value:
            raise DataError(
                f"{folder}: trained with {key} {trained[key]!r}, params say {value!r}; re-run dvc repro {stage}"
            )


def check_splits(cfg: Config, data: dict[str, Any]) -> None:
    """The prepared preference files exist and hold as many rows as paths.data_metrics counts."""
    for split, name in SPLIT_FILES.items():
        path = Path(cfg.paths.prepared) / name
        if not path.is_file():
            raise DataError(f"{path}: not found; run dvc repro prepare")
        rows = count_lines(path)
        if rows != data["preferences"][split]:
            raise DataError(
                f"{path}: {rows} rows but {cfg.paths.data_metrics} counts {data['preferences'][split]}; "
                "re-run dvc repro prepare"
            )


def count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def git_commit() -> str | None:
    """The project's git commit, or None outside a git repository (or without git)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit) else None


# ---------------------------------------------------------------------------------------------------------------------
# The folder that would be pushed


def build_folder(cfg: Config, destination: Path, commit: str | None) -> dict[str, list[str]]:
    """Write model/ and dataset/ into `destination` (a fresh folder); returns the files of each, relative."""
    evaluation = read_metrics(cfg.paths.eval_metrics, EVAL_KEYS, "evaluate")
    data = read_metrics(cfg.paths.data_metrics, DATA_KEYS, "prepare")
    check_splits(cfg, data)
    adapters = {"sft": Path(cfg.paths.sft_adapter), "dpo": Path(cfg.paths.dpo_adapter)}
    for folder in adapters.values():
        check_adapter(folder, cfg)

    base_on_hub = not (cfg.model.name_or_path == cfg.paths.base_model or Path(cfg.model.name_or_path).exists())
    local = {source: is_local_source(source) for source in (cfg.data.sft.source, cfg.data.preferences.source)}

    model_dir = destination / MODEL_DIR
    for name, folder in adapters.items():
        (model_dir / name).mkdir(parents=True)
        for file in (*ADAPTER_FILES, *TOKENIZER_FILES):
            if (folder / file).is_file():
                shutil.copyfile(folder / file, model_dir / name / file)
    card = build_model_card(cfg, evaluation, data, base_on_hub=base_on_hub, local_sources=local, commit=commit)
    card.save(model_dir / "README.md")

    prepared = Path(cfg.paths.prepared)
    dataset_dir = destination / DATASET_DIR
    dataset_dir.mkdir(parents=True)
    for name in SPLIT_FILES.values():
        shutil.copyfile(prepared / name, dataset_dir / name)
    first = read_jsonl(prepared / PREFERENCES_TRAIN)[:1] or read_jsonl(prepared / PREFERENCES_TEST)[:1]
    columns = list(first[0]) if first else DEFAULT_COLUMNS
    card = build_dataset_card(cfg, data, files=dict(SPLIT_FILES), columns=columns, local_sources=local)
    card.save(dataset_dir / "README.md")

    return {
        part: sorted(str(path.relative_to(destination / part)) for path in (destination / part).rglob("*")
                     if path.is_file())
        for part in (MODEL_DIR, DATASET_DIR)
    }


def write_folder(cfg: Config, commit: str | None) -> dict[str, list[str]]:
    """Build paths.publish in a side folder and rename it into place: never half-written, never stale files."""
    with atomic_path(cfg.paths.publish) as partial:
        partial.mkdir()
        return build_folder(cfg, partial, commit)


# ---------------------------------------------------------------------------------------------------------------------
# The push


def _reason(error: Exception, token: str) -> str:
    """The first line of an error, without the token should a library ever echo it."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text.replace(token, "***")


def push(settings: PublishConfig, folder: Path, token: str) -> dict[str, dict[str, Any]]:
    """create_repo + upload_folder for the dataset (if publish.dataset_repo is set), then the model; the commits."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)  # the token goes to the client only: not to argv, files or logs
    jobs = [("model", settings.model_repo, folder / MODEL_DIR)]
    if settings.dataset_repo:
        jobs.insert(0, ("dataset", settings.dataset_repo, folder / DATASET_DIR))  # the model card links to it
    published = {}
    for repo_type, repo_id, path in jobs:
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=settings.private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(path),
                repo_type=repo_type,
                commit_message="Publish from the DVC pipeline (stages.publish)",
            )
        except Exception as error:  # network, auth, permissions, quota: the user needs one line either way
            reason = _reason(error, token)
            raise ProjectError(f"publish: pushing {path} to {repo_type} repo {repo_id} failed ({reason})") from None
        prefix = "datasets/" if repo_type == "dataset" else ""
        published[repo_type] = {
            "repo_id": repo_id,
            "repo_type": repo_type,
            "private": settings.private,
            "url": f"https://huggingface.co/{prefix}{repo_id}",
            "commit_url": str(getattr(commit, "commit_url", commit)),
            "commit_sha": getattr(commit, "oid", None),
        }
        print(f"publish: pushed {path} to {repo_type} repo {repo_id}: {published[repo_type]['commit_url']}")
    return published


def write_published(folder: Path, published: dict[str, dict[str, Any]]) -> None:
    """Record each pushed repo and its commit in folder/published.json (not itself pushed)."""
    write_json(folder / PUBLISHED_FILE, published)
