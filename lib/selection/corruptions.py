"""Synthetic negatives: seeded corrupted copies of good rows (text or chat), the garbage the routers learn to spot."""

from __future__ import annotations

import random
from typing import Callable

_NOISE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789#@%&*!?~^"


def _shuffle(text: str, other: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _noise(text: str, other: str, rng: random.Random) -> str:
    # Replace about a third of the characters: still text-shaped, no longer language.
    return "".join(rng.choice(_NOISE_CHARS) if not c.isspace() and rng.random() < 0.35 else c for c in text)


def _truncate(text: str, other: str, rng: random.Random) -> str:
    words = text.split()
    keep = max(1, int(len(words) * rng.uniform(0.05, 0.25)))
    return " ".join(words[:keep])


def _repeat(text: str, other: str, rng: random.Random) -> str:
    words = text.split()
    span = max(1, min(len(words), rng.randint(2, 6)))
    start = rng.randrange(0, max(1, len(words) - span + 1))
    phrase = words[start:start + span]
    reps = max(3, len(words) // max(1, span))
    return " ".join(phrase * reps)


def _mismatch(text: str, other: str, rng: random.Random) -> str:
    # The first half of one row glued to the second half of an unrelated row.
    a, b = text.split(), other.split()
    return " ".join(a[: max(1, len(a) // 2)] + b[len(b) // 2:])


CORRUPTIONS: dict[str, Callable[[str, str, random.Random], str]] = {
    "shuffle": _shuffle,
    "noise": _noise,
    "truncate": _truncate,
    "repeat": _repeat,
    "mismatch": _mismatch,
}


def corrupt_text(text: str, other: str, kind: str, rng: random.Random) -> str:
    return CORRUPTIONS[kind](text, other, rng)


def corrupt_messages(messages: list[dict], other: list[dict], kind: str, rng: random.Random) -> list[dict]:
    """Corrupt the assistant turns; ``mismatch`` answers with another conversation's assistant turns."""
    other_answers = [m["content"] for m in other if m["role"] == "assistant"] or [
        m["content"] for m in other
    ]
    out, k = [], 0
    targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"] or [len(messages) - 1]
    for i, message in enumerate(messages):
        if i in targets:
            if kind == "mismatch":
                content = other_answers[k % len(other_answers)]
                k += 1
            else:
                content = corrupt_text(message["content"], "", kind, rng)
            message = {**message, "content": content}
        out.append(message)
    return out


def synthetic_negatives(items: list, kinds: list[str], ratio: float, seed: int, chat: bool) -> list:
    """``round(ratio * len(items))`` corrupted copies of ``items`` (texts or message lists), seeded.

    Corruption kinds cycle so every kind is represented; the partner row of ``mismatch`` is another row.
    """
    rng = random.Random(seed)
    n = round(ratio * len(items))
    out = []
    for i in range(n):
        j = rng.randrange(len(items))
        other = items[(j + 1 + rng.randrange(max(1, len(items) - 1))) % len(items)] if len(items) > 1 else items[j]
        kind = kinds[i % len(kinds)]
        if chat:
            out.append(corrupt_messages(items[j], other, kind, rng))
        else:
            out.append(corrupt_text(items[j], other, kind, rng))
    return out

