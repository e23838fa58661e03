"""Training: the [INST] template and completion-only labels, sft and dpo end to end on a tiny model, DPO's reference
being the SFT model, resuming after a kill, the NaN guard and the CPU fallbacks.

The tiny project (conftest.tiny_project) is real: embedded data, prepare and a pre-trained base model, built once per
module; the stages run exactly as `dvc repro` runs them, only smaller.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from finetune.core.config import load_config
from finetune.core.errors import ConfigError
from finetune.data.rows import PREFERENCES_TRAIN, SFT_TRAIN, read_jsonl
from finetune.embedded.tiny_model import END_INST, train_tokenizer
from finetune.model.loading import MISTRAL_CHAT_TEMPLATE, load_model, load_tokenizer
from finetune.training import dpo as dpo_training
from finetune.training import sft as sft_training
from finetune.training.runs import (
    NonFiniteLossError,
    StopOnNonFiniteLoss,
    adapt_to_device,
    build_args,
    trainer_args,
)
from stages import dpo, sft

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def outside_the_repository(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: stages must write only where params say (absolute tmp paths here),
    and DVCLive would otherwise drop step markers into the repository's .dvc/tmp."""
    monkeypatch.chdir(tmp_path)


def with_paths(cfg, **paths):
    """The config with some outputs moved: building a trainer creates its DVCLive folder, which must not be the
    one an end-to-end test reads."""
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, **paths))


def read_metrics(folder) -> dict:
    return json.loads((Path(folder) / "metrics.json").read_text())


def curve_steps(folder, name="loss") -> list[int]:
    lines = (Path(folder) / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [int(line.split("\t")[0]) for line in lines]


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_one_line_error(err: str, pattern: str) -> str:
    """The stage's error is one line of its own on stderr, with no traceback."""
    errors = re.findall(r"(?m)^error: .*$", err)
    assert len(errors) == 1, err[-2000:]
    assert re.fullmatch(pattern, errors[0]), errors[0]
    assert "Traceback" not in err
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# The chat template: pure rendering (no model), then the token ids and labels the SFT trainer really trains on.


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE tokenizer with the project's special tokens and template, trained in milliseconds."""
    return train_tokenizer(["Be brief. Hi there, hello. What is two and two? Four."] * 4, vocab_size=300)


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=MISTRAL_CHAT_TEMPLATE, tokenize=False, **kwargs)


def test_template_renders_mistral_inst_format_with_one_bos_and_eos_after_each_answer(small_tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Two and two?"},
        {"role": "assistant", "content": "Four."},
    ]
    assert render(small_tokenizer, messages) == "<s>[INST] Hi [/INST] Hello</s>[INST] Two and two? [/INST] Four.</s>"


def test_template_folds_the_system_turn_into_the_first_user_turn(small_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    # Mistral-Instruct has no system role: the system text opens the first [INST] only, not every turn.
    assert render(small_tokenizer, messages) == "<s>[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Again [/INST]"


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_generation_prompt_is_an_exact_prefix_of_prompt_plus_completion(small_tokenizer, system):
    # TRL splits prompt from completion where the two renderings diverge; any difference would train on prompt text
    # or drop answer text, and generation would start from a context the model never saw.
    prompt = [{"role": "user", "content": "Two and two?"}]
    if system:
        prompt.insert(0, {"role": "system", "content": system})
    completion = [{"role": "assistant", "content": "Four."}]
    prompt_text = render(small_tokenizer, prompt, add_generation_prompt=True)
    full_text = render(small_tokenizer, prompt + completion)
    assert prompt_text.endswith("[/INST]")
    assert full_text == prompt_text + " Four.</s>"


def test_template_rejects_unknown_roles(small_tokenizer):
    with pytest.raises(Exception, match="roles must be system, user or assistant"):
        render(small_tokenizer, [{"role": "tool", "content": "42"}])


def test_tokenized_prompts_are_token_prefixes_of_every_prepared_example(tiny_project):
    # The text prefix is not enough: BPE could merge across the boundary. Checked on every prepared row.
    cfg = load_config(tiny_project.params_path)
    tokenizer = load_tokenizer(cfg.model)

    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, **kwargs)["input_ids"]

    pairs = [(row["prompt"], row["completion"]) for row in read_jsonl(Path(cfg.paths.prepared) / SFT_TRAIN)]
    for row in read_jsonl(Path(cfg.paths.prepared) / PREFERENCES_TRAIN):
        pairs += [(row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])]
    assert len(pairs) > 200
    for prompt, completion in pairs:
        prompt_ids, full_ids = ids(prompt, add_generation_prompt=True), ids(prompt + completion)
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[-1] == tokenizer.eos_token_id and full_ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.slow
def test_sft_trains_on_the_answer_and_its_eos_and_never_on_the_prompt(tiny_project, tmp_path):
    from trl import SFTConfig

    cfg = with_paths(load_config(tiny_project.params_path), sft_metrics=str(tmp_path / "metrics"))
    tokenizer = load_tokenizer(cfg.model)
    # pad == EOS would make the collator mask every EOS, and the model would never learn to stop.
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    end_inst = tokenizer.convert_tokens_to_ids(END_INST)

    args = trainer_args(SFTConfig, "sft", cfg.sft.trainer, str(tmp_path / "out"))
    trainer = sft_training.build_trainer(cfg, args, resume=False)
    assert trainer.processing_class.pad_token_id == pad

    examples = list(trainer.train_dataset)
    whole = [e for e in examples if len(e["input_ids"]) < args.max_length]  # the rest were cut at max_length
    assert len(whole) >= len(examples) - 3 and len(whole) >= 8
    batch = trainer.data_collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in whole[:8]])
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.min() < lengths.max(), "the batch should need padding"

    for ids, labels, n in zip(batch["input_ids"], batch["labels"], lengths.tolist()):
        real, real_labels = ids[:n], labels[:n]
        assert (ids[n:] == pad).all() and (labels[n:] == -100).all()
        assert real[0] == bos and (real == bos).sum() == 1  # the template's BOS only, no tokenizer-added second one
        assert real[-1] == eos and real_labels[-1] == eos  # the answer's EOS is trained on
        (inst_ends,) = (real == end_inst).nonzero(as_tuple=True)
        assert len(inst_ends) == 1  # single-turn rows
        prompt_len = inst_ends.item() + 1  # through [/INST]
        assert (real_labels[:prompt_len] == -100).all()
        assert (real_labels[prompt_len:] == real[prompt_len:]).all() and n - prompt_len >= 2

    # Every example, batched or not: the masked part is exactly the rendered prompt.
    rows = {tuple(e["input_ids"]): e for e in examples}
    for row in read_jsonl(Path(cfg.paths.prepared) / SFT_TRAIN):
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"])["input_ids"]
        if len(full) >= args.max_length:
            continue
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)["input_ids"]
        labels = rows[tuple(full)]["labels"]
        assert labels == [-100] * len(prompt) + full[len(prompt) :]


# ---------------------------------------------------------------------------------------------------------------------
# sft and dpo end to end, as `dvc repro` runs them.


@pytest.fixture(scope="module")
def sft_run(tiny_project):
    """stages.sft.main on the tiny project: the adapter that dpo and the reference test start from."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_project.root)
        sft.main(str(tiny_project.params_path))
    return load_config(tiny_project.params_path)


@pytest.mark.slow
def test_sft_writes_a_trained_adapter_with_tokenizer_and_curves_and_cleans_up(tiny_project, sft_run):
    cfg = sft_run
    adapter = Path(cfg.paths.sft_adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (cfg.lora.r, cfg.lora.alpha)
    assert sorted(config["target_modules"]) == sorted(cfg.lora.target_modules)
    assert config["base_model_name_or_path"] == cfg.model.name_or_path
    for name in ("adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (adapter / name).is_file(), name
    assert load_tokenizer(dataclasses.replace(cfg.model, name_or_path=str(adapter))).chat_template

    # Written atomically, and a finished run leaves no checkpoints to be wrongly resumed next time.
    assert not adapter.with_name(adapter.name + ".partial").exists()
    assert not (Path(cfg.paths.checkpoints) / "sft").exists()

    metrics = read_metrics(cfg.paths.sft_metrics)
    assert metrics["step"] == cfg.sft.trainer["max_steps"]
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert curve_steps(cfg.paths.sft_metrics) == list(range(1, cfg.sft.trainer["max_steps"] + 1))

    # LoRA B starts at zero: non-zero B in every adapted module means the optimizer really updated the adapter.
    tensors = adapter_tensors(adapter)
    lora_b = {name: t for name, t in tensors.items() if "lora_B" in name}
    assert {m for m in cfg.lora.target_modules if any(f".{m}." in n for n in lora_b)} == set(cfg.lora.target_modules)
    assert all(t.abs().max() > 0 for t in lora_b.values())


@pytest.mark.slow
def test_dpo_writes_only_the_policy_adapter_and_reward_curves(tiny_project, sft_run):
    cfg = sft_run
    dpo.main(str(tiny_project.params_path))
    adapter = Path(cfg.paths.dpo_adapter)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()
    # The frozen reference copy is scaffolding: saving it would ship a second adapter, in a "ref" subfolder.
    assert not (adapter / "ref").exists()
    tensors = adapter_tensors(adapter)
    assert not any(".ref." in name for name in tensors)
    assert not adapter.with_name(adapter.name + ".partial").exists()
    assert not (Path(cfg.paths.checkpoints) / "dpo").exists()

    # DPO started from the SFT adapter (same names and shapes) and moved it.
    sft_tensors = adapter_tensors(cfg.paths.sft_adapter)
    assert {n: t.shape for n, t in tensors.items()} == {n: t.shape for n, t in sft_tensors.items()}
    assert any(not torch.equal(tensors[n], sft_tensors[n]) for n in tensors)

    metrics = read_metrics(cfg.paths.dpo_metrics)
    assert metrics["step"] == cfg.dpo.trainer["max_steps"]
    assert math.isfinite(metrics["loss"])
    assert 0 <= metrics["rewards"]["accuracies"] <= 1 and math.isfinite(metrics["rewards"]["margins"])
    for curve in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert curve_steps(cfg.paths.dpo_metrics, curve)[-1] == cfg.dpo.trainer["max_steps"]


# ---------------------------------------------------------------------------------------------------------------------
# DPO's reference policy must be the SFT model: with the bare base model as reference, the implicit reward measures
# the SFT adapter itself and DPO drifts.


def completion_logps(model, batch) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens, computed independently of TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.mark.slow
def test_dpo_reference_is_the_frozen_sft_model_not_the_base_model(tiny_project, sft_run, tmp_path):
    from peft import PeftModel
    from trl import DPOConfig

    cfg = with_paths(sft_run, dpo_metrics=str(tmp_path / "metrics"))
    # One step at full learning rate, to check that training moves the policy but not the reference.
    trainer_kwargs = {**cfg.dpo.trainer, "max_steps": 1, "warmup_steps": 0}
    args = trainer_args(DPOConfig, "dpo", trainer_kwargs, str(tmp_path / "out"))
    trainer = dpo_training.build_trainer(cfg, args, resume=False)
    policy = trainer.model
    assert "ref" in policy.peft_config and policy.active_adapter == "default"

    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["completion_mask"].sum() > 0

    def reference_logps():
        policy.eval()  # no LoRA dropout, so the comparisons are exact
        return torch.cat(trainer.compute_ref_log_probs(policy, batch))  # what TRL uses in the DPO loss

    sft_model = PeftModel.from_pretrained(load_model(cfg.model, for_training=False), cfg.paths.sft_adapter).eval()
    base_model = load_model(cfg.model, for_training=False).eval()
    sft_logps, base_logps = completion_logps(sft_model, batch), completion_logps(base_model, batch)
    tolerance = dict(rtol=1e-5, atol=1e-3)

    reference = reference_logps()
    torch.testing.assert_close(reference, sft_logps, **tolerance)
    # The SFT adapter must make a difference far above the float noise, or this test could not tell them apart.
    assert (reference - base_logps).abs().max() > 100 * tolerance["atol"]

    trainer.train()
    reference_after = reference_logps()
    torch.testing.assert_close(reference_after, sft_logps, **tolerance)  # the "ref" adapter stayed frozen
    assert (completion_logps(policy, batch) - sft_logps).abs().max() > 10 * tolerance["atol"]  # the policy moved


# ---------------------------------------------------------------------------------------------------------------------
# The NaN guard: a diverged run fails loudly instead of saving (and DVC caching) a broken adapter.


class State:
    global_step = 7


@pytest.mark.parametrize(
    "logs, message",
    [
        ({"loss": float("nan"), "grad_norm": 1.0}, "loss became nan at step 7"),
        ({"loss": float("inf")}, "loss became inf at step 7"),
        ({"loss": float("-inf")}, "loss became -inf at step 7"),
        ({"loss": 2.5, "grad_norm": float("nan")}, "grad_norm became nan at step 7"),
    ],
)
def test_non_finite_loss_or_grad_norm_stops_the_run_naming_the_step(logs, message):
    with pytest.raises(NonFiniteLossError, match=f"^{re.escape(message)}; lower the learning rate"):
        StopOnNonFiniteLoss().on_log(None, State(), None, logs=logs)


def test_finite_and_missing_values_pass_the_guard():
    guard = StopOnNonFiniteLoss()
    guard.on_log(None, State(), None, logs={"loss": 2.5, "grad_norm": 0.3, "learning_rate": 1e-3})
    guard.on_log(None, State(), None, logs={"train_runtime": 1.0})
    guard.on_log(None, State(), None, logs=None)


def test_walk_modules_once_sets_modes_and_clears_gradients_like_the_module_methods(tiny_project):
    from peft import get_peft_model

    from finetune.model.loading import build_lora_config
    from finetune.training.runs import WalkModulesOnce

    cfg = load_config(tiny_project.params_path)
    model = get_peft_model(load_model(cfg.model, for_training=True), build_lora_config(cfg.lora))
    counted = model.num_parameters(exclude_embeddings=True)
    WalkModulesOnce().on_train_begin(None, None, None, model=model)
    assert model.train(False) is model and not any(module.training for module in model.modules())
    model.train()
    assert all(module.training for module in model.modules())
    model(input_ids=torch.ones(1, 8, dtype=torch.long)).logits.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in trainable)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == counted
    WalkModulesOnce().on_train_end(None, None, None, model=model)
    assert not {"train", "zero_grad", "num_parameters"} & set(vars(model))  # the module methods again


def test_walk_modules_once_leaves_models_whose_modules_train_differently_alone():
    from finetune.training.runs import WalkModulesOnce

    class CountsModeChanges(torch.nn.Linear):
        changes = 0

        def train(self, mode: bool = True):
            CountsModeChanges.changes += 1
            return super().train(mode)

    model = torch.nn.Sequential(CountsModeChanges(2, 2))
    WalkModulesOnce().on_train_begin(None, None, None, model=model)
    model.train()
    assert CountsModeChanges.changes == 1


def test_log_lines_do_not_reparse_the_run_for_studio_when_studio_is_off(tmp_path, monkeypatch):
    """DVCLive 3.49 builds Studio's payload at every log line (re-reading params.yaml and every curve) even when no
    Studio is configured; the stages skip that work, and still write the curves and the params."""
    import dvclive.live
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import DVCLiveCallback

    from finetune.training.runs import live_callbacks

    for name in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_STUDIO_REPO_URL", "STUDIO_REPO_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    parsed = []
    monkeypatch.setattr(dvclive.live, "load_yaml", lambda path: parsed.append(path) or {})
    callbacks = live_callbacks(str(tmp_path / "metrics"), resume=False, params={"speed": {"mode": "fast"}})
    [dvclive_callback] = [callback for callback in callbacks if isinstance(callback, DVCLiveCallback)]
    args, state, control = TrainingArguments(str(tmp_path / "out"), report_to="none"), TrainerState(), TrainerControl()
    for step in range(1, 4):
        state.global_step = step
        for callback in callbacks:
            callback.on_log(args, state, control, logs={"loss": 1.0 / step})
    assert parsed == []
    curve = (tmp_path / "metrics" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert len(curve) == 4  # header and three steps
    assert "mode: fast" in (tmp_path / "metrics" / "params.yaml").read_text()


@pytest.mark.slow
def test_diverging_sft_exits_with_one_error_line_and_saves_no_adapter(tiny_project, capsys):
    def edit(params):
        # Adam steps by about the learning rate: 1e30 overflows float32 activations at the second step.
        params["sft"]["trainer"].update(learning_rate=1.0e30, warmup_steps=0, disable_tqdm=True)

    params_path = tiny_project.variant("nan", edit)
    cfg = load_config(params_path)
    with pytest.raises(SystemExit) as exit_info:
        sft.main(str(params_path))
    assert exit_info.value.code == 2
    assert_one_line_error(
        capsys.readouterr().err,
        r"error: (loss|grad_norm) became (nan|inf|-inf) at step \d+; lower the learning rate, "
        r"or use bf16 instead of fp16",
    )
    adapter = Path(cfg.paths.sft_adapter)
    assert not adapter.exists() and not adapter.with_name(adapter.name + ".partial").exists()


# ---------------------------------------------------------------------------------------------------------------------
# CPU fallbacks and trainer-argument errors.

GPU_RECIPE = {"optim": "paged_adamw_8bit", "bf16": True, "learning_rate": 2e-4}


def test_cpu_falls_back_to_adamw_in_float32_and_says_so():
    kwargs, notes = adapt_to_device(GPU_RECIPE, cuda=False)
    assert kwargs == {"optim": "adamw_torch", "bf16": False, "learning_rate": 2e-4}
    assert len(notes) == 2
    assert "paged_adamw_8bit needs CUDA; using adamw_torch" in notes[0]
    assert "bf16 mixed precision needs a GPU" in notes[1]
    assert GPU_RECIPE["optim"] == "paged_adamw_8bit"  # the caller's dict is not modified


def test_cuda_keeps_the_qlora_recipe_unchanged():
    assert adapt_to_device(GPU_RECIPE, cuda=True) == (GPU_RECIPE, [])


@pytest.mark.parametrize("cuda", [True, False])
def test_fp16_is_warned_about_on_every_device(cuda):
    kwargs, notes = adapt_to_device({"fp16": True}, cuda=cuda)
    assert any("fp16 is known to give NaN losses" in note for note in notes)
    assert kwargs["fp16"] is cuda  # a CPU cannot run fp16 autocast at all


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "adamw_8bit", "paged_lion_32bit"])
def test_every_cuda_only_optimizer_falls_back_on_cpu(optim):
    assert adapt_to_device({"optim": optim}, cuda=False)[0]["optim"] == "adamw_torch"


def test_trainer_args_on_cpu_apply_the_fallbacks_and_keep_nan_visible(tmp_path, monkeypatch, capsys):
    from trl import SFTConfig

    monkeypatch.setattr("finetune.training.runs.has_cuda", lambda: False)
    args = trainer_args(SFTConfig, "sft", {**GPU_RECIPE, "max_steps": 3}, str(tmp_path))
    assert (args.optim, args.bf16, args.use_cpu, args.max_steps) == ("adamw_torch", False, True, 3)
    # The NaN filter would log a NaN step loss as 0.0 and hide the divergence from StopOnNonFiniteLoss.
    assert args.logging_nan_inf_filter is False
    assert args.output_dir == str(tmp_path) and args.report_to in ([], "none", ["none"])
    assert "sft: optim paged_adamw_8bit needs CUDA" in capsys.readouterr().out


def test_misspelled_trainer_key_is_a_config_error_naming_the_key(tmp_path):
    from trl import SFTConfig

    with pytest.raises(ConfigError, match=r"^sft\.trainer\.lerning_rate: not accepted by SFTConfig"):
        build_args(SFTConfig, "sft", {"lerning_rate": 1e-3}, output_dir=str(tmp_path))


@pytest.mark.parametrize("key", ["output_dir", "report_to"])
def test_pipeline_owned_trainer_keys_are_config_errors(tmp_path, key):
    from trl import DPOConfig

    with pytest.raises(ConfigError, match=rf"^dpo\.trainer\.{key}: set by the pipeline"):
        trainer_args(DPOConfig, "dpo", {key: "elsewhere"}, str(tmp_path))


def test_invalid_trainer_value_is_a_config_error_naming_the_section(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ConfigError, match=r"^base\.trainer: "):
        build_args(TrainingArguments, "base", {"lr_scheduler_type": "bogus"}, output_dir=str(tmp_path))


def test_sft_with_a_misspelled_trainer_key_exits_with_one_error_line(tiny_project, capsys):
    params_path = tiny_project.variant("typo", lambda p: p["sft"]["trainer"].update(lerning_rate=1e-3))
    with pytest.raises(SystemExit) as exit_info:
        sft.main(str(params_path))
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, r"error: sft\.trainer\.lerning_rate: not accepted by SFTConfig.*")


def test_the_validation_split_is_read_only_when_the_trainer_evaluates(tmp_path):
    from types import SimpleNamespace

    from finetune.training.runs import eval_split

    columns = ("prompt", "completion")
    assert eval_split(SimpleNamespace(eval_strategy="no"), "sft", str(tmp_path), "absent.jsonl", columns) is None
    evaluates = SimpleNamespace(eval_strategy="steps")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^sft\.trainer\.eval_strategy: .*empty\.jsonl has no rows"):
        eval_split(evaluates, "sft", str(tmp_path), "empty.jsonl", columns)
    rows = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}],
             "category": "c"}]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    split = eval_split(evaluates, "sft", str(tmp_path), "rows.jsonl", columns)
    assert split.column_names == list(columns) and split[0]["completion"][0]["content"] == "a"
