"""train_memory.py --memory_type recall with a stand-in extractor that turns every user message with "my" into an
entry (the tiny random test models write none), so a multi-process test can check how extraction is shared."""

import sys

from lib.recall import extraction


def parrot(model, tokenizer, prompts, **kwargs):
    said = [tokenizer.decode(p).split("user\n")[-1].split("<|im_end|>")[0] for p in prompts]
    texts = [f"The user said: {s}" if " my " in f" {s.lower()} " else "NONE" for s in said]
    return texts, [0.0] * len(texts)  # as sure as can be


if __name__ == "__main__":
    extraction.generate_scored = parrot
    from lib.core.errors import run_main
    from train_memory import main

    run_main(main, sys.argv[1:])
