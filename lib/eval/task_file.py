"""Users' own multiple-choice questions (``--task_file``) as an lm-eval task."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lib.core.errors import DataError


def task_file_yaml(path: str, out_dir: str) -> str:
    """Turn a jsonl of ``{"question", "choices": [...], "answer": index or choice text}`` rows into an lm-eval task.

    The choices continue ``Question: <question>\nAnswer:``; rows that all carry a ``prompt`` string are scored on
    that text verbatim instead (e.g. a question rendered in the model's chat template up to the start of the
    answer). Returns the task name (``custom_<file stem>``). Rows are checked here so a bad file fails with one
    sentence.
    """
    if not os.path.exists(path):
        raise DataError(f"--task_file {path} does not exist; check the path.")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {i + 1} is not JSON ({err.msg}).") from err
            choices, answer = row.get("choices"), row.get("answer")
            if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) < 2:
                raise DataError(f"{path} line {i + 1}: rows need a 'question' string and a 'choices' list of at "
                                "least two strings.")
            if isinstance(answer, str) and answer in choices:
                answer = choices.index(answer)
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise DataError(f"{path} line {i + 1}: 'answer' must be the index of the right choice or its text.")
            prompt = row.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise DataError(f"{path} line {i + 1}: 'prompt' must be a string (the text the choices continue).")
            rows.append({"question": row["question"], "choices": [str(c) for c in choices], "answer": answer,
                         **({"prompt": prompt} if prompt is not None else {})})
    if not rows:
        raise DataError(f"--task_file {path} has no rows.")
    prompted = sum("prompt" in r for r in rows)
    if 0 < prompted < len(rows):
        raise DataError(f"--task_file {path}: {prompted} of {len(rows)} rows have a 'prompt'; give every row one "
                        "or none.")
    stem = "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    name = f"custom_{stem}"
    data = os.path.join(out_dir, f"{name}.data.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    cfg = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
        "output_type": "multiple_choice", "test_split": "test",
        "doc_to_text": "{{prompt}}" if prompted else "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n")
    return name

