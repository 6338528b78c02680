"""The training-query generator for the tool encoder (lib/tools/queries.py)."""

import json
import os
import re

import pytest

from lib.core.errors import UserError
from lib.tools.data import load_tool_queries, load_tools, tool_groups
from lib.tools.queries import generate, group_wishes, main, round_between, sentence, task_phrasings
from tests.conftest import ROOT, write_jsonl

TOOLS = [
    {"name": "asr-large", "description": "Speech recognition: transcribes audio with the best accuracy.",
     "resources": {"latency_ms": 2000, "memory_gb": 10, "cost_per_1k_usd": 3.0, "accuracy": 0.95}, "group": "asr"},
    {"name": "asr-tiny", "description": "Speech recognition: transcribes audio on small devices.",
     "resources": {"latency_ms": 50, "memory_gb": 0.2, "cost_per_1k_usd": 0.05, "accuracy": 0.8}, "group": "asr"},
    {"name": "ner", "description": "Finds names of people and places in text.", "resources": {"latency_ms": 30}},
    {"name": "translator", "description": "Translates text between languages.", "resources": {"latency_ms": 300}},
]


def tools_file(tmp_path, tools=TOOLS):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(tools))
    return str(path)


def test_group_must_be_a_name(tmp_path):
    bad = [{**TOOLS[0], "group": ""}, TOOLS[1]]
    with pytest.raises(UserError, match="'group' is ''; give a name shared by the tools that do the same job"):
        load_tools(tools_file(tmp_path, bad))
    tools = load_tools(tools_file(tmp_path))
    assert [t.group for t in tools] == ["asr", "asr", None, None]
    assert tool_groups(tools) == [[0, 1], [2], [3]]  # a tool without a group is alone


def test_round_between_is_strictly_inside():
    for low, high in [(50, 2000), (0.8, 0.95), (0.05, 3.0), (8, 9), (0.1, 0.11), (0, 1), (-3, 2)]:
        x = round_between(low, high)
        assert x is not None and low < x < high, (low, high, x)
    assert round_between(5, 5) is None and round_between(6, 5) is None


def test_each_wish_names_the_member_best_on_its_resource(tmp_path):
    tools = load_tools(tools_file(tmp_path))
    wishes = [w for w, _ in group_wishes(tools, [0, 1], heldout_every=4)]
    by_dim = {}
    for w in wishes:
        by_dim.setdefault((w.dimension, w.family), set()).add(tools[w.target].name)
    # fast, small and cheap ask for the tiny model; accuracy and high stakes for the large one
    for dim in ("latency", "memory", "cost"):
        assert by_dim[(dim, "plain")] == by_dim[(dim, "number")] == {"asr-tiny"}
    assert by_dim[("quality", "plain")] == by_dim[("quality", "stakes")] == {"asr-large"}
    assert by_dim[("memory", "hardware")] == by_dim[("cost", "budget")] == {"asr-tiny"}
    # not caring about speed asks for what speed is traded for (accuracy), and the other way round
    assert by_dim[("latency", "negation")] == {"asr-large"} and by_dim[("quality", "negation")] == {"asr-tiny"}
    # only the better direction of a key whose meaning is known: never "the highest latency"
    assert all("highest latency" not in w.text and "lowest accuracy" not in w.text for w in wishes)
    # numbers sit strictly between the two members' values, in the key's unit or the other unit of its dimension,
    # and both units are used
    units = set()
    for w in wishes:
        if w.family != "number":
            continue
        n = float(re.search(r"[\d.,]+\d|\d", w.text.replace("$", "")).group().replace(",", ""))
        if w.dimension == "latency":
            unit = "seconds" if "seconds" in w.text else "ms"
            assert f" {unit}" in w.text and 50 < n * (1000 if unit == "seconds" else 1) < 2000
        elif w.dimension == "memory":
            unit = "MB" if "MB" in w.text else "GB"
            assert f" {unit}" in w.text and 0.2 < n / (1000 if unit == "MB" else 1) < 10
        elif w.dimension == "cost":
            assert "$" in w.text and 0.05 < n < 3.0
        else:
            assert "%" in w.text and 80 < n < 95
        if w.dimension in ("latency", "memory"):
            units.add(unit)
    assert units == {"ms", "seconds", "GB", "MB"}


def test_wishes_come_in_the_task_sentence_and_as_a_sentence_of_their_own(tmp_path):
    assert sentence("read this receipt", "quickly", 0) == "Read this receipt quickly."
    assert sentence("read this receipt.", "quickly", 1) == "Read this receipt. I need it quickly."
    assert sentence("Is it in the index?", "and speed is irrelevant", 3) == "Is it in the index? Speed is irrelevant."
    train, _ = generate(load_tools(tools_file(tmp_path)), heldout_every=0)
    resource = [r["query"] for r in train if r["kind"] == "resource"]
    for task in task_phrasings("Speech recognition"):  # every task phrasing gets both forms, about half each
        rows = [q for q in resource if q.startswith(task[0].upper() + task[1:])]
        two = sum(". " in q or "? " in q for q in rows)
        assert 0.4 < two / len(rows) < 0.6, (task, two, len(rows))


def test_held_out_phrasings_never_reach_training_and_output_is_deterministic(tmp_path):
    tools = load_tools(tools_file(tmp_path))
    train, held = generate(tools, heldout_every=4)
    assert generate(tools, heldout_every=4) == (train, held)
    assert held and not {r["query"] for r in train} & {r["query"] for r in held}
    wish_texts = {w.text: held for w, held in group_wishes(tools, [0, 1], heldout_every=4)}
    for text, is_held in wish_texts.items():
        in_train = any(text in r["query"] for r in train)
        assert in_train != is_held, text
    # tools alone in their group get semantic queries from their descriptions; groups get resource queries
    kinds = {(r["tool"], r["kind"]) for r in train}
    assert ("ner", "semantic") in kinds and ("translator", "semantic") in kinds
    assert {("asr-large", "resource"), ("asr-tiny", "resource")} <= kinds
    assert not any(r["kind"] == "semantic" and r["tool"].startswith("asr") for r in train)
    assert generate(tools, heldout_every=0)[1] == []


def test_examples_give_the_task_phrasings(tmp_path):
    tools = load_tools(tools_file(tmp_path))
    examples = [{"query": "Transcribe this podcast episode", "tool": "asr-large", "kind": "semantic"},
                {"query": "Write down what is said in this voicemail", "tool": "asr-tiny"},
                {"query": "Tag the places in this story.", "tool": "ner", "kind": "semantic"},
                {"query": "Transcribe this lecture in real time.", "tool": "asr-tiny", "kind": "resource"}]
    train, _ = generate(tools, examples, heldout_every=0)
    queries = [r["query"] for r in train]
    # the examples of tools alone in their group, and resource examples, are kept as they are
    assert {"query": "Tag the places in this story.", "tool": "ner", "kind": "semantic"} in train
    assert {"query": "Transcribe this lecture in real time.", "tool": "asr-tiny", "kind": "resource"} in train
    # a group member's semantic example is a task phrasing: it comes back with every wish, not as a label
    assert "Transcribe this podcast episode" not in queries
    assert "Transcribe this podcast episode as fast as possible." in queries
    assert "Write down what is said in this voicemail for a legal filing." in queries
    assert next(r["tool"] for r in train if r["query"] == "Transcribe this podcast episode on a phone.") == "asr-tiny"


def test_cli_writes_both_files_and_says_when_no_tool_has_a_group(tmp_path, capsys):
    examples = write_jsonl(tmp_path / "ex.jsonl", [{"query": "Transcribe this call", "tool": "asr-large"}])
    out = tmp_path / "q"
    main(["--tools_file", tools_file(tmp_path), "--examples", examples, "--output_dir", str(out)])
    names = [t["name"] for t in TOOLS]
    train = load_tool_queries(str(out / "train_queries.jsonl"), names)
    held = load_tool_queries(str(out / "heldout_queries.jsonl"), names)
    assert sum(train[2]) > 100 and sum(held[2]) > 20 and not set(train[0]) & set(held[0])
    assert "train_queries.jsonl" in capsys.readouterr().out

    lone = [{k: v for k, v in t.items() if k != "group"} for t in TOOLS]
    (tmp_path / "lone").mkdir()
    main(["--tools_file", tools_file(tmp_path / "lone", lone), "--output_dir", str(tmp_path / "q2"),
          "--heldout_every", "0"])
    assert "no tool in" in capsys.readouterr().out and not (tmp_path / "q2" / "heldout_queries.jsonl").exists()

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "Transcribe this", "tool": "asr-huge"}])
    with pytest.raises(UserError, match="bad.jsonl row 0: tool 'asr-huge' is not in"):
        main(["--tools_file", tools_file(tmp_path), "--examples", bad, "--output_dir", str(out)])


def generated_from_examples(folder: str) -> list[dict]:
    """The training queries the generator writes from a shipped set's tools.json and examples.jsonl."""
    tools = load_tools(os.path.join(folder, "tools.json"))
    with open(os.path.join(folder, "examples.jsonl")) as f:
        return generate(tools, [json.loads(line) for line in f], heldout_every=0)[0]


def test_shipped_held_out_wishes_are_unseen_in_the_generated_training_queries():
    from recipes.tools import make_queries

    for folder in ("tools", os.path.join("tools", "services")):
        held = os.path.join(ROOT, "recipes", folder, "heldout_queries.jsonl")
        if os.path.exists(os.path.join(ROOT, "recipes", folder, "examples.jsonl")):
            train = generated_from_examples(os.path.join(ROOT, "recipes", folder))
        else:
            with open(os.path.join(ROOT, "recipes", folder, "train_queries.jsonl")) as f:
                train = [json.loads(line) for line in f]
        train_text = "\n".join(r["query"] for r in train)
        with open(held) as f:
            rows = [json.loads(line) for line in f]
        assert not {r["query"] for r in rows} & set(train_text.split("\n"))
        if folder == "tools":
            wishes = [w for ws in make_queries.WISHES_HELDOUT.values() for w in ws]
        else:  # the services set's held-out wishes: what follows the task phrasing its rows share
            by_task = {}
            for r in rows:
                if r["kind"] == "resource":
                    by_task.setdefault(" ".join(r["query"].split()[:3]), []).append(r["query"].rstrip(".").split())
            wishes = set()
            for words in by_task.values():
                task = len(os.path.commonprefix(words))
                wishes |= {" ".join(w[task:]) for w in words}
        assert wishes and not [w for w in wishes if w in train_text], folder


def test_services_second_look_uses_new_task_phrasings_with_training_wishes_and_right_labels():
    # recipes/tools/services/more_heldout_queries.jsonl: 12 task phrasings no training query has, each with four
    # wishes that training does have, labelled with the member of the group best on the wished resource
    folder = os.path.join(ROOT, "recipes", "tools", "services")
    tools = load_tools(os.path.join(folder, "tools.json"))
    train = [r["query"] for r in generated_from_examples(folder)]
    with open(os.path.join(folder, "more_heldout_queries.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    best = {"as fast as possible": ("p95_latency_ms", min), "with the highest accuracy": ("quality", max),
            "as cheaply as possible": ("price_per_1k_calls_usd", min), "for a legal filing": ("quality", max)}
    group_of = {t.name: t.group for t in tools}
    tasks = set()
    for row in rows:
        wish = next(w for w in best if row["query"].endswith(f" {w}."))
        task = row["query"][:-len(wish) - 2]
        tasks.add(task)
        assert not any(q.startswith(task) for q in train), task
        assert any(q.endswith(f" {wish}.") for q in train), wish
        key, better = best[wish]
        members = [t for t in tools if t.group == group_of[row["tool"]]]
        assert row["kind"] == "resource" and len(members) == 2
        assert row["tool"] == better(members, key=lambda t, key=key: t.resources[key]).name, row["query"]
    assert len(rows) == 48 and len(tasks) == 12


# what each wish of the blind sets asks for: (resource key, the better direction)
BLIND_WISHES = {"fast": ("p95_latency_ms", min), "cheap": ("price_per_1k_calls_usd", min), "accurate": ("quality", max),
                "memory": ("ram_gb", min), "speed_irrelevant": ("quality", max), "cost_irrelevant": ("quality", max),
                "quality_irrelevant": ("p95_latency_ms", min)}


def check_blind_label(tools, row, wish):
    group = next(t.group for t in tools if t.name == row["tool"])
    members = [t for t in tools if t.group == group]
    key, better = BLIND_WISHES[wish]
    assert group and len(members) == 2 and row["kind"] == "resource", row["query"]
    assert row["tool"] == better(members, key=lambda t: t.resources[key]).name, row["query"]


def test_services_blind_set_a_has_new_tasks_and_right_labels():
    # recipes/tools/services/blind_a_heldout_queries.jsonl was written by someone who saw tools.json only (not the
    # examples, the training queries or the encoder's mistakes): 16 task phrasings x 4 wishes in the writer's own
    # words, plus 2 requests per lone tool. Each label is checked against the wish read here, one letter per resource
    # row in file order: F fast, C cheap, Q accurate, M little memory, S speed irrelevant, P price irrelevant (both:
    # the more accurate member), R accuracy not critical (the faster member).
    wishes = "FCQM FCQS FCQM FCQR FCQM FCQS FCQR FCQM FCQS FCQR FCQP FCQS FCQM FCQS FCQM FCQR".replace(" ", "")
    letters = {"F": "fast", "C": "cheap", "Q": "accurate", "M": "memory", "S": "speed_irrelevant",
               "P": "cost_irrelevant", "R": "quality_irrelevant"}
    folder = os.path.join(ROOT, "recipes", "tools", "services")
    tools = load_tools(os.path.join(folder, "tools.json"))
    train = [r["query"] for r in generated_from_examples(folder)]
    with open(os.path.join(folder, "blind_a_heldout_queries.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    resource = [r for r in rows if r["kind"] == "resource"]
    assert len(resource) == len(wishes) == 64 and len(rows) == 72
    group_of = {t.name: t.group for t in tools}
    for i, (row, wish) in enumerate(zip(resource, wishes, strict=True)):
        task = os.path.commonprefix([r["query"] for r in resource[i - i % 4:i - i % 4 + 4]]).strip()
        assert len(task) > 20 and not any(q.startswith(task) for q in train), row["query"]
        check_blind_label(tools, row, letters[wish])
    for row in rows[64:]:
        assert row["kind"] == "semantic" and group_of[row["tool"]] is None and row["query"] not in train


@pytest.mark.parametrize("name", ["blind_b", "blind_c"])
def test_services_blind_sets_b_and_c_have_four_wishes_per_task_and_right_labels(name):
    # recipes/tools/services/blind_{b,c}_heldout_queries.jsonl: two more writers, tools.json only (b: 8 imagined
    # users, c: terse commands to developer specs); the wish may come before or after the task. Each row says which
    # wish it states ("wish"), checked here against the label; every task phrasing (the rows come in fours) has a
    # fast, a cheap and an accurate wish and one more.
    folder = os.path.join(ROOT, "recipes", "tools", "services")
    tools = load_tools(os.path.join(folder, "tools.json"))
    with open(os.path.join(folder, f"{name}_heldout_queries.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    resource = [r for r in rows if r["kind"] == "resource"]
    assert len(resource) == 64 and len(rows) == 72
    for i in range(0, 64, 4):
        assert {"fast", "cheap", "accurate"} < {r["wish"] for r in resource[i:i + 4]}, resource[i]["query"]
        assert len({next(t.group for t in tools if t.name == r["tool"]) for r in resource[i:i + 4]}) == 1
    for row in resource:
        check_blind_label(tools, row, row["wish"])
    group_of = {t.name: t.group for t in tools}
    assert all(r["kind"] == "semantic" and group_of[r["tool"]] is None for r in rows[64:])
