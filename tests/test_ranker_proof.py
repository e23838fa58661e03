"""benchmarks/ranker_proof.py --tiny: the GPU proof's flow (random checkpoints saved, loaded by load_ranker, ranked
by rank_candidates) on tiny shapes on the CPU, so the GPU run meets no surprise but the hardware."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("ranker_proof", REPO / "benchmarks" / "ranker_proof.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_ranker_proof_runs_both_rankers_and_writes_its_results(tmp_path):
    script = load_script()
    assert script.main(["--tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "out" / "ranker_proof.json").read_text())
    assert (tmp_path / "out" / "ranker_proof.md").read_text().startswith("# Ranker proof")
    assert not (tmp_path / "work").exists()  # the random checkpoints are scratch
    pairrm, reward = result["pairrm"], result["reward_model"]
    both = pairrm["both_orders"]
    assert both["all_finite"] and both["ranked"] == 4 * 5 and both["comparisons"] == 4 * 5 * 4
    assert both["max_abs_diff_other_shuffle_seed"] <= 1e-6 + 1e-3 * both["max_abs_score"]  # both orders: no bias
    assert pairrm["single_order"]["max_abs_diff_same_seed"] == 0.0
    assert math.isclose(pairrm["antisymmetry"]["sum"], 0.0, abs_tol=1e-6)
    assert pairrm["model"]["parameters"] > 0 and pairrm["architecture"]["relative_attention"] is True
    assert reward["all_finite"] and reward["ranked"] == 20 and reward["distinct_scores"] > 1
    assert reward["architecture"]["class"] == "MistralForSequenceClassification"
    assert reward["max_abs_diff_batch_1_vs_8"] < 1e-4
    assert both["pairs"] + both["ties_dropped"] + both["invalid_dropped"] == 4
    # The real run uses the shipped architectures: DeBERTa-v3-large's shape and Mistral-7B's
    real = script.architecture(script.PAIRRM_ARCHITECTURE, None)
    assert (real["hidden_size"], real["num_hidden_layers"], real["vocab_size"]) == (1024, 24, 128100)
    assert script.architecture(script.REWARD_ARCHITECTURE, None)["num_hidden_layers"] == 32
