"""A seeded set of chat logs in which fictional users tell an assistant about themselves, to measure recall memory.

Every user has ten personal facts out of twelve kinds (pet, home town, job, sister, allergy, hobby, ...). Each fact
is stated casually in one or two user turns of one of the user's four dated conversations, between real small
talk: turns of the Chit-Chat Challenge conversations (the ``chitchat-dataset`` package, 7,168 human conversations,
MIT) with the turns that could state a personal fact of their own filtered out. Some facts change later ("we moved
to ..."): the latest value is the answer. Users are split into train and test users; the test users' names, towns,
pets, employers, ... are invented words nobody else has, so a test answer can only come from memory.

    python -m lib.recall.chats --output_dir data/chats
    python -m lib.recall.chats --output_dir data/chats --users 120 --seed 0
    python -m lib.recall.chats --output_dir data/chats_incremental --users 40 --hold_back 0.1

Writes, in --output_dir:
    logs/conversations.jsonl  {"conversation_id", "user_id", "timestamp", "messages": [{"role", "content"}, ...]}
    later/conversations.jsonl with --hold_back F: the newest F of the conversations (by timestamp), left out of logs/
                              to copy in later, as the next day's logs of an incremental run
    facts.jsonl               every stated fact: {"user_id", "attribute", "value", "memory", "conversation_id",
                              "timestamp", "current"}; ``memory`` is the entry an extractor should write
                              ("The user's dog is called Rex."), ``current`` false for a value later replaced
    questions_train.jsonl     train users' questions: {"user_id", "question", "answer", "memory", "attribute",
    questions_test.jsonl      "kind"}: two per current fact (kind "fact" or "updated"), and two per user about
                              kinds of fact the user never mentioned (kind "unknown", answer "unknown")
    users.json                the users, their split and facts
    general_chat.jsonl        real instruction conversations ({"messages"}) to mix into training (general ability)
"""

from __future__ import annotations

import argparse
import os
import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from lib.core.files import write_json, write_jsonl
from lib.memory.facts import InventedWords

UNKNOWN = "unknown"

# kind of fact: (memory entry, ways a user states it, ways a user later changes it, questions)
# {v} is the value. Statements are casual; questions are asked by the user about themselves.
KINDS = {
    "pet": ("The user's dog is called {v}.",
            ["btw my dog {v} chewed my shoes again today", "I have to walk my dog {v} soon, he gets restless",
             "sorry, my dog {v} was barking at the mailman"],
            [],
            ["What is my dog called?", "What's the name of my dog?"]),
    "home_town": ("The user lives in {v}.",
                  ["the weather here in {v} has been awful all week", "I live in {v}, it's a small place",
                   "there's a new cafe opening in {v}, where I live"],
                  ["big news: we just moved, we live in {v} now", "we finally moved house, I'm living in {v} now"],
                  ["Which town do I live in?", "Where do I live?"]),
    "job": ("The user works as a {v}.",
            ["work was rough today, being a {v} is tiring", "I've been a {v} for six years now",
             "as a {v} I barely get weekends off"],
            ["I quit my old job! I'm working as a {v} now", "I changed careers, I'm a {v} now"],
            ["What is my job?", "What do I do for a living?"]),
    "sister": ("The user's sister is called {v}.",
               ["my sister {v} is visiting this weekend", "I talked to my sister {v} on the phone for hours",
                "my sister {v} just had her birthday"],
               [],
               ["What is my sister's name?", "What's my sister called?"]),
    "allergy": ("The user is allergic to {v}.",
                ["I can't eat that, I'm allergic to {v}", "ugh, my allergy to {v} is acting up again",
                 "I have to check every menu because I'm allergic to {v}"],
                [],
                ["What am I allergic to?", "Which allergy do I have?"]),
    "hobby": ("The user's hobby is {v}.",
              ["I spent the whole afternoon on {v}, my favourite hobby", "my hobby is {v}, I do it every weekend",
               "I've gotten really into {v} lately"],
              ["I gave up my old hobby, now I'm all about {v}"],
              ["What is my hobby?", "What do I like to do in my free time?"]),
    "food": ("The user's favourite food is {v}.",
             ["I could eat {v} every day, it's my favourite", "my favourite food? definitely {v}",
              "I made {v} for dinner, my favourite"],
             [],
             ["What is my favourite food?", "Which food do I like best?"]),
    "car": ("The user drives a {v}.",
            ["my {v} broke down on the highway again", "I drive a {v}, it's old but reliable",
             "I took my {v} to the car wash"],
            ["I sold my old car and bought a {v}"],
            ["What car do I drive?", "Which car do I have?"]),
    "partner": ("The user's partner is called {v}.",
                ["my partner {v} and I are going to the movies tonight", "{v}, my partner, cooked dinner for me",
                 "I'm planning a surprise for my partner {v}"],
                [],
                ["What is my partner's name?", "Who is my partner?"]),
    "employer": ("The user works for {v}.",
                 ["my company, {v}, is having layoffs", "I work for {v} and the office is freezing",
                  "the team at {v}, where I work, is great"],
                 ["I switched companies, I work for {v} now"],
                 ["Which company do I work for?", "Who is my employer?"]),
    "sport": ("The user plays {v}.",
              ["I have {v} practice tonight", "I play {v} twice a week", "I hurt my knee playing {v}"],
              [],
              ["Which sport do I play?", "What sport do I do?"]),
    "band": ("The user's favourite band is {v}.",
             ["I've had {v} on repeat all day, best band ever", "my favourite band {v} is touring soon",
              "I got tickets to see {v}, my favourite band"],
             [],
             ["What is my favourite band?", "Which band do I like most?"]),
}

# Values that are not invented words: disjoint lists for train and test users.
REAL_VALUES = {
    "job": (["nurse", "teacher", "plumber", "accountant", "chef", "librarian", "pilot", "dentist", "carpenter",
             "pharmacist", "firefighter", "mechanic"],
            ["geologist", "translator", "baker", "electrician", "veterinarian", "architect", "tailor", "surveyor"]),
    "allergy": (["peanuts", "shellfish", "cats", "pollen", "dust", "gluten", "eggs", "penicillin"],
                ["sesame", "latex", "bee stings", "soy", "mustard", "kiwi"]),
    "hobby": (["knitting", "painting", "gardening", "chess", "photography", "baking", "birdwatching", "pottery"],
              ["origami", "woodcarving", "calligraphy", "beekeeping", "juggling", "fencing"]),
    "food": (["lasagna", "sushi", "tacos", "ramen", "curry", "pizza", "pancakes", "dumplings"],
             ["paella", "goulash", "falafel", "risotto", "pierogi", "moussaka"]),
    "sport": (["tennis", "basketball", "volleyball", "badminton", "rugby", "hockey", "golf", "squash"],
              ["lacrosse", "handball", "curling", "water polo", "cricket", "archery"]),
}
INVENTED = {"pet", "home_town", "sister", "car", "partner", "employer", "band"}
FACTS_PER_USER = 10
CONVERSATIONS_PER_USER = 4
ACKS = ["Oh nice, thanks for telling me!", "Got it.", "That sounds like a lot!", "Ha, I see.", "Good to know.",
        "Oh really? Tell me more.", "I'll keep that in mind.", "Wow, okay!"]

# Small-talk turns that could state a personal fact of their own are dropped (they would be facts the generator
# does not know about, and extraction would be scored wrong for finding them).
_PERSONAL = re.compile(
    r"\b(i|i'm|im|i've|ive|i am|my|mine|me|we|our|us|we're)\b|\b(live|work|job|born|name|called|allergic|dog|cat|"
    r"sister|brother|wife|husband|partner|girlfriend|boyfriend|married|kids?|car)\b", re.IGNORECASE)


@dataclass
class User:
    user_id: str
    split: str
    facts: dict[str, str]  # attribute -> first value
    updates: dict[str, str] = field(default_factory=dict)  # attribute -> later value


def small_talk(seed: int, count: int) -> list[tuple[str, str]]:
    """``count`` (user line, assistant line) pairs of real small talk from the Chit-Chat Challenge conversations,
    with no line that could state a personal fact."""
    import chitchat_dataset

    rng = random.Random(seed)
    pairs = []
    for conversation in chitchat_dataset.Dataset().values():
        turns = [" ".join(u["text"] for u in message).strip() for message in conversation["messages"]]
        for a, b in zip(turns[::2], turns[1::2]):
            if 3 <= len(a.split()) <= 25 and 2 <= len(b.split()) <= 25 and not _PERSONAL.search(a + " " + b):
                pairs.append((a, b))
    rng.shuffle(pairs)
    if len(pairs) < count:
        raise SystemExit(f"Only {len(pairs)} small-talk pairs pass the filter, {count} needed; use fewer --users.")
    return pairs[:count]


def make_users(n: int, seed: int, test_fraction: float) -> list[User]:
    rng = random.Random(seed)
    words = InventedWords(rng)
    n_test = max(1, round(n * test_fraction))
    users = []
    for i in range(n):
        split = "test" if i >= n - n_test else "train"
        kinds = rng.sample(sorted(KINDS), FACTS_PER_USER)
        facts = {k: value(k, split, rng, words) for k in kinds}
        updates = {}
        changeable = [k for k in kinds if KINDS[k][2]]
        if changeable and rng.random() < 0.4:
            k = rng.choice(changeable)
            while (new := value(k, split, rng, words)) == facts[k]:
                pass
            updates[k] = new
        users.append(User(f"u{i:04d}", split, facts, updates))
    return users


def value(kind: str, split: str, rng: random.Random, words: InventedWords) -> str:
    if kind in INVENTED:
        word = words.word()
        return {"employer": f"{word} Labs", "band": f"The {word}s"}.get(kind, word)
    train, test = REAL_VALUES[kind]
    return rng.choice(test if split == "test" else train)


def build(output_dir: str, users_count: int = 120, seed: int = 0, test_fraction: float = 0.2,
          general_rows: int = 1000, hold_back: float = 0.0) -> dict[str, int]:
    """Write the logs, facts, questions and users; return the row count of each file.

    ``hold_back`` moves the newest share of the conversations from ``logs/`` to ``later/``; everything else, facts and
    questions included, is what the same seed writes without it.
    """
    if users_count < 2:
        raise SystemExit(f"--users must be at least 2, got {users_count}.")
    if not 0 <= hold_back < 1:
        raise SystemExit(f"--hold_back must lie in [0, 1), got {hold_back}.")
    users = make_users(users_count, seed, test_fraction)
    rng = random.Random(seed + 1)
    talk = iter(small_talk(seed + 2, users_count * CONVERSATIONS_PER_USER * 6))
    start = datetime(2025, 1, 6, 9, 0)
    conversations, facts, questions = [], [], {"train": [], "test": []}
    for user in users:
        # Facts go to conversations 0-2; an update always comes in the last conversation.
        placed: list[list[tuple[str, str, bool]]] = [[] for _ in range(CONVERSATIONS_PER_USER)]
        for kind, v in user.facts.items():
            placed[rng.randrange(CONVERSATIONS_PER_USER - 1)].append((kind, v, False))
        for kind, v in user.updates.items():
            placed[-1].append((kind, v, True))
        day = start + timedelta(days=rng.randrange(30))
        for c, stated in enumerate(placed):
            day += timedelta(days=rng.randint(3, 40), minutes=rng.randrange(600))
            cid = f"{user.user_id}-c{c}"
            lines = [("talk", *next(talk)) for _ in range(rng.randint(2, 4))]
            for kind, v, is_update in stated:
                lines.insert(rng.randrange(len(lines) + 1), ("fact", kind, v, is_update))
            messages = []
            for line in lines:
                if line[0] == "talk":
                    messages += [{"role": "user", "content": line[1]}, {"role": "assistant", "content": line[2]}]
                    continue
                _, kind, v, is_update = line
                text = rng.choice(KINDS[kind][2] if is_update else KINDS[kind][1]).format(v=v)
                messages += [{"role": "user", "content": text[0].upper() + text[1:]},
                             {"role": "assistant", "content": rng.choice(ACKS)}]
                facts.append({"user_id": user.user_id, "attribute": kind, "value": v,
                              "memory": KINDS[kind][0].format(v=v), "conversation_id": cid,
                              "timestamp": day.isoformat() + "Z", "current": is_update or kind not in user.updates})
            conversations.append({"conversation_id": cid, "user_id": user.user_id,
                                  "timestamp": day.isoformat() + "Z", "messages": messages})
        for kind in user.facts:
            answer = user.updates.get(kind, user.facts[kind])
            for question in KINDS[kind][3]:
                questions[user.split].append({
                    "user_id": user.user_id, "question": question, "answer": answer,
                    "memory": KINDS[kind][0].format(v=answer), "attribute": kind,
                    "kind": "updated" if kind in user.updates else "fact"})
        for kind in rng.sample(sorted(set(KINDS) - set(user.facts)), 2):
            questions[user.split].append({"user_id": user.user_id, "question": rng.choice(KINDS[kind][3]),
                                          "answer": UNKNOWN, "memory": None, "attribute": kind, "kind": UNKNOWN})
    from lib.memory.facts import general_conversations

    by_time = sorted(range(len(conversations)), key=lambda i: (conversations[i]["timestamp"], i))
    later = set(by_time[len(by_time) - round(len(by_time) * hold_back):]) if hold_back else set()
    files = {"logs/conversations.jsonl": [c for i, c in enumerate(conversations) if i not in later]}
    if later:
        files["later/conversations.jsonl"] = [c for i, c in enumerate(conversations) if i in later]
    files |= {"facts.jsonl": facts,
             "questions_train.jsonl": questions["train"], "questions_test.jsonl": questions["test"],
             "general_chat.jsonl": [{"messages": m} for m in general_conversations(general_rows, seed)]}
    for name, rows in files.items():
        os.makedirs(os.path.dirname(os.path.join(output_dir, name)), exist_ok=True)
        write_jsonl(os.path.join(output_dir, name), rows)
    write_json(os.path.join(output_dir, "users.json"),
               [{"user_id": u.user_id, "split": u.split, "facts": u.facts, "updates": u.updates} for u in users])
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder for the logs, facts and questions.")
    parser.add_argument("--users", type=int, default=120, help="Number of fictional users (10 facts each).")
    parser.add_argument("--seed", type=int, default=0, help="Everything generated follows from this seed.")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="Share of users kept for testing.")
    parser.add_argument("--hold_back", type=float, default=0.0,
                        help="Share of the conversations, the newest, written to later/ instead of logs/: copy them "
                             "into logs/ to measure an incremental rerun (e.g. 0.1).")
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        raise SystemExit(f"--test_fraction must lie between 0 and 1, got {args.test_fraction}.")
    counts = build(args.output_dir, args.users, args.seed, args.test_fraction, hold_back=args.hold_back)
    print(", ".join(f"{n} rows to {os.path.join(args.output_dir, name)}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
