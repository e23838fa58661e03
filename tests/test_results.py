"""What a person looks at: the report stage's page (reports/index.html) and versions.json, built from made-up result
files, read as text and drawn by a real browser with the network off; and the cost each stage records."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import chain_rounds, write_params
from result_files import HOSTILE_ANSWER, PAGE_SIZE, write_result_files

from finetune.results.charts import draw_rounds, draw_scores, scoped_ids
from finetune.results.page import load_results, render_page
from finetune.results.versions import PACKAGES
from stages import report


@pytest.fixture
def params_path(tmp_path) -> Path:
    def edit(params):
        params["paths"] = {key: str(tmp_path / value) for key, value in params["paths"].items()}
        params["report"]["examples"] = PAGE_SIZE
        chain_rounds(params)  # the rounds start from the moved paths.sft_adapter

    path = write_params(tmp_path, edit)
    write_result_files(tmp_path, load_paths(path))  # the paths are absolute: under tmp_path
    return path


def load_paths(path: Path) -> dict[str, str]:
    import yaml

    return yaml.safe_load(path.read_text())["paths"]


@pytest.fixture
def page(params_path) -> str:
    report.main(str(params_path))
    return (Path(load_paths(params_path)["reports"]) / "index.html").read_text(encoding="utf-8")


def visible_text(html: str) -> str:
    """The page's text as a reader sees it (tags dropped, entities kept escaped)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_the_page_shows_the_setup_scores_deltas_win_rates_and_categories(page):
    text = visible_text(page)
    assert "Results: embedded" in text and "models/base" in text  # recipe and model
    assert "3000" in text and "too long 30" in text and "2940" in text  # rows read, drops by reason, kept
    for variant in ("base", "sft", "dpo"):
        assert f" {variant} " in text
    assert "0.372" in text and "0.271" in text  # the SFT and DPO token F1
    assert "+0.285 [+0.259, +0.310]" in text and "-0.100 [-0.126, -0.074]" in text  # deltas with their intervals
    assert "41.2%" in text and "36.0% – 46.5%" in text and "85.1%" in text  # win rates with intervals
    assert "brainstorming" in text and "safety refusal" in text  # per category
    assert "Self-rewarding rounds" in text and "round2" in text
    assert page.count("<svg") >= 6  # scores, deltas, categories, loss, rewards, rounds


def test_the_page_shows_the_first_held_out_answers_as_text(page):
    examples = re.findall(r'<article class="example">', page)
    assert len(examples) == PAGE_SIZE
    assert "Question number 0?" in page and "Question number 9?" in page
    assert "Question number 12?" not in page  # a probe prompt, not of the held-out split
    assert "<script" not in page  # the answer holding a script tag is shown escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a line," in page
    assert HOSTILE_ANSWER.split("\n")[1] in page


def test_the_page_loads_nothing_and_runs_nothing(page):
    assert "default-src 'none'" in page  # the browser refuses any request the page might make
    assert not re.search(r"<(script|link|iframe|img)\b|\bsrc=|@import|url\((?!#)", page, re.IGNORECASE)
    assert not re.search(r"https?://(?!www\.w3\.org/)", page)  # only SVG's namespace names


def test_versions_name_python_and_the_libraries_of_the_run(page, params_path):
    versions = json.loads((Path(load_paths(params_path)["reports"]) / "versions.json").read_text())
    assert set(versions) == {"python", *PACKAGES, "cuda"} and all(versions[name] for name in ("python", *PACKAGES))
    assert versions["dvc"] in visible_text(page) and versions["torch"] in visible_text(page)


def test_the_same_results_give_the_same_page(params_path):
    from finetune.core.config import load_config

    results = load_results(load_config(str(params_path)), {"python": "3"})
    assert render_page(results) == render_page(results)


def test_a_run_without_validation_curves_or_rounds_still_gets_a_page(params_path):
    paths = load_paths(params_path)
    for stage in ("sft", "dpo"):
        shutil.rmtree(Path(paths[f"{stage}_metrics"]) / "plots" / "metrics" / "eval")
    (Path(paths["reports"]) / "plots" / "rounds.csv").unlink()
    report.main(str(params_path))
    text = visible_text((Path(paths["reports"]) / "index.html").read_text())
    assert "No validation curve for sft, dpo" in text and "No self-rewarding rounds" in text


def test_a_missing_evaluation_names_the_stage_to_run(params_path, capsys):
    Path(load_paths(params_path)["eval_metrics"]).unlink()
    with pytest.raises(SystemExit) as stopped:
        report.main(str(params_path))
    assert stopped.value.code == 2
    assert "run dvc repro evaluate" in capsys.readouterr().err


def test_each_chart_keeps_its_ids_to_itself():
    scores = {v: {"f1": 0.1, "rougeL": 0.2, "bertscore_f1": 0.3} for v in ("base", "sft", "dpo")}
    rounds = [{"round": 0, "name": "sft", "f1": 0.4}, {"round": 1, "name": "r1", "f1": 0.5, "tie_rate": 0.2}]
    charts = [draw_scores(scores), draw_rounds(rounds)]
    ids = [re.findall(r'\bid="([^"]+)"', svg) for svg in charts]
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
    assert all(name.startswith("scores-") for name in ids[0])
    assert 'href="#scores-' in scoped_ids('<use xlink:href="#m1"/><g id="m1"/>', "scores")


def test_a_stage_cost_is_its_wall_time_and_no_gpu_memory_without_cuda():
    from finetune.core.process import process_cost

    cost = process_cost()
    assert cost["wall_s"] > 0
    import torch

    assert ("peak_gpu_memory_gib" in cost) == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_training_writes_its_cost_into_dvclive_summary(tmp_path):
    from types import SimpleNamespace

    from dvclive import Live

    from finetune.training.runs import RecordCost

    live = Live(str(tmp_path / "metrics"), dvcyaml=False, save_dvc_exp=False)
    live.log_metric("loss", 1.0)
    RecordCost(live).on_train_end(None, SimpleNamespace(), None)
    live.end()
    summary = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert summary["loss"] == 1.0 and summary["cost"]["wall_s"] > 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, no GPU, nothing fetched in the background, and every host name unresolvable: the network is off.
OFFLINE = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
]  # fmt: skip


def browse(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, *OFFLINE, f"--user-data-dir={profile}", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)")
def test_a_browser_offline_draws_the_page_with_its_variants_and_deltas(page, params_path, tmp_path):
    import numpy as np
    from PIL import Image

    path = Path(load_paths(params_path)["reports"]) / "index.html"
    dom = browse(path, tmp_path / "profile-dom", "--dump-dom").stdout
    text = visible_text(dom)
    assert "SFT vs base" in text and "DPO vs SFT" in text and "+0.285" in text and "-0.100" in text
    assert dom.count("<svg") >= 6 and "<script" not in dom

    screenshot = tmp_path / "page.png"
    browse(path, tmp_path / "profile-shot", "--window-size=1280,2400", f"--screenshot={screenshot}")
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    inked = (pixels < 200).any(axis=2).mean()  # text, bars and lines, not the page's near-white background
    assert inked > 0.03, f"the screenshot is almost blank ({inked:.1%} of its pixels inked)"
    colours = {tuple(p) for p in pixels[::7, ::7].reshape(-1, 3)}
    assert len(colours) > 50  # the variants' colours and the anti-aliased text and charts, not one flat colour
    # The variants' bar colours appear (the scores chart is in the first screen).
    for colour in ((0x32, 0x74, 0xA1), (0xE1, 0x81, 0x2C)):
        assert (np.abs(pixels.astype(int) - colour).sum(axis=2) < 12).sum() > 200
