"""finetune.overrides: every guard passes on the installed libraries and fails loudly (a RuntimeError naming the
library's version and the override) once the private attribute or code it relies on is gone; a failing guard changes
nothing; dynamo's settings hold only while a compiled layer runs. CPU only, no model weights."""

from __future__ import annotations

import re
import tomllib
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from finetune import overrides

REPO = Path(__file__).resolve().parents[1]

GUARDS = [
    overrides.check_train_sampler,
    overrides.check_rebalance_sampler,
    overrides.check_module_walks,
    overrides.check_studio_posts,
    overrides.check_compiler_settings,
    overrides.check_module_compile,
    overrides.check_dequantize,
    overrides.check_traced_4bit,
    overrides.check_bertscore,
    overrides.check_reference_adapter,
    overrides.check_padding_free_refusal,
]


def loudly(library: str, override: str) -> str:
    """The guards' message: `<library> <installed version>: <what> changed; see finetune/overrides.py <override>`."""
    return rf"^{re.escape(library)} {re.escape(version(library))}: .+ changed; see finetune/overrides\.py {override} "


def tiny_causal_lm(architecture: str = "mistral"):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[
        architecture
    ]
    config = config_cls(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return model_cls(config)


# --- on the installed libraries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", GUARDS, ids=lambda check: check.__name__)
def test_each_guard_passes_on_the_installed_libraries(check):
    check()


@pytest.mark.parametrize("architecture", ["mistral", "llama"])
def test_the_model_guards_pass_on_mistral_and_llama(architecture):
    model = tiny_causal_lm(architecture)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layer = model.model.layers[0]
    overrides.check_backbone_forward(model.model)
    overrides.check_checkpoint_function(layer)


def test_each_override_names_the_version_pinned_in_pyproject():
    """A pin bump fails here until the overrides of that library are read against the new version."""
    pins = dict(
        requirement.split("==")
        for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    )
    assert {library: pins.get(library) for library in overrides.WRITTEN_AGAINST} == overrides.WRITTEN_AGAINST


# --- when the library changes underneath -------------------------------------------------------------------------


def transformers_trainer():
    from transformers import Trainer

    return Trainer


def rebalance_sampler():
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    return BatchRebalanceSampler


def dvclive_live():
    from dvclive.live import Live

    return Live


def bnb_functional():
    import bitsandbytes.functional

    return bitsandbytes.functional


def bert_score_utils():
    import bert_score.utils

    return bert_score.utils


# (what owns the attribute, the attribute, the guard, the library, the override its message names)
REMOVED = [
    (
        transformers_trainer,
        "_get_train_sampler",
        overrides.check_train_sampler,
        "transformers",
        "replace_train_sampler",
    ),
    (rebalance_sampler, "_assign", overrides.check_rebalance_sampler, "transformers", "SharesSampler"),
    (lambda: torch.nn.Module, "zero_grad", overrides.check_module_walks, "torch", "walk_modules_once"),
    (dvclive_live, "post_data_to_studio", overrides.check_studio_posts, "dvclive", "skip_unconfigured_studio_posts"),
    (lambda: torch.nn.Module, "compile", overrides.check_module_compile, "torch", "compile_in_place"),
    (bnb_functional, "dequantize_4bit", overrides.check_dequantize, "bitsandbytes", "dequantize_base"),
    (bnb_functional, "quantize_4bit", overrides.check_traced_4bit, "bitsandbytes", "trace_4bit_products"),
    (bert_score_utils, "greedy_cos_idf", overrides.check_bertscore, "bert-score", "bertscore_pair_f1"),
]


@pytest.mark.parametrize(("owner", "attribute", "check", "library", "override"), REMOVED, ids=[r[1] for r in REMOVED])
def test_a_guard_fails_loudly_when_what_it_relies_on_is_gone(monkeypatch, owner, attribute, check, library, override):
    monkeypatch.delattr(owner(), attribute)
    with pytest.raises(RuntimeError, match=loudly(library, override)):
        check()


def test_the_compiler_settings_guard_fails_when_dynamo_drops_a_setting(monkeypatch):
    monkeypatch.setattr(torch._dynamo, "config", types.SimpleNamespace(recompile_limit=8))
    with pytest.raises(RuntimeError, match=loudly("torch", "compiler_settings")):
        overrides.check_compiler_settings()
    with pytest.raises(RuntimeError, match=loudly("torch", "compiler_settings")):
        overrides.in_compiler_settings(lambda: None)


def test_the_compiler_settings_guard_fails_when_aotautograd_drops_its_custom_function_setting(monkeypatch):
    monkeypatch.delattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions")
    with pytest.raises(RuntimeError, match=loudly("torch", "compiler_settings")):
        overrides.check_compiler_settings()


def test_the_model_guards_fail_on_a_changed_model(monkeypatch):
    from transformers.models.mistral import modeling_mistral

    model = tiny_causal_lm()
    layer = model.model.layers[0]
    with pytest.raises(RuntimeError, match=loudly("transformers", "checkpoint_around_compiled")):
        overrides.check_checkpoint_function(layer)  # checkpointing never enabled: no checkpoint function to wrap

    def backbone_without_positions(self, input_ids=None, attention_mask=None, **kwargs):
        return None

    monkeypatch.setattr(modeling_mistral.MistralModel, "forward", backbone_without_positions)
    with pytest.raises(RuntimeError, match=loudly("transformers", "wrap_forward")):
        overrides.wrap_forward(model.model, lambda forward: forward)
    assert "forward" not in vars(model.model)


def test_the_trl_guards_fail_when_trl_drops_the_code_they_route_around(monkeypatch):
    from trl import DPOTrainer, SFTTrainer

    def init_without_the_check(self, *args, **kwargs):
        return None

    monkeypatch.setattr(DPOTrainer, "__init__", init_without_the_check)
    with pytest.raises(RuntimeError, match=loudly("trl", "reference_adapter_name")):
        overrides.check_reference_adapter()
    monkeypatch.setattr(SFTTrainer, "__init__", init_without_the_check)
    with pytest.raises(RuntimeError, match=loudly("trl", "padding_free_sft_trainer")):
        overrides.padding_free_sft_trainer(
            lambda: None, types.SimpleNamespace(padding_free=True, packing=False, max_length=8)
        )


def test_trainers_outside_the_refused_combination_are_built_unchanged():
    built = object()
    for padding_free, packing, max_length in ((False, False, 8), (True, True, 8), (True, False, None)):
        args = types.SimpleNamespace(padding_free=padding_free, packing=packing, max_length=max_length)
        assert overrides.padding_free_sft_trainer(lambda: built, args) is built


def test_instance_guards_fail_on_objects_without_the_private_state():
    with pytest.raises(RuntimeError, match=loudly("dvclive", "skip_unconfigured_studio_posts")):
        overrides.skip_unconfigured_studio_posts(types.SimpleNamespace())
    with pytest.raises(RuntimeError, match=loudly("bert-score", "bertscore_pair_f1")):
        overrides.set_bertscore_dtype(types.SimpleNamespace(), torch.float16)


def test_a_failing_guard_changes_nothing(monkeypatch):
    from transformers import Trainer

    trainer = types.SimpleNamespace()
    monkeypatch.delattr(Trainer, "get_train_dataloader")
    with pytest.raises(RuntimeError, match=loudly("transformers", "replace_train_sampler")):
        overrides.replace_train_sampler(trainer, lambda train_dataset=None: None)
    assert vars(trainer) == {}

    model = tiny_causal_lm()
    monkeypatch.setattr(torch.nn.Module, "zero_grad", lambda self: None)  # no set_to_none any more
    with pytest.raises(RuntimeError, match=loudly("torch", "walk_modules_once")):
        overrides.walk_modules_once(model)
    assert not {"train", "zero_grad", "num_parameters"} & set(vars(model))


# --- what the overrides do --------------------------------------------------------------------------------------


def test_dynamo_settings_hold_only_while_a_compiled_layer_runs():
    config = torch._dynamo.config
    before = (config.suppress_errors, config.recompile_limit)
    seen = []

    def compiled():
        seen.append((config.suppress_errors, config.recompile_limit))
        raise ValueError("a failing step")

    aot_config = torch._functorch.config
    before_cache = aot_config.autograd_cache_allow_custom_autograd_functions
    with pytest.raises(ValueError, match="a failing step"):
        overrides.in_compiler_settings(compiled)()
    assert seen == [(overrides.SUPPRESS_COMPILE_ERRORS, max(before[1], overrides.RECOMPILE_LIMIT))]
    assert (config.suppress_errors, config.recompile_limit) == before
    assert aot_config.autograd_cache_allow_custom_autograd_functions == before_cache


# A compiled training step through bitsandbytes' 4-bit product (a torch.autograd.Function) on the CPU; prints how
# AOTAutograd's cache answered. argv: the inductor cache folder, then 1 or 0 for CACHE_CUSTOM_AUTOGRAD_FUNCTIONS.
AOT_CACHE_PROBE = """
import os, sys
os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[1]
import bitsandbytes as bnb, torch
from finetune import overrides
overrides.CACHE_CUSTOM_AUTOGRAD_FUNCTIONS = sys.argv[2] == "1"
torch.manual_seed(0)
layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
layer = layer.to("cpu")
step = overrides.in_compiler_settings(torch.compile(lambda x: torch.nn.functional.gelu(layer(x)).sum()))
inputs = torch.randn(8, 64, requires_grad=True)
loss = step(inputs)
loss.backward()
print(dict(torch._dynamo.utils.counters["aot_autograd"]))
print(repr(loss.item()), repr(inputs.grad.abs().sum().item()))
"""


@pytest.mark.parametrize("cached", [True, False], ids=["setting on", "setting off"])
def test_a_second_process_finds_the_4_bit_products_graphs_in_aotautograds_cache(tmp_path, cached):
    import subprocess
    import sys

    def probe() -> str:
        command = [sys.executable, "-c", AOT_CACHE_PROBE, str(tmp_path / "inductor"), "1" if cached else "0"]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout

    first, second = probe().splitlines(), probe().splitlines()
    if cached:
        assert "autograd_cache_saved" in first[-2] and "autograd_cache_hit" in second[-2]
    else:  # what the setting is for: without it every process traces and partitions the graph again
        assert "autograd_cache_bypass" in first[-2] and "autograd_cache_bypass" in second[-2]
    assert first[-1] == second[-1]  # the loss and input gradient, bit for bit, from the cached graph too


def test_compiling_the_decoder_layers_leaves_the_process_settings_alone(monkeypatch):
    """compile_decoder_layers compiles lazily: the settings change at each compiled call, never for the process."""
    from finetune.layout.speed import compile_decoder_layers

    config = torch._dynamo.config
    before = (config.suppress_errors, config.recompile_limit)
    model = tiny_causal_lm()
    seen = []

    def compile(self):  # nn.Module.compile, without compiling: the compiled call records the settings it runs under
        self._compiled_call_impl = lambda *args, **kwargs: seen.append(config.suppress_errors)

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    assert compile_decoder_layers(model) == 1
    assert (config.suppress_errors, config.recompile_limit) == before
    model.model.layers[0](torch.zeros(1, 2, 16))
    assert seen == [overrides.SUPPRESS_COMPILE_ERRORS]
    assert (config.suppress_errors, config.recompile_limit) == before


def test_studio_posts_are_skipped_only_where_dvclive_drops_them():
    def post():
        return "posted"

    unconfigured = types.SimpleNamespace(_studio_events_to_skip={"start", "data", "done"}, post_data_to_studio=post)
    configured = types.SimpleNamespace(_studio_events_to_skip=set(), post_data_to_studio=post)
    assert overrides.skip_unconfigured_studio_posts(unconfigured) is True
    assert unconfigured.post_data_to_studio() is None
    assert overrides.skip_unconfigured_studio_posts(configured) is False
    assert configured.post_data_to_studio() == "posted"


def test_a_real_dvclive_run_without_studio_skips_its_payloads(tmp_path, monkeypatch):
    from dvclive import Live

    for name in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_STUDIO_REPO_URL", "STUDIO_REPO_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    live = Live(str(tmp_path / "metrics"), dvcyaml=False, save_dvc_exp=False)
    assert overrides.skip_unconfigured_studio_posts(live) is True
    live.log_metric("loss", 1.0)
    live.next_step()  # sync() posts to Studio: now nothing
    assert (tmp_path / "metrics" / "plots" / "metrics" / "loss.tsv").is_file()
