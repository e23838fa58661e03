"""Generation and log-probabilities of a variant: batching and padding never change an answer or a score."""

import dataclasses
import json

import pytest
import torch

from finetune.core.config import load_config
from finetune.core.errors import DataError
from finetune.data.rows import read_jsonl
from finetune.evaluation.generation import completion_logps, generate_answers, load_variant, render_prompt
from finetune.evaluation.report import read_generations
from stages import generate

PROMPTS = [
    [{"role": "user", "content": "What colour is a ripe lemon?"}],
    [{"role": "user", "content": "Classify each item as a fruit or a vegetable: pear, leek, plum, carrot, apple."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which is larger, 14 or 9?"}],
]


@pytest.fixture(scope="module")
def base_model(tiny_project):
    cfg = load_config(tiny_project.params_path)
    return (*load_variant(cfg.model, adapter=None), cfg)


def test_rendered_prompt_has_one_bos_and_ends_where_the_answer_starts(base_model):
    _, tokenizer, _ = base_model
    text = render_prompt(tokenizer, PROMPTS[2])
    assert text == "<s>[INST] Answer briefly.\n\nWhich is larger, 14 or 9? [/INST]"


def test_batched_left_padded_greedy_answers_equal_one_by_one_answers(base_model):
    model, tokenizer, cfg = base_model
    texts = [render_prompt(tokenizer, prompt) for prompt in PROMPTS]
    settings = dataclasses.replace(cfg.evaluate.generation, max_new_tokens=12, batch_size=3)
    batched = generate_answers(model, tokenizer, texts, settings)
    single = [
        generate_answers(model, tokenizer, [text], dataclasses.replace(settings, batch_size=1))[0] for text in texts
    ]
    assert batched == single
    for answer in batched:
        assert answer["new_tokens"] <= 12
        assert answer["hit_max_new_tokens"] == (answer["new_tokens"] == 12)


def test_completion_logps_match_a_direct_computation_and_ignore_batch_padding(base_model):
    model, tokenizer, _ = base_model
    answers = ["A ripe lemon is yellow.", "pear: fruit, leek: vegetable.", "14 is larger than 9."]
    batched = completion_logps(model, tokenizer, PROMPTS, answers, batch_size=3)
    single = [completion_logps(model, tokenizer, [p], [a], batch_size=1)[0] for p, a in zip(PROMPTS, answers)]
    assert batched == pytest.approx(single, abs=1e-4)

    prompt_ids = tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_dict=True)["input_ids"]
    conversation = [*PROMPTS[0], {"role": "assistant", "content": answers[0]}]
    ids = tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id  # the answer's EOS is scored too, as DPO scores it
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = sum(torch.log_softmax(logits[i - 1], -1)[ids[i]].item() for i in range(len(prompt_ids), len(ids)))
    assert batched[0] == pytest.approx(expected, abs=1e-4)


def test_generate_writes_answers_with_exact_prompts_and_pair_logps(tiny_project):
    generate.main("base", str(tiny_project.params_path))
    cfg = load_config(tiny_project.params_path)
    answers = read_jsonl(f"{cfg.paths.generations}/base.jsonl")
    tests = read_jsonl(f"{cfg.paths.prepared}/sft_test.jsonl")
    probes = read_jsonl(cfg.paths.probe_prompts)
    assert len(answers) == len(tests) + len(probes)
    first = answers[0]
    assert set(first) >= {"id", "source", "category", "instruction", "reference", "prompt_text", "prediction"}
    assert first["prompt_text"].startswith("<s>[INST] ") and first["prompt_text"].endswith(" [/INST]")
    assert {row["source"] for row in answers} == {"test", "probe"}
    pairs = read_jsonl(f"{cfg.paths.generations}/base_preferences.jsonl")
    assert len(pairs) == len(read_jsonl(f"{cfg.paths.prepared}/preferences_test.jsonl"))
    assert all(row["chosen_logp"] < 0 and row["rejected_logp"] < 0 for row in pairs)


def test_generate_rejects_an_unknown_variant(tiny_project, capsys):
    with pytest.raises(SystemExit):
        generate.main("large", str(tiny_project.params_path))
    assert "variant must be one of base, sft, dpo" in capsys.readouterr().err


def test_evaluate_refuses_generations_of_different_prompts(tmp_path):
    for variant, ids in (("base", ["a", "b"]), ("sft", ["a", "b"]), ("dpo", ["b", "a"])):
        (tmp_path / f"{variant}.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in ids))
    with pytest.raises(DataError, match=r"dpo\.jsonl: not the same prompts as base"):
        read_generations(tmp_path, "")
