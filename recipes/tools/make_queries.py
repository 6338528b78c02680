"""Writes train_queries.jsonl and heldout_queries.jsonl for tools.json (run from anywhere; deterministic).

Every query names one tool. "semantic" queries are settled by the task alone; "resource" queries name a task
that two tools do (a large and a small variant, one "group" in tools.json) and a resource wish that only one of
them meets. Training holds the hand-written queries below plus what the generic generator (lib/tools/queries.py)
writes from them: every pair's task phrasings with each resource wish in many phrasings (numbers with units,
comparatives, budgets, hardware, stakes, negations). Held-out queries use task phrasings and resource phrasings
that occur neither here nor in the generator.

    python recipes/tools/make_queries.py
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # this checkout's lib/

# family -> (large variant, small variant, train task phrasings, held-out task phrasings)
PAIRS = {
    "classify": ("vit-large-classifier", "mobilenet-classifier",
                 ["classify what is shown in this photo", "tell me which category this image belongs to",
                  "label this picture with an ImageNet class"],
                 ["identify the species of bird in my snapshot", "recognise what kind of object this image shows"]),
    "summarise": ("bart-large-summarizer", "distilled-summarizer",
                  ["summarise this long news article", "give me a short summary of these meeting notes",
                   "condense this report into a few sentences"],
                  ["boil this blog post down to its key points", "write a brief abstract of this document"]),
    "transcribe": ("whisper-large-asr", "whisper-tiny-asr",
                   ["transcribe this podcast episode", "turn this recorded interview into text",
                    "write down what is said in this audio clip"],
                   ["produce a transcript of this phone call", "convert this voice memo to written words"]),
    "detect": ("detr-object-detector", "yolo-nano-detector",
               ["find all the objects in this image and box them", "draw bounding boxes around the cars in this photo",
                "locate every person in this picture"],
               ["detect the pedestrians in this street scene", "mark where each item is on this shelf image"]),
    "sentiment": ("roberta-sentiment", "lexicon-sentiment",
                  ["is this product review positive or negative", "tell me the sentiment of this tweet",
                   "decide whether this comment is happy or angry"],
                  ["gauge the mood of these customer emails", "check if this movie review is favourable"]),
    "speak": ("hifi-tts", "lite-tts",
              ["read this paragraph aloud", "convert this text into spoken audio", "give this announcement a voice"],
              ["narrate this story as audio", "turn this message into speech"]),
    "paint": ("diffusion-xl-generator", "diffusion-turbo-generator",
              ["generate an image of a castle at sunset from my prompt", "draw a picture of a cat astronaut",
               "create an illustration from this text description"],
              ["render a poster of a futuristic city", "make artwork showing a dragon over mountains"]),
}
# resource wish -> which variant meets it
WISHES_TRAIN = {
    "small": ["as fast as possible", "with the lowest latency", "using very little memory", "as cheaply as possible",
              "on a phone with no GPU"],
    "large": ["with the highest accuracy", "with the best quality, cost is no issue", "as accurately as possible",
              "even if it needs a big GPU", "with top quality results"],
}
WISHES_HELDOUT = {
    "small": ["in under 20 milliseconds", "so that it fits in 1 GB of memory", "on a tight budget"],
    "large": ["where mistakes are very costly", "with state-of-the-art precision"],
}
SEMANTIC = {
    "bert-ner-tagger": (["find the people and companies named in this text", "tag the places and dates in this article",
                         "extract named entities from this paragraph"],
                        ["list every organisation mentioned in this press release", "pull out the person names in this letter"]),
    "document-qa-reader": (["answer my question about this PDF", "read this web page and tell me what it says about pricing",
                            "what does this manual say about warranty"],
                           ["look up the refund policy in this contract document", "ask a question about the attached report"]),
    "code-completion-model": (["finish this Python function for me", "suggest the next line of my JavaScript code",
                               "autocomplete this Java method"],
                              ["help me complete this half-written script", "propose code to fill in this loop body"]),
    "table-qa-model": (["what is the total of the sales column in this spreadsheet", "find the average price in this CSV table",
                        "look up the row for March in this table"],
                       ["which product has the highest revenue in this sheet", "sum the expenses listed in this table"]),
    "nllb-translator": (["translate this text from Swahili into Yoruba", "translate this Khmer sentence into English",
                         "translate my message into Amharic"],
                        ["render this Zulu proverb in Hausa", "translate this Lao notice into Burmese"]),
    "opus-mt-translator": (["translate this email from English into German", "translate this French menu into English",
                            "put this Spanish sentence into Italian"],
                           ["convert this English contract into French", "translate this German headline to English"]),
}


def queries(split: str) -> list[dict]:
    from lib.tools.data import load_tools
    from lib.tools.queries import generate

    wishes = WISHES_TRAIN if split == "train" else WISHES_HELDOUT
    rows = []
    for tool, (train, heldout) in SEMANTIC.items():
        for q in train if split == "train" else heldout:
            rows.append({"query": q[0].upper() + q[1:] + ".", "tool": tool, "kind": "semantic"})
    tasks = []
    for large, small, train, heldout in PAIRS.values():
        for q in train if split == "train" else heldout:
            tasks.append({"query": q[0].upper() + q[1:] + ".", "tool": large, "kind": "semantic"})
            for size, phrases in wishes.items():
                for w in phrases:
                    rows.append({"query": f"{q[0].upper() + q[1:]} {w}.", "tool": large if size == "large" else small,
                                 "kind": "resource"})
    if split == "heldout":
        return rows
    # a pair member's semantic example is a phrasing of the pair's task: the generator adds every wish to it
    return generate(load_tools(os.path.join(HERE, "tools.json")), rows + tasks, heldout_every=0)[0]


def main() -> None:
    from lib.core.files import write_jsonl

    names = {t["name"] for t in json.load(open(os.path.join(HERE, "tools.json"), encoding="utf-8"))}
    for split in ("train", "heldout"):
        rows = queries(split)
        assert {r["tool"] for r in rows} <= names
        write_jsonl(os.path.join(HERE, f"{split}_queries.jsonl"), rows)
        kinds = {k: sum(r["kind"] == k for r in rows) for k in ("semantic", "resource")}
        print(f"{split}: {len(rows)} queries {kinds}")


if __name__ == "__main__":
    main()
