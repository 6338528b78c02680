"""select_data.py on chat rows: the chat template, the perplexity and IFD baselines, assistant-turn scoring."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from lib.core.errors import UserError
from lib.models.loading import load_model, load_tokenizer
from lib.selection.args import SelectArguments
from tests.conftest import write_jsonl
from tests.test_select_data import read_jsonl, reference_router_scores, router_checkpoint, select


def chat_rows(paragraphs, n=10):
    rows = []
    for i, p in enumerate(paragraphs[:n]):
        rows.append({"messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                                  {"role": "assistant", "content": p}]})
    rows.append({"messages": [{"role": "assistant", "content": "An answer without a question."}]})
    rows.append({"messages": [{"role": "user", "content": "A question without an answer."}]})
    return rows


def test_perplexity_and_ifd_baselines_equal_reference(tmp_path, paragraphs):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(paragraphs))
    model_name = "builtin:tiny-llama"
    model = load_model(model_name).eval()
    tok = load_tokenizer(model_name)

    out = select(tmp_path, model_name, data, "--messages_field", "messages", "--score", "perplexity",
                 "--max_seq_length", "256", out="ppl")
    rows = read_jsonl(os.path.join(out, "scored.jsonl"))
    with torch.no_grad():
        for row in rows[:10]:
            ids = tok(tok.apply_chat_template(row["messages"], tokenize=False), truncation=True,
                      max_length=256, return_tensors="pt")["input_ids"]
            loss = model(ids, labels=ids).loss.item()
            assert row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
            assert row["selection_score"] == pytest.approx(-loss, abs=1e-4)
    assert "quality_score" not in rows[0]  # a dense model has no router scores

    out = select(tmp_path, model_name, data, "--messages_field", "messages", "--score", "ifd",
                 "--max_seq_length", "256", out="ifd")
    rows = read_jsonl(os.path.join(out, "scored.jsonl"))
    with torch.no_grad():
        for row in rows[:10]:
            question, answer = row["messages"][:1], row["messages"][1]["content"]
            prompt = tok(tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
            ans = tok(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + ans])
            logits = model(ids).logits[0, :-1]
            cond = F.cross_entropy(logits[len(prompt) - 1:], ids[0, len(prompt):]).item()
            alone_ids = torch.tensor([[tok.bos_token_id] + ans])
            alone = F.cross_entropy(model(alone_ids).logits[0, :-1], alone_ids[0, 1:]).item()
            assert row["ifd_loss_conditioned"] == pytest.approx(cond, rel=1e-4)
            assert row["ifd_loss_alone"] == pytest.approx(alone, rel=1e-4)
            assert row["ifd"] == pytest.approx(cond / alone, rel=1e-4)
    assert rows[10]["skip_reason"] == "no question before the answer"
    assert rows[11]["skip_reason"] == "no assistant turn"
    assert rows[10]["ifd"] is None and rows[11]["selection_score"] is None


def test_router_scores_on_chat_rows_use_the_chat_template(tmp_path, paragraphs):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(paragraphs, 6))
    ckpt = router_checkpoint(tmp_path, "olmoe")
    out = select(tmp_path, ckpt, data, "--messages_field", "messages", "--select_top_k", "3")
    rows = read_jsonl(os.path.join(out, "scored.jsonl"))
    tok = load_tokenizer(ckpt)
    n = len(tok(tok.apply_chat_template(rows[0]["messages"], tokenize=False), truncation=True,
                max_length=64)["input_ids"])
    assert rows[0]["n_tokens"] == n and all(r["quality_score"] is not None for r in rows)
    assert len(read_jsonl(os.path.join(out, "selected.jsonl"))) == 3


def test_routers_trained_on_assistant_turns_score_only_those_tokens(tmp_path, paragraphs):
    rows = chat_rows(paragraphs, 5)[:5]
    rows[1]["messages"] += [{"role": "user", "content": "And more?"}, {"role": "assistant", "content": "Yes, more."}]
    rows.append({"messages": [{"role": "user", "content": " ".join(paragraphs[300:306])},
                              {"role": "assistant", "content": "Cut off."}]})
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    ckpt = router_checkpoint(tmp_path, "qwen3-moe")
    cfg_path = os.path.join(ckpt, "router_config.json")
    cfg = json.load(open(cfg_path))
    cfg["scoring"]["score_tokens"] = "assistant"  # as train_router.py --score_tokens assistant records it
    json.dump(cfg, open(cfg_path, "w"))
    out = select(tmp_path, ckpt, data, "--messages_field", "messages", "--select_top_k", "2")
    assert json.load(open(os.path.join(out, "summary.json")))["settings"]["score_tokens"] == "assistant"
    everything = select(tmp_path, ckpt, data, "--messages_field", "messages", "--score_tokens", "all", out="all")
    scored, whole = read_jsonl(os.path.join(out, "scored.jsonl")), read_jsonl(os.path.join(everything, "scored.jsonl"))
    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt)
    garbage = [cfg["garbage_experts"][str(layer)] for layer in sorted(map(int, cfg["garbage_experts"]))]
    with torch.no_grad():
        for row, all_tokens in zip(scored[:5], whole):
            text = tok.apply_chat_template(row["messages"], tokenize=False)
            enc = tok(text, truncation=True, max_length=64, return_offsets_mapping=True)
            answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            starts = [text.index(a) for a in answers]  # the turns' text (the template's end marker follows)
            # Each turn: its text and the template's end marker, up to the line break after it.
            turns = [(s, text.index("\n", s + len(c)) + 1) for s, c in zip(starts, answers)]
            positions = [t for t, (a, _) in enumerate(enc["offset_mapping"]) if any(s <= a < e for s, e in turns)]
            ref = reference_router_scores(model, enc["input_ids"], garbage, cfg["top_k"], positions)
            assert row["n_tokens"] == len(enc["input_ids"])
            assert row["quality_score"] != pytest.approx(all_tokens["quality_score"], abs=1e-4)
            for key in ("quality_score", "quality_logodds", "routed_share"):
                assert row[key] == pytest.approx(ref[key], abs=2e-5), key
    assert scored[5]["skip_reason"] == "no assistant tokens within max_seq_length"
    with pytest.raises(UserError, match="--score_tokens assistant reads the assistant turns"):
        SelectArguments(router_model=ckpt, data_file=data, output_dir="x", score_tokens="assistant")
