"""A user's memory as new entries arrive: duplicates are dropped and a later fact replaces the earlier one it changes.

Users' facts change ("we moved, we live in Talmor now"); the later entry replaces the earlier one, which goes to the
history. A later entry replaces an earlier one of the same user when its message (where known) says that something
changed ("now", "moved", "switched", "quit", ...: a small extractor also turns small talk into facts, "Or people in
Greece where ..." -> "The user lives in Greece.", and a second value stated without such a word is more often that
than a change; both then stay) and

- both state the same single-valued relation, in any of its usual wordings, with different values: where the user
  lives, their job, their employer, their car (``RELATIONS``: "The user works for Stimar Labs." replaces "The user's
  company is called Sivakrin Labs."), or one thing of theirs ("The user's hobby is fencing." replaces "The user's
  favourite hobby is juggling."; a name is its own relation: "The user's brother is called Sam." and "The user's
  brother is visiting." both stay);
- or one of them gives the user a role ("The user is a geologist.", "... has been a baker for six years.") and the
  other a role or a job ("I changed careers, I'm a geologist now"); a role needs the message: "is a nurse" and "is a
  potter" may be a job and a hobby;
- or, for relations not known above, they share their first four or more words, one of them saying what the fact is
  about, then differ ("The user's sister lives in Oslo." / "... in Rome."), unless the shared words name a relation
  that holds several values at once ("The user is allergic to sesame." and "... to latex." both stay).

This compares wording, not meaning: an update worded in a way these rules do not know, or told without a word of
change, stays beside the earlier fact (both are retrieved, and the model reads both).
"""

from __future__ import annotations

import re

from lib.recall.extraction import words

_AN = r"(?:(?:a|an|the) )?"
# Single-valued relations and their usual wordings, matched against an entry's lower-cased words; group 1 is the value.
RELATIONS = {
    "home": [r"the user (?:now )?(?:lives|is living|has moved|moved|is moving) (?:in|to) (.+)",
             r"the user's (?:home town|hometown|town|city|home) is (?:called |named |in )?(.+)"],
    "employer": [r"the user (?:now )?(?:works|is working|has worked) (?:for|at) (.+)",
                 r"the user's (?:company|employer|workplace) is (?:called |named )?(.+)"],
    "job": [rf"the user (?:now )?(?:works|is working) as {_AN}(.+)",
            rf"the user's (?:job|occupation|profession|career) is (?:called )?{_AN}(.+)"],
    "car": [rf"the user (?:now )?drives {_AN}(.+)", rf"the user's car is (?:called |named )?{_AN}(.+)"],
}
_RELATIONS = [(name, re.compile(pattern)) for name, patterns in RELATIONS.items() for pattern in patterns]
# One thing of the user's: "the user's favourite band is ..."; "is called" makes it the thing's name.
_THING = re.compile(r"the user's (?:favourite |favorite |current )?(\w+) is (called |named )?(.+)")
# A role: a job, or not ("the user is a nurse", "the user has been a baker for six years").
_ROLE = re.compile(r"the user (?:is|has been) (?:now )?(?:a|an) (\w+)(?: now)?(?: for .+)?")
# Words with which a message says that something changed.
CHANGE_WORDS = re.compile(r"\b(now|new|anymore|no longer|moved|switched|changed|quit|sold|gave up|used to)\b")
_DURATION = re.compile(r"\bfor (?:\w+ ){1,3}now\b")
# Wording-rule words that say nothing of what a fact is about, and relations that hold several values at once.
GENERIC_WORDS = {"the", "user", "user's", "users", "is", "was", "a", "an", "has", "have", "had", "their", "been",
                 "being", "does", "do"}
MANY_VALUED = {"allergic", "likes", "loves", "enjoys", "speaks", "plays", "owns", "visits", "visited"}


def relation(text: str) -> tuple[str, str, bool] | None:
    """``(relation, value, is_role)`` of an entry whose relation is known, else None."""
    said = " ".join(words(text))
    for name, pattern in _RELATIONS:
        found = pattern.fullmatch(said)
        if found:
            return name, found.group(1), False
    found = _THING.fullmatch(said)
    if found:
        return f"{found.group(1)} {found.group(2) or ''}".strip(), found.group(3), False
    found = _ROLE.fullmatch(said)
    if found:
        return "job", found.group(1), True
    return None


def _different(a: str, b: str) -> bool:
    """Two values differ: neither starts with the other ("brovik" and "brovik with her dog" are one value)."""
    a, b = a.split(), b.split()
    shorter = min(len(a), len(b))
    return a[:shorter] != b[:shorter]


def _key(text: str) -> tuple[str, ...]:
    return tuple(words(text))


def contradicts(earlier: str, later: str, min_shared: int = 4) -> bool:
    """The wording rule: equal first ``min_shared`` or more words, one of them saying what the fact is about (not only
    "the user is a") and none a relation that holds several values, then different last words."""
    a, b = _key(earlier), _key(later)
    if a == b:
        return False
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    about = any(word not in GENERIC_WORDS for word in a[:shared])
    many = any(word in MANY_VALUED for word in a[:shared])
    return shared >= min_shared and about and not many and shared < len(a) and shared < len(b)


def says_changed(message: str) -> bool:
    """``message`` says that something changed ("we moved", "I'm a geologist now"; "for six years now" does not)."""
    return bool(CHANGE_WORDS.search(_DURATION.sub("", message.lower())))


def replaces(earlier: dict, later: dict) -> bool:
    """``later`` (an entry, with the ``message`` it came from when known) changes the fact ``earlier`` states."""
    message = later.get("message") or None
    if message is not None and not says_changed(message):
        return False
    old, new = relation(earlier["text"]), relation(later["text"])
    if old is None or new is None:
        return contradicts(earlier["text"], later["text"])
    if old[0] != new[0] or not _different(old[1], new[1]):
        return False
    return message is not None or not (old[2] or new[2])   # a role may be a hobby: it takes the user's word


def merge_entries(entries: list[dict], new: list[dict], dropped_conversations: set[str] = frozenset()
                  ) -> tuple[list[dict], list[dict]]:
    """The memory after ``new`` entries arrive: ``(entries, replaced)``.

    Entries of ``dropped_conversations`` (changed or re-read conversations) leave first; a new entry equal to one
    the user already has is a duplicate; a new entry that changes an earlier fact of the same user (``replaces``)
    replaces it (the earlier one is returned in ``replaced`` with ``replaced_by``). New entries are taken in time
    order."""
    kept = [dict(e) for e in entries if e["conversation_id"] not in dropped_conversations]
    replaced = []
    for entry in sorted(new, key=lambda e: (e["timestamp"], e["conversation_id"])):
        same_user = [e for e in kept if e["user_id"] == entry["user_id"]]
        if any(_key(e["text"]) == _key(entry["text"]) for e in same_user):
            continue
        for old in same_user:
            if old["timestamp"] <= entry["timestamp"] and replaces(old, entry):
                kept.remove(old)
                replaced.append({**old, "replaced_by": entry["text"], "replaced_at": entry["timestamp"]})
        kept.append(dict(entry))
    return kept, replaced
