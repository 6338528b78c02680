"""Smoke tests of bench_selection_effect.py: it runs on tiny models in seconds and reports what it claims to
measure.

Timings are never asserted (they depend on the machine); what is asserted is that every measured variant is
there, that the scores the scorers compute agree, that ratios are computed against the right reference, and that
the numbers a benchmark derives from its outputs can be recomputed from those outputs.
"""

import json
import os

import pytest

from tests.conftest import bench, last_json, write_jsonl


def test_selection_effect_subsets():
    from benchmarks.bench_selection_effect import subsets
    from lib.core.errors import DataError
    from lib.selection.args import SelectArguments
    from lib.selection.outputs import select_indices

    scores = [0.5, None, 0.9, 0.1, 0.9, 0.3, None, 0.7, 0.2, 0.6]
    rows = [{"id": i, "selection_score": s} for i, s in enumerate(scores)]
    def ids(part):
        return [r["id"] for r in part]

    parts = subsets(rows, 0.3, seed=0)
    # round(0.3 * 10) = 3 rows each; ties (rows 2 and 4) rank in file order; unscored rows 1 and 6 are in none.
    assert ids(parts["top"]) == [2, 4, 7]
    assert ids(parts["bottom"]) == [5, 8, 3]
    # random.Random(0).sample(range(8), 3) picks positions 3, 6, 7 of the scored rows [0, 2, 3, 4, 5, 7, 8, 9].
    assert ids(parts["random"]) == [4, 8, 9]
    assert subsets(rows, 0.3, seed=0) == parts
    # The top subset is what select_data.py keeps at the same ratio.
    args = SelectArguments(router_model="-", data_file="-", output_dir="-", select_ratio=0.3)
    assert ids(parts["top"]) == select_indices(scores, args, len(scores))
    # A share larger than the scored rows takes all of them (it used to ask random.sample for too many).
    big = subsets(rows, 0.9, seed=1)
    assert ids(big["top"]) == [2, 4, 7, 9, 0, 5, 8, 3]
    assert sorted(ids(big["random"])) == [0, 2, 3, 4, 5, 7, 8, 9]
    with pytest.raises(DataError, match="no row with a selection_score"):
        subsets([{"selection_score": None}], 0.3, seed=0)


def test_selection_effect_standard_errors_count_questions_and_seeds():
    from benchmarks.bench_selection_effect import mean_se

    # One seed: the usual standard error of a mean (sample variance).
    mean, se = mean_se([[1, 0, 1, 1]])
    assert mean == 0.75 and se == pytest.approx((0.25 / 4) ** 0.5)
    # Two seeds: per-question means [1, 0.5, 0.5, 0] (variance 1/6) and per-seed means [0.75, 0.25] (variance 1/8).
    mean, se = mean_se([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert mean == 0.5 and se == pytest.approx((1 / 6 / 4 + 1 / 8 / 2) ** 0.5)
    # Differences are paired by seed and question: equal scores differ by exactly 0 ± 0.
    assert mean_se([[1, 0, 1], [0, 0, 1]], [[1, 0, 1], [0, 0, 1]]) == (0.0, 0.0)
    mean, se = mean_se([[1, 1, 1, 1]], [[1, 0, 1, 0]])
    assert mean == 0.5 and se == pytest.approx((1 / 3 / 4) ** 0.5)


def test_selection_effect_trains_every_subset_per_seed_and_scores_in_distribution_questions(tmp_path):
    from benchmarks.bench_selection_effect import chat_questions
    from lib.models.loading import load_tokenizer
    from lib.selection.pools import build_instruction_pools

    pools = build_instruction_pools(4, 2, 20, 4, seed=0, mc_rows=6)
    scored = write_jsonl(tmp_path / "scored.jsonl", [{**r, "selection_score": float(r["label"]) + 0.01 * i}
                                                      for i, r in enumerate(pools["candidates"])])
    mc = write_jsonl(tmp_path / "mc.jsonl", sorted(pools["mc"], key=lambda q: q["source"]))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", pools["target_heldout"])
    # The chat form: the question in the chat template, the replies' opening in the prompt, the rest as choices.
    asked = chat_questions(pools["mc"][:1], load_tokenizer("builtin:tiny-llama"))[0]
    reply = pools["mc"][0]["chat"]["replies"][pools["mc"][0]["answer"]]
    assert asked["prompt"].endswith("The answer is") and pools["mc"][0]["chat"]["user"] in asked["prompt"]
    assert "The answer is " + asked["choices"][asked["answer"]] == reply
    out = tmp_path / "out"
    args = ["--scored", scored, "--model", "builtin:tiny-llama", "--heldout", heldout, "--task_file", mc, "--tasks", "",
            "--seeds", "0,1", "--max_steps", "1", "--output_dir", str(out), "--json"]
    report = last_json(bench("bench_selection_effect.py", *args, timeout=600))
    assert report["indist_questions"] == 6 and report["seeds"] == [0, 1]
    for name in ("top", "random", "bottom"):
        assert [r["seed"] for r in report[name]["per_seed"]] == [0, 1] and report[name]["rows"] == 6
        assert report[name]["steps"] == 1 and 0 <= report["indist"][name] <= 1
    # The top subset is the clean rows (scored highest here), the bottom the corrupted ones.
    assert report["top"]["clean_share"] == 1 and report["bottom"]["clean_share"] == 0
    # The reported difference is the difference of the reported means.
    top_random = report["differences"]["top-random"]
    assert top_random["in-dist"][0] == pytest.approx(report["indist"]["top"] - report["indist"]["random"])
    assert top_random["heldout_loss"][0] == pytest.approx(report["top"]["heldout_loss"]
                                                          - report["random"]["heldout_loss"])
    samples = [json.loads(line) for line in open(out / "top-seed1" / "eval0" / "samples.jsonl")]
    assert [s["doc_id"] for s in samples] == list(range(6))

    # --resume: units recorded with the same settings are reused, a unit without a record runs again.
    args.append("--resume")
    os.remove(out / "random-seed1" / "unit.json")
    kept = (out / "top-seed0" / "adapter_model.safetensors").stat().st_mtime_ns
    proc = bench("bench_selection_effect.py", *args, timeout=600)
    resumed = last_json(proc)
    assert proc.stdout.count("reusing ") == 6 and f"reusing {out / 'random-seed1'}" not in proc.stdout
    assert (out / "top-seed0" / "adapter_model.safetensors").stat().st_mtime_ns == kept
    assert (out / "random-seed1" / "unit.json").is_file()
    assert resumed["indist"]["top"] == report["indist"]["top"]
    assert resumed["top"]["per_seed"] == report["top"]["per_seed"]
    # Other settings: refused in one sentence instead of mixing runs.
    proc = bench("bench_selection_effect.py", *args, "--max_steps", "2")
    assert proc.returncode == 2 and "recorded with other settings (max_steps)" in proc.stderr
    proc = bench("bench_selection_effect.py", *args, "--task_sources", "trivia_qa")
    assert proc.returncode == 2 and "--task_sources trivia_qa matches no question" in proc.stderr
    # Other questions only: the adapters are kept and scored again, nothing is retrained.
    proc = bench("bench_selection_effect.py", *args, "--task_sources", "sciq,commonsense_qa", "--task_limit", "3",
                 timeout=600)
    rescored = last_json(proc)
    assert proc.stdout.count("re-scoring ") == 7 and "reusing " not in proc.stdout
    assert (out / "top-seed0" / "adapter_model.safetensors").stat().st_mtime_ns == kept
    assert rescored["indist_questions"] == 3 and rescored["top"]["per_seed"] == report["top"]["per_seed"]
    # The file lists the questions by source; the limit takes the two named sources in turn: CommonsenseQA (first in
    # the file), SciQ, CommonsenseQA.
    asked = [json.loads(line)["question"] for line in open(out / "indist.jsonl")]
    assert sorted(q["source"] for q in pools["mc"] if q["question"] in asked) == \
        ["commonsense_qa", "commonsense_qa", "sciq"]
    # Each source's accuracies are those of its questions: the overall means are their means weighted by count.
    by_source = rescored["indist_by_source"]
    assert {k: row["questions"] for k, row in by_source.items()} == {"commonsense_qa": 2, "sciq": 1}

    def weighted(key):
        return sum(row[key] * row["questions"] for row in by_source.values()) / 3

    for name in ("top", "random", "bottom"):
        assert weighted(name) == pytest.approx(rescored["indist"][name])
    assert sum(row["top-random"][0] * row["questions"] for row in by_source.values()) / 3 == \
        pytest.approx(rescored["differences"]["top-random"]["in-dist"][0])
