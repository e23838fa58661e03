"""Check recipes without weights: compose, validate, build each one's model shape, LoRA, 4-bit and trainer configs.

    python -m finetune.tools.dry_run                        # every recipe in conf/recipe/
    python -m finetune.tools.dry_run seed003-zephyr-alpaca  # some of them
    python -m finetune.tools.dry_run --offline              # never ask the hub (the shipped architecture configs only)
    python -m finetune.tools.dry_run --write-params         # params.yaml from conf/ (default recipe), as DVC writes it

For each recipe: compose conf/ with `recipe=NAME` through Hydra's compose API (what `dvc exp run -S recipe=NAME`
does), validate the result with finetune.core.config.load_config, build the model on the meta device from its
architecture config (the hub's, via AutoConfig, when reachable; otherwise recipes/architectures/<org>--<name>.json),
wrap it with the recipe's LoRA (every target module must exist), build the BitsAndBytesConfig, and build TRL's
SFTConfig and DPOConfig from `sft.trainer` / `dpo.trainer` / `self_rewarding.trainer`, and build every ranker model
the recipe names (PairRM, a reward model, a judge) on the meta device from its architecture config. One line per
recipe; exit status 0 only if every recipe passes.

The trainer configs are built as on a CPU: keys are checked against the config dataclass's fields (so keys TRL no
longer accepts fail by name), bf16/fp16 must be true/false and not both true, and the config is then constructed
with bf16 = fp16 = False and use_cpu = True, because transformers rejects bf16 on a machine without a GPU. Every
other value (optimizer name, scheduler, warmup, lengths) goes through TRL's own validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core.config import Config, build_section, load_config
from finetune.core.errors import ConfigError, ProjectError

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
CONFIG_NAME = "config"
ARCHITECTURES_DIR = REPO / "recipes" / "architectures"
PARAMS_FILE = REPO / "params.yaml"

# Keys older TRL releases took and 1.16 rejects, with what replaced them (README "Recipes").
REPLACED_KEYS = {
    "max_seq_length": "max_length",
    "warmup_ratio": "warmup_steps (a value below 1 is a fraction of the steps)",
    "max_prompt_length": "dpo.max_prompt_length, outside the trainer section",
}
# Architecture fields compared between a shipped config and the hub's, when both are at hand.
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "sliding_window",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
)


class RecipeError(ProjectError):
    """A recipe that does not compose, validate or build; the message starts with the recipe's name."""


@dataclass
class Summary:
    recipe: str
    model: str
    architecture_source: str  # "hub", "shipped <file>", "local <folder>" or "params base.architecture"
    total_params: int
    trainable_params: int
    target_modules: tuple[str, ...]
    quantization: str
    trainers: dict[str, dict[str, str]]  # section -> optimizer, precision, effective batch
    notes: list[str]
    rankers: list[str] = dataclasses.field(default_factory=list)  # "section: ranker model [source] N params"

    def line(self) -> str:
        share = 100 * self.trainable_params / self.total_params
        trainers = "  ".join(
            f"{section}: {t['optim']}, {t['precision']}, batch {t['batch']}" for section, t in self.trainers.items()
        )
        notes = "".join(f"  note: {note}" for note in self.notes)
        rankers = "".join(f"  {ranker}" for ranker in self.rankers)
        return (
            f"{self.recipe}: ok  {self.model} [{self.architecture_source}]  "
            f"params {self.total_params:,} total / {self.trainable_params:,} trainable LoRA ({share:.2f}%)  "
            f"targets {','.join(self.target_modules)}  {self.quantization}  {trainers}{rankers}{notes}"
        )


def list_recipes(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(path.stem for path in (Path(conf_dir) / "recipe").glob("*.yaml"))


def compose_params(recipe: str | None = None, overrides: tuple[str, ...] = (), conf_dir: Path = CONF_DIR) -> dict:
    """conf/ composed as `dvc exp run -S recipe=NAME -S OVERRIDE...` does (recipe None: the default one)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    choice = [f"recipe={recipe}"] if recipe is not None else []
    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=choice + list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)


@functools.lru_cache(maxsize=None)
def _composed_json(recipe: str | None) -> str:
    return json.dumps(compose_params(recipe))


def default_section(key: str, recipe: str | None = None, **overrides: Any) -> Any:
    """The config section at dotted `key` (e.g. "evaluate.bertscore") with the values conf/ composes for `recipe`
    (None: the default recipe, which is conf/config.yaml's values), `overrides` on top, validated as params.yaml is.

    For tests and benchmarks that need one section: conf/ stays the one home of the values they do not set.
    """
    values = json.loads(_composed_json(recipe))
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None  # None: build_section names the bad key
    return build_section(key, {**(values or {}), **overrides})


def write_params(output: Path = PARAMS_FILE, conf_dir: Path = CONF_DIR) -> None:
    """params.yaml from conf/ with the default recipe, through DVC's own function (what `dvc exp run` writes)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(output, str(Path(conf_dir).resolve()), None, CONFIG_NAME, str(REPO), [])


def validate_params(params: dict) -> Config:
    """The composed params as the stages will read them from params.yaml."""
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(params)), encoding="utf-8")
        try:
            return load_config(path)
        except ConfigError as error:
            raise ConfigError(str(error).removeprefix(f"{path}: ")) from None


def check_trainer(config_cls: type, section: str, trainer_kwargs: dict[str, Any]) -> dict[str, str]:
    """Build `config_cls` from the trainer keywords as on a CPU (see the module doc); its summary for the line."""
    import trl

    from finetune.training.runs import build_args

    fields = {field.name for field in dataclasses.fields(config_cls) if field.init}
    for key in trainer_kwargs:
        if key not in fields:
            hint = REPLACED_KEYS.get(key) or next(iter(difflib.get_close_matches(key, fields, n=1)), None)
            raise ConfigError(
                f"{section}.trainer.{key}: not accepted by {config_cls.__name__} of trl {trl.__version__}"
                + (f" (use {hint})" if hint else "")
            )
    for precision in ("bf16", "fp16"):
        if not isinstance(trainer_kwargs.get(precision, False), bool):
            value = trainer_kwargs[precision]
            raise ConfigError(f"{section}.trainer.{precision}: must be true or false, got {value!r}")
    if trainer_kwargs.get("bf16") and trainer_kwargs.get("fp16"):
        raise ConfigError(f"{section}.trainer: bf16 and fp16 are both true; choose one (bf16 on GPUs that have it)")
    cpu_kwargs = dict(trainer_kwargs, bf16=False, fp16=False, use_cpu=True)
    with tempfile.TemporaryDirectory() as folder:
        args = build_args(
            config_cls, section, cpu_kwargs, output_dir=folder, report_to="none", logging_nan_inf_filter=False
        )
    precision = "bf16" if trainer_kwargs.get("bf16") else "fp16" if trainer_kwargs.get("fp16") else "fp32"
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    return {
        "optim": str(getattr(args.optim, "value", args.optim)),
        "precision": precision,
        "batch": f"{per_device}x{accumulation}={per_device * accumulation}",
    }


def architecture_file(name_or_path: str, folder: Path = ARCHITECTURES_DIR) -> Path:
    return Path(folder) / (name_or_path.replace("/", "--") + ".json")


def config_from_dict(values: dict[str, Any]):
    from transformers import CONFIG_MAPPING

    values = {key: value for key, value in values.items() if not key.startswith("_")}
    model_type = values.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(values)


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request, so that an offline machine does not wait for transformers' retries on every recipe."""
    import os
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
        return True
    except urllib.error.HTTPError:  # an answer, even an error status, means the hub is reachable
        return True
    except (urllib.error.URLError, OSError):
        return False


def load_architecture(cfg: Config, hub: bool):
    """(model config, where it came from, notes) for cfg.model, without downloading any weights."""
    from transformers import AutoConfig, MistralConfig

    name = cfg.model.name_or_path
    local = Path(name)
    if name == cfg.paths.base_model and cfg.base.gguf is not None:  # stage `base` imports it from a package
        from finetune.model.packaged import packaged_file

        path = packaged_file(cfg.base.gguf.package, cfg.base.gguf.file)
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name), f"packaged {path.name}", []
    if (local / "config.json").is_file():
        return AutoConfig.from_pretrained(local, trust_remote_code=cfg.model.trust_remote_code), f"local {name}", []
    if name == cfg.paths.base_model:  # the embedded model, not built yet: stage `base` builds it from these params
        arch = dataclasses.asdict(cfg.base.architecture)
        return MistralConfig(**arch, sliding_window=None, tie_word_embeddings=True), "params base.architecture", []
    shipped = architecture_file(name)
    notes: list[str] = []
    if hub:
        try:
            real = AutoConfig.from_pretrained(
                name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
            )
        except (OSError, ValueError) as error:
            notes.append(f"hub config unavailable ({str(error).splitlines()[0][:120]})")
        else:
            if shipped.is_file():
                mine = config_from_dict(json.loads(shipped.read_text())).to_dict()
                theirs = real.to_dict()
                differ = [key for key in SHAPE_KEYS if mine.get(key) != theirs.get(key)]
                if differ:
                    notes.append(f"{shipped.relative_to(REPO)} differs from the hub's config at {', '.join(differ)}")
            return real, "hub" + (f"@{cfg.model.revision}" if cfg.model.revision else ""), notes
    if not shipped.is_file():
        raise ConfigError(
            f"model.name_or_path: no architecture config for {name} offline; add {shipped.relative_to(REPO)}"
        )
    return config_from_dict(json.loads(shipped.read_text())), f"shipped {shipped.name}", notes


def build_model_summary(cfg: Config, hub: bool) -> tuple[str, int, int, list[str]]:
    """The model on the meta device wrapped with the recipe's LoRA: (source, total, trainable parameters, notes)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.model.loading import build_lora_config

    architecture, source, notes = load_architecture(cfg, hub)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
        linear = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
        missing = [module for module in cfg.lora.target_modules if module not in linear]
        if missing:
            raise ConfigError(
                f"lora.target_modules: {', '.join(missing)} not in {type(model).__name__} "
                f"(its linear layers: {', '.join(sorted(linear))})"
            )
        model = get_peft_model(model, build_lora_config(cfg.lora))
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return source, total, trainable, notes


def ranker_architecture(name: str, revision: str | None, key: str, hub: bool):
    """(config, source) of a ranker model: the hub's config.json when reachable, else the shipped file."""
    from transformers import AutoConfig

    if (Path(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(name), f"local {name}"
    if hub:
        try:
            return AutoConfig.from_pretrained(name, revision=revision), "hub" + (f"@{revision}" if revision else "")
        except (OSError, ValueError):
            pass  # the shipped file, if there is one, still tells the shape
    shipped = architecture_file(name)
    if not shipped.is_file():
        raise ConfigError(f"{key}: no architecture config for {name} offline; add {shipped.relative_to(REPO)}")
    return config_from_dict(json.loads(shipped.read_text())), f"shipped {shipped.name}"


def ranker_summaries(cfg: Config, hub: bool) -> list[str]:
    """Each ranker model the recipe names (preference_data, self_rewarding), built on the meta device: its class and
    parameter count. The reference ranker and a self-judge (the policy) load nothing of their own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finetune.preferences.ranking import PairRMModel

    lines = []
    for section in ("preference_data", "self_rewarding"):
        ranker = getattr(cfg, section).ranker
        if ranker.name == "reference" or (ranker.name == "judge" and ranker.model is None):
            lines.append(f"{section}.ranker: {ranker.name}" + (" (the policy)" if ranker.name == "judge" else ""))
            continue
        key = f"{section}.ranker.model"
        config, source = ranker_architecture(ranker.model, ranker.revision, key, hub)
        if ranker.name == "pairrm" and config.model_type != "deberta-v2":
            raise ConfigError(f"{key}: PairRM is a DeBERTa-v2/v3 model; {ranker.model} is {config.model_type}")
        if ranker.name == "reward_model":
            config.num_labels = 1  # a hub config may name no labels; the stage checks the real checkpoint's count
        with torch.device("meta"):
            if ranker.name == "pairrm":
                model = PairRMModel(config)
            elif ranker.name == "reward_model":
                model = AutoModelForSequenceClassification.from_config(config)
            else:
                model = AutoModelForCausalLM.from_config(config)
        total = sum(parameter.numel() for parameter in model.parameters())
        described = f"{ranker.name} {ranker.model} {type(model).__name__} [{source}] {total:,} params"
        lines.append(f"{section}.ranker: {described}")
    return lines


def dry_run(recipe: str, overrides: tuple[str, ...] = (), conf_dir: Path = CONF_DIR, hub: bool = False) -> Summary:
    """Everything a GPU run of `recipe` would set up before loading weights; RecipeError names recipe and key."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from trl import DPOConfig, SFTConfig

    from finetune.model.loading import build_bnb_config

    try:
        try:
            params = compose_params(recipe, overrides, conf_dir)
        except (HydraException, OmegaConfBaseException) as error:  # unknown recipe, bad override, missing key
            raise ConfigError(f"does not compose: {str(error).splitlines()[0]}") from None
        cfg = validate_params(params)
        if cfg.recipe != recipe:
            raise ConfigError(f"recipe: is {cfg.recipe!r}; a recipe file must set `recipe:` to its own name")
        trainers = {
            "sft": check_trainer(SFTConfig, "sft", cfg.sft.trainer),
            "dpo": check_trainer(DPOConfig, "dpo", cfg.dpo.trainer),
            "self_rewarding": check_trainer(DPOConfig, "self_rewarding", cfg.self_rewarding.trainer),
        }
        quantization = "fp32/bf16 weights"
        if cfg.model.load_in_4bit:
            bnb = build_bnb_config()
            quantization = f"4-bit {bnb.bnb_4bit_quant_type} (double quant {bnb.bnb_4bit_use_double_quant})"
        source, total, trainable, notes = build_model_summary(cfg, hub)
        rankers = ranker_summaries(cfg, hub)
    except ProjectError as error:
        raise RecipeError(f"{recipe}: {error}") from None
    for section in trainers:
        if getattr(cfg, section).trainer.get("fp16"):
            notes.append(f"{section}.trainer.fp16 is known to give NaN losses with Mistral and in DPO")
    model = cfg.model.name_or_path
    return Summary(
        recipe, model, source, total, trainable, cfg.lora.target_modules, quantization, trainers, notes, rankers
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.tools.dry_run", description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (conf/recipe/NAME.yaml); default: all")
    parser.add_argument("--offline", action="store_true", help="use the shipped architecture configs only")
    parser.add_argument("--write-params", action="store_true", help="regenerate params.yaml from conf/ and exit")
    args = parser.parse_args(argv)
    if args.write_params:
        write_params()
        print(f"wrote {PARAMS_FILE.relative_to(REPO)} from conf/ (default recipe)")
        return 0
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU kernel notice is noise here
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers property
    hub = not args.offline and hub_reachable()
    failed = 0
    for recipe in args.recipes or list_recipes():
        try:
            print(dry_run(recipe, hub=hub).line(), flush=True)
        except RecipeError as error:
            failed += 1
            print(f"FAIL {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
