"""The recall-memory chat generator: seeded, split by user, every fact stated in its conversation, updates later,
test answers only in test users' logs, and no small-talk line that states a fact of its own."""

import json

import pytest

from lib.recall import chats
from tests.test_memory_parts import read


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chats")
    chats.build(str(out), users_count=20, seed=3)
    return out


def test_every_fact_is_stated_in_its_conversation_and_asked_about(chat_dir):
    conversations = {c["conversation_id"]: c for c in read(chat_dir / "logs" / "conversations.jsonl")}
    facts = read(chat_dir / "facts.jsonl")
    users = json.load(open(chat_dir / "users.json"))
    assert len(users) == 20 and len(conversations) == 20 * chats.CONVERSATIONS_PER_USER
    for fact in facts:
        conversation = conversations[fact["conversation_id"]]
        assert conversation["user_id"] == fact["user_id"] and conversation["timestamp"] == fact["timestamp"]
        said = [m["content"] for m in conversation["messages"] if m["role"] == "user"]
        assert sum(fact["value"] in line for line in said) >= 1
    for user in users:
        mine = [f for f in facts if f["user_id"] == user["user_id"]]
        assert len({f["attribute"] for f in mine}) == chats.FACTS_PER_USER
        for kind, new in user["updates"].items():
            old = next(f for f in mine if f["attribute"] == kind and not f["current"])
            latest = next(f for f in mine if f["attribute"] == kind and f["current"])
            assert latest["value"] == new and latest["timestamp"] > old["timestamp"]
    questions = read(chat_dir / "questions_train.jsonl") + read(chat_dir / "questions_test.jsonl")
    current = {(f["user_id"], f["attribute"]): f["value"] for f in facts if f["current"]}
    for q in questions:
        if q["kind"] == chats.UNKNOWN:
            assert q["answer"] == chats.UNKNOWN and (q["user_id"], q["attribute"]) not in current
        else:
            assert q["answer"] == current[(q["user_id"], q["attribute"])] and q["answer"] in q["memory"]
    assert {q["kind"] for q in questions} == {"fact", "updated", chats.UNKNOWN}
    per_user = len(questions) / len(users)
    assert per_user == 2 * chats.FACTS_PER_USER + 2


def test_test_users_values_are_their_own_and_small_talk_states_no_facts(chat_dir, tmp_path):
    users = json.load(open(chat_dir / "users.json"))
    test = {u["user_id"] for u in users if u["split"] == "test"}
    assert 0 < len(test) < len(users)
    invented = {(f["user_id"], f["value"]) for f in read(chat_dir / "facts.jsonl") if f["attribute"] in chats.INVENTED}
    test_values = {v for u, v in invented if u in test}
    assert test_values and not test_values & {v for u, v in invented if u not in test}
    for kind, (train_values, test_only) in chats.REAL_VALUES.items():
        assert not set(train_values) & set(test_only), kind
    facts = read(chat_dir / "facts.jsonl")
    stated = {f["value"] for f in facts}
    for conversation in read(chat_dir / "logs" / "conversations.jsonl"):
        for m in conversation["messages"]:
            if m["role"] == "user" and not any(v in m["content"] for v in stated):
                assert not chats._PERSONAL.search(m["content"]), m["content"]
    chats.build(str(tmp_path / "again"), users_count=20, seed=3)
    assert (tmp_path / "again" / "facts.jsonl").read_text() == (chat_dir / "facts.jsonl").read_text()


def test_hold_back_moves_the_newest_conversations_to_later_and_changes_nothing_else(chat_dir, tmp_path):
    counts = chats.build(str(tmp_path), users_count=20, seed=3, hold_back=0.1)
    everything = read(chat_dir / "logs" / "conversations.jsonl")
    kept, later = read(tmp_path / "logs" / "conversations.jsonl"), read(tmp_path / "later" / "conversations.jsonl")
    assert counts["later/conversations.jsonl"] == len(later) == round(len(everything) * 0.1) > 0
    assert sorted(kept + later, key=lambda c: c["conversation_id"]) == sorted(everything,
                                                                             key=lambda c: c["conversation_id"])
    assert min(c["timestamp"] for c in later) >= max(c["timestamp"] for c in kept)
    for name in ("facts.jsonl", "questions_train.jsonl", "questions_test.jsonl", "users.json"):
        assert (tmp_path / name).read_text() == (chat_dir / name).read_text(), name
    assert not (chat_dir / "later").exists()
    with pytest.raises(SystemExit, match="--hold_back must lie in"):
        chats.build(str(tmp_path / "bad"), users_count=20, seed=3, hold_back=1.0)
