"""The memory model and its four stages on a tiny local model: exactness at step 0 and with an empty bank, causal
retrieval, content-addressed lookup, what each stage trains, save/load, resume, evaluation and bad input."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lib.core.errors import DataError, UserError
from lib.memory import facts
from lib.memory.bank import MemoryBank
from lib.memory.config import MemoryConfig
from lib.memory.model import MemoryModel, load_memory_model, memory_parts_from
from lib.models.loading import load_model, load_tokenizer

MODEL = "builtin:tiny-llama"
ENTRY_TOKENS = "48"  # the tiny models' small tokenizer spends more tokens per entry than SmolLM2's


@pytest.fixture(scope="module")
def fact_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("facts")
    facts.build(str(d), people_count=20, seed=1)
    return d


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MODEL)


def make_memory(tok, fact_dir, **overrides):
    backbone = load_model(MODEL)
    backbone.requires_grad_(False)
    settings = dict(base_model=MODEL, hidden_size=64, num_layers=2, query_layer=1, fusion_layers=[1, 2],
                    max_entry_tokens=48, candidates=4, top_k=2)
    settings.update(overrides)
    memory = MemoryModel(backbone, MemoryConfig(**settings))
    bank = MemoryBank.load(str(fact_dir / "bank.jsonl"), tok, max_entry_tokens=48)
    memory.set_bank(bank)
    return memory.eval(), bank


def batch(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def open_gates(memory, value=1.0):
    with torch.no_grad():
        for fusion in memory.fusions.values():
            fusion.alpha.fill_(value)
            fusion.o.weight.normal_(0, 0.5)


def test_step_zero_and_empty_bank_equal_the_backbone(tok, fact_dir):
    memory, _ = make_memory(tok, fact_dir)
    ids, mask = batch(tok, ["Where was Kunom Fosi born?", "Who employs the person?"])
    with torch.no_grad():
        with memory.memory_off():
            base = memory(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(memory(input_ids=ids, attention_mask=mask).logits, base)  # alpha = 0
        open_gates(memory)
        assert not torch.allclose(memory(input_ids=ids, attention_mask=mask).logits, base)  # the bank is read
        memory.set_bank(MemoryBank.from_texts([], tok, max_entry_tokens=48))
        assert torch.equal(memory(input_ids=ids, attention_mask=mask).logits, base)  # empty bank: exactly base


def test_retrieval_is_causal(tok, fact_dir):
    memory, _ = make_memory(tok, fact_dir)
    open_gates(memory)
    a, _ = batch(tok, ["Where was the first person born? Tell me now"])
    b = a.clone()
    b[0, -3:] = torch.tensor(tok(" pets and cities")["input_ids"][:3])
    with torch.no_grad():
        la, lb = memory(input_ids=a).logits, memory(input_ids=b).logits
    assert torch.allclose(la[0, :-3], lb[0, :-3], atol=1e-5)
    assert not torch.allclose(la[0, -1], lb[0, -1])


def test_kv_cache_steps_equal_the_whole_sequence(tok, fact_dir):
    # With a KV cache each step reads only its new token; the gate's running sums must make that the same as
    # reading the whole sequence, for left-padded batches too, and greedy generation must not change.
    from transformers import DynamicCache

    memory, _ = make_memory(tok, fact_dir)
    open_gates(memory)
    with torch.no_grad():
        for gate in (memory.gate.entity_pool, memory.gate.relation_pool):
            gate.weight.normal_(0, 1.0)  # pooling weights that differ by position
    tok.padding_side = "left"
    try:
        ids, mask = batch(tok, ["Where was the first person born? Tell me", "Which pet?"])
    finally:
        tok.padding_side = "right"
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        whole = memory(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        cache = DynamicCache(config=memory.config)
        split = ids.shape[1] - 3
        steps = [memory(input_ids=ids[:, :split], attention_mask=mask[:, :split], position_ids=positions[:, :split],
                        cache=cache, use_cache=True).logits]
        for t in range(split, ids.shape[1]):
            steps.append(memory(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                                position_ids=positions[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, 1)[mask.bool()], whole[mask.bool()], atol=1e-4)
    assert memory.last_retrieval["entries"].shape[1] == 1  # the last step really read one token
    cached = memory.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    plain = memory.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    # Beam search reorders a cache behind the gate's back: it runs without one, and still generates.
    beams = memory.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, num_beams=2,
                            do_sample=False, use_cache=True)
    assert beams.shape == (2, ids.shape[1] + 3)


def test_gate_reads_stored_query_states_like_the_backbone(tok, fact_dir):
    # The gate stage computes the rows' query-layer states once; a batch read from them must retrieve what running
    # the backbone retrieves, and a batch with a row that was not stored runs the backbone.
    memory, _ = make_memory(tok, fact_dir)
    ids, mask = batch(tok, ["Where was the first person born?", "Which pet?", "Tell me about the third person"])
    positions = mask.bool() & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) < 0.6)
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    states = memory.query_states(rows[::-1], batch_size=2)  # another order and batching than the batch below
    assert len(states) == 3
    with torch.no_grad():
        ran = {k: v.clone() for k, v in memory.gate_forward(ids, mask, positions).items()}
        stored = memory.gate_forward(ids, mask, positions, states=states)
        assert torch.equal(stored["entries"], ran["entries"])
        assert torch.allclose(stored["scores"], ran["scores"], atol=1e-5)
        assert torch.allclose(stored["queries"], ran["queries"], atol=1e-5)
        partial = memory.gate_forward(ids, mask, positions, states=dict(list(states.items())[:2]))
        assert torch.equal(partial["entries"], ran["entries"])


def test_choice_scores_equal_scoring_each_whole_sequence(tok, fact_dir):
    # choice_logprobs reads each prompt once and copies its cache (and the gate's sums) for every choice.
    from lib.memory.data import prompt_and_answer
    from lib.memory.evaluation import choice_logprobs

    memory, _ = make_memory(tok, fact_dir)
    open_gates(memory)
    questions = ["Where was the first person born?", "Which pet does the second person have at home?"]
    choices = [["Paris", "a small town", "Lima"], ["a cat", "Rex the dog"]]
    with torch.no_grad():
        reference = []
        for question, options in zip(questions, choices):
            reference.append([])
            for option in options:
                prompt, answer = prompt_and_answer(tok, question, option)
                ids = torch.tensor([prompt + answer])
                logp = memory(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                picked = logp[len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None])
                reference[-1].append(float(picked.sum()))
    for batch_size in (3, 64):  # one question per batch, and both questions in one batch (padded)
        scores = choice_logprobs(memory, tok, questions, choices, batch_size=batch_size)
        assert [len(s) for s in scores] == [3, 2]
        assert all(abs(a - b) < 1e-3 for s, r in zip(scores, reference) for a, b in zip(s, r)), (scores, reference)


def test_gate_retrieval_equals_exhaustive_scoring_and_ignores_bank_order(tok, fact_dir):
    memory, bank = make_memory(tok, fact_dir, candidates=11)  # 11^2 >= 120 entries: every entry is a candidate
    ids, mask = batch(tok, ["Where was the first person born?", "Which company employs them?"])
    entries = memory.gate_forward(ids, mask)["entries"]
    with torch.no_grad():
        queries = memory.last_retrieval["queries"]
        exact = memory.gate.scores(queries, memory.entry_keys()).topk(2, dim=-1).indices
    assert torch.equal(entries, exact)
    # Lookup is by content: the same entries in another order give the same retrieved texts.
    order = list(reversed(range(len(bank))))
    shuffled = MemoryBank.from_texts([bank.texts[i] for i in order], tok, ids=[bank.ids[i] for i in order],
                                     max_entry_tokens=48)
    memory.set_bank(shuffled)
    again = memory.gate_forward(ids, mask)["entries"]
    assert [[shuffled.ids[i] for i in row] for row in again[:, -1].tolist()] == \
        [[bank.ids[i] for i in row] for row in entries[:, -1].tolist()]


def stage_args(fact_dir, out, *extra):
    return ["--model_name_or_path", MODEL, "--memory_bank", str(fact_dir / "bank.jsonl"),
            "--train_file", str(fact_dir / "qa_train.jsonl"), "--validation_file", str(fact_dir / "qa_validation.jsonl"),
            "--max_entry_tokens", ENTRY_TOKENS, "--output_dir", str(out), "--max_train_rows", "24",
            "--max_eval_rows", "12", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
            "--report_to", "none", "--query_layer", "1", "--fusion_layers", "1,2", "--candidates", "4",
            "--learning_rate", "1e-2", "--seed", "0", *extra]


def changed_parts(before: dict, after: dict) -> set[str]:
    return {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}


@pytest.fixture(scope="module")
def stages(tmp_path_factory, fact_dir):
    """The four stages in a row on the tiny model; each output folder."""
    import train_fusion
    import train_joint
    import train_memory
    import train_router

    root = tmp_path_factory.mktemp("stages")
    out = {name: root / name for name in ("gate", "fusion", "joint", "memory")}
    train_router.main(["--router_type", "memory_gate", *stage_args(fact_dir, out["gate"])])
    train_fusion.main([*stage_args(fact_dir, out["fusion"], "--init_from", str(out["gate"]))])
    train_joint.main([*stage_args(fact_dir, out["joint"], "--init_from", str(out["fusion"]),
                                  "--similarity_loss_coef", "0.1", "--diversity_loss_coef", "0.1",
                                  "--schedule", json.dumps([{"name": "gumbel_temperature", "start": 1.5, "end": 0.5}]))])
    train_memory.main(["--memory_type", "explicit", *stage_args(
        fact_dir, out["memory"], "--init_from", str(out["joint"]), "--train_file", str(fact_dir / "chat_train.jsonl"),
        "--general_file", str(fact_dir / "qa_trained.jsonl"), "--general_mix_ratio", "0.25")])
    return out


def test_each_stage_trains_only_its_parts(stages, tok, fact_dir):
    memory, _ = make_memory(tok, fact_dir)
    initial = memory.memory_state()
    weights = {name: load_file(str(folder / "trainable.safetensors")) for name, folder in stages.items()}
    assert changed_parts(initial, weights["gate"]) == {"gate"}
    assert changed_parts(weights["gate"], weights["fusion"]) == {"fusions"}
    assert changed_parts(weights["fusion"], weights["joint"]) == {"gate", "fusions"}
    assert changed_parts(weights["joint"], weights["memory"]) == {"gate", "fusions"}
    assert not any(name.startswith("backbone.") for w in weights.values() for name in w)
    for name, folder in stages.items():
        config = json.load(open(folder / "memory_config.json"))
        assert config["stage"] == name and config["bank_size"] == 120
        assert os.path.exists(folder / "memory_bank.jsonl") and "memory-" + name in open(folder / "README.md").read()
    history = [json.loads(line) for line in open(stages["fusion"] / "metrics.jsonl")]
    alphas = [h["fusion/alpha/1"] for h in history if "fusion/alpha/1" in h]
    assert alphas and alphas[-1] != 0.0
    gate_history = [json.loads(line) for line in open(stages["gate"] / "metrics.jsonl")]
    assert any("eval_gate/hit@1" in h for h in gate_history) and any("gate/entropy" in h for h in gate_history)


def test_saved_model_loads_in_one_call_and_swaps_banks(stages, fact_dir):
    memory, tok = load_memory_model(str(stages["memory"]))
    ids, mask = batch(tok, ["Where was the first person born?"])
    with torch.no_grad():
        logits = memory(input_ids=ids, attention_mask=mask).logits
        again, _ = load_memory_model(str(stages["memory"]))
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, logits)
        edited, _ = load_memory_model(str(stages["memory"]), bank=str(fact_dir / "bank_counterfactual.jsonl"))
        assert not torch.equal(edited(input_ids=ids, attention_mask=mask).logits, logits)
    out = memory.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_resume_equals_uninterrupted(tmp_path, fact_dir, stages):
    import train_fusion

    common = ["--init_from", str(stages["gate"]), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
              "--eval_strategy", "no"]
    train_fusion.main(stage_args(fact_dir, tmp_path / "full", *common))
    # The same run cut after step 2: its last checkpoint and final weights removed, then resumed.
    train_fusion.main(stage_args(fact_dir, tmp_path / "cut", *common))
    os.remove(tmp_path / "cut" / "trainable.safetensors")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    train_fusion.main(stage_args(fact_dir, tmp_path / "cut", *common, "--resume_from_checkpoint", "true"))
    full = load_file(str(tmp_path / "full" / "trainable.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "trainable.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[n], resumed[n]) for n in full)


def test_evaluate_reports_every_bank(stages, fact_dir, tmp_path):
    import evaluate

    out = evaluate.main(["--memory_model", str(stages["memory"]), "--qa_file", str(fact_dir / "qa_test.jsonl"),
                         "--counterfactual_bank", str(fact_dir / "bank_counterfactual.jsonl"),
                         "--irrelevant_bank", str(fact_dir / "bank_irrelevant.jsonl"), "--qa_limit", "6",
                         "--max_new_tokens", "3", "--output_dir", str(tmp_path)])
    qa = out["qa"]
    assert qa["empty_equals_base"] is True
    assert {"base", "in_context", "memory", "empty", "irrelevant", "counterfactual", "gate"} <= set(qa)
    assert all(0 <= qa[c]["ll_accuracy"] <= 1 for c in ("base", "memory", "counterfactual"))
    saved = json.load(open(tmp_path / "memory_results.json"))
    assert saved["qa"]["gate"]["hit@1"] == qa["gate"]["hit@1"]
    assert "| ll_accuracy |" in open(tmp_path / "memory_results.md").read()


def test_bad_input_is_one_sentence(stages, fact_dir, tmp_path, tok):
    import train_fusion
    import train_router

    with pytest.raises(UserError, match="written by the memory stage"):
        train_fusion.main(stage_args(fact_dir, tmp_path / "a", "--init_from", str(stages["memory"])))
    with pytest.raises(UserError, match="trained gate"):
        train_fusion.main(stage_args(fact_dir, tmp_path / "b"))
    long_bank = tmp_path / "long.jsonl"
    long_bank.write_text(json.dumps({"id": "x", "text": "word " * 80}) + "\n")
    with pytest.raises(DataError, match="id 'x'.*more than --max_entry_tokens"):
        train_router.main(["--router_type", "memory_gate", *stage_args(fact_dir, tmp_path / "c"),
                           "--memory_bank", str(long_bank)])
    bad_qa = tmp_path / "qa.jsonl"
    bad_qa.write_text(json.dumps({"question": "Who?", "answer": "Me", "memory_id": "nobody"}) + "\n")
    with pytest.raises(DataError, match="memory_id 'nobody'"):
        train_router.main(["--router_type", "memory_gate", *stage_args(fact_dir, tmp_path / "d"),
                           "--train_file", str(bad_qa)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no entries"):
        train_router.main(["--router_type", "memory_gate", *stage_args(fact_dir, tmp_path / "e"),
                           "--memory_bank", str(empty)])
    config = MemoryConfig.load(str(stages["gate"]))
    config.hidden_size = 32
    (tmp_path / "small").mkdir()
    config.save(str(tmp_path / "small"))
    with pytest.raises(UserError, match="hidden size 32"):
        memory_parts_from(str(tmp_path / "small"), load_model(MODEL))


def test_push_to_hub_offline_is_refused_before_a_stage_trains(fact_dir, tmp_path, monkeypatch):
    import train_joint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="--push_to_hub needs the model hub, which is unreachable"):
        train_joint.main(stage_args(fact_dir, tmp_path / "o", "--retrieval", "gold", "--push_to_hub",
                                    "--hub_model_id", "me/memory"))
    assert not (tmp_path / "o" / "trainable.safetensors").exists()
