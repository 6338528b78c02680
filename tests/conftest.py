import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs one worker per core: a second intra-op thread per worker only oversubscribes the cores, and
    # OpenMP's waits then made a tiny model's forward pass up to 70x slower. Scripts the tests start inherit it.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama():
    """builtin:tiny-llama's model and tokenizer, loaded once: tests that change them work on copies."""
    from lib.models.loading import load_model, load_tokenizer

    return load_model("builtin:tiny-llama"), load_tokenizer("builtin:tiny-llama")


@pytest.fixture(scope="session")
def paragraphs():
    from lib.selection.pools import pydoc_paragraphs

    return pydoc_paragraphs(min_chars=80, max_chars=300)


@pytest.fixture(scope="session")
def pool_files(tmp_path_factory, paragraphs):
    """A small text pool (good rows only) and a labelled held-out file with corrupted rows."""
    import random

    from lib.selection.corruptions import corrupt_text

    d = tmp_path_factory.mktemp("pool")
    train = write_jsonl(d / "train.jsonl", [{"text": p} for p in paragraphs[:48]])
    rng = random.Random(0)
    held = []
    for p in paragraphs[200:216]:
        held.append({"text": p, "label": 1})
        held.append({"text": corrupt_text(p, paragraphs[0], "noise", rng), "label": 0})
    val = write_jsonl(d / "val.jsonl", held)
    return {"train": train, "val": val, "dir": d}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of benchmarks/ in a fresh interpreter (what a user runs), output captured."""
    return subprocess.run([sys.executable, os.path.join("benchmarks", script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    """The JSON object a benchmark's --json prints as its last line (the run must have succeeded)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
