"""Smoke tests of bench_select.py, bench_router.py and bench_select_quality.py (and --help of every benchmark):
each runs on tiny models in seconds and reports what it claims to measure.

Timings are never asserted (they depend on the machine); what is asserted is that every measured variant is
there, that the scores the scorers compute agree, that ratios are computed against the right reference, and that
the numbers a benchmark derives from its outputs can be recomputed from those outputs.
"""

import json
import os
import random
import shutil

import pytest

from lib.models.builtin import resolve_model_path
from lib.models.loading import load_model
from lib.models.moe import find_moe_routers
from lib.selection.split import ExpertSplit, save_router_config
from tests.conftest import bench, last_json, write_jsonl


BENCHMARKS = ["bench_select.py", "bench_router.py", "bench_select_quality.py", "bench_selection_effect.py",
              "bench_encoder.py", "bench_memory_gate.py", "bench_memory.py", "bench_recall.py"]


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
