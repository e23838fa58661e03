"""publish: the dry-run folder is exactly what a push sends, the cards hold the run's real settings and numbers, a push
calls the Hub client with the right repos and folders, and the token never reaches a file, a log or an error.

The adapters and metrics come from a real tiny run (conftest.tiny_project, then sft, dpo, generate and evaluate), as
`dvc repro` runs them; the Hub client is replaced by a fake that records its calls, so nothing touches the network.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import types
from pathlib import Path

import pytest
import yaml

from finetune.cards.model_card import build_dataset_card, build_model_card
from finetune.core.config import load_config
from stages import dpo, evaluate, generate, publish, sft

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_s3cr3t-token-that-must-never-leak"
VARIANT_NAMES = {"base": "base", "sft": "SFT", "dpo": "SFT + DPO"}
DELTAS = {"sft_vs_base": "SFT − base", "dpo_vs_sft": "DPO − SFT"}


def number(value: float) -> str:
    """How the cards show a metric: 3 decimals."""
    return f"{value:.3f}"


def signed(value: float) -> str:
    return f"{value:+.3f}"


@pytest.fixture(autouse=True)
def outside_the_repository(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: the stage must write only where params say."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def trained(tiny_project) -> dict:
    """The tiny project's adapters, generations and metrics: the inputs of publish, built by the real stages."""

    def edit(params):
        folder = tiny_project.root / "pub"
        for key in ("generations", "reports", "publish"):
            params["paths"][key] = str(folder / key)
        params["paths"]["eval_metrics"] = str(folder / "eval.json")
        params["evaluate"]["generation"]["max_new_tokens"] = 8  # short answers: the scores only need to exist
        params["evaluate"]["bootstrap_samples"] = 100

    params_path = tiny_project.variant("pub", edit)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_project.root)
        sft.main(str(params_path))
        dpo.main(str(params_path))
        for variant in ("base", "sft", "dpo"):
            generate.main(variant, str(params_path))
        evaluate.main(str(params_path))
    return yaml.safe_load(params_path.read_text())


def params_file(params: dict, folder: Path, **settings) -> Path:
    """A params file like `params` whose publish folder is folder/publish, with publish.* set to `settings`."""
    params = copy.deepcopy(params)
    params["paths"]["publish"] = str(folder / "publish")
    params["publish"].update(settings)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def one_error_line(err: str) -> str:
    errors = re.findall(r"(?m)^error: .*$", err)
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


class Offline:
    """huggingface_hub.HfApi for tests that must not reach the Hub: constructing it fails the test."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi was instantiated: publish must not touch the network")


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces huggingface_hub.HfApi with a recorder; `hub.fail` makes upload_folder raise that error."""
    hub = types.SimpleNamespace(calls=[], tokens=[], snapshots={}, fail=None)

    class FakeHfApi:
        def __init__(self, endpoint=None, token=None, **kwargs):
            hub.tokens.append(token)

        def create_repo(self, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            hub.calls.append(("upload_folder", repo_id, {"folder_path": folder_path, **kwargs}))
            if hub.fail is not None:
                raise hub.fail
            hub.snapshots[repo_id] = {name: (Path(folder_path) / name).read_bytes() for name in
                                      files_under(Path(folder_path))}
            oid = f"{len(hub.calls):040x}"
            return types.SimpleNamespace(oid=oid, commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}")

    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    return hub


# ---------------------------------------------------------------------------------------------------------------------
# The dry run


@pytest.fixture(scope="module")
def dry_run(trained, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dry")
    path = params_file(trained, folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr("huggingface_hub.HfApi", Offline)
        publish.main(str(path))
    return folder / "publish", trained


def test_dry_run_writes_exactly_the_folder_to_push(dry_run):
    out, params = dry_run
    adapter_files = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja"}
    expected = {"model/README.md", "dataset/README.md", "dataset/preferences_train.jsonl",
                "dataset/preferences_test.jsonl"}
    expected |= {f"model/{adapter}/{name}" for adapter in ("sft", "dpo") for name in adapter_files}
    assert files_under(out) == expected  # no PEFT boilerplate README, no training_args.bin, no published.json
    for adapter, source in (("sft", params["paths"]["sft_adapter"]), ("dpo", params["paths"]["dpo_adapter"])):
        for name in adapter_files:
            assert (out / "model" / adapter / name).read_bytes() == (Path(source) / name).read_bytes(), name
    prepared = Path(params["paths"]["prepared"])
    for name in ("preferences_train.jsonl", "preferences_test.jsonl"):
        assert (out / "dataset" / name).read_bytes() == (prepared / name).read_bytes()
    assert not out.with_name("publish.partial").exists()


def test_model_card_shows_base_model_recipe_lora_and_settings(dry_run):
    out, params = dry_run
    card = (out / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert set(meta["tags"]) == {"trl", "dpo", "sft", "lora", "qlora", "dvc"}
    assert "base_model" not in meta  # a local folder: the Hub would reject it as base_model
    assert "datasets" not in meta and "license" not in meta  # local sources, no license known

    assert f"`{params['model']['name_or_path']}`" in card and "embedded tiny Mistral-architecture model" in card
    assert f"**Recipe:** `{params['recipe']}`" in card
    lora = params["lora"]
    assert f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']:g}" in card
    assert all(f"`{module}`" in card for module in lora["target_modules"])
    assert "4-bit NF4" in card
    for key in ("max_steps", "learning_rate", "per_device_train_batch_size"):
        sft_value, dpo_value = params["sft"]["trainer"][key], params["dpo"]["trainer"][key]
        assert f"| `{key}` | {sft_value:g} | {dpo_value:g} |" in card
    assert f"| `beta` | — | {params['dpo']['trainer']['beta']:g} |" in card
    # The recipe's settings, not a claim that the trainers ran with them: the GPU layout may rewrite some.
    assert "as they are" not in card
    for stage in ("sft_metrics", "dpo_metrics"):
        assert f"`{params['paths'][stage]}/layout.json`" in card
    assert 'PeftModel.from_pretrained(base, "YOUR_NAME/REPO", subfolder="dpo")' in card
    assert "dvc exp run -S recipe=embedded" in card
    assert "no git commit was recorded" in card  # the tiny project is not a git repository


def test_model_card_has_the_exact_numbers_of_eval_json_and_data_json(dry_run):
    out, params = dry_run
    card = (out / "model" / "README.md").read_text()
    result = json.loads(Path(params["paths"]["eval_metrics"]).read_text())
    for variant in ("base", "sft", "dpo"):
        scores = result[variant]
        cells = [number(scores[m]) for m in ("f1", "rougeL", "bertscore_f1", "mean_words")]
        assert f"| {VARIANT_NAMES[variant]} | {' | '.join(cells)} |" in card
    for name in ("sft_vs_base", "dpo_vs_sft"):
        cells = [
            f"{signed(d['mean'])} [{signed(d['low'])}, {signed(d['high'])}]"
            for d in (result["delta"][name][m] for m in ("f1", "rougeL", "bertscore_f1"))
        ]
        assert f"| {DELTAS[name]} | {' | '.join(cells)} |" in card
    prefs = result["preferences"]
    assert f"| SFT | base | {number(prefs['sft']['accuracy'])} | {number(prefs['sft']['margin'])} |" in card
    assert f"| SFT + DPO | SFT | {number(prefs['dpo']['accuracy'])} | {number(prefs['dpo']['margin'])} |" in card
    assert result["bertscore_settings"]["hash"] in card
    match = result["win_rate"]["dpo_vs_sft"]
    interval = f"{number(match['rate'])} [{number(match['low'])}, {number(match['high'])}]"
    assert f"| SFT + DPO over SFT | {interval} | {match['wins']} / {match['ties']} / {match['losses']} |" in card
    for category, summary in result["categories"].items():
        f1 = " / ".join(number(summary[v]["f1"]) for v in ("base", "sft", "dpo"))
        assert f"| {category} | {summary['n']} | {f1} |" in card

    data = json.loads(Path(params["paths"]["data_metrics"]).read_text())
    sft_counts, pref_counts = data["sft"], data["preferences"]
    for label, key in (("rows read", "rows_read"), ("kept", "kept"), ("train", "train"), ("test (held out)", "test")):
        assert f"| {label} | {sft_counts[key]} | {pref_counts[key]} |" in card
    for reason in sft_counts["dropped"]:
        if reason != "total":
            cells = f"{sft_counts['dropped'][reason]} | {pref_counts['dropped'][reason]}"
            assert f"| dropped: {reason} | {cells} |" in card
    assert f"| dropped in all | {sft_counts['dropped']['total']} | {pref_counts['dropped']['total']} |" in card


def test_dataset_card_declares_the_splits_and_counts(dry_run):
    out, params = dry_run
    card = (out / "dataset" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "preferences_train.jsonl"}, {"split": "test", "path": "preferences_test.jsonl"}]}]
    counts = json.loads(Path(params["paths"]["data_metrics"]).read_text())["preferences"]
    assert f"| rows read | {counts['rows_read']} |" in card and f"| kept | {counts['kept']} |" in card
    assert f"| train (`preferences_train.jsonl`) | {counts['train']} |" in card
    assert f"| test (`preferences_test.jsonl`, held out) | {counts['test']} |" in card
    assert "`prompt`, `chosen`, `rejected`" in card


def test_dry_run_touches_no_network_even_with_a_token_set(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr("huggingface_hub.HfApi", Offline)

    def no_connection(*args, **kwargs):
        raise AssertionError("publish opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    publish.main(str(params_file(trained, tmp_path, model_repo="you/adapters", dataset_repo="you/pairs")))
    assert "nothing was pushed" in capsys.readouterr().out
    assert not (tmp_path / "publish" / "published.json").exists()
    card = (tmp_path / "publish" / "model" / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "you/adapters", subfolder="dpo")' in card
    assert front_matter(card)["datasets"] == ["you/pairs"]


# ---------------------------------------------------------------------------------------------------------------------
# The push (a fake Hub client)


def test_push_creates_and_uploads_both_repos_and_never_leaks_the_token(trained, tmp_path, monkeypatch, capsys,
                                                                       fake_hub):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    path = params_file(trained, tmp_path, push=True, model_repo="you/adapters", dataset_repo="you/pairs",
                       private=False)
    publish.main(str(path))
    out = tmp_path / "publish"
    assert fake_hub.tokens == [SECRET]  # from the environment, handed to the client only
    assert [(call, repo_id) for call, repo_id, _ in fake_hub.calls] == [
        ("create_repo", "you/pairs"), ("upload_folder", "you/pairs"),
        ("create_repo", "you/adapters"), ("upload_folder", "you/adapters"),
    ]
    creates = {repo_id: kwargs for call, repo_id, kwargs in fake_hub.calls if call == "create_repo"}
    assert creates["you/pairs"] == {"repo_type": "dataset", "private": False, "exist_ok": True}
    assert creates["you/adapters"] == {"repo_type": "model", "private": False, "exist_ok": True}
    uploads = {repo_id: kwargs for call, repo_id, kwargs in fake_hub.calls if call == "upload_folder"}
    assert uploads["you/pairs"]["repo_type"] == "dataset"
    assert uploads["you/pairs"]["folder_path"] == str(out / "dataset")
    assert uploads["you/adapters"]["repo_type"] == "model"
    assert uploads["you/adapters"]["folder_path"] == str(out / "model")
    # What was uploaded is the dry-run folder as it stays on disk.
    for repo_id, part in (("you/adapters", "model"), ("you/pairs", "dataset")):
        assert fake_hub.snapshots[repo_id] == {name: (out / part / name).read_bytes()
                                               for name in files_under(out / part)}

    published = json.loads((out / "published.json").read_text())
    assert published["model"]["repo_id"] == "you/adapters" and published["dataset"]["repo_type"] == "dataset"
    assert published["model"]["commit_sha"] and published["model"]["commit_url"].endswith(
        published["model"]["commit_sha"])
    captured = capsys.readouterr()
    assert published["model"]["commit_url"] in captured.out and published["dataset"]["commit_url"] in captured.out

    for name in files_under(out):
        assert SECRET.encode() not in (out / name).read_bytes(), name
    assert SECRET not in captured.out and SECRET not in captured.err
    assert SECRET not in path.read_text()


def test_push_of_the_model_only_when_no_dataset_repo(trained, tmp_path, monkeypatch, fake_hub):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    publish.main(str(params_file(trained, tmp_path, push=True, model_repo="you/adapters")))
    assert [(call, repo_id, kwargs["repo_type"]) for call, repo_id, kwargs in fake_hub.calls] == [
        ("create_repo", "you/adapters", "model"), ("upload_folder", "you/adapters", "model")]
    assert fake_hub.calls[0][2]["private"] is True  # the default
    assert set(json.loads((tmp_path / "publish" / "published.json").read_text())) == {"model"}


def test_push_failure_is_one_line_naming_the_repo_without_the_token(trained, tmp_path, monkeypatch, capsys,
                                                                    fake_hub):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    fake_hub.fail = RuntimeError(f"401 Client Error: Unauthorized (token {SECRET})\nrequest id: 123")
    with pytest.raises(SystemExit) as exit_info:
        publish.main(str(params_file(trained, tmp_path, push=True, model_repo="you/adapters")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert "model repo you/adapters failed" in line and "401 Client Error" in line
    assert SECRET not in err
    assert not (tmp_path / "publish" / "published.json").exists()


@pytest.mark.parametrize(
    "settings, token, pattern",
    [
        ({"model_repo": None}, SECRET, r"error: publish\.model_repo: must be set to push .*"),
        ({"model_repo": "no-namespace"}, SECRET, r"error: publish\.model_repo: must be a hub repository id .*"),
        ({"model_repo": "you/adapters", "dataset_repo": "a/b/c"}, SECRET, r"error: publish\.dataset_repo: .*"),
        ({"model_repo": "you/adapters"}, None, r"error: publish\.push is true but the HF_TOKEN environment .*"),
        ({"model_repo": "you/adapters"}, "  ", r"error: .* HF_TOKEN environment variable is not set.*"),
    ],
)
def test_push_without_repo_or_token_exits_2_with_one_line_before_any_work(
    trained, tmp_path, monkeypatch, capsys, settings, token, pattern
):
    monkeypatch.setattr("huggingface_hub.HfApi", Offline)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(SystemExit) as exit_info:
        publish.main(str(params_file(trained, tmp_path, push=True, **settings)))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert re.fullmatch(pattern, one_error_line(captured.err))
    assert SECRET not in captured.err + captured.out
    assert not (tmp_path / "publish").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Inputs that do not match: one-line errors, not a card that lies


def test_missing_metrics_are_one_line_errors_naming_the_stage(trained, tmp_path, capsys):
    params = copy.deepcopy(trained)
    params["paths"]["eval_metrics"] = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit):
        publish.main(str(params_file(params, tmp_path)))
    assert one_error_line(capsys.readouterr().err).endswith("missing.json: not found; run dvc repro evaluate")
    assert not (tmp_path / "publish").exists() and not (tmp_path / "publish.partial").exists()


def test_adapter_trained_with_other_lora_settings_is_refused(trained, tmp_path, capsys):
    params = copy.deepcopy(trained)
    params["lora"]["r"] = params["lora"]["r"] * 2  # params changed, adapters not retrained
    with pytest.raises(SystemExit):
        publish.main(str(params_file(params, tmp_path)))
    assert re.fullmatch(r"error: .*: trained with lora\.r \d+, params say \d+; re-run dvc repro sft",
                        one_error_line(capsys.readouterr().err))


# ---------------------------------------------------------------------------------------------------------------------
# The card builders on their own: a hub model and hub datasets


def test_model_card_of_a_hub_model_names_it_as_base_model_with_its_revision(dry_run, tmp_path):
    out, params = dry_run
    params = copy.deepcopy(params)
    params["model"].update(name_or_path="mistralai/Mistral-7B-v0.1", revision="26bca36", load_in_4bit=False)
    params["data"]["sft"].update(source="databricks/databricks-dolly-15k")
    params["data"]["preferences"].update(source="HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    params["publish"].update(model_repo="you/mistral-dpo")
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg = load_config(path)
    evaluation = json.loads(Path(params["paths"]["eval_metrics"]).read_text())
    data = json.loads(Path(params["paths"]["data_metrics"]).read_text())
    local = {cfg.data.sft.source: False, cfg.data.preferences.source: False}
    card = str(build_model_card(cfg, evaluation, data, base_on_hub=True, local_sources=local, commit="a" * 40,
                                license="apache-2.0"))
    meta = front_matter(card)
    assert meta["base_model"] == "mistralai/Mistral-7B-v0.1" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["databricks/databricks-dolly-15k", "HuggingFaceH4/ultrafeedback_binarized"]
    assert "qlora" not in meta["tags"] and "no 4-bit quantization" in card
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# mistral-dpo"
    assert "revision `26bca36`" in card
    assert 'AutoModelForCausalLM.from_pretrained("mistralai/Mistral-7B-v0.1", revision="26bca36")' in card
    assert 'PeftModel.from_pretrained(base, "you/mistral-dpo", subfolder="dpo")' in card
    assert f"git checkout {'a' * 40}" in card
    assert "split `train_prefs`" in card

    dataset = str(build_dataset_card(cfg, data, files={"train": "t.jsonl", "test": "e.jsonl"}, columns=["prompt"],
                                     local_sources=local, license="mit"))
    assert front_matter(dataset)["license"] == "mit"
    assert "[`you/mistral-dpo`](https://huggingface.co/you/mistral-dpo)" in dataset


# ---------------------------------------------------------------------------------------------------------------------
# The DVC contract of the stage


def test_dvc_stage_lists_every_params_section_and_path_it_uses():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["publish"]
    assert stage["cmd"] == "python -m stages.publish"
    cards = [path for path in (REPO / "finetune" / "cards").rglob("*") if path.suffix in (".py", ".md", ".jinja")]
    sources = "".join(path.read_text() for path in [REPO / "stages" / "publish.py", *cards])  # the templates read cfg
    for key in set(re.findall(r"cfg\.paths\.(\w+)", sources)):
        assert "paths" in stage["params"] or f"paths.{key}" in stage["params"], key
    for section in set(re.findall(r"cfg\.(\w+)", sources)) - {"paths"}:
        assert section in stage["params"], section
    # Pushing is a side effect: a persistent output keeps DVC from restoring the stage from its run cache.
    assert stage["outs"] == [{"${paths.publish}": {"persist": True}}]


# ---------------------------------------------------------------------------------------------------------------------
# The repository's own embedded-default run, where one exists (after `dvc repro` or `dvc pull`)

REAL_INPUTS = ("models/sft/adapter_model.safetensors", "models/dpo/adapter_model.safetensors",
               "metrics/eval.json", "metrics/data.json", "data/prepared/preferences_train.jsonl")


@pytest.mark.skipif(not all((REPO / name).is_file() for name in REAL_INPUTS), reason="no embedded-default run here")
def test_dry_run_of_the_repositorys_run_gives_a_complete_model_card(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    path = params_file(params, tmp_path)  # writes to tmp_path/publish, reads the repository's outputs
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("huggingface_hub.HfApi", Offline)
    publish.main(str(path))
    card = (tmp_path / "publish" / "model" / "README.md").read_text()
    for heading in ("## What it is", "## Training settings", "## Data", "## Evaluation", "### Per category",
                    "## How to use", "## Reproduce"):
        assert heading in card
    result = json.loads((REPO / "metrics/eval.json").read_text())
    assert f"| base | {number(result['base']['f1'])} |" in card
    assert len(result["categories"]) >= 8 and all(f"| {name} |" in card for name in result["categories"])
    assert not re.search(r"\bnan\b", card, re.IGNORECASE)


def test_model_card_says_dpo_trained_on_generated_pairs_when_it_did(dry_run, tmp_path):
    out, params = dry_run
    params = copy.deepcopy(params)
    params["dpo"]["source"] = "generated"
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg = load_config(path)
    evaluation = json.loads(Path(params["paths"]["eval_metrics"]).read_text())
    data = json.loads(Path(params["paths"]["data_metrics"]).read_text())
    local = {cfg.data.sft.source: True, cfg.data.preferences.source: True}
    card = str(build_model_card(cfg, evaluation, data, base_on_hub=False, local_sources=local))
    line = next(line for line in card.splitlines() if line.startswith("- **DPO training pairs:**"))
    assert "generated by the pipeline" in line and f"{cfg.preference_data.prompts} SFT-train instructions" in line
    assert f"`{cfg.preference_data.ranker.name}`" in line
    assert "DPO training pairs" not in (out / "model" / "README.md").read_text()  # dpo.source: dataset


def test_the_cards_name_the_variants_and_metrics_eval_json_holds():
    from finetune.cards import model_card
    from finetune.evaluation.comparison import VARIANTS
    from finetune.evaluation.metrics import METRICS

    assert (model_card.VARIANTS, model_card.METRICS) == (VARIANTS, METRICS)
