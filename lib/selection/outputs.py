"""select_data.py's results: which rows are kept, the score statistics, the plot, and the summary.

The final files appear as a set: ``scored.*``, ``selected.*`` and ``scores.png`` are written first (each atomically)
and ``summary.json`` last, after removing an earlier one, so a folder with a summary.json holds a complete,
matching set. Consumers (train_target.py's provenance, ``--resume``) check for it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lib.core.errors import UserError
from lib.core.files import atomic_path, package_versions, write_json, write_table
from lib.selection.args import SelectArguments
from lib.selection.shards import merge_shards


def select_indices(scores: list[float | None], args: SelectArguments, n_total: int) -> list[int]:
    """Indices of the kept rows, best first; ties go to the earlier row. Rows without a score are never kept."""
    ranked = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: (-scores[i], i))
    if args.score_threshold is not None:
        return [i for i in ranked if scores[i] >= args.score_threshold]
    if args.select_top_k is not None:
        return ranked[: args.select_top_k]
    return ranked[: min(len(ranked), max(1, round(args.select_ratio * n_total)))]


def score_statistics(values: list[float]) -> dict[str, float]:

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    q = np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "p10": float(q[0]),
            "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p90": float(q[4]), "max": float(a.max())}


def plot_scores(path: str, values: list[float], cut: float | None, score: str, n_selected: int) -> None:
    """Histogram of the selection scores with the cut. A bare Figure needs no display and changes no global
    matplotlib state (a notebook importing this keeps its backend)."""
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    ax.hist(values, bins=min(60, max(10, len(values) // 20)), color="#4C72B0", alpha=0.85)
    if cut is not None:
        ax.axvline(cut, color="#C44E52", linestyle="--", label=f"cut {cut:.4g} ({n_selected} kept)")
        ax.legend()
    ax.set_xlabel(f"selection_score ({score}; higher is better)")
    ax.set_ylabel("rows")
    ax.set_title("select_data.py: score distribution")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


SUMMARY_NAME = "summary.json"


def write_selection(args: SelectArguments, ds, *, shard_dir: str, n_shards: int, manifest: dict,
                    router_cfg: dict, want_router: bool, max_len: int, dtype: str, device: str, processes: int,
                    rows_scored_here: int, scoring_seconds: float, started: float,
                    baseline: dict | None = None) -> dict[str, Any]:
    """Merge the shards, select, and write the result set (summary.json last); returns the summary. ``baseline``:
    what the fasttext or probe baseline was trained on, its settings and its training time."""
    n_rows = len(ds)
    summary_path = os.path.join(args.output_dir, SUMMARY_NAME)
    if os.path.exists(summary_path):
        os.remove(summary_path)  # from here until the new one is written, the folder's set is incomplete
    scores_table = merge_shards(shard_dir, n_shards, n_rows)
    scored = ds.with_format("arrow")[0:n_rows]
    for name in scores_table.column_names:
        scored = scored.append_column(name, scores_table.column(name))
    values = scores_table.column("selection_score").to_pylist()
    chosen = select_indices(values, args, n_rows)
    ext = args.output_format
    write_table(scored, os.path.join(args.output_dir, f"scored.{ext}"), ext)
    write_table(scored.take(chosen), os.path.join(args.output_dir, f"selected.{ext}"), ext)
    valid = [v for v in values if v is not None]
    cut = values[chosen[-1]] if chosen else None
    plot_scores(os.path.join(args.output_dir, "scores.png"), valid, cut, args.score, len(chosen))
    reasons: dict[str, int] = {}
    for reason in scores_table.column("skip_reason").to_pylist():
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    column = args.messages_field or args.text_field
    summary = {
        "counts": {"rows": n_rows, "scored": len(valid), "unscored": n_rows - len(valid), "selected": len(chosen),
                   "truncated": sum(bool(t) for t in scores_table.column("truncated").to_pylist()),
                   "unscored_reasons": reasons},
        "selection": {"score": args.score, "ranked_by": "selection_score (higher is better)",
                      "select_ratio": args.select_ratio, "select_top_k": args.select_top_k,
                      "score_threshold": args.score_threshold, "cut_selection_score": cut},
        "selection_score_stats": score_statistics(valid),
        "selected_score_stats": score_statistics([values[i] for i in chosen]),
        "settings": {k: v for k, v in asdict(args).items() if k not in ("disable_tqdm",)},
        "model": {"path": args.router_model, "fingerprint": manifest["model"],
                  "expert_split": ({"num_experts": router_cfg["num_experts"], "top_k": router_cfg["top_k"],
                                    "method": router_cfg.get("method")} if want_router else None)},
        "data": {"source": args.data_file, "field": column, "fingerprint": manifest["data"]},
        "baseline": baseline,
        "max_seq_length": max_len,
        "shard_size": manifest["shard_size"],
        "dtype": dtype,
        "device": device,
        "processes": processes,
        "versions": package_versions(("torch", "transformers", "datasets", "sidekit")),
        "timing": {"scoring_seconds_rank0": round(scoring_seconds, 3),
                   "rows_per_second_rank0": (round(rows_scored_here / scoring_seconds, 2)
                                             if scoring_seconds > 0 and rows_scored_here else None),
                   "total_seconds": round(time.time() - started, 3)},
        "files": {"scored": f"scored.{ext}", "selected": f"selected.{ext}", "plot": "scores.png"},
    }
    write_json(summary_path, summary)
    return summary


def read_summary(folder: str) -> dict[str, Any] | None:
    """A finished select_data.py run's summary.json (None when the folder holds no select_data.py results).

    A folder with shards but no summary is an interrupted run: refused with the command that finishes it.
    """
    path = os.path.join(folder, SUMMARY_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(folder, "shards", "manifest.json")):
            raise UserError(f"{folder} holds an unfinished select_data.py run (no {SUMMARY_NAME}); finish it by "
                            "rerunning the same select_data.py command with --resume.")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}); rerun select_data.py to rewrite it.") from None
    if not isinstance(summary, dict) or "selection" not in summary or "counts" not in summary:
        raise UserError(f"{path} is not a select_data.py summary (no 'selection'/'counts'); rerun select_data.py.")
    return summary
