"""The model card and the dataset card of the publish stage: huggingface_hub cards rendered from templates/*.md.

The cards are pure functions of the config and the metrics files: nothing here reads the environment, the network
or any file but the templates. The templates hold the wording and the tables; this module the metadata and checks.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from finetune.core.config import Config

# finetune.evaluation.comparison.VARIANTS and finetune.evaluation.metrics.METRICS, as eval.json holds them; named again
# so that publish does not depend on the evaluation code (and its overrides), which would rerun it on every change there.
VARIANTS = ("base", "sft", "dpo")
METRICS = ("f1", "rougeL", "bertscore_f1")
MODEL_TAGS = ("trl", "dpo", "sft", "lora", "qlora", "dvc")
DATASET_TAGS = ("dpo", "preference", "dvc")

# What the cards read from metrics/eval.json and metrics/data.json; the stage checks them before building a card.
EVAL_KEYS = (
    "n",
    *(f"{variant}.{metric}" for variant in VARIANTS for metric in (*METRICS, "mean_words")),
    *(f"delta.{name}.{metric}.{bound}" for name in ("sft_vs_base", "dpo_vs_sft")
      for metric in METRICS for bound in ("mean", "low", "high")),
    "categories",
    "preferences.n",
    *(f"preferences.{variant}.{key}" for variant in ("sft", "dpo") for key in ("accuracy", "margin")),
    "bertscore_settings",
)
DATA_KEYS = tuple(
    f"{name}.{key}" for name in ("sft", "preferences") for key in ("rows_read", "kept", "dropped", "train", "test")
)


def missing_keys(mapping: dict[str, Any], dotted_keys: tuple[str, ...]) -> list[str]:
    """The dotted keys of `dotted_keys` that `mapping` lacks."""
    missing = []
    for dotted in dotted_keys:
        value: Any = mapping
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                missing.append(dotted)
                break
            value = value[part]
    return missing


def setting(value: Any) -> str:
    """A params value as YAML spells it (hyperparameters keep their precision: 5e-07 is not 0.000)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(setting(item) for item in value)
    return str(value)


def render(template: str, card_data: ModelCardData | DatasetCardData, **fields: Any) -> str:
    """templates/`template` filled with `fields`, under the card's YAML metadata."""
    # Not RepoCard.from_template: its bare jinja2.Template renders a misspelt field as empty text and cannot import
    # the macros both cards share.
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("finetune.cards", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["setting"] = setting
    return environment.get_template(template).render(card_data=card_data.to_yaml(), **fields)


def is_embedded_base(cfg: Config) -> bool:
    return cfg.model.name_or_path == cfg.paths.base_model


def source_ids(cfg: Config, local: dict[str, bool]) -> list[str]:
    """The hub dataset ids among the data sources (`local` says which sources are local files)."""
    sources = (cfg.data.sft.source, cfg.data.preferences.source)
    return list(dict.fromkeys(source for source in sources if not local[source]))


def build_model_card(
    cfg: Config,
    evaluation: dict[str, Any],
    data: dict[str, Any],
    *,
    base_on_hub: bool,
    local_sources: dict[str, bool],
    commit: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The README.md of the model repository: metadata, what it is, settings, data, evaluation, usage, reproduction.

    `base_on_hub`: model.name_or_path is a hub id (not a local folder); `local_sources`: for each data source,
    whether it is a local file; `commit`: the project's git commit, if known; `license`: the license id, if known.
    """
    datasets = [*source_ids(cfg, local_sources), *([cfg.publish.dataset_repo] if cfg.publish.dataset_repo else [])]
    card_data = ModelCardData(
        base_model=cfg.model.name_or_path if base_on_hub else None,  # the Hub rejects a base_model it lacks
        library_name="peft",
        pipeline_tag="text-generation",
        license=license,
        tags=[tag for tag in MODEL_TAGS if tag != "qlora" or cfg.model.load_in_4bit],
        datasets=list(dict.fromkeys(datasets)) or None,  # ModelCardData leaves out None, not an empty list
    )
    content = render(
        "model_card.md",
        card_data,
        cfg=cfg,
        evaluation=evaluation,
        data=data,
        base_on_hub=base_on_hub,
        embedded_base=is_embedded_base(cfg),
        local_sources=local_sources,
        commit=commit,
    )
    return ModelCard(content)


def build_dataset_card(
    cfg: Config,
    data: dict[str, Any],
    *,
    files: dict[str, str],
    columns: list[str],
    local_sources: dict[str, bool],
    license: str | None = None,
) -> DatasetCard:
    """The README.md of the dataset repository: the preference pairs DPO used (train) and held out (test).

    `files`: split name -> file name in the repository; `columns`: the fields of a row.
    """
    card_data = DatasetCardData(
        license=license,
        task_categories=["text-generation"],
        tags=list(DATASET_TAGS),
        # The splits, so the Hub's viewer and load_dataset() need no file-name guessing.
        configs=[{"config_name": "default",
                  "data_files": [{"split": split, "path": path} for split, path in files.items()]}],
    )
    content = render(
        "dataset_card.md", card_data, cfg=cfg, data=data, files=files, columns=columns, local_sources=local_sources
    )
    return DatasetCard(content)
