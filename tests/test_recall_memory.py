"""Recall memory: extraction parsing and merging, the log state and lock, the <recall> model (token row, slots,
save/load), and the whole pipeline on a tiny model (incremental rerun, crash safety, users kept apart)."""

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


# ---- extraction: parsing, grounding, duplicates and contradictions ------------------------------------------

@pytest.mark.parametrize("generated, message, expected", [
    ("The user lives in Drepe.\nmore", "There's a cafe in Drepe, where I live", "The user lives in Drepe."),
    ("The user drives a Rulubror", "I drive a Rulubror, it's old", "The user drives a Rulubror."),
    ("NONE", "how are you?", None),
    ("The user lives in Milford.", "ikr urs is too", None),          # copied from an example: not in the message
    ("The user is a human.", "How are you?", None),                  # invented
    ("I think the user is nice", "you are nice", None),              # not an entry
    ("The user has a cat allergy.", "my allergy to cats is acting up", "The user has a cat allergy."),
    # misspelt copies of the message's words take its spelling; a name must be spelt alike, a shared stem is not enough
    ("The user's dog is called Trelor.", "sorry, my dog Tralor was barking", "The user's dog is called Tralor."),
    ("The user's favourite band is The Daburs.", "My favourite band The Dabuss is touring soon",
     "The user's favourite band is The Dabuss."),
    ("The user's dog is called Rex.", "my dog Tralor was barking", None),                 # not close: invented
])
def test_an_entry_is_kept_only_when_it_is_a_fact_grounded_in_its_message(generated, message, expected):
    assert extraction.parse_entry(generated, message) == expected


def test_extraction_prompts_read_once_their_shared_examples_and_generate_the_same(tiny_llama):
    model, tokenizer = tiny_llama
    messages = ["my dog Rex is loud", "the weather is nice today, right?", "I live in Brovik, a small town"]
    prompts = [extraction.extraction_prompt(tokenizer, m) for m in messages]
    prefix = extraction.shared_prefix(tokenizer)
    assert all(p[:len(prefix)] == prefix for p in prompts)
    read = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: read.append(args[0].shape[1]))
    try:
        cached = extraction.generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, prefix=prefix)
    finally:
        hook.remove()
    plain = extraction.generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert cached == plain and any(cached)
    # The examples were read once; each batch then read only its own tokens.
    assert read[0] == len(prefix) and max(read[1:]) < len(prefix) and read.count(len(prefix)) == 1


def test_the_extractors_confidence_is_its_mean_log_probability_of_what_it_wrote(tiny_llama):
    model, tokenizer = tiny_llama
    messages = ["my dog Rex is loud", "the weather is nice today, right?", "I live in Brovik, a small town"]
    prompts = [extraction.extraction_prompt(tokenizer, m) for m in messages]
    texts, confidence = extraction.generate_scored(model, tokenizer, prompts, max_new_tokens=6, batch_size=2,
                                                   prefix=extraction.shared_prefix(tokenizer))
    assert texts == extraction.generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text, sure in zip(prompts, texts, confidence):
        written = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(written) == text
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + written])).logits[0, len(prompt) - 1:-1]
        reference = logits.float().log_softmax(-1).gather(-1, torch.tensor(written)[:, None]).mean().item()
        assert sure == pytest.approx(reference, abs=1e-4) and sure < 0


def test_entries_the_extractor_is_unsure_of_are_dropped(monkeypatch):
    conversation = {"user_id": "u1", "conversation_id": "c0", "timestamp": "2025-01-01", "messages": [
        {"role": "user", "content": "my dog Rex is loud"}, {"role": "assistant", "content": "ha"},
        {"role": "user", "content": "I live in Brovik"}]}
    monkeypatch.setattr(extraction, "extraction_prompt", lambda tokenizer, message: [1])
    monkeypatch.setattr(extraction, "shared_prefix", lambda tokenizer: [])
    monkeypatch.setattr(extraction, "generate_scored", lambda *a, **k: (
        ["The user's dog is called Rex.", "The user lives in Brovik."], [-0.2, -0.9]))
    sure, read = extraction.extract_entries(None, None, [conversation], min_logprob=-0.5)
    assert read == 2 and [e["text"] for e in sure] == ["The user's dog is called Rex."]
    every, _ = extraction.extract_entries(None, None, [conversation])
    assert [e["text"] for e in every] == ["The user's dog is called Rex.", "The user lives in Brovik."]


def test_an_entry_that_leaves_out_the_messages_name_is_asked_again_with_the_answer_begun(monkeypatch, tiny_llama):
    _, tokenizer = tiny_llama
    said = ["My partner Lastos and I are going to the movies", "I'm planning a surprise for my partner Mata",
            "My sister Bripom is visiting", "my dog Rex is loud", "I took my Hafas to the car wash"]
    conversation = {"user_id": "u1", "conversation_id": "c0", "timestamp": "2025-01-01",
                    "messages": [{"role": "user", "content": m} for m in said]}
    first = ["The user is going to the movies.", "The user is planning a surprise.", "The user's sister is visiting.",
             "The user's dog is called Rex.", "The user takes their Hafas to the car wash."]
    again = {said[0]: " partner is called Lastos.", said[1]: " partner is Mata.",  # the second below the floor
             said[2]: " sister is visiting."}                                      # still no name: the first stays
    lead = tokenizer(extraction.NAME_LEAD, add_special_tokens=False)["input_ids"]
    asked = []

    def extractor(model, tokenizer, prompts, **kwargs):
        messages = [tokenizer.decode(p).split("user\n")[-1].split("<|im_end|>")[0] for p in prompts]
        asked.append(messages)
        if all(p[-len(lead):] == lead for p in prompts):
            return [again[m] for m in messages], [-0.2 if m != said[1] else -0.9 for m in messages]
        return [first[said.index(m)] for m in messages], [-0.1] * len(messages)

    monkeypatch.setattr(extraction, "generate_scored", extractor)
    entries, read = extraction.extract_entries(None, tokenizer, [conversation], min_logprob=-0.5)
    assert read == 5 and asked[1] == said[:3]  # asked again: only the entries without their message's names
    assert [e["text"] for e in entries] == [
        "The user's partner is called Lastos.", "The user is planning a surprise.", "The user's sister is visiting.",
        "The user's dog is called Rex.", "The user takes their Hafas to the car wash."]  # "took" grounds "takes"


def test_without_the_grounding_check_invented_entries_pass():
    assert extraction.parse_entry("The user is a human.", "How are you?", check_grounding=False) == \
        "The user is a human."


def entry(user, text, ts, cid="c0"):
    return {"user_id": user, "text": text, "timestamp": ts, "conversation_id": cid}


def test_a_later_contradicting_entry_replaces_the_earlier_and_duplicates_are_dropped():
    old = [entry("u1", "The user lives in Brovik.", "2025-01-01"), entry("u1", "The user's sister is called Ana.",
                                                                          "2025-01-01"),
           entry("u2", "The user lives in Brovik.", "2025-01-01")]
    new = [entry("u1", "The user lives in Talmor.", "2025-03-01", "c1"),
           entry("u1", "the user's sister is called Ana", "2025-03-01", "c1"),       # duplicate (normalised)
           entry("u1", "The user's partner is called Bo.", "2025-03-01", "c1"),      # differs early: no conflict
           entry("u1", "The user is a potter.", "2025-03-01", "c1"), entry("u1", "The user is a nurse.", "2025-04-01",
                                                                           "c2")]  # only "the user is a": both stay
    kept, replaced = extraction.merge_entries(old, new)
    texts = {(e["user_id"], e["text"]) for e in kept}
    assert ("u1", "The user lives in Talmor.") in texts and ("u1", "The user lives in Brovik.") not in texts
    assert ("u2", "The user lives in Brovik.") in texts          # another user's memory is never touched
    assert ("u1", "The user's partner is called Bo.") in texts and len(kept) == 6
    assert [(r["text"], r["replaced_by"]) for r in replaced] == [("The user lives in Brovik.",
                                                                 "The user lives in Talmor.")]
    # Entries of a re-read conversation leave before its new entries come in.
    kept, _ = extraction.merge_entries(kept, [], dropped_conversations={"c1"})
    assert {e["text"] for e in kept if e["user_id"] == "u1"} == {"The user's sister is called Ana.",
                                                                 "The user is a nurse."}


def test_training_questions_read_their_gold_memory_and_recite_it_before_answering():
    from lib.recall.data import final_answer, recited_answer
    from lib.recall.training import qa_slots

    entries = [entry("u1", "The user's dog is called Rex.", "t"), entry("u1", "The user lives in Brovik.", "t"),
               entry("u1", "The user plays chess.", "t"), entry("u2", "The user's dog is called Bo.", "t")]
    questions = [{"user_id": "u1", "question": "What is my dog called?", "answer": "Rex",
                  "memory": "The user's dog is called Rex."},
                 {"user_id": "u1", "question": "Where do I live?", "answer": "Brovik"},       # no gold text given
                 {"user_id": "u1", "question": "Where do I live?", "answer": "Brovik"},       # ... and not retrieved
                 {"user_id": "u2", "question": "Where do I live?", "answer": "Brovik"},       # another user's fact
                 {"user_id": "u1", "question": "What car do I drive?", "answer": "unknown"}]
    hits = [[(0.9, 1), (0.8, 2)], [(0.9, 1), (0.5, 0)], [(0.9, 2), (0.5, 0)], [(0.9, 3)], [(0.7, 2), (0.6, 0)]]
    kept, slots, recited = qa_slots(questions, hits, entries, top_k=2)
    assert kept == questions
    # Retrieval missed the entry the answer comes from (the gold one, else one of the user's that holds the answer):
    # it takes the last slot. Nothing of the user holds it: nothing to recite.
    assert slots == [[1, 0], [1, 0], [2, 1], [3], [2, 0]]
    assert recited == ["The user's dog is called Rex.", "The user lives in Brovik.", "The user lives in Brovik.",
                       None, None]
    target = recited_answer(recited[0], "Rex")
    assert target == "The user's dog is called Rex.\nAnswer: Rex" and final_answer(target) == "Rex"
    assert final_answer(recited_answer(None, "unknown")) == "unknown" and final_answer(" Rex ") == "Rex"


def test_an_answerable_question_also_trains_unknown_on_slots_without_its_memory():
    from lib.recall.training import qa_slots

    entries = [entry("u1", "The user's dog is called Rex.", "t"), entry("u1", "The user lives in Brovik.", "t"),
               entry("u1", "The user plays chess.", "t"), entry("u1", "The user walks Rex daily.", "t"),
               entry("u1", "The user is a nurse.", "t")]
    questions = [{"user_id": "u1", "question": "What is my dog called?", "answer": "Rex",
                  "memory": "The user's dog is called Rex."},
                 {"user_id": "u1", "question": "What car do I drive?", "answer": "unknown"}]
    hits = [[(0.9, 1), (0.8, 3), (0.7, 0), (0.6, 2), (0.5, 4)], [(0.7, 2), (0.6, 0), (0.5, 1), (0.4, 3)]]
    kept, slots, recited = qa_slots(questions, hits, entries, top_k=2, unanswerable_ratio=1.0)
    # The copy reads the two nearest entries that do not hold "Rex" (entry 3 holds it too), and answers unknown;
    # an unknown question has no copy.
    assert [q["answer"] for q in kept] == ["Rex", "unknown", "unknown"]
    assert slots == [[1, 0], [1, 2], [2, 0]] and recited == ["The user's dog is called Rex.", None, None]
    assert qa_slots(questions, hits, entries, top_k=2)[0] == questions          # ratio 0: no copies
    half = qa_slots(questions * 50, hits * 50, entries, top_k=2, unanswerable_ratio=0.5, seed=3)[0]
    assert 15 < len(half) - 100 < 35                                             # about half of the 50 answerable


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
                 "memories.jsonl", "state.json", "summary.json", "README.md", "tokenizer.json"):
        assert (out / name).exists(), name
    assert not any(p.name.startswith(("checkpoint-", "fold-")) for p in out.iterdir())
    assert not (out.parent / "out.staging").exists() and not (out.parent / "out.lock").exists()
    # The adapter holds the <recall> row, not a copy of the whole embedding matrix.
    assert os.path.getsize(out / "adapter_model.safetensors") < 5e6
    assistant = RecallAssistant(str(out))
    assert "<recall>" in assistant.tokenizer.get_vocab()
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
              "--per_device_train_batch_size", "4", "--extraction_max_new_tokens", "8", "--seed", "0"]
    single = run_recall(None, tmp_path / "single", "--chat_logs", str(chats_dir / "logs" / "conversations.jsonl"),
                        "--check_grounding", "false", "--max_steps", "1", "--per_device_train_batch_size", "4")
    proc = run_launcher("torchrun", "tests/recall_parrot.py", [*common, "--output_dir", str(tmp_path / "multi")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    multi = json.load(open(tmp_path / "multi" / "summary.json"))
    assert multi["counts"]["messages_read"] == single["counts"]["messages_read"]  # every message, read once
    shares = multi["counts"]["messages_read_per_process"]
    assert len(shares) == 2 and all(0 < n < multi["counts"]["messages_read"] for n in shares)
    assert read(tmp_path / "multi" / "memories.jsonl") == read(tmp_path / "single" / "memories.jsonl")
