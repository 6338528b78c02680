"""Smoke tests of benchmarks/: each script runs on tiny models in seconds and reports what it claims to measure.

Timings are never asserted (they depend on the machine); what is asserted is that every measured variant is
there, that the scores the scorers compute agree, that ratios are computed against the right reference, and that
the numbers a benchmark derives from its outputs can be recomputed from those outputs.
"""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from lib.models.builtin import resolve_model_path
from lib.models.loading import load_model
from lib.models.moe import find_moe_routers
from lib.selection.split import ExpertSplit, save_router_config
from tests.conftest import ROOT, write_jsonl

BENCHMARKS = ["bench_select.py", "bench_router.py", "bench_select_quality.py", "bench_selection_effect.py",
              "bench_encoder.py", "bench_memory_gate.py", "bench_memory.py"]


def bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join("benchmarks", script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", BENCHMARKS)
def test_help(script):
    proc = bench(script, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lower().startswith("usage") and "--json" in proc.stdout


# ---- bench_select.py -------------------------------------------------------------------------------


def test_bench_select_scores_agree_for_every_variant():
    # tiny-mixtral already has routers: the default --upcycle_experts must not try to upcycle it.
    result = last_json(bench("bench_select.py", "--model", "builtin:tiny-mixtral", "--rows", "24", "--json"))
    assert result["upcycle_experts"] == 0 and result["pool"] == "mixed" and result["rows"] == 24
    assert list(result["variants"]) == ["baseline", "sorted", "stop", "select_data"]
    for name, v in result["variants"].items():
        assert v["speedup"] > 0 and v["rows_per_s"] > 0, name
        assert v["max_abs_diff"] < 1e-4, name
    # Each variant runs what its name says: the batching decides the padded tokens, the forward the LM head.
    v = result["variants"]
    assert v["baseline"]["padded_tokens"] == v["stop"]["padded_tokens"]
    assert v["sorted"]["padded_tokens"] == v["select_data"]["padded_tokens"] < v["baseline"]["padded_tokens"]
    assert v["baseline"]["lm_head_calls"] > 0 and v["sorted"]["lm_head_calls"] > 0
    assert v["stop"]["lm_head_calls"] == v["select_data"]["lm_head_calls"] == 0
    assert result["variants"]["baseline"]["speedup"] == 1.0
    assert result["variants"]["baseline"]["max_abs_diff"] == 0.0
    # The headline numbers are the full scorer's.
    assert result["speedup"] == result["variants"]["select_data"]["speedup"]
    assert result["max_abs_diff"] == result["variants"]["select_data"]["max_abs_diff"]
    stats = result["pool_stats"]
    assert stats["tokens_min"] <= stats["tokens_median"] <= stats["tokens_max"] <= result["max_seq_length"]
    assert 0 <= stats["padding_share_sorted"] <= stats["padding_share_input_order"] < 1


def test_bench_select_pools():
    from benchmarks.bench_select import build_pool
    from lib.selection.pools import benchmark_texts, pydoc_paragraphs

    texts = set(pydoc_paragraphs(min_chars=20, max_chars=1500) + benchmark_texts())
    natural = build_pool(40, seed=3, kind="natural")
    mixed = build_pool(40, seed=3, kind="mixed")
    assert len(natural) == len(mixed) == 40
    assert all(t in texts for t in natural) and len(set(natural)) == 40  # real rows, nothing glued
    glued = [i for i, t in enumerate(mixed) if t not in texts]
    assert glued == list(range(4, 40, 5))  # exactly every fifth row is glued
    assert build_pool(40, seed=3, kind="natural") == natural  # seeded


def test_bench_select_refuses_to_upcycle_an_moe_model():
    proc = bench("bench_select.py", "--model", "builtin:tiny-mixtral", "--upcycle_experts", "4", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: builtin:tiny-mixtral is already an MoE model")
    assert "Traceback" not in proc.stderr


# ---- bench_router.py -------------------------------------------------------------------------------


@pytest.mark.slow  # four worker processes, each importing torch and transformers: ~40 s on 2 cores
def test_bench_router_measures_every_mode():
    result = last_json(bench("bench_router.py", "--model", "builtin:tiny-llama", "--steps", "1", "--warmup", "0",
                             "--upcycle_experts", "4", "--batch_size", "2", "--seq_len", "16", "--json"))
    modes = result["modes"]
    assert list(modes) == ["local", "router", "full", "dense"]
    for name, m in modes.items():
        assert m["step_time_s"] > 0 and m["peak_memory_gib"] > 0, name
        for key in ("step_time_ratio_vs_full", "peak_memory_ratio_vs_full", "step_time_ratio_vs_dense",
                    "peak_memory_ratio_vs_dense"):
            assert m[key] > 0, (name, key)
    assert modes["full"]["step_time_ratio_vs_full"] == 1.0 and modes["dense"]["step_time_ratio_vs_dense"] == 1.0
    # tiny-llama: 2 layers, hidden 64; routers of 4 experts are 2 * 4 * 64 weights, all that router modes train.
    assert modes["local"]["trainable_params"] == modes["router"]["trainable_params"] == 2 * 4 * 64
    assert modes["router"]["trainable_params"] < modes["dense"]["trainable_params"] < modes["full"]["trainable_params"]
    assert modes["full"]["trainable_params"] == modes["full"]["total_params"] == modes["router"]["total_params"]
    assert modes["dense"]["trainable_params"] == modes["dense"]["total_params"]
    # The ratios kept from before are router-full over full fine-tuning of the upcycled model.
    assert result["step_time_ratio"] == modes["router"]["step_time_ratio_vs_full"]
    assert result["peak_memory_ratio"] == modes["router"]["peak_memory_ratio_vs_full"]
    assert result["local_speedup"] > 0 and result["peak_is_training_only"]


# ---- bench_select_quality.py -------------------------------------------------------------------------


def router_checkpoint(tmp_path) -> str:
    """A builtin tiny MoE model with a router_config.json, as train_router.py would leave it."""
    out = tmp_path / "ckpt"
    shutil.copytree(resolve_model_path("builtin:tiny-mixtral"), out)
    routers = find_moe_routers(load_model(str(out)))
    save_router_config(str(out), ExpertSplit.by_index(routers, 0.25), routers, {"scoring": {"max_seq_length": 64}})
    return str(out)


def pairwise_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def chat_quality_files(tmp_path, paragraphs):
    """Held-out labelled chat rows (noise and shuffle garbage) and a labelled training file for the baselines."""
    from lib.selection.corruptions import corrupt_messages

    rng = random.Random(0)
    chat = [[{"role": "user", "content": "What does the documentation say here?"},
             {"role": "assistant", "content": p}] for p in paragraphs[:11]]
    rows = []
    for i, messages in enumerate(chat[:10]):
        kind = ("noise", "shuffle")[i % 2]
        rows += [{"messages": messages, "label": 1, "corruption": None},
                 {"messages": corrupt_messages(messages, chat[10], kind, rng), "label": 0, "corruption": kind}]
    data = write_jsonl(tmp_path / "heldout_chat.jsonl", rows)
    train = []
    for i, p in enumerate(paragraphs[20:40]):
        messages = [{"role": "user", "content": "What does the documentation say here?"},
                    {"role": "assistant", "content": p}]
        kind = ("noise", "shuffle")[i % 2]
        train += [{"messages": messages, "label": 1, "corruption": None},
                  {"messages": corrupt_messages(messages, chat[10], kind, rng), "label": 0, "corruption": kind}]
    return rows, data, write_jsonl(tmp_path / "router_train.jsonl", train)


def test_bench_select_quality_end_to_end(tmp_path, paragraphs):
    # Chat rows, as the README's command runs it (text rows go through the same code with --text_field).
    rows, data, train_file = chat_quality_files(tmp_path, paragraphs)
    out = tmp_path / "out"
    result = last_json(bench("bench_select_quality.py", "--router_model", router_checkpoint(tmp_path), "--data_file",
                             data, "--messages_field", "messages", "--output_dir", str(out), "--max_samples", "16",
                             "--batch_size", "4", "--baseline_train_file", train_file, "--json"))
    assert result["rows"] == 16 and result["good"] == 8 and result["base_rate"] == 0.5

    def read(run, name):
        with open(out / run / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    scored = read("perplexity", "scored.jsonl")
    labels = [r["label"] for r in scored]
    assert labels == [r["label"] for r in rows[:16]]
    # Every AUROC is recomputed from the scored file by counting pairs.
    columns = {n: [r[n] for r in scored] for n in ("quality_score", "quality_logodds", "routed_share")}
    for method in ("perplexity", "ifd", "fasttext", "probe"):
        columns[method] = [r["selection_score"] for r in read(method, "scored.jsonl")]
    assert result["auroc"].keys() == columns.keys()
    assert all(result["rows_per_second"][m] > 0 for m in ("quality_score", "perplexity", "ifd", "fasttext", "probe"))
    for name, values in columns.items():
        assert result["auroc"][name] == pytest.approx(pairwise_auroc(values, labels)), name
    # The router columns come from the perplexity run: they equal the router run's own scores.
    router_scored = read("quality_score", "scored.jsonl")
    for a, b in zip(router_scored, scored, strict=True):
        assert a["quality_score"] == pytest.approx(b["quality_score"], abs=1e-5)
    assert set(result["auroc_by_corruption"]) == {"noise", "shuffle"}
    for kind, row in result["auroc_by_corruption"].items():
        idx = [i for i, r in enumerate(scored) if r["label"] == 1 or r["corruption"] == kind]
        assert row["quality_score"] == pytest.approx(
            pairwise_auroc([columns["quality_score"][i] for i in idx], [labels[i] for i in idx]))
    for score in ("quality_score", "perplexity", "ifd", "fasttext", "probe"):
        selected = read(score, "selected.jsonl")
        assert len(selected) == round(0.3 * 16)
        assert result["precision_selected"][score] == pytest.approx(sum(r["label"] for r in selected) / len(selected))


def test_bench_select_quality_leaves_each_kind_out_of_training(tmp_path, paragraphs):
    rows, data, train_file = chat_quality_files(tmp_path, paragraphs)
    recipe = tmp_path / "router.yaml"
    recipe.write_text("model_name_or_path: builtin:tiny-mixtral\nmessages_field: messages\nlabel_field: label\n"
                      "max_seq_length: 64\nper_device_train_batch_size: 8\nlearning_rate: 5.0e-3\nmax_steps: 2\n"
                      "output_dir: unused\nsave_strategy: 'no'\nseed: 0\n")
    out = tmp_path / "out"
    result = last_json(bench("bench_select_quality.py", "--router_model", router_checkpoint(tmp_path), "--data_file",
                             data, "--messages_field", "messages", "--output_dir", str(out), "--max_samples", "16",
                             "--baseline_train_file", train_file, "--holdout_kinds", "noise", "--router_recipe",
                             str(recipe), "--json"))
    assert set(result["held_out_kind"]) == {"noise"}
    folder = out / "without_noise"
    with open(folder / "train.jsonl", encoding="utf-8") as f:
        kinds = [json.loads(line)["corruption"] for line in f]
    assert "noise" not in kinds and kinds.count("shuffle") == 10 and kinds.count(None) == 20
    assert os.path.exists(folder / "router" / "router_config.json")
    labels = [r["label"] for r in rows[:16]]
    idx = [i for i, r in enumerate(rows[:16]) if r["label"] == 1 or r["corruption"] == "noise"]
    for method in ("quality_score", "fasttext", "probe"):
        with open(folder / method / "scored.jsonl", encoding="utf-8") as f:
            scores = [json.loads(line)["selection_score"] for line in f]
        assert result["held_out_kind"]["noise"][method] == pytest.approx(
            pairwise_auroc([scores[i] for i in idx], [labels[i] for i in idx])), method


def test_bench_select_quality_refuses_a_bad_label(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a row", "label": 1}, {"text": "b row", "label": 2}])
    proc = bench("bench_select_quality.py", "--router_model", "unused", "--data_file", data, "--output_dir",
                 str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {data} row 1: field 'label' is 2; labels must be "
                                                    "1 (good) or 0 (garbage).")


# ---- bench_selection_effect.py -----------------------------------------------------------------------


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
    mc = write_jsonl(tmp_path / "mc.jsonl", pools["mc"])
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


# ---- bench_encoder.py --------------------------------------------------------------------------------


def test_encoder_keyword_baseline_picks_the_named_resource_among_the_nearest_tools():
    from benchmarks.bench_encoder import keyword_choice
    from tests.test_encoder import TOOLS, load_tools_from

    tools = load_tools_from(TOOLS)  # 0 fast-asr (50 ms, 0.2 GB), 1 big-asr (2000 ms, 10 GB), 2 ner, 3 translator
    assert keyword_choice("Transcribe this call quickly.", [1, 0, 2, 3], tools, 2) == 0  # lowest latency
    assert keyword_choice("Transcribe it on a phone.", [1, 0, 2, 3], tools, 2) == 0      # least memory
    assert keyword_choice("Transcribe it on a phone.", [1, 2, 0, 3], tools, 2) == 1      # fast-asr is not near
    assert keyword_choice("Transcribe this call.", [1, 0, 2, 3], tools, 2) == 1          # no resource named
    assert keyword_choice("Transcribe it accurately.", [1, 0, 2, 3], tools, 2) == 1      # no accuracy field


def test_bench_encoder_compares_poolings_the_baseline_and_the_trained_encoder(tmp_path):
    from tests.test_encoder import query_files, tools_file

    train, held = query_files(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_train_epochs: 2\nper_device_train_batch_size: 16\nlearning_rate: 1.0e-2\n"
                      "report_to: none\nnum_attention_heads: 4\n")
    report = last_json(bench("bench_encoder.py", "--model", "builtin:tiny-llama", "--tools_file", tools_file(tmp_path),
                             "--train_file", train, "--validation_file", held, "--poolings", "mean,prompt_last",
                             "--layers=-1,middle", "--recipe", str(recipe), "--output_dir", str(tmp_path / "o"),
                             "--json"))
    assert [(r["pooling"], r["layer"]) for r in report["step0"]] == [("mean", -1), ("mean", 1), ("prompt_last", -1),
                                                                     ("prompt_last", 1)]
    chosen = next(r for r in report["step0"] if (r["pooling"], r["layer"]) == ("prompt_last", -1))  # the default
    assert report["keyword_baseline"]["pooling"] == report["trained"]["pooling"] == "prompt_last"
    for row in [*report["step0"], report["keyword_baseline"], report["trained"]]:
        assert 0 <= row["top1"] <= row["top3"] <= 1 and 0 <= row["top1_resource"] <= 1
    # The encoder's own step 0 is the semantic table of the same pooling: the bench's step-0 row.
    encoder = json.load(open(tmp_path / "o" / "encoder" / "encoder_config.json"))
    assert encoder["step0"]["eval_top1"] == pytest.approx(chosen["top1"])
