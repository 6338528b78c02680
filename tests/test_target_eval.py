import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_target
from lib.core.errors import UserError
from lib.models.builtin import resolve_model_path
from lib.models.loading import load_model, load_tokenizer
from tests.conftest import ROOT, write_jsonl

BASE = "builtin:tiny-llama"


def load_evaluate_script():
    # Imported under another name: a module called `evaluate` would shadow the evaluate library in this process.
    spec = importlib.util.spec_from_file_location("sidekit_evaluate_script", os.path.join(ROOT, "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_file(tmp_path, paragraphs, n=32, name="chat.jsonl"):
    rows = [{"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                          {"role": "assistant", "content": p}]} for i, p in enumerate(paragraphs[:n])]
    return write_jsonl(tmp_path / name, rows)


def train(tmp_path, data, *extra, out="target"):
    out_dir = str(tmp_path / out)
    train_target.main(["--model_name_or_path", BASE, "--train_file", data, "--output_dir", out_dir,
                       "--per_device_train_batch_size", "4", "--max_length", "96", "--learning_rate", "5e-3",
                       "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--seed", "3",
                       "--activation_checkpointing", "false", *extra])
    return out_dir


def collated_labels(tmp_path, rows, *flags):
    """The first batch the real SFTTrainer would train on (its own collator), as (input_ids, labels) lists."""
    from lib.core.args import parse_args
    from lib.models.args import ModelLoadArguments
    from lib.sft.args import LoraArguments, SFTDataArguments, TargetTrainingArguments
    from lib.sft.data import prepare_sft_datasets
    from lib.sft.trainer import TargetTrainer

    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    _, data_args, _, args = parse_args(
        (ModelLoadArguments, SFTDataArguments, LoraArguments, TargetTrainingArguments),
        ["--model_name_or_path", BASE, "--train_file", data, "--output_dir", str(tmp_path / "o"), "--report_to",
         "none", "--per_device_train_batch_size", str(len(rows)), *flags])
    tok = load_tokenizer(BASE)
    train_ds, _ = prepare_sft_datasets(data_args, args, tok)
    trainer = TargetTrainer(model=load_model(BASE), args=args, train_dataset=train_ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    return tok, batch["input_ids"].tolist(), batch["labels"].tolist()


def learned_text(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != -100])


def test_sft_trainer_batches_learn_exactly_the_assistant_turns_and_completions(tmp_path):
    messages = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."},
                {"role": "user", "content": "And a tuple?"}, {"role": "assistant", "content": "An immutable one."}]
    tok, ids, labels = collated_labels(tmp_path, [{"m": messages}], "--messages_field", "m")
    assert learned_text(tok, ids[0], labels[0]) == "A sequence.<|im_end|>\nAn immutable one.<|im_end|>\n"
    # Every user-turn token is -100.
    user_part = tok.apply_chat_template(messages[:1], tokenize=False)
    n_user = len(tok(user_part, add_special_tokens=False)["input_ids"])
    assert all(lab == -100 for lab in labels[0][:n_user])
    # Prompt/completion rows go to TRL untokenised: its completion_only_loss masks the prompt, its EOS ends the row.
    tok, ids, labels = collated_labels(tmp_path, [{"p": "Q: 2+2?\nA:", "c": " 4"}], "--prompt_field", "p",
                                       "--completion_field", "c")
    assert learned_text(tok, ids[0], labels[0]) == " 4" + tok.eos_token
    # Plain text rows learn every token (and TRL's EOS).
    tok, ids, labels = collated_labels(tmp_path, [{"body": "Lists are mutable."}], "--dataset_text_field", "body")
    assert learned_text(tok, ids[0], labels[0]).endswith("Lists are mutable." + tok.eos_token)
    with pytest.raises(UserError, match="row 0: field 'm' has no assistant turn"):
        collated_labels(tmp_path, [{"m": messages[:1]}], "--messages_field", "m")
    with pytest.raises(UserError, match="--assistant_only_loss applies to chat rows"):
        collated_labels(tmp_path, [{"p": "Q", "c": "A"}], "--prompt_field", "p", "--completion_field", "c",
                        "--assistant_only_loss")


def test_lora_adapter_trains_saves_reloads_and_merges(tmp_path, paragraphs):
    from peft import PeftModel

    out = train(tmp_path, chat_file(tmp_path, paragraphs), "--messages_field", "messages", "--use_peft",
                "--lora_r", "4", "--max_steps", "4", "--merge_adapter")
    adapter = load_file(os.path.join(out, "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    assert any("q_proj" in k for k in adapter) and any("down_proj" in k for k in adapter)  # all-linear
    assert not any(k.endswith("embed_tokens.weight") for k in adapter)
    # The base checkpoint is untouched; base + adapter reloads; the merged model computes the same thing.
    base = load_model(BASE).eval()
    reloaded = PeftModel.from_pretrained(load_model(BASE), out).eval()
    merged = load_model(os.path.join(out, "merged")).eval()
    x = torch.randint(5, 1000, (2, 20))
    with torch.no_grad():
        ref, got, plain = reloaded(x).logits, merged(x).logits, base(x).logits
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    assert not torch.allclose(plain, got, atol=1e-4)
    assert not any(f.endswith(".safetensors") and "model" in f and f != "adapter_model.safetensors"
                   for f in os.listdir(out))
    card = open(os.path.join(out, "README.md")).read()
    assert "LoRA r=4" in card and "builtin:tiny-llama" in card


def test_model_card_records_the_selection(tmp_path, paragraphs):
    import select_data
    from tests.test_select_data import router_checkpoint

    pool = chat_file(tmp_path, paragraphs, n=20, name="pool.jsonl")
    sel = str(tmp_path / "sel")
    select_data.main(["--router_model", router_checkpoint(tmp_path, "olmoe"), "--data_file", pool,
                      "--messages_field", "messages", "--output_dir", sel, "--select_ratio", "0.5",
                      "--disable_tqdm"])
    out = train(tmp_path, os.path.join(sel, "selected.jsonl"), "--messages_field", "messages", "--use_peft",
                "--max_steps", "1")
    card = open(os.path.join(out, "README.md")).read()
    assert f"selected by `select_data.py` from `{pool}` (20 rows" in card
    assert "10 rows, top 50% of the pool by `quality_score`" in card


def test_text_rows_full_fine_tune_and_bad_inputs(tmp_path, paragraphs, capsys):
    from tests.test_errors import refused

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": p} for p in paragraphs[:12]])
    out = train(tmp_path, data, "--max_steps", "2")
    before, after = load_file(os.path.join(resolve_model_path(BASE), "model.safetensors")), \
        load_file(os.path.join(out, "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    empty = tmp_path / "selected.jsonl"
    empty.write_text("")
    cases = [
        (["--train_file", str(empty)], "selected.jsonl is empty; it needs at least one row"),
        (["--train_file", data, "--messages_field", "messages"], "has no field 'messages' (fields: text)"),
        (["--train_file", data, "--merge_adapter"], "--merge_adapter needs --use_peft"),
    ]
    for i, (argv, message) in enumerate(cases):  # in this process: the command line's exit path, no start-up cost
        last = refused(capsys, train_target.main, ["--model_name_or_path", BASE, *argv, "--output_dir",
                                                   tmp_path / f"bad{i}", "--report_to", "none"])
        assert message in last, last


def test_evaluate_equals_the_lm_eval_command_line(tmp_path):
    from lib.eval.pack import build_task_pack

    evaluate = load_evaluate_script()
    model_dir = resolve_model_path(BASE)
    report = evaluate.main(["--model_name_or_path", model_dir, "--tasks", "arc_easy", "--limit", "24",
                            "--batch_size", "4", "--task_source", "pack", "--output_dir", str(tmp_path / "ours")])
    ours = report["runs"]["base"]["results"]["arc_easy"]
    pack, _ = build_task_pack()
    bin_dir = os.path.dirname(sys.executable)
    proc = subprocess.run(
        [os.path.join(bin_dir, "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
         "--tasks", "arc_easy", "--include_path", pack, "--limit", "24", "--batch_size", "4", "--device", "cpu",
         "--output_path", str(tmp_path / "cli")],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cli") for f in fs if f.startswith("results")]
    cli = json.load(open(found[0]))["results"]["arc_easy"]
    for key in ("acc,none", "acc_norm,none"):
        assert ours[key] == cli[key], key
    saved = json.load(open(tmp_path / "ours" / "results.json"))
    assert saved["split_notes"]["arc_easy"]["split"] == "validation"
    assert "| arc_easy | acc |" in open(tmp_path / "ours" / "results.md").read()


def test_evaluate_tuned_vs_base_task_file_and_bad_inputs(tmp_path, paragraphs):
    evaluate = load_evaluate_script()
    out = train(tmp_path, chat_file(tmp_path, paragraphs, n=8), "--messages_field", "messages", "--use_peft",
                "--max_steps", "2")
    qs = [{"question": f"Which word is number {i}?", "choices": ["alpha", "beta", "gamma"], "answer": i % 3}
          for i in range(6)]
    qs.append({"question": "Pick beta.", "choices": ["alpha", "beta"], "answer": "beta"})
    task_file = write_jsonl(tmp_path / "mine.jsonl", qs)
    report = evaluate.main(["--model_name_or_path", BASE, "--adapter", out, "--task_file", task_file,
                            "--task_source", "pack", "--log_samples", "--output_dir", str(tmp_path / "ev")])
    assert set(report["runs"]) == {"base", "tuned"}
    assert report["runs"]["tuned"]["n-samples"]["custom_mine"]["effective"] == 7
    # --log_samples: every question's score in each run, averaging to the reported accuracy.
    with open(tmp_path / "ev" / "samples.jsonl") as f:
        samples = [json.loads(line) for line in f]
    for run in ("base", "tuned"):
        mine = [s for s in samples if s["run"] == run]
        assert [s["doc_id"] for s in mine] == list(range(7)) and {s["acc"] for s in mine} <= {0.0, 1.0}
        acc = report["runs"][run]["results"]["custom_mine"]["acc,none"]
        assert sum(s["acc"] for s in mine) / 7 == pytest.approx(acc)
    table = open(tmp_path / "ev" / "results.md").read()
    assert "| custom_mine | acc |" in table and "delta" in table
    cases = [
        (["--adapter", str(tmp_path / "nope"), "--tasks", "arc_easy"], "has no adapter_config.json"),
        (["--tasks", "arc_eazy"], "Unknown lm-eval task(s) ['arc_eazy']"),
        ([], "Nothing to evaluate"),
    ]
    for i, (argv, message) in enumerate(cases):
        proc = subprocess.run([sys.executable, "evaluate.py", "--model_name_or_path", BASE, *argv, "--task_source",
                               "pack", "--output_dir", str(tmp_path / f"bad{i}")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
