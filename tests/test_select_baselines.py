"""select_data.py's supervised baselines: --score fasttext and --score probe, against references built by hand."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import select_data
from lib.core.errors import UserError
from lib.models.loading import load_model, load_tokenizer
from lib.selection.scores import auroc
from tests.conftest import ROOT, write_jsonl
from tests.test_errors import refused

MODEL = "builtin:tiny-llama"  # 2 layers: the probe's default layer is 1
# Settings under which fastText tells these paragraphs from their shuffles (word bigrams; unigrams are the same).
FASTTEXT = dict(epoch=25, lr=0.5, wordNgrams=2, dim=16)
FASTTEXT_FLAGS = ["--fasttext_epoch", "25", "--fasttext_lr", "0.5", "--fasttext_dim", "16"]


def shuffled(text, rng):
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def labelled(paragraphs, rng):
    """Each paragraph (good) and a word-shuffled copy of it (garbage): only word order tells them apart."""
    return [row for p in paragraphs for row in ({"text": p, "label": 1}, {"text": shuffled(p, rng), "label": 0})]


@pytest.fixture(scope="module")
def files(tmp_path_factory, paragraphs):
    d = tmp_path_factory.mktemp("baselines")
    rng = random.Random(0)
    return {
        "train": write_jsonl(d / "train.jsonl", labelled(paragraphs[:150], rng)),
        "pool": write_jsonl(d / "pool.jsonl", labelled(paragraphs[400:440], rng)),
        "small_train": write_jsonl(d / "small_train.jsonl", labelled(paragraphs[150:174], rng)),
        "small_pool": write_jsonl(d / "small_pool.jsonl", [{"text": p[: 30 + 9 * i]} for i, p in
                                                           enumerate(paragraphs[500:516])] + [{"text": "  "}]),
        "other_train": write_jsonl(d / "other_train.jsonl", labelled(paragraphs[200:224], rng)),
        "one_class": write_jsonl(d / "one_class.jsonl", [{"text": p, "label": 1} for p in paragraphs[:8]]),
        "no_label": write_jsonl(d / "no_label.jsonl", [{"text": p} for p in paragraphs[:8]]),
    }


def run(tmp_path, out, data, *extra):
    out_dir = str(tmp_path / out)
    summary = select_data.main(["--router_model", MODEL, "--data_file", data, "--output_dir", out_dir,
                                "--disable_tqdm", *extra])
    with open(os.path.join(out_dir, "scored.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f], summary


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- fasttext --------------------------------------------------------------------------------------------------

def reference_fasttext(train_file, texts, tmp_path):
    """P(good) of a fastText model trained directly on the file's rows with the same settings."""
    import fasttext

    lines = tmp_path / "ref.txt"
    lines.write_text("".join(f"__label__{r['label']} {r['text']}\n" for r in read_jsonl(train_file)), encoding="utf-8")
    model = fasttext.train_supervised(input=str(lines), thread=1, seed=0, minCount=1, verbose=0, **FASTTEXT)
    out = []
    for text in texts:
        probs = {label: p for p, label in model.f.predict(text + "\n", -1, 0.0, "strict")}
        out.append(probs["__label__1"] / (probs["__label__1"] + probs["__label__0"]))
    return out


def test_fasttext_matches_reference_is_deterministic_and_ranks(tmp_path, files):
    args = ["--score", "fasttext", "--baseline_train_file", files["train"], *FASTTEXT_FLAGS]
    first, summary = run(tmp_path, "a", files["pool"], *args)
    second, _ = run(tmp_path, "b", files["pool"], *args)
    scores = [r["fasttext"] for r in first]
    assert scores == [r["fasttext"] for r in second]
    assert [r["selection_score"] for r in first] == scores
    ref = reference_fasttext(files["train"], [r["text"] for r in first], tmp_path)
    assert scores == pytest.approx(ref, abs=1e-9)
    # 0.93 here; swapped labels would give 0.07 and an untrained classifier about 0.5.
    assert auroc(scores, [r["label"] for r in first]) > 0.8
    base = summary["baseline"]
    assert base["train_rows"] == 300 and base["train_garbage"] == 150 and base["train_seconds"] >= 0
    assert base["settings"]["word_ngrams"] == 2 and not base["reused_from_earlier_run"]


# ---- probe -----------------------------------------------------------------------------------------------------

def reference_probe(train_file, pool_texts, layers):
    """Per layer: features one row at a time from output_hidden_states (mean over the row's tokens), then
    StandardScaler + LogisticRegression with select_data.py's settings; P(good) of ``pool_texts``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    model, tokenizer = load_model(MODEL, dtype="float32").eval(), load_tokenizer(MODEL)

    def features(texts):
        with torch.no_grad():
            states = [model(torch.tensor([tokenizer(t)["input_ids"]]), output_hidden_states=True).hidden_states
                      for t in texts]
        return {layer: np.stack([h[layer][0].double().mean(0).numpy() for h in states]) for layer in layers}

    rows = read_jsonl(train_file)
    train, pool = features([r["text"] for r in rows]), features(pool_texts)
    out = {}
    for layer in layers:
        scaler = StandardScaler().fit(train[layer])
        clf = LogisticRegression(C=1.0, max_iter=1000, random_state=0)
        clf.fit(scaler.transform(train[layer]), [r["label"] for r in rows])
        out[layer] = list(clf.predict_proba(scaler.transform(pool[layer]))[:, 1])
    return out


def test_probe_matches_reference_and_ignores_batching(tmp_path, files):
    args = ["--score", "probe", "--baseline_train_file", files["small_train"]]
    batched, summary = run(tmp_path, "batched", files["small_pool"], *args, "--batch_size", "8")
    alone, _ = run(tmp_path, "alone", files["small_pool"], *args, "--batch_size", "1")
    last, _ = run(tmp_path, "last", files["small_pool"], *args, "--probe_layer", "2")
    assert summary["baseline"]["settings"]["layer"] == 1 and summary["baseline"]["train_rows"] == 48
    assert batched[-1]["probe"] is None and batched[-1]["skip_reason"] == "empty"
    ref = reference_probe(files["small_train"], [r["text"] for r in batched[:-1]], (1, 2))
    for rows, layer in ((batched, 1), (alone, 1), (last, 2)):
        assert [r["probe"] for r in rows[:-1]] == pytest.approx(ref[layer], abs=1e-5), layer
    assert [r["n_tokens"] for r in alone] == [r["n_tokens"] for r in batched]


# ---- refusals and resume ---------------------------------------------------------------------------------------

def test_baseline_refusals_and_resume(tmp_path, files, capsys):
    common = ["--router_model", MODEL, "--data_file", files["small_pool"], "--score", "fasttext"]
    cases = [
        ([], "--score fasttext is a supervised baseline that trains on labelled rows: pass --baseline_train_file"),
        (["--baseline_train_file", files["one_class"]], "has only good (1) rows in 'label'"),
        (["--baseline_train_file", files["no_label"]],
         "has no label column 'label' (fields: text); set --baseline_label_field"),
    ]
    for i, (extra, message) in enumerate(cases):
        assert message in refused(capsys, select_data.main, [*common, *extra, "--output_dir", tmp_path / f"o{i}"])

    args = ["--score", "fasttext", "--baseline_train_file", files["small_train"]]
    first, _ = run(tmp_path, "r", files["small_pool"], *args)
    again, summary = run(tmp_path, "r", files["small_pool"], *args, "--resume")
    assert again == first and summary["baseline"]["reused_from_earlier_run"]
    with pytest.raises(UserError, match="Cannot resume in .*different baseline"):
        run(tmp_path, "r", files["small_pool"], "--score", "fasttext", "--baseline_train_file",
            files["other_train"], "--resume")


@pytest.mark.distributed
@pytest.mark.xdist_group("launchers")
def test_probe_torchrun_two_processes_equal_one(tmp_path, files):
    """The main process trains the probe and the other loads it: two processes write what one writes."""
    common = ["--router_model", MODEL, "--data_file", files["small_pool"], "--score", "probe",
              "--baseline_train_file", files["small_train"], "--shard_size", "4", "--disable_tqdm"]
    select_data.main([*common, "--output_dir", str(tmp_path / "single")])
    from tests.test_distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "select_data.py", *common, "--output_dir",
                           str(tmp_path / "multi")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, multi = read_jsonl(tmp_path / "single" / "scored.jsonl"), read_jsonl(tmp_path / "multi" / "scored.jsonl")
    assert [r["probe"] for r in multi] == pytest.approx([r["probe"] for r in single], abs=1e-6)
    with open(tmp_path / "multi" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["processes"] == 2
