"""Smoke tests of bench_encoder.py: it runs on tiny models in seconds and reports what it claims to measure.

Timings are never asserted (they depend on the machine); what is asserted is that every measured variant is
there, that the scores the scorers compute agree, that ratios are computed against the right reference, and that
the numbers a benchmark derives from its outputs can be recomputed from those outputs.
"""

import json

import pytest

from tests.conftest import bench, last_json


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
