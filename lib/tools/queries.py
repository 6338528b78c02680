"""Training queries for the tool encoder, generated from ``tools.json``: every resource wish in many phrasings.

    python -m lib.tools.queries --tools_file my/tools.json --output_dir data/my_queries
    python -m lib.tools.queries --tools_file my/tools.json --examples my/examples.jsonl --output_dir data/my_queries

Tools that do the same job share a ``"group"`` in ``tools.json``. For each group of two or more tools the
generator writes *resource* queries: a task phrasing of the group followed by a wish about one resource ("with a
response time below 30 ms", "on a phone", "accuracy is what counts", "speed is irrelevant"), labelled with the
member that meets it (the best on that resource; a number threshold sits between the best and the second best, written
in the key's unit and, taking turns, in the other unit of its dimension: "0.2 seconds" for a key in ms, "200 MB"
for one in GB). Half the queries put the wish in the task's sentence ("Read this receipt quickly."), half in a
sentence of its own ("Read this receipt. I need it quickly.", "... Speed is irrelevant.").
Resource keys are read by name (latency / time, memory / ram, cost / price, accuracy / quality / score); every
key also gets "the lowest <key>" / "the highest <key>" wishes (only the better direction of a key read by name).

Task phrasings come from ``--examples`` (rows ``{"query", "tool", "kind"?}``): a semantic example of a tool in a
group is a phrasing of the group's task, since alone it cannot choose between the members; examples of tools alone
in their group, and every resource example, are copied to the training file as they are. A group without examples
gets phrasings from the words its members' descriptions share; a tool alone in its group also gets semantic
queries from its description ("Can you handle weather forecasts").

Every list of wish phrasings is split: a quarter of each (every fourth; ``--heldout_every``) is kept for
``heldout_queries.jsonl`` and never appears in training, with task phrasings split the same way, so the held-out
file measures phrasings training never saw (of the same constructions). Deterministic: the same inputs write the
same files.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass

from lib.core.errors import UserError
from lib.tools.data import Tool, load_tools, tool_groups

# what a resource key measures, from its name: (dimension, key substrings, the better direction)
DIMENSIONS = (
    ("latency", ("latency", "time", "_ms", "seconds"), "low"),
    ("memory", ("memory", "ram", "vram", "_gb", "_mb", "mem_"), "low"),
    ("cost", ("cost", "price", "usd", "eur", "dollar", "fee"), "low"),
    ("quality", ("accuracy", "quality", "score", "precision", "f1", "acc"), "high"),
)

# Wishes by dimension, in families of constructions. "{n}" and "{unit}" are filled from the tools' values.
WISHES = {
    "latency": {
        "plain": ["as fast as possible", "quickly", "right away", "with minimal delay", "in real time",
                  "with the lowest latency", "without making me wait", "instantly", "at top speed",
                  "with a snappy response", "as soon as possible", "live, while the user waits"],
        "comparative": ["whichever option is faster", "with the quicker of the tools", "faster than the usual way",
                        "using the speedier option", "with whatever responds sooner", "the faster the better"],
        "number": ["with a response time below {n} {unit}", "taking no more than {n} {unit}",
                   "with at most {n} {unit} of delay", "answering in less than {n} {unit}",
                   "with a {n} {unit} latency budget", "in {n} {unit} or less", "under a {n} {unit} deadline",
                   "before {n} {unit} have passed"],
        "negation": ["and speed is irrelevant", "and I do not care how long it takes", "and waiting is fine",
                     "and there is no deadline", "and time isn't a factor", "and the response time is unimportant",
                     "and we can wait for the result", "and turnaround time doesn't matter",
                     "with no rush at all", "even if it takes a while", "and latency does not matter"],
    },
    "memory": {
        "plain": ["using very little memory", "with a small memory footprint", "in a lightweight way",
                  "with the least RAM", "on a memory-starved machine", "while keeping memory use minimal",
                  "without hogging RAM", "with a tiny footprint"],
        "hardware": ["on a phone", "on a Raspberry Pi", "on a laptop without a GPU", "on an old CPU-only server",
                     "inside a web browser", "on an embedded board", "on a smartwatch", "on a cheap tablet"],
        "number": ["using under {n} {unit} of RAM", "in less than {n} {unit} of memory",
                   "on a machine with only {n} {unit} of RAM", "with a memory limit of {n} {unit}",
                   "without exceeding {n} {unit} of memory", "within a {n} {unit} RAM cap",
                   "with {n} {unit} of memory to spare at most", "where only {n} {unit} of RAM are free"],
        "negation": ["and memory is no concern", "and we have plenty of RAM", "on a huge GPU server",
                     "and RAM is not a constraint", "with all the memory it wants", "and the hardware is beefy"],
    },
    "cost": {
        "plain": ["as cheaply as possible", "at the lowest price", "for very little money", "inexpensively",
                  "while keeping the bill small", "at minimal cost", "without spending much", "economically"],
        "budget": ["on a shoestring budget", "because our budget is tiny", "as a student with no money",
                   "for a free hobby project", "within a very small budget", "while we cut costs",
                   "because every cent counts", "with the cheapest option"],
        "number": ["for under {unit}{n} per thousand calls", "at less than {unit}{n} per 1,000 requests",
                   "paying no more than {unit}{n} per thousand calls", "with a cap of {unit}{n} per 1,000 calls",
                   "for at most {unit}{n} per thousand requests", "below {unit}{n} for every thousand calls",
                   "where a thousand calls may cost {unit}{n} at most", "spending less than {unit}{n} per 1k calls"],
        "negation": ["and money is no object", "and cost is not an issue", "whatever it costs",
                     "and the budget is generous", "and cost doesn't matter", "and we don't mind paying more",
                     "and the price does not matter", "with an unlimited budget", "and we can pay for the best"],
    },
    "quality": {
        "plain": ["with the highest accuracy", "as accurately as possible", "with the best quality",
                  "with top quality results", "as reliably as possible", "with no compromise on quality",
                  "getting it exactly right", "with the most trustworthy output", "at the best possible quality",
                  "where only a flawless result will do", "with outstanding accuracy", "with the finest results"],
        "stakes": ["for a medical report", "for a legal filing", "for a court case", "for the board of directors",
                   "for a safety-critical system", "for a scientific publication", "for our most important client",
                   "for an official audit"],
        "number": ["with at least {n}{unit} accuracy", "at {n}{unit} accuracy or better", "scoring above {n}{unit}",
                   "with accuracy no lower than {n}{unit}", "reaching {n}{unit} quality or more",
                   "with a quality bar of {n}{unit}", "that is right {n}{unit} of the time or more",
                   "hitting a {n}{unit} accuracy target"],
        "negation": ["and accuracy is not critical", "and a rough result is fine", "and quality barely matters",
                     "and close enough is good enough", "and some mistakes are okay", "and it doesn't have to be exact",
                     "and a draft-quality result will do",
                     "where a good-enough answer will do", "and small errors are acceptable",
                     "and an approximate answer is enough"],
    },
}
GENERIC = {"low": ["with the lowest {words}", "minimising {words}", "keeping {words} as low as it gets",
                   "with the smallest {words}"],
           "high": ["with the highest {words}", "maximising {words}", "with {words} as high as it gets",
                    "with the largest {words}"]}
TASK_TEMPLATES = ["{task}", "Please do this: {task}", "I need {task_lower}", "Can you handle {task_lower}",
                  "Help me with {task_lower}", "Run {task_lower}"]


def dimension_of(key: str) -> tuple[str, str] | None:
    """``(dimension, better)`` a resource key measures, read from its name, or None."""
    name = key.lower()
    for dim, parts, better in DIMENSIONS:
        if any(p in name for p in parts):
            return dim, better
    return None


def unit_of(key: str, dim: str, values: list[float]) -> tuple[str, float] | None:
    """How a number is written for this key: ``(unit, scale)`` or None when the unit cannot be told."""
    name = key.lower()
    if dim == "latency":
        if name.endswith("_ms") or "millis" in name:
            return "ms", 1.0
        if name.endswith("_s") or "seconds" in name or name.endswith("_sec"):
            return "seconds", 1.0
    if dim == "memory":
        for suffix, unit in (("_gb", "GB"), ("_mb", "MB")):
            if name.endswith(suffix) or f"{suffix}_" in name:
                return unit, 1.0
    if dim == "cost":
        return ("$", 1.0) if "usd" in name or "dollar" in name else (("€", 1.0) if "eur" in name else None)
    if dim == "quality" and all(0 <= v <= 1 for v in values):
        return "%", 100.0
    if dim == "quality" and all(0 <= v <= 100 for v in values):
        return "%", 1.0
    return None


# a unit users also write for the same dimension: (unit of the key, other unit, factor, the least value worth it)
OTHER_UNITS = {"ms": ("seconds", 1e-3, 100.0), "seconds": ("ms", 1e3, 0.0), "GB": ("MB", 1e3, 0.0),
               "MB": ("GB", 1e-3, 100.0)}


def units_of(key: str, dim: str, values: list[float], bound: float) -> list[tuple[str, float]]:
    """Every way a threshold ``bound`` of this key is written: the key's own unit, and the other unit of its
    dimension when the number reads well in it ("0.2 seconds" for 200 ms, "200 MB" for 0.2 GB); empty when the
    unit cannot be told."""
    unit = unit_of(key, dim, values)
    if unit is None:
        return []
    other = OTHER_UNITS.get(unit[0])
    if other is None or bound * unit[1] < other[2]:
        return [unit]
    return [unit, (other[0], unit[1] * other[1])]


def round_between(low: float, high: float) -> float | None:
    """A round number strictly between ``low`` and ``high`` (near their geometric mean), or None."""
    if not low < high:
        return None
    target = math.sqrt(low * high) if low > 0 else (low + high) / 2
    for digits in range(1, 6):
        step = 10 ** (math.floor(math.log10(abs(target))) - digits + 1) if target else 1
        for candidate in (round(target / step) * step, math.floor(target / step) * step,
                          math.ceil(target / step) * step):
            if low < candidate < high:
                return float(f"{candidate:.6g}")
    return None


def fmt_number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


@dataclass
class Wish:
    text: str
    target: int  # tool index
    dimension: str
    family: str


def held_out(i: int, every: int) -> bool:
    """Whether the ``i``-th phrasing of a list is held out (every ``every``-th; never when ``every`` is 0)."""
    return every > 0 and i % every == every - 1


def group_wishes(tools: list[Tool], members: list[int], heldout_every: int = 4) -> list[tuple[Wish, bool]]:
    """Every wish for one group, each with its member and whether it is held out."""
    out: list[tuple[Wish, bool]] = []

    def add(phrases, family, dim, target, **fill):
        for i, phrase in enumerate(phrases):
            out.append((Wish(phrase.format(**fill), target, dim, family), held_out(i, heldout_every)))

    keys = sorted({k for m in members for k in tools[m].resources})
    best_on: dict[str, int] = {}
    for key in keys:
        having = [m for m in members if key in tools[m].resources]
        if len(having) < 2:
            continue
        values = sorted((tools[m].resources[key], m) for m in having)
        low, high = values[0], values[-1]
        words = key.replace("_", " ")
        found = dimension_of(key)
        # "the lowest <key>" / "the highest <key>": only the better direction of a key whose meaning is known
        if low[0] < values[1][0] and (found is None or found[1] == "low"):
            add(GENERIC["low"], "generic", key, low[1], words=words)
        if high[0] > values[-2][0] and (found is None or found[1] == "high"):
            add(GENERIC["high"], "generic", key, high[1], words=words)
        if found is None or found[0] in best_on:
            continue
        dim, better = found
        ranked = values if better == "low" else values[::-1]
        best, second = ranked[0], ranked[1]
        if best[0] == second[0]:
            continue
        best_on[dim] = best[1]
        for family, phrases in WISHES[dim].items():
            if family == "negation":
                continue
            if family == "number":  # the phrasings take turns among the units the number can be written in
                bound = round_between(*sorted((best[0], second[0])))
                units = units_of(key, dim, [v for v, _ in values], bound) if bound is not None else []
                for i, phrase in enumerate(phrases if units else []):
                    unit, scale = units[i % len(units)]
                    out.append((Wish(phrase.format(n=fmt_number(bound * scale), unit=unit), best[1], dim, family),
                                held_out(i, heldout_every)))
            else:
                add(phrases, family, dim, best[1])
    # Not caring about one resource means wanting what it is traded for: "speed is irrelevant" asks for the most
    # accurate member, "accuracy is not critical" for the one best on latency (else cost, else memory).
    for dim in best_on:
        if dim == "quality":
            trade = next((best_on[d] for d in ("latency", "cost", "memory") if d in best_on), None)
        else:
            trade = best_on.get("quality")
        if trade is not None and trade != best_on[dim]:
            add(WISHES[dim]["negation"], "negation", dim, trade)
    return out


def shared_words(texts: list[str]) -> str:
    """The words all ``texts`` start with, without a trailing function word or punctuation."""
    split = [t.split() for t in texts]
    common = []
    for words in zip(*split, strict=False):
        if len(set(words)) > 1:
            break
        common.append(words[0])
    while common and common[-1].lower().strip(",:;") in {"a", "an", "the", "with", "and", "or", "of", "by", "as",
                                                          "that", "for", "to", "from", "on", "in", "at"}:
        common.pop()
    return " ".join(common).rstrip(",:;")


def description_task(text: str) -> str:
    """A task phrasing from a description: the part before a colon, else its first clause."""
    return (text.split(":")[0] if ":" in text else re.split(r"[.;,]", text)[0]).strip()


def task_phrasings(task: str) -> list[str]:
    task = task.strip().rstrip(".!?")
    lower = task[0].lower() + task[1:] if task else task
    return [t.format(task=task, task_lower=lower) for t in TASK_TEMPLATES]


# the wish as a sentence of its own, after the task ("Read this receipt. I need it on a phone.")
WISH_SENTENCES = ["I need it {wish}.", "Please do it {wish}.", "It has to be done {wish}.", "Do it {wish}."]


def sentence(task: str, wish: str, form: int = 0) -> str:
    """The query for a task phrasing and a wish: one sentence ("<Task> <wish>.") for even ``form``, the task and
    then the wish as a sentence of its own for odd ``form`` (a wish "and <clause>" becomes "<Clause>.")."""
    end = "?" if task.strip().endswith("?") else "."
    task = task.strip().rstrip(".!?")
    task = task[0].upper() + task[1:]
    if form % 2 == 0:
        return f"{task} {wish}."
    if wish.startswith("and "):
        return f"{task}{end} {wish[4].upper()}{wish[5:]}."
    return f"{task}{end} " + WISH_SENTENCES[form // 2 % len(WISH_SENTENCES)].format(wish=wish)


def generate(tools: list[Tool], examples: list[dict] | None = None, heldout_every: int = 4
             ) -> tuple[list[dict], list[dict]]:
    """``(train rows, held-out rows)`` of ``{"query", "tool", "kind"}`` for a tool set; ``heldout_every`` 0 holds
    nothing out."""
    names = [t.name for t in tools]
    groups = tool_groups(tools)
    group_of = {names[i]: g for g, members in enumerate(groups) for i in members}
    tasks: list[list[str]] = [[] for _ in groups]
    train: list[dict] = []
    for row in examples or []:
        g = group_of[row["tool"]]
        if len(groups[g]) > 1 and row.get("kind", "semantic") != "resource":
            tasks[g].append(row["query"])
        else:
            train.append({"query": row["query"], "tool": row["tool"], "kind": row.get("kind") or "semantic"})
    heldout: list[dict] = []
    for g, members in enumerate(groups):
        phrasings = tasks[g]
        if not phrasings:
            task = shared_words([tools[m].description for m in members]) if len(members) > 1 else ""
            phrasings = task_phrasings(description_task(task or tools[members[0]].description))
        split = {held: [p for i, p in enumerate(phrasings) if held_out(i, heldout_every) == held]
                 for held in (False, True)}
        if not split[True] and heldout_every:
            split[True] = split[False]  # one or two phrasings: the held-out wishes are still new
        if len(members) == 1:  # phrasings of its description: the tool's own semantic queries
            for held, rows in ((False, train), (True, heldout)):
                rows.extend({"query": p.rstrip(".") + ".", "tool": names[members[0]], "kind": "semantic"}
                            for p in split[held])
            continue
        # one sentence and two sentences take turns, over the wishes and over the task phrasings
        for w, (wish, held) in enumerate(group_wishes(tools, members, heldout_every)):
            for j, task in enumerate(split[held]):
                (heldout if held else train).append({"query": sentence(task, wish.text, w + j),
                                                     "tool": names[wish.target], "kind": "resource"})
    return train, heldout


def main(argv=None) -> None:
    import json

    from lib.core.data import load_rows
    from lib.core.files import write_jsonl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools_file", required=True, help="tools.json; tools doing the same job share a 'group'.")
    parser.add_argument("--examples", default=None, help="Optional rows {query, tool, kind?}: your own queries.")
    parser.add_argument("--output_dir", required=True, help="Where train_queries.jsonl and heldout_queries.jsonl go.")
    parser.add_argument("--heldout_every", type=int, default=4,
                        help="Hold out every N-th phrasing of each list (0: hold out nothing; no held-out file).")
    args = parser.parse_args(argv)
    if args.heldout_every < 0:
        raise UserError(f"--heldout_every must be 0 or more, got {args.heldout_every}.")
    tools = load_tools(args.tools_file)
    names = [t.name for t in tools]
    examples = None
    if args.examples:
        ds = load_rows(args.examples)
        examples = []
        for i, row in enumerate(ds):
            if not isinstance(row.get("query"), str) or not row["query"].strip():
                raise UserError(f"{args.examples} row {i}: 'query' is missing or empty.")
            if row.get("tool") not in names:
                raise UserError(f"{args.examples} row {i}: tool {row.get('tool')!r} is not in {args.tools_file}.")
            examples.append({"query": row["query"].strip(), "tool": row["tool"], "kind": row.get("kind")})
    if not any(t.group for t in tools):
        print(f"note: no tool in {args.tools_file} has a 'group', so no resource queries are written; give tools "
              "that do the same job the same \"group\": \"<job>\"", flush=True)
    train, heldout = generate(tools, examples, args.heldout_every)
    os.makedirs(args.output_dir, exist_ok=True)
    files = [("train_queries.jsonl", train)] + ([("heldout_queries.jsonl", heldout)] if args.heldout_every else [])
    for name, rows in files:
        write_jsonl(os.path.join(args.output_dir, name), rows)
        kinds = {k: sum(r["kind"] == k for r in rows) for k in ("semantic", "resource")}
        print(f"{os.path.join(args.output_dir, name)}: {len(rows)} queries {json.dumps(kinds)}", flush=True)


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
