"""params.yaml loading: every config error names its key in one line; `dvc exp run -S` spellings load; every value
has one home, conf/config.yaml (the dataclasses hold no defaults, and a missing key is an error naming it)."""

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from finetune.core.config import Config, load_config
from finetune.core.errors import ConfigError
from finetune.tools.dry_run import compose_params

REPO = Path(__file__).resolve().parents[1]


def load_with(tmp_path, edit):
    return load_config(write_params(tmp_path, edit))


def config_fields(kind=Config, values=None, prefix=""):
    """(dotted key, dataclass field, its value in `values`) for every field of the Config tree, sections included;
    `values` is the default composition of conf/ (conf/config.yaml's values), which has one entry per round."""
    values = compose_params() if values is None else values
    hints = typing.get_type_hints(kind)
    for spec in dataclasses.fields(kind):
        key, kind_of = f"{prefix}{spec.name}", hints[spec.name]
        present = isinstance(values, dict) and spec.name in values
        value = values[spec.name] if present else dataclasses.MISSING
        yield key, spec, value
        if dataclasses.is_dataclass(kind_of) and present:
            yield from config_fields(kind_of, value, f"{key}.")
        elif typing.get_origin(kind_of) is dict and dataclasses.is_dataclass(typing.get_args(kind_of)[1]) and present:
            for name, entry in value.items():  # self_rewarding.rounds.NAME
                yield from config_fields(typing.get_args(kind_of)[1], entry, f"{key}.{name}.")


def test_every_config_field_has_exactly_one_home_conf_config_yaml():
    """No dataclass field carries a default (a second home that could disagree with conf/), and conf/ sets each."""
    with_defaults = [
        key
        for key, spec, _ in config_fields()
        if spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING
    ]
    assert not with_defaults, (
        f"{with_defaults} have a default in finetune/core/config.py; "
        "conf/config.yaml is their home"
    )
    not_in_conf = [key for key, _, value in config_fields() if value is dataclasses.MISSING]
    assert not not_in_conf, f"conf/config.yaml does not set {not_in_conf}"


def test_a_missing_key_fails_naming_it_for_every_key(tmp_path):
    """Whatever key params.yaml lacks, at any depth, the loader stops with one line naming it: no silent default."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    keys = [key for key, _, _ in config_fields()]
    assert len(keys) > 100
    for key in keys:
        edited = copy.deepcopy(params)
        *parents, leaf = key.split(".")
        section = edited
        for part in parents:
            section = section[part]
        del section[leaf]
        path.write_text(yaml.safe_dump(edited))
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert str(error.value) == f"{path}: {key}: missing key"


@pytest.mark.parametrize(
    "key", ["data.seed", "preference_data.top_p", "self_rewarding.prompts", "self_rewarding.rounds.round2.seed"]
)
def test_a_missing_key_fails_in_one_line_naming_it(tmp_path, key):
    """The issue's keys (their code defaults once differed from conf/) and a round's: an error, never a default."""
    *parents, leaf = key.split(".")

    def drop(params):
        section = params
        for part in parents:
            section = section[part]
        del section[leaf]

    with pytest.raises(ConfigError) as error:
        load_with(tmp_path, drop)
    assert str(error.value) == f"{tmp_path / 'params.yaml'}: {key}: missing key"


def test_every_params_section_named_in_dvc_yaml_exists_in_the_config():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cfg = load_config(REPO / "params.yaml")
    for name, stage in stages.items():
        for key in stage.get("params", []):
            node = cfg
            for part in key.split("."):
                present = part in node if isinstance(node, dict) else hasattr(node, part)
                assert present, f"stage {name} lists params '{key}', which params.yaml or the config does not have"
                node = node[part] if isinstance(node, dict) else getattr(node, part)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["lora"].update(dropuot=0.1), r"lora\.dropuot: unknown key \(did you mean 'lora\.dropout'\?\)"),
        (lambda p: p.update(trainer={}), r"trainer: unknown key"),
        (
            lambda p: p["data"].update(test_size=1.5),
            r"data\.test_size: must be between 0 and 1 \(exclusive\), got 1\.5",
        ),
        (lambda p: p["data"].update(test_size=0), r"data\.test_size: must be between 0 and 1"),
        (lambda p: p["lora"].update(r=-4), r"lora\.r: must be a positive integer, got -4"),
        (lambda p: p["lora"].update(r="abc"), r"lora\.r: must be an integer, got 'abc'"),
        (lambda p: p["lora"].update(r=8.5), r"lora\.r: must be an integer, got 8\.5"),
        (lambda p: p["data"].update(max_chars=True), r"data\.max_chars: must be an integer, got True"),
        (lambda p: p["lora"].update(target_modules="q_proj"), r"lora\.target_modules: must be a list of strings"),
        (lambda p: p["data"]["sft"].update(format="sharegpt"), r"data\.sft\.format: must be one of dolly, alpaca"),
        (lambda p: p["data"]["preferences"].update(format="dolly"), r"data\.preferences\.format: must be one of"),
        (lambda p: p["model"].pop("name_or_path"), r"model\.name_or_path: missing key"),
        (lambda p: p.update(lora=[1, 2]), r"lora: must be a mapping"),
    ],
)
def test_config_errors_name_the_key_in_one_line(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_with(tmp_path, edit)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(str(tmp_path / "params.yaml"))


def params_text(tmp_path, **spellings):
    """params.yaml with lora.dropout, lora.r and data.test_size written exactly as `spellings` spell them."""
    path = write_params(tmp_path, lambda p: (p["lora"].update(dropout="DROPOUT", r="RANK"),
                                             p["data"].update(test_size="TEST_SIZE")))  # fmt: skip
    text = path.read_text()
    for name, spelling in spellings.items():
        text = text.replace(f"{name.upper()}\n", f"{spelling}\n")
    path.write_text(text)
    return path


def test_values_written_by_dvc_exp_set_load_as_intended(tmp_path):
    # -S writes small floats as 1e-05 (a string to YAML 1.1 readers), 0 for a float, 8.0 for an int.
    cfg = load_config(params_text(tmp_path, dropout="0", rank="8.0", test_size="'3e-01'"))
    assert cfg.lora.dropout == 0.0 and isinstance(cfg.lora.dropout, float)
    assert cfg.data.test_size == 0.3
    assert cfg.lora.r == 8 and isinstance(cfg.lora.r, int)


def test_scientific_notation_without_a_dot_reads_as_a_float(tmp_path):
    cfg = load_config(params_text(tmp_path, dropout="0.1", rank="8", test_size="3e-01"))
    assert cfg.data.test_size == 0.3


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+: not valid YAML"):
        load_config(bad)
