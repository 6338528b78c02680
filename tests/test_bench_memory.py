"""Smoke tests of bench_memory_gate.py and bench_memory.py: each runs on tiny models in seconds and reports what it
claims to measure.

Timings are never asserted (they depend on the machine); what is asserted is that every measured variant is
there, that the scores the scorers compute agree, that ratios are computed against the right reference, and that
the numbers a benchmark derives from its outputs can be recomputed from those outputs.
"""

import pytest

from tests.conftest import bench, last_json


# ---- bench_memory_gate.py ----------------------------------------------------------------------------


def test_bench_memory_gate_quick():
    result = last_json(bench("bench_memory_gate.py", "--quick", "--json"))
    rows = result["sizes"]
    assert [(r["exponent"], r["n"], r["side"]) for r in rows] == [(10, 1024, 32), (12, 4096, 64)]
    # The product-key lookup is exact: the same entries and scores as scoring every entry.
    assert result["identical_topk"] and all(r["identical_topk"] and r["max_score_diff"] == 0.0 for r in rows)
    for r in rows:
        assert r["ratio"] == round(r["brute_ms"] / r["product_ms"], 2)
        assert r["placement"] == "content" and r["placement_s"] is not None
        # The brute force holds every query's score of every entry; the product path only side-wide rows.
        assert r["brute_peak_bytes"] >= result["queries"] * r["n"] * 4 > r["product_peak_bytes"] > 0
    assert rows[0]["product_growth"] is None
    assert rows[1]["product_growth"] == round(rows[1]["product_ms"] / rows[0]["product_ms"], 3)
    assert rows[1]["sqrt_n_growth"] == 2.0
    assert result["placement"] == {"exponent": 12, "n": 4096, "seconds": rows[1]["placement_s"]}
    assert result["threads"] >= 1 and result["torch"]


# ---- bench_memory.py ---------------------------------------------------------------------------------


def test_bench_memory_reports_every_condition(tmp_path):
    import train_router
    from lib.memory import facts
    from tests.test_memory_model import stage_args

    facts.build(str(tmp_path), people_count=12, seed=3, general_rows=0)
    train_router.main(["--router_type", "memory_gate", *stage_args(tmp_path, tmp_path / "gate", "--max_steps", "1",
                                                                   "--eval_strategy", "no")])
    result = last_json(bench("bench_memory.py", "--memory_model", str(tmp_path / "gate"), "--facts", str(tmp_path),
                             "--limit", "4", "--max_new_tokens", "2", "--json"))
    test, trained = result["test"], result["trained"]
    assert set(test) >= {"base", "in_context", "memory", "empty", "irrelevant", "counterfactual", "gate"}
    assert set(trained) >= {"base", "in_context", "memory", "empty", "counterfactual"}
    # A gate alone (alpha = 0 everywhere) reads nothing: every bank answers like the base model.
    for group in (test, trained):
        assert group["empty_equals_base"] is True
        assert group["memory"]["ll_accuracy"] == group["base"]["ll_accuracy"]
    assert test["gate"]["chance@1"] == pytest.approx(1 / 72)
    bound = test["in_context"]["ll_accuracy"]
    assert ("memory_over_in_context_ll" in result) == (bound > 0)
    if bound > 0:
        assert result["memory_over_in_context_ll"] == round(test["memory"]["ll_accuracy"] / bound, 3)
