import json
import os
import random

import pytest

from lib.core.args import parse_args
from lib.core.data import PadCollator, check_fields, load_rows, parse_label
from lib.core.errors import DataError, UserError
from lib.models.args import ModelArguments
from lib.selection.args import RouterDataArguments as DataArguments
from lib.selection.corruptions import CORRUPTIONS, synthetic_negatives
from lib.selection.data import collect_rows
from tests.conftest import ROOT, write_jsonl


def test_load_rows_formats_and_errors(tmp_path):
    import pandas as pd

    rows = [{"text": "a b c", "label": 1}, {"text": "d e f", "label": 0}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "x.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "x.csv", index=False)
    (tmp_path / "x.json").write_text(json.dumps(rows))
    for name in ("x.jsonl", "x.parquet", "x.csv", "x.json"):
        ds = load_rows(str(tmp_path / name))
        assert ds["text"] == ["a b c", "d e f"], name
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.xlsx").write_text("not a table")
    with pytest.raises(DataError, match=r"x.xlsx: unsupported file type '.xlsx'"):
        load_rows(str(tmp_path / "x.xlsx"))


def test_missing_field_names_what_is_there(tmp_path):
    ds = load_rows(write_jsonl(tmp_path / "p.jsonl", [{"txt": "hello"}]))
    with pytest.raises(DataError, match=r"no field 'text' \(fields: txt\); set --text_field"):
        check_fields(ds, "p.jsonl", text_field="text", messages_field=None, label_field=None)


@pytest.mark.parametrize("value,expected", [(1, 1), (0, 0), (True, 1), ("0", 0), ("true", 1), (1.0, 1)])
def test_labels_accepted(value, expected):
    assert parse_label(value, "f", 0, "label") == expected


@pytest.mark.parametrize("value", [2, -1, "good", None, 0.5])
def test_bad_labels_refused_with_row(value):
    with pytest.raises(DataError, match=r"f row 3: field 'label' is .*; labels must be 1 \(good\) or 0"):
        parse_label(value, "f", 3, "label")


def test_collect_rows_skips_empty_and_validates_messages(tmp_path):
    from lib.models.loading import load_tokenizer

    tok = load_tokenizer("builtin:tiny-llama")
    ds = load_rows(write_jsonl(tmp_path / "t.jsonl", [{"text": "ok"}, {"text": "  "}, {"text": "fine"}]))
    items, labels, empty = collect_rows(ds, "t.jsonl", tok, text_field="text", messages_field=None, label_field=None)
    assert items == ["ok", "fine"] and labels == [1, 1] and empty == 1
    bad = load_rows(write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}]))
    with pytest.raises(DataError, match="row 0: field 'messages' must be a list"):
        collect_rows(bad, "m.jsonl", tok, text_field="text", messages_field="messages", label_field=None)


def test_synthetic_negatives_are_seeded_and_cover_every_kind(paragraphs):
    good = paragraphs[:20]
    a = synthetic_negatives(good, list(CORRUPTIONS), 1.0, seed=3, chat=False)
    b = synthetic_negatives(good, list(CORRUPTIONS), 1.0, seed=3, chat=False)
    c = synthetic_negatives(good, list(CORRUPTIONS), 1.0, seed=4, chat=False)
    assert a == b and a != c and len(a) == 20
    assert not set(a) & set(good)
    for kind, fn in CORRUPTIONS.items():
        out = fn(good[0], good[1], random.Random(0))
        assert out != good[0], kind


def test_chat_negatives_corrupt_only_the_answer():
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer number {i} here"}]
             for i in range(4)]
    out = synthetic_negatives(convs, ["mismatch"], 1.0, seed=0, chat=True)
    for conv in out:
        assert conv[0]["content"].startswith("q")
        q = int(conv[0]["content"][1:])
        assert conv[1]["content"] != f"answer number {q} here"


def test_pad_collator_pads_labels_with_ignore_index():
    batch = PadCollator(pad_token_id=7)([
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3], "quality": 1},
        {"input_ids": [4], "attention_mask": [1], "labels": [-100], "quality": 0},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [-100, -100, -100]]
    assert batch["quality"].tolist() == [1, 0]


def test_recipe_defaults_and_cli_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: builtin:tiny-mixtral\ntrain_file: a.jsonl\nmax_seq_length: 64\n")
    model_args, data_args = parse_args((ModelArguments, DataArguments), [str(recipe), "--max_seq_length", "32"])
    assert model_args.model_name_or_path == "builtin:tiny-mixtral"
    assert data_args.train_file == "a.jsonl" and data_args.max_seq_length == 32
    (tmp_path / "bad.yaml").write_text("model_name_or_path: x\ntrain_file: a\nmax_seq_lenght: 3\n")
    with pytest.raises(UserError, match=r"unknown setting\(s\) \['max_seq_lenght'\]"):
        parse_args((ModelArguments, DataArguments), [str(tmp_path / "bad.yaml")])


def test_argument_validation_is_one_sentence():
    with pytest.raises(UserError, match="--upcycle_top_k must be between 1 and --upcycle_experts"):
        ModelArguments(model_name_or_path="x", upcycle_experts=4, upcycle_top_k=5)
    with pytest.raises(UserError, match="unknown corruption"):
        DataArguments(train_file="x", synthetic_kinds="shuffle,blur")


@pytest.mark.parametrize("recipe", sorted(f for f in os.listdir(os.path.join(ROOT, "recipes")) if f.endswith(".yaml")))
def test_shipped_recipes_parse(recipe):
    """Every shipped recipe is complete and spelled right for the script it is named after."""
    from lib.models.args import ModelLoadArguments
    from lib.selection.args import RouterTrainingArguments, SelectArguments
    from lib.sft.args import LoraArguments, SFTDataArguments, TargetTrainingArguments
    from lib.tools.args import EncoderDataArguments, EncoderTrainingArguments

    script = {"train_router": (ModelArguments, DataArguments, RouterTrainingArguments),
              "select_data": (SelectArguments,),
              "train_target": (ModelLoadArguments, SFTDataArguments, LoraArguments, TargetTrainingArguments),
              "pretrain_encoder": (ModelArguments, EncoderDataArguments, EncoderTrainingArguments)}
    import yaml

    kind = next(k for k in script if recipe.startswith(k))
    path = os.path.join(ROOT, "recipes", recipe)
    parsed = parse_args(script[kind], [path])
    # Every setting the recipe writes reaches the arguments with its value (enums compared by their value).
    values = {k: getattr(v, "value", v) for obj in parsed for k, v in vars(obj).items()}
    normalised = {("report_to", "none"): []}  # TrainingArguments' own spelling of "no tracker"
    for key, value in yaml.safe_load(open(path)).items():
        expected = normalised.get((key, value), value)
        assert values[key] == expected or str(values[key]) == str(expected), (recipe, key, values[key], value)


def test_instruction_pools_are_disjoint_real_conversations():
    from lib.selection.pools import build_instruction_pools

    pools = build_instruction_pools(40, 20, 40, 10, seed=0, mc_rows=30)
    assert [len(pools[k]) for k in ("router", "heldout", "candidates", "target_heldout")] == [40, 20, 40, 10]
    mc = pools.pop("mc")
    questions = {}
    for name, rows in pools.items():
        assert sum(r["label"] == 0 for r in rows) == (0 if name == "target_heldout" else len(rows) // 2)
        for r in rows:
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        questions[name] = {r["messages"][0]["content"] for r in rows}
    names = list(questions)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not questions[a] & questions[b], (a, b)
    # Garbage rows are corrupted answers to real questions; their clean originals sit in the same file.
    bad = [r for r in pools["candidates"] if r["label"] == 0]
    good = {r["messages"][1]["content"] for r in pools["candidates"] if r["label"] == 1}
    assert all(r["messages"][1]["content"] not in good for r in bad if r["corruption"] != "mismatch")
    # The multiple-choice questions come from the same sources, a third each, and from no conversation of any file.
    assert len(mc) == 30 and sorted({q["source"] for q in mc}) == ["commonsense_qa", "sciq", "social_i_qa"]
    assert all(sum(q["source"] == s for q in mc) == 10 for s in ("sciq", "commonsense_qa", "social_i_qa"))
    # Sources take turns, so any first N of the file is balanced (evaluate.py --limit, the benchmark's --task_limit).
    assert len({q["source"] for q in mc[:3]}) == 3 and len({q["source"] for q in mc[-3:]}) == 3
    assert all(0 <= q["answer"] < len(q["choices"]) and len(set(q["choices"])) > 1 for q in mc)
    asked = [r["messages"][0]["content"] for rows in pools.values() for r in rows]
    assert not any(q["question"] in text for q in mc for text in asked)


def test_a_recipes_switch_is_read_behind_the_deepspeed_launchers_local_rank():
    """The deepspeed launcher runs ``script --local_rank=N recipe.yaml ...``: train_memory.py's --memory_type (and
    train_router.py's --router_type) in the recipe were missed, so a recall recipe went to the explicit parser."""
    from lib.core.args import peek_setting

    recipe = os.path.join(ROOT, "recipes", "recall", "train_recall_smollm2.yaml")
    assert peek_setting([recipe], "memory_type") == "recall"
    assert peek_setting(["--local_rank=1", recipe, "--output_dir", "x"], "memory_type") == "recall"
    assert peek_setting(["--local_rank=0", recipe, "--memory_type", "explicit"], "memory_type") == "explicit"
