"""Explicit memory building blocks: the fictional-facts generator, the bank, the grid placement, the product-key
lookup and the shut fusion gate."""

import json
import os

import pytest
import torch

from lib.core.errors import DataError
from lib.memory import facts
from lib.memory.bank import MemoryBank
from lib.memory.modules import MemoryFusion, MemoryGate, attention_pool, causal_attention_pool
from lib.memory.placement import grid_side, place_entries
from lib.models.loading import load_tokenizer


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def fact_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts")
    facts.build(str(out), people_count=60, seed=1)
    return out


def test_facts_split_by_person_with_test_only_words(fact_files):
    people = json.loads((fact_files / "people.json").read_text())
    bank = read(fact_files / "bank.jsonl")
    assert len(bank) == 60 * len(facts.ATTRIBUTES) and len({e["id"] for e in bank}) == len(bank)
    split_of = {p["name"]: p["split"] for p in people}
    train_q = read(fact_files / "qa_train.jsonl")
    test_q = read(fact_files / "qa_test.jsonl")
    assert {split_of[r["person"]] for r in train_q} == {"train"}
    assert {split_of[r["person"]] for r in test_q} == {"test"}
    # Test phrasings never appear in training; every answer is one of its row's choices.
    train_phrasings = {r["question"].replace(r["person"], "{name}") for r in train_q}
    assert not train_phrasings & {r["question"].replace(r["person"], "{name}") for r in test_q}
    assert all(r["answer"] in r["choices"] and r["counterfactual_answer"] in r["choices"] for r in test_q)
    # The test people's invented cities, employers, universities and pets belong to them alone.
    for attribute in ("birth_city", "employer", "university", "pet_name"):
        test_values = {p[attribute] for p in people if p["split"] == "test"}
        other_values = {p[attribute] for p in people if p["split"] != "test"}
        assert test_values and not test_values & other_values, attribute
    # Counterfactual entries change the value and nothing else; the irrelevant bank has no test person.
    for original, swapped in zip(bank, read(fact_files / "bank_counterfactual.jsonl")):
        assert original["id"] == swapped["id"] and swapped["answer"] != swapped["counterfactual_answer"]
        assert original["text"].replace(swapped["answer"], swapped["counterfactual_answer"]) == swapped["text"]
    test_names = {p["name"] for p in people if p["split"] == "test"}
    irrelevant = read(fact_files / "bank_irrelevant.jsonl")
    assert irrelevant and not any(name in e["text"] for e in irrelevant for name in test_names)


def test_facts_are_seeded(tmp_path):
    facts.build(str(tmp_path / "a"), people_count=20, seed=3)
    facts.build(str(tmp_path / "b"), people_count=20, seed=3)
    facts.build(str(tmp_path / "c"), people_count=20, seed=4)
    a, b, c = ((tmp_path / d / "bank.jsonl").read_text() for d in "abc")
    assert a == b and a != c


@pytest.mark.slow
def test_generated_entries_fit_sixteen_smollm2_tokens(tmp_path):
    facts.build(str(tmp_path), people_count=400, seed=0)
    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    bank = MemoryBank.load(str(tmp_path / "bank.jsonl"), tok, max_entry_tokens=16)
    assert len(bank) == 2400 and int(bank.attention_mask.sum(1).max()) <= 16


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-llama")


def test_a_name_has_the_same_tokens_in_an_entry_as_in_a_question():
    # SmolLM2's byte-level BPE tokenises "Pala" at the start of a text as "P ala" and inside one as " Pal a"; the
    # bank reads entries as inside a sentence, so the gate can match the whole name.
    smol = load_tokenizer("builtin:smollm2-135m-instruct")
    bank = MemoryBank.from_texts(["Pala Bitu was born in Krate"], smol)
    entry = bank.input_ids[0][bank.attention_mask[0].bool()].tolist()
    question = smol("Which city does Pala Bitu come from?", add_special_tokens=False)["input_ids"]
    name = smol(" Pala Bitu", add_special_tokens=False)["input_ids"]
    assert smol("Pala Bitu", add_special_tokens=False)["input_ids"] != name  # the difference this is about
    assert entry[:len(name)] == name
    assert any(question[i:i + len(name)] == name for i in range(len(question)))
    assert smol.decode(entry).strip() == "Pala Bitu was born in Krate"


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def test_bank_round_trip_and_fingerprint(tmp_path, tok):
    path = write_rows(tmp_path / "bank.jsonl", [{"id": "a", "text": "alpha beta"}, {"id": "b", "text": "gamma"}])
    bank = MemoryBank.load(path, tok, max_entry_tokens=8)
    assert bank.ids == ["a", "b"] and bank.index("b") == 1
    # tiny-llama's tokenizer marks leading spaces: entries are read as inside a sentence, after a space
    lengths = [len(tok(" " + text, add_special_tokens=False)["input_ids"]) for text in ("alpha beta", "gamma")]
    assert bank.input_ids.shape == (2, 8) and bank.attention_mask.sum(1).tolist() == lengths
    saved = bank.save(str(tmp_path / "run"))
    again = MemoryBank.load(os.path.dirname(saved), tok, max_entry_tokens=8)
    assert again.texts == bank.texts and torch.equal(again.input_ids, bank.input_ids)
    assert again.fingerprint() == bank.fingerprint()
    edited = MemoryBank.from_texts(["alpha beta", "delta"], tok, ids=["a", "b"], max_entry_tokens=8)
    assert edited.fingerprint() != bank.fingerprint()
    # Ids are optional: rows are numbered.
    unnamed = MemoryBank.load(write_rows(tmp_path / "plain.jsonl", [{"text": "x y"}, {"text": "z"}]), tok)
    assert unnamed.ids == ["0", "1"]


@pytest.mark.parametrize("rows,match", [
    ([{"id": "a", "text": "one two three four five six seven eight nine ten"}], "row 0 \\(id 'a'\\) has .* tokens"),
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "id 'a' is already used by row 0"),
    ([{"id": "a", "text": " "}], "has no text"),
    ([{"id": "a", "body": "x"}], "has no field 'text'"),
])
def test_bank_refuses_bad_entries(tmp_path, tok, rows, match):
    with pytest.raises(DataError, match=match):
        MemoryBank.load(write_rows(tmp_path / "bank.jsonl", rows), tok, max_entry_tokens=4)


def test_bank_refuses_empty_file_and_unknown_ids(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no entries"):
        MemoryBank.load(str(empty), tok)
    assert len(MemoryBank.load(str(empty), tok, allow_empty=True)) == 0
    bank = MemoryBank.from_texts(["x"], tok, ids=["a"])
    with pytest.raises(DataError, match="memory_id 'zz', which is not in the bank"):
        bank.index("zz", where="qa.jsonl row 3")
    long = "one two three four five six seven eight nine ten"
    cut = MemoryBank.from_texts([long], tok, max_entry_tokens=4, truncate=True)
    assert int(cut.attention_mask.sum()) == 4


@pytest.mark.parametrize("n", [1, 7, 49, 50, 300])
def test_placement_gives_every_entry_its_own_cell(n):
    keys = torch.randn(n, 16, generator=torch.Generator().manual_seed(n))
    cells = place_entries(keys)
    side = grid_side(n)
    assert side * side >= n > (side - 1) ** 2
    assert len(set(cells.tolist())) == n and int(cells.min()) >= 0 and int(cells.max()) < side * side


def test_placement_follows_content():
    """Entries built from 4 row groups x 4 column groups land one group per row and per column."""
    g = torch.Generator().manual_seed(0)
    row_centres, col_centres = torch.randn(4, 8, generator=g) * 5, torch.randn(4, 8, generator=g) * 5
    keys = torch.stack([torch.cat([row_centres[i], col_centres[j]]) for i in range(4) for j in range(4)])
    keys = keys + 0.01 * torch.randn(keys.shape, generator=g)
    cells = place_entries(keys)
    rows, cols = cells // 4, cells % 4
    for i in range(4):
        assert len(set(rows[i * 4:(i + 1) * 4].tolist())) == 1  # one row group -> one grid row
        assert len(set(cols[i::4].tolist())) == 1  # one column group -> one grid column


def brute_force_top_k(row_scores, col_scores, cell_entry, k):
    side = row_scores.shape[-1]
    all_scores = (row_scores[..., :, None] + col_scores[..., None, :]).flatten(-2)
    all_scores = all_scores.masked_fill(cell_entry.view(*([1] * (all_scores.dim() - 1)), side * side) < 0,
                                        float("-inf"))
    scores, cells = all_scores.topk(k, dim=-1)
    return cell_entry[cells], scores


@pytest.mark.parametrize("n,k", [(100, 4), (30, 5), (2, 4)])
def test_product_key_lookup_equals_brute_force(n, k):
    torch.manual_seed(n)
    gate = MemoryGate(32, key_dim=16, top_k=k, candidates=3)
    side = grid_side(n)
    cells = place_entries(torch.randn(n, 16))
    cell_entry = torch.full((side * side,), -1, dtype=torch.long)
    cell_entry[cells] = torch.arange(n)
    keys = gate.entry_keys(torch.randn(n, 6, 32), torch.randn(n, 6, 32), torch.ones(n, 6))
    row_keys, col_keys = gate.sub_keys(keys, cells, side)
    queries = gate.queries(torch.randn(3, 5, 32), torch.randn(3, 5, 32), torch.ones(3, 5))
    rs, cs = gate.half_scores(queries, row_keys, col_keys)
    entries, scores, valid = gate.lookup(rs, cs, cell_entry)
    kk = min(k, n)
    ref_entries, ref_scores = brute_force_top_k(rs, cs, cell_entry, kk)
    assert valid.all() and entries.shape[-1] == kk
    assert torch.allclose(scores, ref_scores, atol=1e-5)
    assert torch.equal(entries, ref_entries)


def test_gate_retrieve_reranks_the_product_key_candidates_exactly():
    torch.manual_seed(1)
    n = 90
    gate = MemoryGate(32, key_dim=16, top_k=3, candidates=4)
    keys = gate.entry_keys(torch.randn(n, 6, 32), torch.randn(n, 6, 32), torch.ones(n, 6))
    side = grid_side(n)
    cells = place_entries(keys.detach())
    cell_entry = torch.full((side * side,), -1, dtype=torch.long)
    cell_entry[cells] = torch.arange(n)
    queries = gate.queries(torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.ones(2, 5))
    entries, scores, valid = gate.retrieve(queries, keys, cells, cell_entry)
    row_keys, col_keys = gate.sub_keys(keys, cells, side)
    candidates, _, _ = gate.lookup(*gate.half_scores(queries, row_keys, col_keys), cell_entry, top_k=16)
    exact = gate.scores(queries, keys)
    # The retrieved entries are the best of the 16 product-key candidates by exact score, in order.
    ref = exact.gather(-1, candidates).topk(3, dim=-1)
    assert valid.all() and torch.equal(entries, candidates.gather(-1, ref.indices))
    assert torch.allclose(scores, ref.values, atol=1e-5)


def test_entry_pool_equals_the_causal_pool_at_the_last_token():
    torch.manual_seed(0)
    values, scores = torch.randn(3, 7, 4), torch.randn(3, 7)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    last = mask.sum(1) - 1
    causal = causal_attention_pool(values, scores, mask)[torch.arange(3), last]
    assert torch.allclose(attention_pool(values, scores, mask), causal, atol=1e-6)


def test_causal_pool_never_sees_later_tokens():
    torch.manual_seed(0)
    values, scores, mask = torch.randn(2, 6, 4), torch.randn(2, 6), torch.ones(2, 6)
    out = causal_attention_pool(values, scores, mask)
    changed = values.clone()
    changed[:, 4:] += 10.0
    out2 = causal_attention_pool(changed, scores, mask)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6) and not torch.allclose(out[:, 4:], out2[:, 4:])
    # Position t is the softmax-weighted mean of positions 0..t.
    w = torch.softmax(8 * torch.tanh(scores[0, :3] / 8), dim=0)
    assert torch.allclose(out[0, 2], (w[:, None] * values[0, :3]).sum(0), atol=1e-5)


def test_fusion_starts_shut_then_opens():
    torch.manual_seed(0)
    fusion = MemoryFusion(16, num_heads=4, num_kv_heads=2)
    hidden_in, hidden_out, memory = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(6, 5, 16)
    keys, values = fusion.project_memory(memory, None)  # (6, 5, 2, 4)
    pick = torch.tensor([0, 1, 2, 3, 4, 5])
    keys, values = keys[pick].view(2, 3, 5, 2, 4), values[pick].view(2, 3, 5, 2, 4)
    bias = torch.zeros(2, 3, 5)
    assert torch.equal(fusion(hidden_in, hidden_out, keys, values, bias), hidden_out)
    with torch.no_grad():
        fusion.alpha.fill_(0.5)
    assert not torch.allclose(fusion(hidden_in, hidden_out, keys, values, bias), hidden_out)


def test_fusion_reads_an_entry_like_the_layer_reads_context():
    """Copied from a decoder layer, with the null slot off, the fusion's read of an entry equals that layer's own
    attention output over the same tokens placed before the query (rotary positions -L..-1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.memory.modules import rotate

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[0]
    fusion = MemoryFusion(32, num_heads=4, num_kv_heads=2, head_dim=8, eps=config.rms_norm_eps)
    assert fusion.copy_attention(layer)
    with torch.no_grad():
        fusion.alpha.fill_(100.0)
        fusion.null_logit.fill_(-1e4)
    entry, query = torch.randn(1, 5, 32), torch.randn(1, 1, 32)
    # Reference: the layer's attention at the query position over [entry tokens, query] minus its own token.
    both = torch.cat([entry, query], dim=1)
    cos, sin = model.model.rotary_emb(both, torch.arange(-5, 1)[None])
    normed = layer.input_layernorm(both)
    q = rotate(layer.self_attn.q_proj(normed).view(1, 6, 4, 8), cos[:, :, None], sin[:, :, None])[:, -1]
    k = rotate(layer.self_attn.k_proj(normed).view(1, 6, 2, 8), cos[:, :, None], sin[:, :, None])[:, :5]
    v = layer.self_attn.v_proj(normed).view(1, 6, 2, 8)[:, :5]
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # (1, 5, 4, 8)
    attn = torch.softmax(torch.einsum("bhd,bmhd->bhm", q, k) / 8 ** 0.5, dim=-1)
    expected = layer.self_attn.o_proj(torch.einsum("bhm,bmhd->bhd", attn, v).reshape(1, 32))
    with torch.no_grad():
        keys, values = fusion.project_memory(entry, (cos[0, :5], sin[0, :5]))
        out = fusion(query, torch.zeros(1, 1, 32), keys[None], values[None], torch.zeros(1, 1, 5),
                     (cos[:, 5:], sin[:, 5:]))
    assert torch.allclose(out[0], expected, atol=1e-5)
