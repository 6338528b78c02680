"""--append_eos: text rows end with the tokenizer's EOS token in router training and in router scoring, so the
last position reads the whole row (a row cut short is no longer identical to the start of its clean copy)."""

import json
import os

import pytest
import torch

import select_data
from lib.models.loading import load_model, load_tokenizer
from lib.selection.args import RouterDataArguments
from lib.selection.data import prepare_router_datasets
from lib.selection.rows import encode_texts
from tests.conftest import write_jsonl
from tests.test_select_data import read_jsonl, reference_router_scores, router_checkpoint


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-mixtral")


def test_the_end_token_follows_rows_that_fit_and_only_those(tok):
    eos = tok.eos_token_id
    short, long = "A short row.", " ".join(["word"] * 200)
    plain = tok([short])["input_ids"][0]
    exact = tok.decode(tok([long])["input_ids"][0][:12])  # a row of exactly 12 tokens
    assert len(tok([exact])["input_ids"][0]) == 12
    ids, cut = encode_texts(tok, [short, long, exact, short + tok.eos_token], 12, eos)
    assert ids[0] == plain + [eos] and not cut[0]
    assert len(ids[1]) == 12 and eos not in ids[1] and cut[1]  # cut rows do not show an end
    assert len(ids[2]) == 12 and ids[2][-1] != eos and not cut[2]  # it fills the window: its end is out of view
    assert ids[3] == plain + [eos]  # a row that already ends with it gets no second one
    assert encode_texts(tok, [short], 12)[0] == [plain]


def router_rows(tmp_path, paragraphs, tok, **fields):
    rows = [{"text": p, "label": i % 2} for i, p in enumerate(paragraphs[:8])]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    args = RouterDataArguments(train_file=data, label_field="label", max_seq_length=64, **fields)
    train, _, _ = prepare_router_datasets(args, tok, seed=0)
    return train


def test_training_rows_end_with_the_token_unless_turned_off(tmp_path, paragraphs, tok):
    eos = tok.eos_token_id
    marked = router_rows(tmp_path, paragraphs, tok)
    plain = router_rows(tmp_path, paragraphs, tok, append_eos=False)
    for a, b in zip(marked["input_ids"], plain["input_ids"], strict=True):
        assert a == (b + [eos] if len(b) < 64 else b)
    assert any(len(b) < 64 for b in plain["input_ids"])


def test_select_data_appends_it_when_the_routers_were_trained_with_it(tmp_path, paragraphs):
    rows = [{"text": p} for p in paragraphs[:6]] + [{"text": " ".join(paragraphs[300:306])}]  # the last is cut
    data = write_jsonl(tmp_path / "pool.jsonl", rows)
    ckpt = router_checkpoint(tmp_path, "qwen3-moe")
    cfg_path = os.path.join(ckpt, "router_config.json")
    cfg = json.load(open(cfg_path))
    cfg["scoring"]["append_eos"] = True  # as train_router.py records it for text rows
    json.dump(cfg, open(cfg_path, "w"))
    out = str(tmp_path / "sel")
    select_data.main(["--router_model", ckpt, "--data_file", data, "--output_dir", out, "--disable_tqdm",
                      "--select_top_k", "2"])
    scored = read_jsonl(os.path.join(out, "scored.jsonl"))
    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt)
    garbage = [cfg["garbage_experts"][str(layer)] for layer in sorted(map(int, cfg["garbage_experts"]))]
    with torch.no_grad():
        for row in scored:
            ids = tok(row["text"], truncation=True, max_length=64)["input_ids"]
            if not row["truncated"]:
                ids = ids + [tok.eos_token_id]
            assert row["n_tokens"] == len(ids)
            ref = reference_router_scores(model, ids, garbage, cfg["top_k"])
            assert row["quality_score"] == pytest.approx(ref["quality_score"], abs=2e-5)
    assert scored[-1]["truncated"] and not scored[0]["truncated"]
    # A perplexity run reads the same end token, so its router columns equal the router run's, but the token is no
    # target: perplexity equals that of routers trained without it.
    def perplexity_run(folder):
        select_data.main(["--router_model", ckpt, "--data_file", data, "--output_dir", str(tmp_path / folder),
                          "--disable_tqdm", "--score", "perplexity", "--select_top_k", "2"])
        return read_jsonl(os.path.join(tmp_path, folder, "scored.jsonl"))

    marked = perplexity_run("ppl")
    assert [r["quality_score"] for r in marked] == pytest.approx([r["quality_score"] for r in scored], abs=1e-6)
    cfg["scoring"]["append_eos"] = False
    json.dump(cfg, open(cfg_path, "w"))
    plain = perplexity_run("ppl_plain")
    assert [r["perplexity"] for r in marked] == pytest.approx([r["perplexity"] for r in plain], rel=1e-5)
    assert [r["n_tokens"] for r in marked] == [min(r["n_tokens"] + 1, 64) for r in plain]  # no room: no end token
