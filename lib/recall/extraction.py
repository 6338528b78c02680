"""Memory entries from chat logs: a model rewrites each user message as a fact about the user, or NONE.

One prompt per user message (a small model does far better on one message than on a whole conversation), with
generic examples; the first line of the answer is parsed into an entry ("The user's dog is called Rex."). A word of
the entry that is not in the message but close to one of its words is a misspelt copy of it and takes the message's
spelling ("Trelor" for "Tralor": a small model copies rare names badly). Three checks keep what a small extractor
invents out of memory: an entry must start with "The user", every content word of it must appear in the message it
came from (a shared 4-letter stem is enough: "lives" / "live"; a past form grounds its present: "took" / "takes"),
and optionally the extractor's mean log-probability of the entry's tokens must reach a floor (it is less sure of
what it invents); an entry of frame words alone ("The user lives in for.", "The user loves it.") says nothing. An
entry that leaves out a name its message gives ("My partner Lastos and I are going to the movies" -> "The user is
going to the movies.") lost what the message was about: the extractor is asked once more with its answer begun as
"The user's", and the new entry replaces it when it holds the names. How entries of the same user are deduplicated
and how a later one replaces an earlier one: ``lib.recall.updates``.
"""

from __future__ import annotations

import copy
import difflib
import re

import torch

from lib.core.data import PadCollator

SYSTEM = ("You turn a chat message into a fact about the user, or NONE. Write the fact as one short sentence "
          "starting with 'The user'. If the message says nothing about the user's own life, write NONE.")
# Generic examples, facts and small talk in turn; all but the last are about kinds of fact the project's chat
# generator never uses (its test users' facts are not in them).
SHOTS = [("my brother Sam is flying in from Oslo tomorrow", "The user's brother is called Sam."),
         ("my son Tom starts school tomorrow, so nervous", "The user's son is called Tom."),
         ("did you see the game last night? crazy ending", "NONE"),
         ("I'm vegetarian so I'll skip the burgers", "The user is vegetarian."),
         ("hey how's it going?", "NONE"),
         ("my cat Mila knocked my coffee over again", "The user's cat is called Mila."),
         ("what's the capital of Peru?", "NONE"),
         ("I speak Greek at home with my parents", "The user speaks Greek."),
         ("haha yeah, that's so true", "NONE"),
         ("my favourite colour? green, always", "The user's favourite colour is green."),
         ("ugh, the bus to Milford, where I live, was late again", "The user lives in Milford.")]
# Words an entry may use without the message using them: grammar and the usual relation verbs.
FRAME_WORDS = set("""the user user's users is are was were be been has have had a an of to in at for on and or with
their they them his her its it that this who which as by from called named name lives live works work likes like
loves love enjoys enjoy plays play drives drive owns own favourite favorite does do not no""".split())
_WORD = re.compile(r"[\w']+")
# Past forms that share no stem with the present an entry writes ("I took my Hafas to the car wash" -> "The user
# takes their Hafas to the car wash."): a message's past form also grounds its present.
IRREGULAR_PAST = {"ate": "eat", "became": "become", "began": "begin", "bought": "buy", "brought": "bring",
                  "built": "build", "caught": "catch", "chose": "choose", "drew": "draw", "drove": "drive",
                  "felt": "feel", "flew": "fly", "found": "find", "gave": "give", "got": "get", "grew": "grow",
                  "kept": "keep", "knew": "know", "left": "leave", "lost": "lose", "made": "make", "met": "meet",
                  "ran": "run", "rode": "ride", "said": "say", "sang": "sing", "saw": "see", "sold": "sell",
                  "sent": "send", "spent": "spend", "swam": "swim", "taught": "teach", "thought": "think",
                  "told": "tell", "took": "take", "went": "go", "won": "win", "wore": "wear", "wrote": "write"}


# The start of the answer when the extractor is asked again for an entry that left out the message's names.
NAME_LEAD = "The user's"


def names(message: str) -> list[str]:
    """The capitalised words of ``message`` after its first word ("I" forms aside): the names it gives."""
    found = _WORD.findall(message)
    return [w for w in found[1:] if w[0].isupper() and w != "I" and not w.startswith("I'")]


def holds_names(entry: str, message: str) -> bool:
    return all(name.lower() in words(entry) for name in names(message))


def _instructions() -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}]
    for said, fact in SHOTS:
        messages += [{"role": "user", "content": said}, {"role": "assistant", "content": fact}]
    return messages


def extraction_prompt(tokenizer, message: str) -> list[int]:
    messages = _instructions() + [{"role": "user", "content": message}]
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


def shared_prefix(tokenizer) -> list[int]:
    """The tokens every extraction prompt starts with (instructions and examples)."""
    return tokenizer.apply_chat_template(_instructions(), tokenize=True, return_dict=False)


def words(text: str) -> list[str]:
    return [w.strip("'") for w in _WORD.findall(text.lower())]


def _said_in(word: str, said: set[str], stems: set[str]) -> bool:
    """``word`` is a frame word or in the message (the same word, the same first four letters, or the start of a
    word of the message: "cat" / "cats")."""
    return (word in FRAME_WORDS or word in said or (len(word) >= 4 and word[:4] in stems)
            or (len(word) >= 3 and any(w.startswith(word) for w in said)))


def message_words(message: str) -> set[str]:
    """The words of ``message``, with the present of each irregular past form."""
    said = set(words(message))
    return said | {IRREGULAR_PAST[w] for w in said if w in IRREGULAR_PAST}


def grounded(entry: str, message: str) -> bool:
    """Every content word of ``entry`` appears in ``message``."""
    said = message_words(message)
    stems = {w[:4] for w in said if len(w) >= 4}
    return all(_said_in(word, said, stems) for word in words(entry))


def respell(entry: str, message: str, cutoff: float = 0.6) -> str:
    """``entry`` with each word that is not in ``message`` but close to one of its words (difflib ratio >=
    ``cutoff``) spelt as in the message: "The user's dog is called Trelor." for "my dog Tralor" -> "... Tralor.".
    Capitalised words (names) count as in the message only when spelt alike."""
    spelt = {w.lower(): w for w in _WORD.findall(message)}
    said = {w.strip("'") for w in spelt}
    stems = {w[:4] for w in said if len(w) >= 4}

    def fix(match: re.Match) -> str:
        word = match.group(0)
        bare = word.lower().strip("'")
        # A name must be said as it is ("Daburs" shares a stem with "Dabuss" but is not its name).
        if bare in said or bare in FRAME_WORDS or (not word[0].isupper() and _said_in(bare, said, stems)):
            return word
        close = difflib.get_close_matches(word.lower(), list(spelt), n=1, cutoff=cutoff)
        return spelt[close[0]] if close else word
    return _WORD.sub(fix, entry)


def parse_entry(generated: str, message: str, *, check_grounding: bool = True) -> str | None:
    """The entry in an extractor's answer, or None (NONE, not a fact about the user, or not grounded); with
    ``check_grounding``, misspelt copies of the message's words are respelt first."""
    line = generated.strip().split("\n")[0].strip().strip('"').strip()
    if check_grounding:
        line = respell(line, message)
    if not line.lower().startswith("the user") or "none" == line.lower().strip(". "):
        return None
    line = re.sub(r"\s+", " ", line).rstrip(" ,;:")
    if not line.endswith((".", "!", "?")):
        line += "."
    said = words(line)
    if len(said) < 4 or all(word in FRAME_WORDS for word in said):   # "The user lives in for." says nothing
        return None
    if check_grounding and not grounded(line, message):
        return None
    return line


def generate_texts(model, tokenizer, prompts: list[list[int]], **kwargs) -> list[str]:
    """Greedy continuations of token-id prompts (``generate_scored``'s texts)."""
    return generate_scored(model, tokenizer, prompts, **kwargs)[0]


@torch.no_grad()
def generate_scored(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                    prefix: list[int] | None = None, progress=None) -> tuple[list[str], list[float]]:
    """Greedy continuations of token-id prompts, batched longest first, decoded; each ends at its first newline.
    Also the mean log-probability the model gave each continuation's tokens (its confidence).

    With ``prefix`` (tokens every prompt starts with), the prefix is read once and its KV cache copied into every
    batch, so only each prompt's own tokens are read again: with the extraction examples that is most of a prompt.
    The rest of each prompt is left-padded after the prefix (the padding is masked out)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if prefix and not all(p[:len(prefix)] == prefix for p in prompts):
        prefix = None
    cache = None
    if prefix:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prefix], device=device), cache=cache, use_cache=True)
    cut = len(prefix) if prefix else 0
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    confidence: list[float] = [0.0] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": prompts[i][cut:], "attention_mask": [1] * (len(prompts[i]) - cut)}
                         for i in chunk])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        kwargs = {}
        if cache is not None:
            rows = copy.deepcopy(cache)
            rows.batch_repeat_interleave(len(chunk))
            ids = torch.cat([torch.tensor([prefix] * len(chunk)), ids], 1)
            mask = torch.cat([torch.ones(len(chunk), cut, dtype=mask.dtype), mask], 1)
            kwargs["cache"] = rows
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, stop_strings=["\n"], tokenizer=tokenizer,
                                   output_scores=True, return_dict_in_generate=True, **kwargs)
        new = generated.sequences[:, ids.shape[1]:]
        logprobs = torch.stack([step.float().log_softmax(-1).gather(-1, new[:, t:t + 1])[:, 0]
                                for t, step in enumerate(generated.scores)], 1)  # step by step: no vocab-wide copy
        for row, i in enumerate(chunk):
            # A row that stopped early is filled with padding after its stop.
            padding = (new[row] == tokenizer.pad_token_id).nonzero()
            written = max(1, int(padding[0]) if len(padding) else len(new[row]))
            out[i] = tokenizer.decode(new[row], skip_special_tokens=True)
            confidence[i] = logprobs[row, :written].mean().item()
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return out, confidence


def extract_entries(model, tokenizer, conversations: list[dict], *, batch_size: int = 16, max_new_tokens: int = 24,
                    check_grounding: bool = True, min_logprob: float | None = None, progress=None
                    ) -> tuple[list[dict], int]:
    """Entries ``{"user_id", "text", "conversation_id", "timestamp", "message"}`` from the user messages of
    ``conversations`` (in conversation order), and the number of messages read. With ``min_logprob``, an answer
    whose tokens the extractor gave a lower mean log-probability is dropped."""
    said = [(c, m["content"]) for c in conversations for m in c["messages"]
            if m["role"] == "user" and m["content"].strip()]
    prompts = [extraction_prompt(tokenizer, text) for _, text in said]
    prefix = shared_prefix(tokenizer)
    generated, confidence = generate_scored(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, prefix=prefix, progress=progress)

    def sure_enough(sure: float) -> bool:
        return min_logprob is None or sure >= min_logprob

    texts = [parse_entry(answer, message, check_grounding=check_grounding)
             for (_, message), answer in zip(said, generated)]
    again = [i for i, text in enumerate(texts) if text is not None and not holds_names(text, said[i][1])]
    if again:
        lead = tokenizer(NAME_LEAD, add_special_tokens=False)["input_ids"]
        more, more_sure = generate_scored(model, tokenizer, [prompts[i] + lead for i in again],
                                          max_new_tokens=max_new_tokens, batch_size=batch_size, prefix=prefix)
        for i, answer, sure in zip(again, more, more_sure):
            text = parse_entry(NAME_LEAD + answer, said[i][1], check_grounding=check_grounding)
            if text is not None and holds_names(text, said[i][1]) and sure_enough(sure):
                texts[i], confidence[i] = text, sure
    entries = []
    for (conversation, message), text, sure in zip(said, texts, confidence):
        if text is not None and sure_enough(sure):
            entries.append({"user_id": conversation["user_id"], "text": text,
                            "conversation_id": conversation["conversation_id"],
                            "timestamp": conversation["timestamp"], "message": message})
    return entries, len(said)
