"""The recall memory index: per-user search that never crosses users, exact and IVF, save and load."""

import numpy as np
import pytest
import torch

from lib.core.errors import DataError
from lib.recall.index import MemoryIndex


def entries_and_vectors(n_users=5, per_user=40, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    entries = [{"user_id": f"u{u}", "text": f"memory {i} of user {u}"} for u in range(n_users) for i in range(per_user)]
    return entries, rng.standard_normal((len(entries), dim)).astype(np.float32)


def exact_neighbours(entries, vectors, query, user, k):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    mine = [i for i, e in enumerate(entries) if e["user_id"] == user]
    return [entries[i]["text"] for i in sorted(mine, key=lambda i: -scores[i])[:k]]


# exact index; IVF above 10 entries, each user searched over their own rows; IVF searched through a user filter
@pytest.mark.parametrize("exact_limit,user_exact_rows", [(10_000, 4096), (10, 4096), (10, 1)])
def test_search_finds_the_users_nearest_memories_and_never_another_users(exact_limit, user_exact_rows):
    entries, vectors = entries_and_vectors()
    index = MemoryIndex(entries, vectors, exact_limit=exact_limit, user_exact_rows=user_exact_rows)
    assert index.kind == ("exact" if exact_limit > len(entries) else "ivf")
    # Each query is another user's memory exactly: the searching user must still only get their own entries.
    for row in (0, 45, 199):
        owner = entries[row]["user_id"]
        for user in ("u0", "u2", "u4"):
            found = index.search(vectors[row], user, k=5)[0]
            assert [e["user_id"] for _, e in found] == [user] * 5
            assert [e["text"] for _, e in found] == exact_neighbours(entries, vectors, vectors[row], user, 5)
            if user == owner:
                assert found[0][1] is index.entries[row] and found[0][0] == pytest.approx(1.0, abs=1e-5)
    assert index.search(vectors[0], "nobody", k=3) == [[]]


def test_many_users_with_few_memories_get_all_their_nearest_ones_from_the_approximate_index(tmp_path):
    # 3000 users x 4 memories: a filtered approximate search would reach few of a user's rows (the lists probed
    # rarely hold them); each user is searched over their own rows, so the answer is complete and exact.
    entries, vectors = entries_and_vectors(n_users=3000, per_user=4, dim=16, seed=1)
    index = MemoryIndex(entries, vectors, exact_limit=1000, nprobe=1)
    assert index.kind == "ivf"
    index.save(str(tmp_path / "idx"))
    again = MemoryIndex.load(str(tmp_path / "idx"))
    assert again.kind == "ivf"
    rng = np.random.default_rng(2)
    for user in (f"u{u}" for u in rng.choice(3000, size=20, replace=False)):
        query = rng.standard_normal(16).astype(np.float32)
        want = exact_neighbours(entries, vectors, query, user, 4)
        assert [e["text"] for _, e in index.search(query, user, k=4)[0]] == want
        assert [e["text"] for _, e in again.search(query, user, k=4)[0]] == want


def test_saved_index_loads_and_answers_the_same(tmp_path):
    entries, vectors = entries_and_vectors(n_users=3, per_user=10)
    index = MemoryIndex(entries, vectors)
    index.save(str(tmp_path / "idx"))
    again = MemoryIndex.load(str(tmp_path / "idx"))
    queries = vectors[:4] + 0.1
    assert again.search(queries, "u1", k=3) == index.search(queries, "u1", k=3)
    with pytest.raises(DataError, match="holds no memory index"):
        MemoryIndex.load(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="one vector per entry"):
        MemoryIndex(entries, vectors[:-1])
    with pytest.raises(DataError, match="no user_id"):
        MemoryIndex([{"text": "x"}], vectors[:1])


# ---- the query adapter ------------------------------------------------------------------------------------

def worded_apart(users=40, kinds=6, dim=64, seed=0):
    """Each user holds one entry per kind of fact; the questions of a kind point elsewhere than its entries (a fixed
    rotation), as a question and its memory are worded apart."""
    rng = np.random.default_rng(seed)
    kind_vectors = rng.standard_normal((kinds, dim))
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    entries, vectors, questions, frozen = [], [], [], []
    for u in range(users):
        for k in range(kinds):
            entries.append({"user_id": f"u{u}", "text": f"The user's kind {k} is val{u}x{k}."})
            vectors.append(kind_vectors[k] + 0.3 * rng.standard_normal(dim))
            questions.append({"user_id": f"u{u}", "question": f"kind {k}?", "answer": f"val{u}x{k}"})
            frozen.append(rotation @ kind_vectors[k] + 0.3 * rng.standard_normal(dim))
    return entries, np.array(vectors, dtype=np.float32), questions, torch.tensor(np.array(frozen), dtype=torch.float32)


def top1(index, search, questions):
    hits = [index.search(v[None], q["user_id"], k=1)[0][0][1]["text"] for v, q in zip(search.numpy(), questions)]
    return sum(q["answer"] in text for q, text in zip(questions, hits)) / len(questions)


def test_query_adapter_starts_as_the_frozen_search_then_finds_the_memories_of_held_out_users(tmp_path):
    from lib.recall.retrieval import QueryAdapter, answer_rows, search_vectors, train_query_adapter

    entries, vectors, questions, frozen = worded_apart()
    index = MemoryIndex(entries, vectors)
    train = [i for i, q in enumerate(questions) if int(q["user_id"][1:]) < 30]
    test = [i for i, q in enumerate(questions) if int(q["user_id"][1:]) >= 30]
    held_out = [questions[i] for i in test]
    # Zero-initialised, the adapter searches exactly as the frozen vectors do.
    start = search_vectors(frozen[test], QueryAdapter(frozen.shape[1]))
    assert [index.search_rows(v[None], q["user_id"], 6)[0] for v, q in zip(start.numpy(), held_out)] == \
        [[(pytest.approx(s, abs=1e-5), r) for s, r in index.search_rows(v[None], q["user_id"], 6)[0]]
         for v, q in zip(frozen[test].numpy(), held_out)]
    before = top1(index, frozen[test], held_out)
    assert answer_rows(questions[0], index.user_rows["u0"], entries) == [0]
    adapter, learnt = train_query_adapter(frozen[train], [questions[i] for i in train], entries,
                                          index.vectors(list(range(len(entries)))), index.user_rows, epochs=30,
                                          learning_rate=1e-2)
    assert learnt == len(train)
    after = top1(index, search_vectors(frozen[test], adapter), held_out)
    assert before < 0.5 and after > 0.9, (before, after)
    adapter.save(str(tmp_path))
    again = QueryAdapter.load(str(tmp_path))
    assert torch.equal(again(frozen[test]), adapter(frozen[test]).detach())
    assert QueryAdapter.load(str(tmp_path / "nothing")) is None
    # No question whose answer any entry holds: no adapter.
    assert train_query_adapter(frozen[:2], [{"user_id": "u0", "question": "?", "answer": "unknown"}] * 2, entries,
                               vectors, index.user_rows) == (None, 0)
