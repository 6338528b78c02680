"""Supervised baselines select_data.py can rank by, trained on labelled rows (``--baseline_train_file``).

* ``fasttext``: a fastText classifier on each row's rendered text, as in DCLM's and FineWeb-Edu-style quality
  filters. Trained with one thread and a fixed seed, so it is deterministic.
* ``probe``: a logistic regression on the frozen model's hidden states at one layer, mean-pooled over each row's
  tokens and standardised with the training rows' statistics. Training and pool rows get their features from the
  same batched, length-sorted scorer (``HiddenPooler`` through ``run_items``).

Both give P(good). The main process trains once per run and saves the model under ``output_dir/shards/baseline/``
(``baseline.json`` last, so a folder with it is complete); every process then loads that copy, so all processes of
a torchrun run score with the same model. A resumed run reuses it: the shards' manifest holds the settings and the
training file's fingerprint, so ``--resume`` with another training file is refused before anything is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lib.core.data import load_rows, render_messages
from lib.core.errors import DataError
from lib.core.files import atomic_path, write_json
from lib.selection.args import SelectArguments
from lib.selection.data import collect_rows
from lib.selection.rows import prepare_rows
from lib.selection.scorer import run_items
from lib.selection.shards import data_fingerprint

BASELINE_DIR = "baseline"
INFO_NAME = "baseline.json"
GOOD, GARBAGE = "__label__1", "__label__0"
PROBE_MAX_ITER = 1000


@dataclass
class TrainingRows:
    items: list  # texts, or message lists for chat rows
    labels: list[int]  # 1 good, 0 garbage
    n_empty: int  # empty rows left out
    fingerprint: str  # of the training file's content


def read_training_rows(args: SelectArguments) -> TrainingRows:
    """The labelled rows of ``--baseline_train_file``, in the pool's text or messages field; refused in one sentence
    when the label column is missing or only one class is present."""
    source = args.baseline_train_file
    ds = load_rows(source, config_name=args.dataset_config_name)
    label = args.baseline_label_field
    if label not in ds.column_names:
        raise DataError(f"{source} has no label column '{label}' (fields: {', '.join(ds.column_names)}); set "
                        "--baseline_label_field to its 0/1 column.")
    items, labels, empty = collect_rows(ds, source, None, text_field=args.text_field,
                                        messages_field=args.messages_field, label_field=label)
    if len(set(labels)) < 2:
        only = "good (1)" if labels[0] == 1 else "garbage (0)"
        raise DataError(f"{source} has only {only} rows in '{label}'; the {args.score} baseline learns to tell good "
                        "from garbage, so add rows of both labels.")
    return TrainingRows(items, labels, empty, data_fingerprint(source, ds))


def baseline_settings(args: SelectArguments, rows: TrainingRows, layer: int | None) -> dict[str, Any]:
    """What the baseline depends on, for the manifest (a resume with other settings or data is refused)."""
    common = {"score": args.score, "train_data": rows.fingerprint, "label_field": args.baseline_label_field,
              "seed": args.baseline_seed}
    if args.score == "fasttext":
        return {**common, "epoch": args.fasttext_epoch, "lr": args.fasttext_lr,
                "word_ngrams": args.fasttext_word_ngrams, "dim": args.fasttext_dim, "min_count": 1, "thread": 1}
    return {**common, "layer": layer, "C": args.probe_c, "max_iter": PROBE_MAX_ITER, "pooling": "mean"}


# ---- fastText --------------------------------------------------------------------------------------------------

def fasttext_line(text: str) -> str:
    # fastText reads one example per line.
    return text.replace("\r", " ").replace("\n", " ")


def train_fasttext(texts: list[str], labels: list[int], settings: dict[str, Any], path: str) -> None:
    """Train on ``texts`` and save the model to ``path``; one thread and a fixed seed make it deterministic."""
    import fasttext

    folder = os.path.dirname(path)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, suffix=".txt", delete=False) as f:
        for text, label in zip(texts, labels, strict=True):
            f.write(f"{GOOD if label == 1 else GARBAGE} {fasttext_line(text)}\n")
    try:
        model = fasttext.train_supervised(
            input=f.name, epoch=settings["epoch"], lr=settings["lr"], wordNgrams=settings["word_ngrams"],
            dim=settings["dim"], minCount=settings["min_count"], thread=settings["thread"], seed=settings["seed"],
            loss="softmax", verbose=0)
    finally:
        os.remove(f.name)
    with atomic_path(path) as tmp:
        model.save_model(tmp)


class FastTextBaseline:
    """A saved fastText classifier; ``p_good(text)`` is its probability of the good label."""

    file_name = "fasttext.bin"

    def __init__(self, path: str):
        # fasttext.load_model is this plus a deprecation message.
        from fasttext.FastText import _FastText

        self.model = _FastText(model_path=path)

    def p_good(self, text: str) -> float | None:
        # The C++ binding's predict: fasttext 0.9.2's model.predict fails under numpy 2 (np.array(copy=False)).
        # fastText adds 1e-5 to each probability; normalising over the two labels keeps P(good) within [0, 1].
        probs = {label: p for p, label in self.model.f.predict(fasttext_line(text) + "\n", -1, 0.0, "replace")}
        good, garbage = probs.get(GOOD, 0.0), probs.get(GARBAGE, 0.0)
        return good / (good + garbage) if good + garbage > 0 else None


# ---- linear probe ----------------------------------------------------------------------------------------------

@dataclass
class LinearProbe:
    """StandardScaler + binary LogisticRegression, kept as plain arrays; ``p_good`` equals sklearn's
    ``predict_proba(...)[:, 1]`` of the fitted pipeline."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    file_name = "probe.npz"

    @classmethod
    def fit(cls, features: np.ndarray, labels: list[int], *, c: float, seed: int) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(features)
        clf = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER, random_state=seed)
        clf.fit(scaler.transform(features), np.asarray(labels))
        return cls(scaler.mean_, scaler.scale_, clf.coef_[0], float(clf.intercept_[0]))

    def p_good(self, features) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def save(self, path: str) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, scale=self.scale, coef=self.coef, intercept=np.float64(self.intercept))

    @classmethod
    def load(cls, path: str) -> LinearProbe:
        with np.load(path) as z:
            return cls(z["mean"], z["scale"], z["coef"], float(z["intercept"]))


def pooled_features(pooler, items: list, tokenizer, *, chat: bool, max_len: int, device, batch_size: int,
                    max_batch_tokens: int) -> np.ndarray:
    """``(rows, hidden)`` features of labelled rows, from the scorer that pools the pool's rows."""
    prepared = prepare_rows(items, tokenizer, chat=chat, max_len=max_len, ifd=False)
    unusable = [p.skip_reason for p in prepared if p.main is None]
    if unusable:  # collect_rows already left out empty rows, so only a tokenizer that encodes nothing gets here
        raise DataError(f"A row of --baseline_train_file has no tokens to read ({unusable[0]}); drop such rows.")
    out = run_items(pooler, [p.main for p in prepared], pad_id=tokenizer.pad_token_id, device=device,
                    batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    return np.asarray([r["features"] for r in out], dtype=np.float64)


# ---- once per run ----------------------------------------------------------------------------------------------

def prepare_baseline(args: SelectArguments, state, rows: TrainingRows, settings: dict[str, Any], shard_dir: str,
                     *, tokenizer, features: Callable[[list], np.ndarray] | None = None):
    """Train the baseline on the main process (or reuse the one this run's shards were scored with), save it, and
    load it in every process. Returns ``(model, info)``; ``info`` goes into summary.json."""
    folder = os.path.join(shard_dir, BASELINE_DIR)
    info_path = os.path.join(folder, INFO_NAME)
    kind = FastTextBaseline if args.score == "fasttext" else LinearProbe
    trained = state.is_main_process and _saved_settings(info_path) != settings
    if trained:
        shutil.rmtree(folder, ignore_errors=True)  # a partial or outdated one
        os.makedirs(folder)
        started = time.time()
        path = os.path.join(folder, kind.file_name)
        if args.score == "fasttext":
            texts = [render_messages(tokenizer, it) if args.messages_field else it for it in rows.items]
            train_fasttext(texts, rows.labels, settings, path)
        else:
            LinearProbe.fit(features(rows.items), rows.labels, c=args.probe_c, seed=args.baseline_seed).save(path)
        write_json(info_path, {
            "settings": settings, "train_file": args.baseline_train_file, "train_rows": len(rows.labels),
            "train_good": sum(rows.labels), "train_garbage": len(rows.labels) - sum(rows.labels),
            "train_empty_skipped": rows.n_empty, "train_seconds": round(time.time() - started, 3)})
    state.wait_for_everyone()
    with open(info_path, encoding="utf-8") as f:
        info = {**json.load(f), "reused_from_earlier_run": not trained}
    path = os.path.join(folder, kind.file_name)
    return (FastTextBaseline(path) if kind is FastTextBaseline else LinearProbe.load(path)), info


def _saved_settings(info_path: str) -> dict | None:
    try:
        with open(info_path, encoding="utf-8") as f:
            return json.load(f).get("settings")
    except (OSError, ValueError):
        return None
