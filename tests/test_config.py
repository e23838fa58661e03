"""params.yaml loading: every config error names its key in one line; `dvc exp run -S` spellings load."""

from pathlib import Path

import pytest
import yaml
from conftest import write_params

from finetune.config import load_config
from finetune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def load_with(tmp_path, edit):
    return load_config(write_params(tmp_path, edit))


def test_repository_params_load_with_the_required_user_facing_keys():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.model.name_or_path
    assert (cfg.data.sft.source, cfg.data.sft.format) == ("data/embedded/dolly.jsonl", "dolly")
    assert cfg.data.preferences.format == "ultrafeedback"
    assert (cfg.data.max_chars, cfg.data.test_size) == (2500, 0.1)
    assert isinstance(cfg.data.seed, int)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules[:4] == ("q_proj", "k_proj", "v_proj", "o_proj")


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
        (lambda p: p["model"].pop("name_or_path"), r"model\.name_or_path: missing"),
        (lambda p: p.update(lora=[1, 2]), r"lora: must be a mapping"),
    ],
)
def test_config_errors_name_the_key_in_one_line(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_with(tmp_path, edit)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(str(tmp_path / "params.yaml"))


def test_values_written_by_dvc_exp_set_load_as_intended(tmp_path):
    path = write_params(tmp_path, lambda p: None)
    text = path.read_text()
    # -S writes small floats as 1e-05 (a string to YAML 1.1 readers), 0 for a float, 8.0 for an int.
    text = text.replace("dropout: 0.05", "dropout: 0").replace("test_size: 0.1", "test_size: '1e-01'")
    text = text.replace("r: 16", "r: 8.0")
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.lora.dropout == 0.0 and isinstance(cfg.lora.dropout, float)
    assert cfg.data.test_size == 0.1
    assert cfg.lora.r == 8 and isinstance(cfg.lora.r, int)


def test_scientific_notation_without_a_dot_reads_as_a_float(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("test_size: 0.1 ", "test_size: 1e-01 "))
    assert load_config(path).data.test_size == 0.1


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+: not valid YAML"):
        load_config(bad)
