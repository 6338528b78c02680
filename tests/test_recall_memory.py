"""Recall memory: the log state and lock, the <recall> model (token row, slots, save/load), and the whole pipeline
on a tiny model (incremental rerun, crash safety, users kept apart). Entries and question rows:
test_recall_entries.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lib.core.errors import DataError, UserError
from lib.recall import extraction
from lib.recall.logs import (
    conversation_hash,
    new_or_changed,
    read_conversations,
    run_lock,
)
from lib.recall.probes import load_probes
from tests.conftest import ROOT, write_jsonl

TINY = "builtin:tiny-llama"


# ---- logs: state and lock ---------------------------------------------------------------------------------

def conversation(cid, user, text, ts="2025-01-01T10:00:00Z"):
    return {"conversation_id": cid, "user_id": user, "timestamp": ts,
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Got it."}]}


def test_only_new_or_changed_conversations_are_read_again(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    write_jsonl(logs / "a.jsonl", [conversation("c1", "u1", "I live in Brovik"), conversation("c2", "u2", "hi")])
    convs = read_conversations(str(logs))
    state = {"conversations": {c["conversation_id"]: conversation_hash(c) for c in convs}}
    assert new_or_changed(convs, state) == []
    write_jsonl(logs / "b.jsonl", [conversation("c3", "u1", "my dog Rex"), conversation("c2", "u2", "hi there")])
    assert sorted(c["conversation_id"] for c in new_or_changed(read_conversations(str(logs)), state)) == ["c2", "c3"]


def test_bad_logs_are_one_sentence(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"conversation_id": "c1", "user_id": "u1", "messages": []}])
    with pytest.raises(DataError, match="no 'timestamp' field"):
        read_conversations(path)
    path = write_jsonl(tmp_path / "bad2.jsonl", [{**conversation("c1", "", "hi")}])
    with pytest.raises(DataError, match="row 0: 'user_id' is empty"):
        read_conversations(path)
    with pytest.raises(DataError, match="does not exist"):
        read_conversations(str(tmp_path / "nothing"))


def test_a_second_run_at_once_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "out")
    with run_lock(out) as path:
        child = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]);"
                                "from lib.recall.logs import run_lock\nwith run_lock(sys.argv[2]): pass", ROOT, out],
                               capture_output=True, text=True)
        assert child.returncode != 0 and "Another recall-memory run" in child.stderr
    assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write("999999999")  # a process that no longer exists
    with run_lock(out):
        assert open(path).read() == str(os.getpid())


# ---- the whole pipeline on a tiny model -----------------------------------------------------------------

def run_recall(_, out, *extra):
    from train_memory import main

    return main(["--memory_type", "recall", "--model_name_or_path", TINY, "--output_dir", str(out),
                 "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--extraction_max_new_tokens", "8",
                 "--logging_steps", "50", "--seed", "0", *extra])


@pytest.fixture(scope="module")
def chats_dir(tmp_path_factory):
    from lib.recall import chats

    out = tmp_path_factory.mktemp("chats")
    chats.build(str(out), users_count=5, seed=1)
    return out


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, chats_dir):
    """One recall run on the tiny model with the generator's entries (the tiny random model extracts nothing)."""
    out = tmp_path_factory.mktemp("recall") / "out"
    summary = run_recall(None, out, "--memories_file", str(chats_dir / "facts.jsonl"),
                         "--qa_file", str(chats_dir / "questions_train.jsonl"), "--k_folds", "2",
                         "--sft_file", str(chats_dir / "general_chat.jsonl"))
    return out, summary


def test_pipeline_saves_every_part_and_answers_from_the_users_own_memories(trained, chats_dir):
    from lib.recall.answer import RecallAssistant

    out, summary = trained
    facts = [f for f in read(chats_dir / "facts.jsonl") if f["current"]]
    assert summary["counts"]["entries"] == len(facts) and summary["index"] == "exact"
    assert summary["counts"]["train_rows"] > summary["counts"]["entries"]  # questions and instruction rows too
    assert summary["k_fold"]["exact_match_std"] >= 0 and len(summary["k_fold"]["folds"]) == 2
    assert sum(f["held_out_entries"] for f in summary["k_fold"]["folds"]) == len(facts)
    for name in ("adapter_model.safetensors", "projector.safetensors", "recall_config.json", "memories.faiss",
                 "memories.jsonl", "state.json", "summary.json", "README.md", "tokenizer.json",
                 "query_adapter.safetensors"):
        assert (out / name).exists(), name
    assert not any(p.name.startswith(("checkpoint-", "fold-")) for p in out.iterdir())
    assert not (out.parent / "out.staging").exists() and not (out.parent / "out.lock").exists()
    # The adapter holds the <recall> row, not a copy of the whole embedding matrix.
    assert os.path.getsize(out / "adapter_model.safetensors") < 5e6
    assistant = RecallAssistant(str(out))
    assert "<recall>" in assistant.tokenizer.get_vocab()
    assert summary["settings"]["query_adapter"] and assistant.query_adapter is not None
    assert summary["counts"]["adapter_questions"] > 0
    for user in ("u0000", "u0004"):
        result = assistant.answer("What is my dog called?", user_id=user, max_new_tokens=4)
        mine = {e["text"] for e in read(out / "memories.jsonl") if e["user_id"] == user}
        assert len(result["memories"]) == 3 and {text for _, text in result["memories"]} <= mine


def test_saved_model_reloads_with_the_same_outputs(trained):
    from lib.recall.model import load_recall_model

    out, _ = trained
    first, tokenizer = load_recall_model(str(out))
    again, _ = load_recall_model(str(out))
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<recall>"), 5, 6]])
    vectors = torch.randn(1, 1, first.recall_config.vector_dim)
    with torch.no_grad():
        torch.testing.assert_close(first(ids, memory_vectors=vectors).logits, again(ids, memory_vectors=vectors).logits)
        # The trained parts changed the output (the <recall> row, projector and LoRA are not at their start).
        base = first.model.get_base_model()
        with first.model.disable_adapter():
            plain = base(input_ids=ids[:, 1:]).logits
        assert not torch.allclose(first(ids[:, 1:]).logits, plain)


def test_answer_logits_equal_the_full_forward_at_the_answer_positions(trained):
    from lib.recall.model import load_recall_model

    out, _ = trained
    model, tokenizer = load_recall_model(str(out))
    ids = torch.tensor([[tokenizer.convert_tokens_to_ids("<recall>"), 5, 6, 7], [8, 9, 10, 11]])
    at = torch.tensor([[False, True, False, True], [True, False, False, False]])
    vectors = torch.randn(2, 1, model.recall_config.vector_dim)
    with torch.no_grad():
        full = model(ids, memory_vectors=vectors).logits
        torch.testing.assert_close(model(ids, memory_vectors=vectors, logits_at=at)["logits"], full[at])


def test_evaluate_and_the_benchmark_measure_a_recall_model(trained, chats_dir, tmp_path):
    import evaluate

    out, _ = trained
    probes = str(chats_dir / "questions_test.jsonl")
    result = evaluate.main(["--recall_model", str(out), "--probe_file", probes, "--probe_limit", "6",
                            "--max_new_tokens", "3", "--seed", "3", "--output_dir", str(tmp_path / "eval")])
    conditions = result["probes"]["conditions"]
    assert set(conditions) == {"recall", "no_memory", "base_no_memory", "retrieved_text", "base_retrieved_text",
                               "gold_text", "base_gold_text"}
    assert conditions["recall"]["memory_tokens"] == 3 and conditions["no_memory"]["memory_tokens"] is None
    # The same three retrieved memories as text: several tokens each, asked of every question.
    assert conditions["retrieved_text"]["rows"] == 6 and conditions["retrieved_text"]["memory_tokens"] > 3 * 3
    assert 0 <= result["probes"]["index_recall@1"] <= result["probes"]["index_recall@3"] <= 1
    seen = result["probes"]["when_retrieved"]
    assert 0 <= seen["rows"] <= 6 and 0 <= seen["recall"] <= 1
    paired, kinds = result["probes"]["answerable"], [p.get("kind") for p in load_probes(probes, 6, 3)]
    assert paired["rows"] == conditions["gold_text"]["rows"] == sum(k != "unknown" for k in kinds)
    unknown = kinds.count("unknown")  # recall over all questions = recall on the answerable ones + the unknown ones
    assert conditions["recall"]["accuracy"] * 6 == pytest.approx(
        paired["recall"] * paired["rows"] + conditions["recall"].get("accuracy_unknown", 0) * unknown)
    saved = json.load(open(tmp_path / "eval" / "results.json"))
    assert saved["probes"]["probes"] == 6 and "recall model" in open(tmp_path / "eval" / "results.md").read()
    with pytest.raises(UserError, match="--probe_file belongs to --recall_model"):
        evaluate.main(["--model_name_or_path", TINY, "--probe_file", probes, "--output_dir", str(tmp_path / "e2")])

    from benchmarks.bench_recall import main as bench

    report = bench(["--recall_model", str(out), "--chats", str(chats_dir), "--limit", "4", "--max_new_tokens", "3",
                    "--sizes", "3000"])
    controls = report["reconstruction_trained"]["controls"]
    assert set(controls) == {"zero", "shuffled", "random"}
    assert report["index_speed"][0]["entries"] == 3000 and 0 <= report["index_speed"][0]["recall@10"] <= 1
    assert "extraction" not in report  # the run was given its entries

    from benchmarks.bench_query_adapter import main as bench_adapter

    report = bench_adapter(["--recall_model", str(out), "--chats", str(chats_dir), "--epochs", "2"])
    assert report["questions"] > 0 and report["ceiling"] == 1.0  # the run was given the generator's entries
    for part in (report["frozen"], report["adapter"], report["unseen_kinds"]["frozen"],
                 report["unseen_kinds"]["adapter"]):
        assert 0 <= part["recall@1"] <= part["recall@3"] <= part["recall@5"] <= 1 + 1e-9


def test_bench_recall_extract_only_extracts_and_merges_every_users_conversations(chats_dir):
    from benchmarks.bench_recall import main as bench

    report = bench(["--extract_only", "--model", TINY, "--chats", str(chats_dir)])["extraction"]
    said = sum(m["role"] == "user" and bool(m["content"].strip()) for c in read(chats_dir / "logs" /
                                                                                "conversations.jsonl")
               for m in c["messages"])
    assert report["messages_read"] == said and report["facts"] == len(read(chats_dir / "facts.jsonl"))
    assert 0 <= report["updates_replaced"] <= report["updates_extracted"] and report["extractor"] == TINY


@pytest.fixture
def parrot_extractor(monkeypatch):
    """The tiny random model writes no entry; this extractor turns every message with "my" into one."""
    from tests.recall_parrot import parrot

    monkeypatch.setattr(extraction, "generate_scored", parrot)


def test_rerun_extracts_only_new_conversations_and_a_crash_keeps_the_previous_run(tmp_path, chats_dir, monkeypatch,
                                                                                  parrot_extractor):
    logs = tmp_path / "logs"
    logs.mkdir()
    conversations = read(chats_dir / "logs" / "conversations.jsonl")
    write_jsonl(logs / "part1.jsonl", conversations[:-2])
    out = tmp_path / "out"
    first = run_recall(tmp_path, out, "--chat_logs", str(logs), "--check_grounding", "false")
    assert first["counts"]["new_conversations"] == len(conversations) - 2
    state = json.load(open(out / "state.json"))
    assert len(state["conversations"]) == len(conversations) - 2
    before = {name: open(out / name, "rb").read() for name in ("adapter_model.safetensors", "state.json")}

    write_jsonl(logs / "part2.jsonl", conversations[-2:])
    import lib.recall.training as training

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        patch.setattr(training, "train_recall", crash)
        run_recall(tmp_path, out, "--chat_logs", str(logs), "--check_grounding", "false")
    assert {name: open(out / name, "rb").read() for name in before} == before
    assert not (tmp_path / "out.lock").exists()

    second = run_recall(tmp_path, out, "--chat_logs", str(logs), "--check_grounding", "false")
    assert second["counts"]["new_conversations"] == 2 and second["counts"]["conversations"] == len(conversations)
    assert second["counts"]["messages_read"] == sum(m["role"] == "user" for c in conversations[-2:]
                                                    for m in c["messages"])
    assert len(json.load(open(out / "state.json"))["conversations"]) == len(conversations)
    new, total = second["counts"]["embedded"], second["counts"]["entries"]
    assert new > 0 and second["counts"]["train_entries"] == new + min(total - new, 4 * new)  # --rehearsal_ratio 4
    assert second["settings"]["learning_rate"] == pytest.approx(first["settings"]["learning_rate"] / 4)
    # Nothing new: nothing is read or trained, and the model stays as it was.
    adapter = open(out / "adapter_model.safetensors", "rb").read()
    third = run_recall(tmp_path, out, "--chat_logs", str(logs), "--check_grounding", "false")
    assert third["counts"]["new_conversations"] == 0 and third["counts"]["messages_read"] == 0
    assert third["final_loss"] == {} and open(out / "adapter_model.safetensors", "rb").read() == adapter


@pytest.mark.distributed
@pytest.mark.xdist_group("launchers")
def test_torchrun_processes_share_extraction_and_keep_the_same_memories(tmp_path, chats_dir, parrot_extractor):
    from tests.test_distributed import run_launcher

    common = ["--memory_type", "recall", "--model_name_or_path", TINY, "--chat_logs",
              str(chats_dir / "logs" / "conversations.jsonl"), "--check_grounding", "false", "--max_steps", "1",
              "--per_device_train_batch_size", "4", "--extraction_max_new_tokens", "8", "--seed", "0",
              "--qa_file", str(chats_dir / "questions_train.jsonl"), "--sft_file",
              str(chats_dir / "general_chat.jsonl"), "--sft_mix_ratio", "0.5", "--sft_loss", "kl"]
    single = run_recall(None, tmp_path / "single", "--chat_logs", str(chats_dir / "logs" / "conversations.jsonl"),
                        "--check_grounding", "false", "--max_steps", "1", "--per_device_train_batch_size", "4",
                        "--qa_file", str(chats_dir / "questions_train.jsonl"), "--sft_file",
                        str(chats_dir / "general_chat.jsonl"), "--sft_mix_ratio", "0.5", "--sft_loss", "kl")
    proc = run_launcher("torchrun", "tests/recall_parrot.py", [*common, "--output_dir", str(tmp_path / "multi")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi = json.load(open(tmp_path / "multi" / "summary.json"))
    assert multi["counts"]["messages_read"] == single["counts"]["messages_read"]  # every message, read once
    shares = multi["counts"]["messages_read_per_process"]
    assert len(shares) == 2 and all(0 < n < multi["counts"]["messages_read"] for n in shares)
    assert read(tmp_path / "multi" / "memories.jsonl") == read(tmp_path / "single" / "memories.jsonl")
    # Every process searched with the main process's query adapter, the one a single process trains.
    from lib.recall.retrieval import QueryAdapter

    assert multi["counts"]["adapter_questions"] == single["counts"]["adapter_questions"] > 0
    one, two = (QueryAdapter.load(str(tmp_path / name)).state_dict() for name in ("single", "multi"))
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)
    # Instruction rows trained against the base model (--sft_loss kl) on every process.
    assert multi["settings"]["sft_loss"] == "kl" and "loss/sft" in multi["final_loss"]


@pytest.mark.distributed
@pytest.mark.xdist_group("launchers")
def test_deepspeed_zero2_trains_the_same_recall_model_as_ddp_and_zero3_is_refused(tmp_path, chats_dir):
    """ZeRO-2 shards the LoRA's gradients and optimizer states: the weights after three steps (instruction rows
    against the base model included) equal DDP's. ZeRO-3 would partition the model that extraction and the vectors
    need whole: one sentence, before anything is read."""
    from safetensors.torch import load_file

    from tests.test_distributed import run_launcher

    common = ["--memory_type", "recall", "--model_name_or_path", TINY, "--memories_file",
              str(chats_dir / "facts.jsonl"), "--qa_file", str(chats_dir / "questions_train.jsonl"), "--sft_file",
              str(chats_dir / "general_chat.jsonl"), "--sft_mix_ratio", "0.5", "--sft_loss", "kl", "--max_steps",
              "3", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--seed", "0"]
    weights = {}
    for launcher, extra in (("torchrun", ()), ("deepspeed", ("--deepspeed", "ds_configs/zero2.json"))):
        proc = run_launcher(launcher, "train_memory.py", [*common, "--output_dir", str(tmp_path / launcher), *extra])
        assert proc.returncode == 0, proc.stderr[-4000:]
        weights[launcher] = load_file(str(tmp_path / launcher / "trainable.safetensors"))
    ddp, zero2 = weights["torchrun"], weights["deepspeed"]
    assert ddp.keys() == zero2.keys() and any("lora_B" in n and ddp[n].abs().max() > 0 for n in ddp)
    for name, weight in ddp.items():
        assert torch.allclose(zero2[name], weight, atol=1e-5), (name, (zero2[name] - weight).abs().max())
    proc = run_launcher("deepspeed", "train_memory.py", [*common, "--output_dir", str(tmp_path / "zero3"),
                                                         "--deepspeed", "ds_configs/zero3.json"])
    assert proc.returncode != 0 and "does not run under ZeRO-3" in proc.stderr + proc.stdout
    assert not (tmp_path / "zero3").exists()


def test_recall_trains_on_an_architecture_with_other_module_names(tmp_path, chats_dir):
    """GPT-2 names its layers c_attn / c_fc / c_proj (Conv1D) and its embedding wte: the default all-linear LoRA and
    the <recall> row find them (q_proj-style names and an embed_tokens row were once hard-wired)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lib.models.loading import load_tokenizer
    from lib.recall.answer import RecallAssistant

    tokenizer = load_tokenizer(TINY)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    summary = run_recall(None, out, "--model_name_or_path", str(tmp_path / "gpt2"), "--memories_file",
                         str(chats_dir / "facts.jsonl"), "--qa_file", str(chats_dir / "questions_train.jsonl"),
                         "--max_steps", "2")
    assert summary["counts"]["entries"] > 0
    config = json.load(open(out / "adapter_config.json"))
    assert {"c_attn", "c_fc", "c_proj"} <= {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in n and w.abs().max() > 0 for n, w in weights.items())
    assert any("wte" in n and "trainable_tokens" in n for n in weights)
    result = RecallAssistant(str(out)).answer("What is my dog called?", user_id="u0001", max_new_tokens=3)
    mine = {e["text"] for e in read(out / "memories.jsonl") if e["user_id"] == "u0001"}
    assert result["memories"] and {text for _, text in result["memories"]} <= mine
