"""Ask a trained recall model a question as one of its users.

    python -m lib.recall.ask outputs/recall --user_id u0042 "What is my dog called?" "Where do I live?"
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="Output folder of train_memory.py --memory_type recall.")
    parser.add_argument("questions", nargs="+", help="Questions, as the user would ask them.")
    parser.add_argument("--user_id", required=True, help="Whose memories to search (only theirs are read).")
    parser.add_argument("--top_k", type=int, default=None, help="Memories per question (default: the run's).")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="Longest answer in tokens.")
    parser.add_argument("--show_memories", action="store_true",
                        help="Also print the whole answer and the memories it was given.")
    args = parser.parse_args(argv)

    from lib.recall.answer import RecallAssistant

    assistant = RecallAssistant(args.model_dir, top_k=args.top_k)
    results = assistant.answer_many(args.questions, [args.user_id] * len(args.questions),
                                    max_new_tokens=args.max_new_tokens)
    for question, result in zip(args.questions, results):
        print(f"Q: {question}\nA: {result['answer']}", flush=True)
        if args.show_memories:
            print(f"   (said: {result['said']!r})", flush=True)
            for score, text in result["memories"]:
                print(f"   recalled ({score:.3f}): {text}", flush=True)
    return results


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
