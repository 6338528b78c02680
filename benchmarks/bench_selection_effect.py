#!/usr/bin/env python
r"""Does the selection matter? Train the target on the top, a random and the bottom share of one scored pool.

From select_data.py's scored file, take the top 30% by selection_score, a seeded random 30% and the bottom 30%
of the scored rows; LoRA-train the target model on each with the same recipe and epochs (train_target.py), once
per seed (the random share is drawn again for each seed); then measure each adapter's held-out loss on clean
conversations, its accuracy on in-distribution multiple-choice questions (the same sources as the pool, in no pool
file: data/indist_mc.jsonl, written with the pools; scored in the pool's chat format by default) and on lm-eval
tasks, next to the untouched base model. Accuracies are means over seeds with standard errors, and the
differences between subsets are paired by question and seed (below).

    make demo        # or any run of select_data.py; the pools also write data/indist_mc.jsonl
    python benchmarks/bench_selection_effect.py --scored outputs/selected/scored.jsonl --json
    python benchmarks/bench_selection_effect.py --quick --json   # one seed, 300 questions, shorter lm-eval
    # Only the source(s) the target model can answer at all, all of them in no pool file (866 SciQ questions):
    python -m lib.selection.pools --output_dir data/mc_all --format chat --train_rows 400 --heldout_rows 100 \
        --candidate_rows 500 --target_heldout_rows 60 --mc_rows 2598
    python benchmarks/bench_selection_effect.py --task_file data/mc_all/indist_mc.jsonl --task_sources sciq --json

Standard errors: for scores s[k][q] (seed k, question q) of one subset, or the differences of two subsets' scores
on the same question and seed, SE^2 = var_q(mean_k s[k][q]) / n + var_k(mean_q s[k][q]) / K: the spread over
questions plus the spread over training seeds (the second term needs K >= 2). Held-out losses: mean over seeds,
SE = std / sqrt(K).

The full run takes hours on a CPU, so every finished unit (the base model's evaluation, each subset and seed's
training and evaluation) is recorded in its folder (``unit.json``: its results and the run's settings, written last
and atomically). --resume reuses every unit recorded with the same settings (model, recipe, scored pool, held-out
and question files by content, limits, epochs) and runs the rest. A unit trained under the same settings but
evaluated on other questions, tasks or limits keeps its adapter and is only scored again; a unit trained under other
settings is refused in one sentence rather than mixed in. Without --resume every unit runs again.

With --json the last line printed is a JSON object with top_acc, random_acc and bottom_acc (mean accuracy over
--tasks), the in-distribution accuracies (``indist``), the held-out losses and the differences with their SEs.
"""

import argparse
import gc
import json
import math
import os
import random
import sys

# Run from anywhere: the scripts and lib/ of this checkout come first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBSETS = ("top", "random", "bottom")


def subsets(rows: list[dict], ratio: float, seed: int) -> dict[str, list[dict]]:
    """The top, a seeded random and the bottom ``ratio`` share of the pool, drawn from the rows with a score.

    Sized as select_data.py sizes its selection (``ratio`` of every row, at most the scored ones), so ``top`` is
    exactly what select_data.py keeps at ``--select_ratio ratio``: ties rank in file order and rows without a
    selection_score are in no subset. All three have the same size.
    """
    from lib.core.errors import DataError

    scored = [r for r in rows if r.get("selection_score") is not None]
    if not scored:
        raise DataError("The scored file has no row with a selection_score; score the pool with select_data.py first.")
    k = min(len(scored), max(1, round(ratio * len(rows))))
    ranked = sorted(range(len(scored)), key=lambda i: (-scored[i]["selection_score"], i))
    picked = sorted(random.Random(seed).sample(range(len(scored)), k))
    return {"top": [scored[i] for i in ranked[:k]], "random": [scored[i] for i in picked],
            "bottom": [scored[i] for i in ranked[-k:]]}


def _var(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0


def mean_se(scores: list[list[float]], minus: list[list[float]] | None = None) -> tuple[float, float]:
    """Mean and standard error of ``scores[k][q]`` (seed k, question q), or of ``scores - minus`` paired by seed
    and question: SE^2 = var_q(mean over seeds) / n + var_k(mean over questions) / K."""
    if minus is not None:
        scores = [[a - b for a, b in zip(s, m, strict=True)] for s, m in zip(scores, minus, strict=True)]
    seeds, n = len(scores), len(scores[0])
    per_question = [sum(s[q] for s in scores) / seeds for q in range(n)]
    per_seed = [sum(s) / n for s in scores]
    mean = sum(per_seed) / seeds
    return mean, math.sqrt(_var(per_question) / n + (_var(per_seed) / seeds if seeds > 1 else 0.0))


def chat_questions(rows: list[dict], tokenizer) -> list[dict]:
    """Multiple-choice rows as the pool's conversations ask and answer them: the prompt is the question in the
    model's chat template plus the replies' common opening ("The answer is"), each choice the rest of its reply
    (``{prompt, question, choices, answer}``, evaluate.py --task_file's prompted rows)."""
    from lib.core.errors import DataError

    out = []
    for i, row in enumerate(rows):
        chat = row.get("chat")
        if not chat or len(chat.get("replies", [])) != len(row["choices"]):
            raise DataError(f"question {i + 1} has no 'chat' form (user message and one reply per choice); use "
                            "--task_format plain, or rewrite the file with python -m lib.selection.pools.")
        opening = os.path.commonprefix(chat["replies"])
        opening = opening[:opening.rfind(" ") + 1] if " " in opening else ""
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": chat["user"]}], tokenize=False,
                                               add_generation_prompt=True) + opening.rstrip()
        out.append({"prompt": prompt, "question": row["question"], "answer": row["answer"],
                    "choices": [reply[len(opening):] for reply in chat["replies"]]})
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scored", default="outputs/selected/scored.jsonl", help="select_data.py's scored file.")
    parser.add_argument("--recipe", default="recipes/train_target_smollm2.yaml", help="train_target.py recipe.")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Target model.")
    parser.add_argument("--messages_field", default="messages", help="Chat column ('' for text rows).")
    parser.add_argument("--dataset_text_field", default="text", help="Text column when --messages_field is ''.")
    parser.add_argument("--heldout", default="data/target_heldout.jsonl", help="Clean rows for the held-out loss.")
    parser.add_argument("--task_file", default="data/indist_mc.jsonl",
                        help="In-distribution multiple-choice questions ('' for none).")
    parser.add_argument("--task_format", default="chat", choices=["chat", "plain"],
                        help="chat: asked and answered as the pool's conversations; plain: 'Question: ... Answer:'.")
    parser.add_argument("--task_limit", type=int, default=None,
                        help="Score N of --task_file, sources taking turns (each its first questions).")
    parser.add_argument("--task_sources", default="",
                        help="Only the questions of these sources (comma list of their 'source' field, e.g. sciq).")
    parser.add_argument("--ratio", type=float, default=0.3, help="Share of the pool in each subset.")
    parser.add_argument("--num_train_epochs", type=float, default=2, help="Epochs over each subset.")
    parser.add_argument("--max_steps", type=int, default=-1, help="Training steps instead of epochs (> 0).")
    parser.add_argument("--seeds", default="0,1", help="Training seeds (and draws of the random share).")
    parser.add_argument("--tasks", default="arc_easy,piqa", help="lm-eval tasks ('' for none).")
    parser.add_argument("--limit", type=float, default=200, help="lm-eval examples per task.")
    parser.add_argument("--quick", action="store_true",
                        help="One seed, 300 in-distribution questions (as --task_limit 300), lm-eval limit 100.")
    parser.add_argument("--output_dir", default="outputs/selection_effect")
    parser.add_argument("--resume", action="store_true",
                        help="Reuse the units (base evaluation, subset x seed) an earlier run with the same settings "
                             "finished in --output_dir.")
    parser.add_argument("--json", action="store_true", help="Print a JSON object as the last line.")
    args = parser.parse_args(argv)
    from lib.core.errors import UserError

    if args.quick:
        args.seeds, args.task_limit, args.limit = args.seeds.split(",")[0], args.task_limit or 300, 100
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not os.path.isfile(args.scored):
        raise UserError(f"--scored {args.scored} does not exist; run select_data.py first (its scored.jsonl).")
    if args.task_file and not os.path.isfile(args.task_file):
        raise UserError(f"--task_file {args.task_file} does not exist; write it with python -m lib.selection.pools "
                        "--format chat (indist_mc.jsonl), or pass --task_file ''.")
    if not seeds or not (tasks or args.task_file):
        raise UserError("Nothing to measure: give --seeds and --tasks or --task_file.")

    import importlib.util

    import train_target
    from lib.models.loading import load_tokenizer
    from lib.core.cache import file_digest
    from lib.core.files import write_json, write_jsonl
    from lib.selection.pools import by_source_in_turn

    # evaluate.py is a script whose name shadows the `evaluate` library: load it under another name.
    spec = importlib.util.spec_from_file_location(
        "sidekit_evaluate_script", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "evaluate.py"))
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    os.makedirs(args.output_dir, exist_ok=True)

    indist, sources = None, []
    if args.task_file:
        with open(args.task_file, encoding="utf-8") as f:
            questions = [json.loads(line) for line in f if line.strip()]
        wanted = {s.strip() for s in args.task_sources.split(",") if s.strip()}
        if wanted:
            found = sorted({str(q.get("source")) for q in questions})
            questions = [q for q in questions if q.get("source") in wanted]
            if not questions:
                raise UserError(f"--task_sources {args.task_sources} matches no question of {args.task_file} (its "
                                f"sources: {', '.join(found)}); name one of those.")
        questions = by_source_in_turn(questions, args.task_limit)
        sources = [q.get("source") for q in questions]
        if args.task_format == "chat":
            questions = chat_questions(questions, load_tokenizer(args.model))
        indist = os.path.join(args.output_dir, "indist.jsonl")
        write_jsonl(indist, questions)
    indist_task = "custom_indist"

    def scores(output_dir: str, *extra: str) -> dict[str, list[float]]:
        """Every question's score (--metric of samples.jsonl) per task, for the base model or an adapter."""
        run = "tuned" if "--adapter" in extra else "base"
        out: dict[str, list[float]] = {}
        calls = ([["--tasks", ",".join(tasks), "--limit", str(args.limit)]] if tasks else []) + \
            ([["--task_file", indist]] if indist else [])
        for i, call in enumerate(calls):
            report = evaluate_script.main(["--model_name_or_path", args.model, *call, "--log_samples",
                                           "--output_dir", os.path.join(output_dir, f"eval{i}"), *extra])
            for row in report["runs"][run]["samples"]:
                out.setdefault(row["task"], []).append(row["acc"])
        return out

    # What a unit's results depend on; a unit recorded under other settings is never reused.
    settings = {"model": args.model, "recipe": file_digest(args.recipe), "scored": file_digest(args.scored),
                "heldout": file_digest(args.heldout), "questions": file_digest(indist) if indist else None,
                "tasks": tasks, "limit": args.limit, "ratio": args.ratio, "num_train_epochs": args.num_train_epochs,
                "max_steps": args.max_steps, "field": args.messages_field or args.dataset_text_field}

    # Settings that only change the evaluation: a unit trained under the same other settings keeps its adapter.
    evaluation = ("questions", "tasks", "limit")

    def unit(folder: str, train, score) -> dict:
        """``train()``'s results (``{}`` for the base model) plus ``scores: score()`` for one unit; with --resume
        those recorded in ``folder/unit.json``, re-scored when only the evaluation settings changed."""
        record = os.path.join(folder, "unit.json")
        if args.resume and os.path.isfile(record):
            with open(record, encoding="utf-8") as f:
                saved = json.load(f)
            old = saved.get("settings", {})
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            if not changed:
                print(f"reusing {folder} (finished earlier with the same settings)", flush=True)
                return saved["result"]
            if any(k not in evaluation for k in changed):
                raise UserError(f"--resume: {record} was recorded with other settings ({', '.join(changed)}); "
                                "pass the same flags and files, or a new --output_dir.")
            print(f"re-scoring {folder}: trained earlier with the same settings, evaluated with other "
                  f"{', '.join(changed)}", flush=True)
            result = {**saved["result"], "scores": score()}
        else:
            result = {**train(), "scores": score()}
        write_json(record, {"settings": settings, "result": result})
        return result

    with open(args.scored, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    field = (["--messages_field", args.messages_field] if args.messages_field
             else ["--dataset_text_field", args.dataset_text_field])
    steps = ["--max_steps", str(args.max_steps)] if args.max_steps > 0 else \
        ["--num_train_epochs", str(args.num_train_epochs)]
    base_dir = os.path.join(args.output_dir, "base")
    os.makedirs(base_dir, exist_ok=True)
    base = unit(base_dir, dict, lambda: scores(base_dir))["scores"]
    runs: dict[str, list[dict]] = {name: [] for name in SUBSETS}
    for seed in seeds:
        for name, subset in subsets(rows, args.ratio, seed).items():
            out = os.path.join(args.output_dir, f"{name}-seed{seed}")

            def train(name=name, subset=subset, seed=seed, out=out) -> dict:
                data = os.path.join(args.output_dir, f"{name}-seed{seed}.jsonl")
                write_jsonl(data, subset)
                train_target.main([args.recipe, "--model_name_or_path", args.model, "--train_file", data, *field,
                                   "--validation_file", args.heldout, "--output_dir", out, "--overwrite_output_dir",
                                   *steps, "--seed", str(seed), "--eval_strategy", "no", "--save_strategy", "no",
                                   "--report_to", "none"])
                with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
                    state = json.load(f)
                labels = [r.get("label") for r in subset if r.get("label") is not None]
                result = {"seed": seed, "rows": len(subset),
                          "heldout_loss": [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h][-1],
                          "clean_share": sum(int(v) for v in labels) / len(labels) if labels else None,
                          "steps": state["global_step"]}
                gc.collect()
                return result

            runs[name].append(unit(out, train, lambda out=out: scores(out, "--adapter", out, "--skip_base")))

    # ---- the table --------------------------------------------------------------------------------------
    columns = ([indist_task] if indist else []) + tasks
    label = {indist_task: "in-dist", **{t: t for t in tasks}}
    summary: dict = {"tasks": tasks, "task_file": args.task_file or None, "task_format": args.task_format,
                     "indist_questions": len(base.get(indist_task, [])), "ratio": args.ratio, "seeds": seeds,
                     "num_train_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
                     "max_steps": args.max_steps if args.max_steps > 0 else None, "limit": args.limit}
    print(f"\nselection effect: {args.ratio:.0%} subsets of {args.scored}, "
          + (f"{args.max_steps} LoRA steps" if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs")
          + f", seeds {seeds}; in-distribution questions: {summary['indist_questions']} ({args.task_format}), "
          f"lm-eval limit {args.limit:g}; accuracy mean ± SE over questions and seeds")
    print(f"{'subset':<8}{'rows':>6}{'clean':>7}{'heldout loss':>18}" + "".join(f"{label[c]:>17}" for c in columns))

    def cell(value: float, se: float) -> str:
        return f"{value:.4f} ± {se:.4f}"

    print(f"{'base':<8}{0:>6}{'–':>7}{'–':>18}" + "".join(f"{cell(*mean_se([base[c]])):>17}" for c in columns))
    summary["base_per_task"] = {c: mean_se([base[c]])[0] for c in columns}
    for name in SUBSETS:
        rs = runs[name]
        losses = [r["heldout_loss"] for r in rs]
        loss = (sum(losses) / len(losses), math.sqrt(_var(losses) / len(losses)))
        clean = [r["clean_share"] for r in rs if r["clean_share"] is not None]
        acc = {c: mean_se([r["scores"][c] for r in rs]) for c in columns}
        print(f"{name:<8}{rs[0]['rows']:>6}" + (f"{sum(clean) / len(clean):>7.2f}" if clean else f"{'–':>7}")
              + f"{cell(*loss):>18}" + "".join(f"{cell(*acc[c]):>17}" for c in columns))
        summary[name] = {"rows": rs[0]["rows"], "clean_share": sum(clean) / len(clean) if clean else None,
                         "heldout_loss": loss[0], "heldout_loss_se": loss[1], "steps": rs[0]["steps"],
                         "per_seed": [{k: v for k, v in r.items() if k != "scores"} for r in rs],
                         "acc": {c: a[0] for c, a in acc.items()}, "acc_se": {c: a[1] for c, a in acc.items()}}
        summary[f"{name}_heldout_loss"] = loss[0]
        summary[f"{name}_per_task"] = {t: acc[t][0] for t in tasks}
        summary[f"{name}_acc"] = sum(acc[t][0] for t in tasks) / len(tasks) if tasks else None
        if indist:
            summary.setdefault("indist", {})[name] = acc[indist_task][0]
    summary["base_acc"] = sum(summary["base_per_task"][t] for t in tasks) / len(tasks) if tasks else None
    print("\ndifferences (paired by question and seed), mean ± SE:")
    summary["differences"] = {}
    for a, b in (("top", "random"), ("random", "bottom"), ("top", "bottom")):
        diff = {c: mean_se([r["scores"][c] for r in runs[a]], [r["scores"][c] for r in runs[b]]) for c in columns}
        dl = [x["heldout_loss"] - y["heldout_loss"] for x, y in zip(runs[a], runs[b], strict=True)]
        loss = (sum(dl) / len(dl), math.sqrt(_var(dl) / len(dl)))
        print(f"  {a} - {b}: heldout loss {loss[0]:+.4f} ± {loss[1]:.4f}; "
              + "; ".join(f"{label[c]} {d[0]:+.4f} ± {d[1]:.4f}" for c, d in diff.items()))
        summary["differences"][f"{a}-{b}"] = {"heldout_loss": loss, **{label[c]: d for c, d in diff.items()}}
    if len(set(sources)) > 1:
        # Sources differ in how much any training moves them; the mean over all questions can hide that.
        print("\nin-distribution accuracy by source (mean; top - random paired, ± SE):")
        summary["indist_by_source"] = {}
        for source in sorted(set(sources), key=str):
            idx = [i for i, s in enumerate(sources) if s == source]

            def part(score_lists: list[list[float]], idx=idx) -> list[list[float]]:
                return [[per_question[i] for i in idx] for per_question in score_lists]

            acc = {name: part([r["scores"][indist_task] for r in runs[name]]) for name in SUBSETS}
            row = {"questions": len(idx), "base": mean_se(part([base[indist_task]]))[0],
                   **{name: mean_se(acc[name])[0] for name in SUBSETS},
                   "top-random": mean_se(acc["top"], acc["random"])}
            summary["indist_by_source"][str(source)] = row
            print(f"  {str(source):<16}{len(idx):>5} questions: base {row['base']:.4f}, "
                  + ", ".join(f"{name} {row[name]:.4f}" for name in SUBSETS)
                  + f"; top - random {row['top-random'][0]:+.4f} ± {row['top-random'][1]:.4f}")
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from lib.core.errors import run_main

    run_main(main)
