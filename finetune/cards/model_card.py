"""The model card and the dataset card the publish stage writes: pure functions of the config and the metrics files.

Nothing here reads files, the environment or the network, so the cards are a function of what the stage loaded and
can be tested on hand-made inputs. Metric values are shown with 3 decimals; deltas are signed, with their 95% interval.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.config import Config

VARIANTS = ("base", "sft", "dpo")  # the order of finetune.evaluation.generation.VARIANTS, without importing torch
VARIANT_NAMES = {"base": "base", "sft": "SFT", "dpo": "SFT + DPO"}
METRIC_NAMES = {"f1": "F1", "rougeL": "ROUGE-L", "bertscore_f1": "BERTScore F1"}
DELTAS = {"sft_vs_base": "SFT − base", "dpo_vs_sft": "DPO − SFT", "dpo_vs_base": "DPO − base"}
MODEL_TAGS = ("trl", "dpo", "sft", "lora", "qlora", "dvc")
DATASET_TAGS = ("dpo", "preference", "dvc")

# What the cards read from metrics/eval.json and metrics/data.json; the stage checks them before building a card.
EVAL_KEYS = (
    "n",
    *(f"{variant}.{metric}" for variant in VARIANTS for metric in (*METRIC_NAMES, "mean_words")),
    *(f"delta.{name}.{metric}.{bound}" for name in DELTAS if name != "dpo_vs_base"
      for metric in METRIC_NAMES for bound in ("mean", "low", "high")),
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


# ---------------------------------------------------------------------------------------------------------------------
# Formatting


def number(value: float) -> str:
    """A metric value: 3 decimals."""
    return f"{value:.3f}"


def signed(value: float) -> str:
    return f"{value:+.3f}"


def interval(delta: dict[str, float]) -> str:
    """A paired difference and its 95% bootstrap interval: `+0.285 [+0.259, +0.310]`."""
    return f"{signed(delta['mean'])} [{signed(delta['low'])}, {signed(delta['high'])}]"


def setting(value: Any) -> str:
    """A params value as YAML spells it (hyperparameters keep their precision: 5e-07 is not 0.000)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(setting(item) for item in value)
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def yaml_lines(fields: dict[str, Any]) -> list[str]:
    """Card metadata as YAML lines (strings JSON-quoted, which is valid YAML); None and empty values are left out."""
    lines = []
    for key, value in fields.items():
        if value is None or value == []:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return lines


def front_matter(fields: dict[str, Any]) -> str:
    """The Hugging Face card metadata block."""
    return "\n".join(["---", *yaml_lines(fields), "---"])


def repo_name(repo_id: str | None) -> str | None:
    return repo_id.split("/")[-1] if repo_id else None


# ---------------------------------------------------------------------------------------------------------------------
# The model card


def is_embedded_base(cfg: Config) -> bool:
    return cfg.model.name_or_path == cfg.paths.base_model


def source_ids(cfg: Config, local: dict[str, bool]) -> list[str]:
    """The hub dataset ids among the data sources (`local` says which sources are local files)."""
    sources = (cfg.data.sft.source, cfg.data.preferences.source)
    return list(dict.fromkeys(source for source in sources if not local[source]))


def _base_description(cfg: Config, base_on_hub: bool) -> str:
    model = cfg.model
    if base_on_hub:
        revision = f"revision `{model.revision}`" if model.revision else "the default branch (no revision pinned)"
        return f"[`{model.name_or_path}`](https://huggingface.co/{model.name_or_path}), {revision}"
    if is_embedded_base(cfg):
        return (
            f"`{model.name_or_path}`, the project's embedded tiny Mistral-architecture model (stage `base`, "
            "pre-trained on the synthetic corpus); a local folder, not on the Hub"
        )
    return f"`{model.name_or_path}`, a local model folder (not on the Hub)"


def _what_it_is(cfg: Config, base_on_hub: bool, dataset_repo: str | None) -> str:
    lora = cfg.lora
    if cfg.model.load_in_4bit:
        precision = (
            "QLoRA: the base model loaded in 4-bit NF4 with double quantization and bf16 compute on CUDA "
            "(a machine without CUDA trains in float32 instead)"
        )
    else:
        precision = "the base model in full precision (no 4-bit quantization)"
    lines = [
        f"- **Base model:** {_base_description(cfg, base_on_hub)}",
        f"- **Recipe:** `{cfg.recipe}`",
        "- **Method:** supervised fine-tuning (TRL `SFTTrainer`, loss on the answers only), then DPO (TRL "
        "`DPOTrainer`) of the same adapter, with the SFT model as the reference policy",
        f"- **LoRA:** r={lora.r}, alpha={lora.alpha}, dropout={setting(lora.dropout)}, "
        f"target modules {', '.join(f'`{name}`' for name in lora.target_modules)}",
        f"- **Precision:** {precision}",
        "- **Adapters:** `dpo/` (SFT then DPO: the final model) and `sft/` (after SFT only), each with its "
        "tokenizer and chat template",
    ]
    if dataset_repo:
        lines.append(
            f"- **Preference data:** [`{dataset_repo}`](https://huggingface.co/datasets/{dataset_repo}), "
            "the pairs DPO trained on and the held-out pairs"
        )
    return "\n".join(lines)


def training_section(cfg: Config) -> str:
    """The sft.trainer and dpo.trainer values, side by side, as passed to TRL's SFTConfig and DPOConfig."""
    sft, dpo = cfg.sft.trainer, cfg.dpo.trainer
    keys = list(dict.fromkeys([*sft, *dpo]))
    rows = [[f"`{key}`", setting(sft[key]) if key in sft else "—", setting(dpo[key]) if key in dpo else "—"]
            for key in keys]
    rows.append(["`max_prompt_length` (dpo)", "—", setting(cfg.dpo.max_prompt_length)])
    return "\n\n".join([
        "## Training settings",
        "The `sft.trainer` and `dpo.trainer` params, passed as they are to TRL's `SFTConfig` and `DPOConfig`. On a "
        "machine without CUDA the stages train with `adamw_torch` in float32 instead of paged/8-bit optimizers and "
        "bf16.",
        table(["setting", "SFT", "DPO"], rows),
    ])


def _source_line(label: str, source, local: bool, embedded_dir: str) -> str:
    if source.source.startswith(embedded_dir.rstrip("/") + "/"):
        where = f"`{source.source}`, generated by the project's `embedded` stage (a synthetic world)"
    elif local:
        where = f"`{source.source}`, a local file"
    else:
        revision = f", revision `{source.revision}`" if source.revision else ""
        link = f"[`{source.source}`](https://huggingface.co/datasets/{source.source})"
        where = f"{link} split `{source.split}`{revision}"
    system = ", with a fixed system prompt" if source.system_prompt else ""
    return f"- **{label}:** {where}, format `{source.format}`{system}"


def dpo_source_line(cfg: Config) -> str:
    """With dpo.source generated, DPO trained on the pipeline's own pairs; the dataset's pairs only evaluate."""
    settings = cfg.preference_data
    return (
        f"- **DPO training pairs:** generated by the pipeline (stage `preference_data`): {settings.candidates} "
        f"sampled answers to each of {settings.prompts} SFT-train instructions from the {settings.policy} model, "
        f"ranked by `{settings.ranker.name}`, best against worst; the preference pairs above are used only for the "
        "held-out preference accuracy"
    )


def data_section(cfg: Config, data: dict[str, Any], local: dict[str, bool]) -> str:
    """Sources and the counts of prepare: rows read, kept, dropped by reason, train and test."""
    names = ("sft", "preferences")
    reasons = list(dict.fromkeys(r for name in names for r in data[name]["dropped"] if r != "total"))
    rows = [["rows read", *(str(data[name]["rows_read"]) for name in names)],
            ["kept", *(str(data[name]["kept"]) for name in names)]]
    rows += [[f"dropped: {reason}", *(str(data[name]["dropped"].get(reason, 0)) for name in names)]
             for reason in reasons]
    rows.append(["dropped in all",
                 *(str(data[name]["dropped"].get("total", data[name]["rows_read"] - data[name]["kept"]))
                   for name in names)])
    rows += [["train", *(str(data[name]["train"]) for name in names)],
             ["test (held out)", *(str(data[name]["test"]) for name in names)]]
    embedded = cfg.paths.embedded
    return "\n\n".join([
        "## Data",
        "\n".join([
            _source_line("SFT data", cfg.data.sft, local[cfg.data.sft.source], embedded),
            _source_line("Preference pairs", cfg.data.preferences, local[cfg.data.preferences.source], embedded),
            *([dpo_source_line(cfg)] if cfg.dpo.source == "generated" else []),
            f"- **Cleaning:** rows of {cfg.data.max_chars} characters or more and invalid rows dropped, duplicates "
            f"removed; {setting(cfg.data.test_size)} of each dataset held out (seed {cfg.data.seed})",
        ]),
        table(["rows", "SFT", "preferences"], rows),
    ])


def evaluation_section(evaluation: dict[str, Any]) -> str:
    """Scores of base, SFT and SFT + DPO, the deltas with 95% intervals, preference accuracy, per category."""
    metrics = list(METRIC_NAMES)
    scores = table(
        ["model", *METRIC_NAMES.values(), "mean words"],
        [[VARIANT_NAMES[v], *(number(evaluation[v][m]) for m in metrics), number(evaluation[v]["mean_words"])]
         for v in VARIANTS],
    )
    deltas = table(
        ["difference", *METRIC_NAMES.values()],
        [[label, *(interval(evaluation["delta"][name][m]) for m in metrics)]
         for name, label in DELTAS.items() if name in evaluation["delta"]],
    )
    prefs = evaluation["preferences"]
    preferences = table(
        ["model", "reference policy", "accuracy", "mean reward margin"],
        [[VARIANT_NAMES[v], ref, number(prefs[v]["accuracy"]), number(prefs[v]["margin"])]
         for v, ref in (("sft", "base"), ("dpo", "SFT"))],
    )
    categories = table(
        ["category", "n", "F1 base / SFT / DPO", "BERTScore F1 base / SFT / DPO", "F1 DPO − SFT"],
        [[name, str(c["n"]), " / ".join(number(c[v]["f1"]) for v in VARIANTS),
          " / ".join(number(c[v]["bertscore_f1"]) for v in VARIANTS),
          interval(c["delta"]["dpo_vs_sft"]["f1"]) if "delta" in c else "—"]
         for name, c in evaluation["categories"].items()],
    )
    bert = evaluation["bertscore_settings"]
    bert_line = (
        f"BERTScore: `{bert.get('model')}`, layer {bert.get('num_layers')}, idf {setting(bert.get('idf'))}, "
        f"rescaled with baseline {setting(bert.get('rescaled'))} (hash `{bert.get('hash')}`)."
    )
    return "\n\n".join([
        "## Evaluation",
        f"On the {evaluation['n']} held-out prompts (greedy answers). F1 is SQuAD token F1, ROUGE-L the stemmed "
        "F-measure, BERTScore the F1; an empty answer scores 0.",
        scores,
        "Paired differences, with 95% paired-bootstrap intervals:",
        deltas,
        f"Held-out preference pairs ({prefs['n']}): how often the implicit DPO reward β·log(π/π_ref) prefers the "
        "chosen answer.",
        preferences,
        bert_line,
        "### Per category",
        "The held-out split's categories and the fixed probe prompts' categories (all prompts of each).",
        categories,
    ])


def usage_section(cfg: Config, base_on_hub: bool, model_repo: str | None) -> str:
    repo = model_repo or "YOUR_NAME/REPO"  # publish.model_repo is only required for a push
    base = cfg.model.name_or_path
    revision = f', revision="{cfg.model.revision}"' if base_on_hub and cfg.model.revision else ""
    code = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}"{revision})',
    ]
    if cfg.model.load_in_4bit:
        code.append(
            "# as trained on CUDA: add quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
            'bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)'
        )
    code += [
        f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="dpo")  # or subfolder="sft"',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}", subfolder="dpo")  # with the chat template trained on',
        "",
        'messages = [{"role": "user", "content": "Name three things a potter needs."}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
        'return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    parts = ["## How to use", "```python\n" + "\n".join(code) + "\n```"]
    if not base_on_hub:
        parts.append(
            f"`{base}` is a local folder, not on the Hub: "
            + ("build it with `dvc repro base` in the project (see Reproduce) and " if is_embedded_base(cfg) else "")
            + "pass its path to `from_pretrained`."
        )
    return "\n\n".join(parts)


def reproduce_section(recipe: str, commit: str | None) -> str:
    checkout = (f"git checkout {commit}   # the project's commit when this card was built"
                if commit else "# (no git commit was recorded: the stage did not run in a git repository)")
    return "\n\n".join([
        "## Reproduce",
        "Built by the DVC pipeline `embedded → prepare → base → sft → dpo → generate_{base,sft,dpo} → "
        "evaluate → publish`:",
        "```bash\n" + "\n".join([
            checkout,
            "pip install -e .",
            f"dvc exp run -S recipe={recipe}   # or `dvc repro` if params.yaml at that commit is this recipe's",
        ]) + "\n```",
        "The settings above are the ones the run used (a `dvc exp run -S` change is not in the commit); "
        "`dvc metrics show` prints the numbers of the evaluation.",
    ])


def model_card(
    cfg: Config,
    evaluation: dict[str, Any],
    data: dict[str, Any],
    *,
    base_on_hub: bool,
    local_sources: dict[str, bool],
    commit: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md of the model repository: metadata, what it is, settings, data, evaluation, usage, reproduction.

    `base_on_hub`: model.name_or_path is a hub id (not a local folder); `local_sources`: for each data source,
    whether it is a local file; `commit`: the project's git commit, if known; `license`: the license id, if known.
    """
    publish = cfg.publish
    datasets = source_ids(cfg, local_sources) + ([publish.dataset_repo] if publish.dataset_repo else [])
    tags = [tag for tag in MODEL_TAGS if tag != "qlora" or cfg.model.load_in_4bit]
    meta = front_matter({
        "base_model": cfg.model.name_or_path if base_on_hub else None,  # the Hub rejects a base_model it lacks
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": license,
        "tags": tags,
        "datasets": list(dict.fromkeys(datasets)),
    })
    base_name = "the embedded tiny Mistral model" if is_embedded_base(cfg) else cfg.model.name_or_path.split("/")[-1]
    title = repo_name(publish.model_repo) or f"SFT + DPO LoRA adapters for {base_name}"
    intro = (
        f"LoRA adapters for `{cfg.model.name_or_path}`, fine-tuned with supervised fine-tuning and then direct "
        "preference optimisation (DPO), by a reproducible DVC pipeline. Trained with "
        "[TRL](https://github.com/huggingface/trl) and [PEFT](https://github.com/huggingface/peft)."
    )
    sections = [
        meta,
        f"# {title}",
        intro,
        "## What it is\n\n" + _what_it_is(cfg, base_on_hub, publish.dataset_repo),
        training_section(cfg),
        data_section(cfg, data, local_sources),
        evaluation_section(evaluation),
        usage_section(cfg, base_on_hub, publish.model_repo),
        reproduce_section(cfg.recipe, commit),
    ]
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The dataset card


def dataset_card(
    cfg: Config,
    data: dict[str, Any],
    *,
    files: dict[str, str],
    columns: list[str],
    local_sources: dict[str, bool],
    license: str | None = None,
) -> str:
    """The README.md of the dataset repository: the preference pairs DPO used (train) and held out (test).

    `files`: split name -> file name in the repository; `columns`: the fields of a row.
    """
    counts = data["preferences"]
    publish = cfg.publish
    meta = "\n".join([
        "---",
        "configs:",  # the splits, so the Hub's viewer and load_dataset() need no file-name guessing
        '- config_name: "default"',
        "  data_files:",
        *(f"  - split: {json.dumps(split)}\n    path: {json.dumps(path)}" for split, path in files.items()),
        *yaml_lines({"license": license, "task_categories": ["text-generation"], "tags": list(DATASET_TAGS)}),
        "---",
    ])
    model = (f"[`{publish.model_repo}`](https://huggingface.co/{publish.model_repo})" if publish.model_repo
             else "the published adapters")
    title = repo_name(publish.dataset_repo) or "Preference pairs"
    dropped = {reason: n for reason, n in counts["dropped"].items() if reason != "total"}
    rows = [["rows read", str(counts["rows_read"])], ["kept", str(counts["kept"])]]
    rows += [[f"dropped: {reason}", str(n)] for reason, n in dropped.items()]
    rows += [["dropped in all", str(counts["dropped"].get("total", sum(dropped.values())))],
             [f"train (`{files['train']}`)", str(counts["train"])],
             [f"test (`{files['test']}`, held out)", str(counts["test"])]]
    sections = [
        meta,
        f"# {title}",
        f"The preference pairs of {model}: DPO trained on the `train` split; the `test` split was held out and "
        "scored (preference accuracy of the implicit reward). Rows are in TRL's conversational preference format.",
        _source_line("Source", cfg.data.preferences, local_sources[cfg.data.preferences.source], cfg.paths.embedded),
        f"Columns: {', '.join(f'`{column}`' for column in columns)}. `prompt`, `chosen` and `rejected` are lists of "
        "`{role, content}` messages.",
        "## Counts",
        f"Rows of {cfg.data.max_chars} characters or more and invalid rows were dropped, duplicates removed, and "
        f"{setting(cfg.data.test_size)} held out (seed {cfg.data.seed}).",
        table(["rows", "count"], rows),
    ]
    categories = counts.get("categories")
    if categories:
        sections += [
            "### Per category",
            table(["category", "train", "test"],
                  [[name, str(c.get("train", 0)), str(c.get("test", 0))] for name, c in categories.items()]),
        ]
    return "\n\n".join(sections) + "\n"
