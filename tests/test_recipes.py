"""Recipes (conf/recipe/*.yaml): they compose and validate, params.yaml is the default composition, and each one's
dry run builds its model shape, LoRA, 4-bit and trainer configs without weights. The recipes' values themselves live in
conf/ only: the tests check what composition and validation do with them, not restate them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.core.config import Config
from finetune.tools.dry_run import (
    ARCHITECTURES_DIR,
    CONF_DIR,
    RecipeError,
    architecture_file,
    compose_params,
    dry_run,
    list_recipes,
    validate_params,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = list_recipes()
SEED_RECIPES = [name for name in RECIPES if name.startswith("seed")]


def recipe_config(name: str | None, *overrides: str) -> Config:
    return validate_params(compose_params(name, overrides))


def test_there_is_one_recipe_per_seed_and_the_embedded_default():
    assert "embedded" in RECIPES
    assert sorted(name[:7] for name in SEED_RECIPES) == [f"seed00{i}" for i in range(5)]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_validates_and_names_itself(name):
    assert recipe_config(name).recipe == name


def test_params_yaml_is_exactly_the_default_composition():
    composed = OmegaConf.to_yaml(OmegaConf.create(compose_params()))  # what `dvc exp run` writes to params.yaml
    assert (REPO / "params.yaml").read_text(encoding="utf-8") == composed, (
        "params.yaml is generated from conf/: edit conf/, then run `python -m finetune.tools.dry_run --write-params`"
    )


def test_the_default_recipe_is_embedded_and_changes_nothing_but_the_recipe_key():
    assert compose_params() == compose_params("embedded")
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=True)  # ${paths.*} in rounds
    assert raw.pop("defaults") == ["_self_", {"recipe": "embedded"}]
    composed = compose_params()
    assert composed.pop("recipe") == "embedded"
    raw.pop("recipe")
    assert composed == raw


def test_dvc_composes_params_with_hydra():
    from configobj import ConfigObj

    hydra = ConfigObj(str(REPO / ".dvc" / "config"))["hydra"]
    assert hydra["enabled"] == "true"
    assert hydra.get("config_dir", "conf") == "conf" and hydra.get("config_name", "config") == "config"


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_builds_every_recipe(name):
    summary = dry_run(name)
    assert 0 < summary.trainable_params < summary.total_params
    assert set(summary.trainers) == {"sft", "dpo", "self_rewarding"}
    if name == "smollm2":  # SmolLM2-135M-Instruct, read from the GGUF file's metadata
        assert summary.architecture_source == "packaged SmolLM2-135M-Instruct.Q4_1.gguf"
        assert 134e6 < summary.total_params - summary.trainable_params < 135e6  # 134,515,008
    elif name != "embedded":
        assert summary.architecture_source.startswith("shipped")
        assert 7.2e9 < summary.total_params - summary.trainable_params < 7.3e9  # Mistral-7B: 7,241,732,096
        assert summary.quantization.startswith("4-bit nf4")


@pytest.mark.parametrize(
    "override, key",
    [
        ("+sft.trainer.max_seq_length=1024", "sft.trainer.max_seq_length"),  # removed in TRL 0.20
        ("+sft.trainer.warmup_ratio=0.1", "sft.trainer.warmup_ratio"),  # removed from transformers/TRL
        ("+dpo.trainer.max_prompt_length=512", "dpo.trainer.max_prompt_length"),  # removed from DPOConfig
    ],
)
def test_a_key_the_installed_trl_rejects_fails_naming_recipe_and_key(override, key):
    with pytest.raises(RecipeError, match=rf"^seed000-mistral-dolly-dpo: {key}: not accepted by") as error:
        dry_run("seed000-mistral-dolly-dpo", (override,))
    assert "\n" not in str(error.value)


def test_a_recipe_file_with_a_removed_key_fails_naming_it(tmp_path):
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")
    text = (conf / "recipe" / "seed003-zephyr-alpaca.yaml").read_text()
    text = text.replace("recipe: seed003-zephyr-alpaca", "recipe: old-style").replace(
        "    num_train_epochs: 1\n", "    num_train_epochs: 1\n    warmup_ratio: 0.03\n", 1
    )
    (conf / "recipe" / "old-style.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"^old-style: sft\.trainer\.warmup_ratio: not accepted by SFTConfig"):
        dry_run("old-style", conf_dir=conf)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.target_modules=[q_proj,qkv_proj]", r"lora\.target_modules: qkv_proj not in MistralForCausalLM"),
        ("sft.trainer.fp16=true", r"sft\.trainer: bf16 and fp16 are both true"),
        ("lora.r=0", r"lora\.r: must be a positive integer"),
        ("+sft.trainer.output_dir=x", r"sft\.trainer\.output_dir: set by the pipeline"),
    ],
)
def test_other_recipe_mistakes_fail_in_one_line(override, message):
    with pytest.raises(RecipeError, match=rf"^seed003-zephyr-alpaca: {message}"):
        dry_run("seed003-zephyr-alpaca", (override,))


def test_an_unknown_recipe_fails_naming_it():
    with pytest.raises(RecipeError, match=r"^no-such-recipe: does not compose: .*recipe/no-such-recipe"):
        dry_run("no-such-recipe")


def test_overrides_apply_on_top_of_a_recipe():
    """`dvc exp run -S recipe=NAME -S KEY=VALUE` is Hydra's compose with these overrides."""
    cfg = recipe_config("seed003-zephyr-alpaca", "lora.r=4", "+sft.trainer.max_grad_norm=0.5")
    assert (cfg.recipe, cfg.lora.r, cfg.lora.alpha) == ("seed003-zephyr-alpaca", 4, 32)
    assert cfg.sft.trainer["max_grad_norm"] == 0.5
    assert cfg.model.name_or_path == "HuggingFaceH4/zephyr-7b-beta"
    # The seed's other gradient accumulation values, on top of the recipe's 8.
    for steps in (4, 16):
        cfg = recipe_config("seed000-mistral-dolly-dpo", f"sft.trainer.gradient_accumulation_steps={steps}")
        assert cfg.sft.trainer["gradient_accumulation_steps"] == steps
    # Keys exist or not in the composed config: the recipe adds max_steps, so there it needs no '+'.
    assert recipe_config("seed000-mistral-dolly-dpo", "sft.trainer.max_steps=10").sft.trainer["max_steps"] == 10
    with pytest.raises(Exception, match="max_steps"):
        compose_params("embedded", ("sft.trainer.max_steps=10",))
    with pytest.raises(Exception, match="max_steps"):
        compose_params("seed000-mistral-dolly-dpo", ("+sft.trainer.max_steps=10",))
    assert recipe_config("seed000-mistral-dolly-dpo", "++sft.trainer.max_steps=10").sft.trainer["max_steps"] == 10


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_every_seed_recipe_has_the_7b_essentials(name):
    cfg = recipe_config(name)
    assert cfg.model.load_in_4bit
    assert architecture_file(cfg.model.name_or_path).is_file()
    assert (cfg.evaluate.bertscore.model, cfg.evaluate.bertscore.num_layers) == ("roberta-large", 17)
    assert cfg.evaluate.bertscore.rescale_with_baseline
    for trainer in (cfg.sft.trainer, cfg.dpo.trainer):
        assert trainer["activation_checkpointing"] is True
        assert trainer["bf16"] is True and not trainer.get("fp16")  # the seeds' fp16 stays one -S away
        assert trainer["learning_rate"] < 1e-3  # not the tiny model's rates


def test_seed001_chains_its_rounds_and_dry_runs_its_rankers():
    """Composition resolves the rounds' ${paths.*} starts into a chain; the dry run builds PairRM and a self-judge."""
    cfg = recipe_config("seed001-instruct-lima-pairrm")
    rounds = cfg.self_rewarding
    assert [r.start for r in rounds.rounds.values()] == [cfg.paths.sft_adapter, f"{cfg.paths.rounds}/round1"]
    assert "PENDING" not in (CONF_DIR / "recipe" / "seed001-instruct-lima-pairrm.yaml").read_text()
    summary = dry_run("seed001-instruct-lima-pairrm")
    assert any(line.startswith("preference_data.ranker: pairrm llm-blender/PairRM-hf PairRMModel") and
               "436,111,361 params" in line for line in summary.rankers)  # fmt: skip  (DeBERTa-v3-large + head)
    assert "self_rewarding.ranker: judge (the policy)" in summary.rankers


def test_a_ranker_model_without_an_architecture_offline_fails_naming_the_key():
    with pytest.raises(RecipeError, match=r"^seed001-instruct-lima-pairrm: preference_data\.ranker\.model: no "
                                          r"architecture config for org/unknown-rm offline"):
        dry_run("seed001-instruct-lima-pairrm", ("preference_data.ranker.model=org/unknown-rm",))


@pytest.mark.parametrize(
    "hub_id, rope_theta, sliding_window",
    [
        ("mistralai/Mistral-7B-v0.1", 10000.0, 4096),
        ("HuggingFaceH4/zephyr-7b-beta", 10000.0, 4096),
        ("mistralai/Mistral-7B-Instruct-v0.2", 1000000.0, None),
    ],
)
def test_shipped_architectures_have_the_published_numbers(hub_id, rope_theta, sliding_window):
    config = json.loads(architecture_file(hub_id, ARCHITECTURES_DIR).read_text())
    assert (config["model_type"], config["architectures"]) == ("mistral", ["MistralForCausalLM"])
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    assert [config[key] for key in shape] == [4096, 14336, 32, 32, 8]
    assert (config["vocab_size"], config["max_position_embeddings"], config["rms_norm_eps"]) == (32000, 32768, 1e-5)
    assert (config["rope_theta"], config["sliding_window"]) == (rope_theta, sliding_window)
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (1, 2, False)


def test_with_hub_access_the_hub_config_is_used_and_compared_with_the_shipped_one(monkeypatch):
    from transformers import AutoConfig, MistralConfig

    hub_config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *args, **kwargs: hub_config)
    summary = dry_run("seed003-zephyr-alpaca", hub=True)
    assert summary.architecture_source == "hub"
    assert summary.total_params < 10**7  # built from the hub's (here: tiny) config, not the shipped one
    assert any("differs from the hub's config at hidden_size" in note for note in summary.notes)
