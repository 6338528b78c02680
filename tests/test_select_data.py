import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import select_data
from lib.core.errors import UserError
from lib.models.builtin import resolve_model_path
from lib.models.loading import load_model, load_tokenizer
from lib.models.moe import find_moe_routers
from lib.selection import shards
from lib.selection.args import SelectArguments
from lib.selection.outputs import select_indices
from lib.selection.scorer import BatchScorer, length_batches
from lib.selection.split import ExpertSplit, save_router_config
from tests.conftest import ROOT, write_jsonl

MOE_ARCHS = ["mixtral", "qwen3-moe", "qwen2-moe", "olmoe"]


def router_checkpoint(tmp_path, arch="mixtral", ratio=0.25):
    """A builtin tiny MoE model with a router_config.json, as train_router.py would leave it."""
    out = tmp_path / f"ckpt-{arch}"
    shutil.copytree(resolve_model_path(f"builtin:tiny-{arch}"), out)
    model = load_model(str(out))
    routers = find_moe_routers(model)
    save_router_config(str(out), ExpertSplit.by_index(routers, ratio), routers,
                       {"scoring": {"max_seq_length": 64}})
    return str(out)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, paragraphs):
    """Text rows of mixed length, an empty and a missing row, and an extra field that must survive."""
    d = tmp_path_factory.mktemp("selpool")
    rows = [{"text": p if i % 3 else p[: 20 + i], "id": i, "meta": {"src": "pydoc", "n": i}}
            for i, p in enumerate(paragraphs[:37])]
    rows[5]["text"] = "   "
    rows[9]["text"] = None
    rows[12]["text"] = " ".join(paragraphs[300:306])  # longer than max_seq_length: truncated and flagged
    return write_jsonl(d / "pool.jsonl", rows)


def select(tmp_path, model, data, *extra, out="sel"):
    out_dir = str(tmp_path / out)
    select_data.main(["--router_model", model, "--data_file", data, "--output_dir", out_dir, "--disable_tqdm",
                      *extra])
    return out_dir


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- reference implementation: one row at a time, full forward with output_router_logits ---------------------

def reference_router_scores(model, ids, garbage: list[list[int]], top_k: int, positions=None):
    """Scores averaged over ``positions`` (default: every token) of the whole row's forward."""
    out = model(torch.tensor([ids]), output_router_logits=True)
    positions = range(len(ids)) if positions is None else positions
    per_layer_q, per_layer_lo, per_layer_share = [], [], []
    for layer, logits in enumerate(out.router_logits):
        logits = logits.double()
        g = torch.zeros(logits.shape[-1], dtype=torch.bool)
        g[garbage[layer]] = True
        q_tok, lo_tok, share_tok = [], [], []
        for t in positions:
            p = torch.softmax(logits[t], -1)
            q_tok.append(1 - float(p[g].sum()))
            lo_tok.append(float(torch.logsumexp(logits[t][~g], 0) - torch.logsumexp(logits[t][g], 0)))
            top = torch.topk(logits[t], top_k).indices.tolist()
            share_tok.append(sum(not bool(g[e]) for e in top) / top_k)
        per_layer_q.append(sum(q_tok) / len(q_tok))
        per_layer_lo.append(sum(lo_tok) / len(q_tok))
        per_layer_share.append(sum(share_tok) / len(q_tok))
    n = len(per_layer_q)
    return {"quality_score": sum(per_layer_q) / n, "quality_logodds": sum(per_layer_lo) / n,
            "routed_share": sum(per_layer_share) / n, "quality_score_layers": per_layer_q}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_scores_equal_slow_reference(arch, tmp_path, pool):
    ckpt = router_checkpoint(tmp_path, arch)
    out = select(tmp_path, ckpt, pool, "--batch_size", "4", "--max_seq_length", "64")
    rows = read_jsonl(os.path.join(out, "scored.jsonl"))
    model = load_model(ckpt).eval()
    tok = load_tokenizer(ckpt)
    cfg = json.load(open(os.path.join(ckpt, "router_config.json")))
    garbage = [cfg["garbage_experts"][str(layer)] for layer in sorted(map(int, cfg["garbage_experts"]))]
    checked = 0
    with torch.no_grad():
        for row in rows:
            if row["skip_reason"]:
                assert row["quality_score"] is None
                continue
            ids = tok(row["text"], truncation=True, max_length=64)["input_ids"]
            assert row["n_tokens"] == len(ids)
            ref = reference_router_scores(model, ids, garbage, cfg["top_k"])
            for key in ("quality_score", "quality_logodds", "routed_share"):
                assert row[key] == pytest.approx(ref[key], abs=2e-5), (key, row["id"])
            assert row["quality_score_layers"] == pytest.approx(ref["quality_score_layers"], abs=2e-5)
            checked += 1
    assert checked == len(rows) - 2


def test_padding_does_not_change_a_rows_score(tmp_path):
    ckpt = router_checkpoint(tmp_path, "qwen3-moe")
    model = load_model(ckpt).eval()
    routers = find_moe_routers(model)
    split = ExpertSplit.by_index(routers, 0.25)
    scorer = BatchScorer(model, routers=routers, garbage_masks=split.masks(), top_k=split.top_k)
    short = torch.randint(5, 1000, (1, 9))
    long = torch.randint(5, 1000, (1, 40))
    alone = scorer(short, torch.ones_like(short))
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = long[0], 1
    ids[1, :9], mask[1, :9] = short[0], 1
    batched = scorer(ids, mask)
    for key in ("quality_score", "quality_logodds", "routed_share"):
        assert batched[key][1].item() == pytest.approx(alone[key][0].item(), abs=1e-5), key
    assert batched["n_tokens"].tolist() == [40, 9]


def test_outputs_keep_every_row_and_field(tmp_path, pool):
    ckpt = router_checkpoint(tmp_path)
    out = select(tmp_path, ckpt, pool, "--select_ratio", "0.25", "--output_format", "parquet")
    import pyarrow.parquet as pq

    scored = pq.read_table(os.path.join(out, "scored.parquet")).to_pylist()
    selected = pq.read_table(os.path.join(out, "selected.parquet")).to_pylist()
    source = read_jsonl(pool)
    assert len(scored) == len(source)
    for got, src in zip(scored, source, strict=True):
        assert {k: got[k] for k in src} == src  # original fields unchanged, nested ones included
    assert scored[5]["skip_reason"] == "empty" and scored[9]["skip_reason"] == "missing"
    assert scored[5]["quality_score"] is None and scored[5]["selection_score"] is None
    assert scored[12]["truncated"] and scored[12]["n_tokens"] == 64
    assert sum(r["truncated"] for r in scored) >= 1
    # selected = the best 25% of the pool, best first, never an unscored row.
    assert len(selected) == round(0.25 * len(source))
    ranked = sorted((r for r in scored if r["selection_score"] is not None),
                    key=lambda r: (-r["selection_score"], r["id"]))
    assert [r["id"] for r in selected] == [r["id"] for r in ranked[: len(selected)]]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["counts"] == {"rows": 37, "scored": 35, "unscored": 2, "selected": len(selected),
                                 "truncated": summary["counts"]["truncated"],
                                 "unscored_reasons": {"empty": 1, "missing": 1}}
    assert summary["selection"]["cut_selection_score"] == selected[-1]["selection_score"]
    assert summary["model"]["fingerprint"].startswith("sha256:")
    assert summary["data"]["fingerprint"].startswith("sha256:")
    with open(os.path.join(out, "scores.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_selection_modes_and_ties():
    scores = [0.5, None, 0.9, 0.5, 0.1, 0.9, float("nan") if False else None]
    args = SelectArguments(router_model="m", data_file="d", output_dir="o", select_ratio=0.5)
    assert select_indices(scores, args, len(scores)) == [2, 5, 0, 3][: round(0.5 * 7)]
    args = SelectArguments(router_model="m", data_file="d", output_dir="o", select_top_k=10)
    assert select_indices(scores, args, len(scores)) == [2, 5, 0, 3, 4]
    args = SelectArguments(router_model="m", data_file="d", output_dir="o", score_threshold=0.5)
    assert select_indices(scores, args, len(scores)) == [2, 5, 0, 3]
    assert SelectArguments(router_model="m", data_file="d", output_dir="o").select_ratio == 0.3
    with pytest.raises(UserError, match="Choose one selection mode"):
        SelectArguments(router_model="m", data_file="d", output_dir="o", select_ratio=0.2, select_top_k=3)
    # Length batching: longest first, token budget respected, ties in input order.
    batches = length_batches([3, 10, 3, 7, 10], batch_size=2, max_batch_tokens=100)
    assert batches == [[1, 4], [3, 0], [2]]
    assert length_batches([10, 10, 10], batch_size=8, max_batch_tokens=25) == [[0, 1], [2]]


def test_resume_equals_uninterrupted(tmp_path, pool, monkeypatch):
    ckpt = router_checkpoint(tmp_path)
    common = ["--shard_size", "10", "--batch_size", "4"]
    full = select(tmp_path, ckpt, pool, *common, out="full")

    real_write = shards.write_shard
    written = []

    def crash_after_two(path, start, rows):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, start, rows)

    monkeypatch.setattr(shards, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        select(tmp_path, ckpt, pool, *common, out="resumed")
    assert not os.path.exists(tmp_path / "resumed" / "scored.jsonl")
    with pytest.raises(UserError, match="--resume"):
        select(tmp_path, ckpt, pool, *common, out="resumed")
    with pytest.raises(UserError, match="different batch_size"):
        select(tmp_path, ckpt, pool, "--shard_size", "10", "--batch_size", "8", "--resume", out="resumed")

    rescored = []
    monkeypatch.setattr(shards, "write_shard", lambda path, start, rows: (rescored.append(start),
                                                                              real_write(path, start, rows)))
    select(tmp_path, ckpt, pool, *common, "--resume", out="resumed")
    assert rescored == [20, 30]  # the two finished shards were not scored again
    for name in ("scored.jsonl", "selected.jsonl"):
        assert open(os.path.join(full, name), "rb").read() == open(tmp_path / "resumed" / name, "rb").read()


def test_bad_inputs_give_one_sentence(tmp_path, pool, capsys):
    from tests.test_errors import refused

    ckpt = router_checkpoint(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--router_model", ckpt, "--data_file", pool, "--text_field", "body"],
         "has no field 'body' (fields: text, id, meta); set --text_field"),
        (["--router_model", ckpt, "--data_file", str(empty)], "is empty; it needs at least one row"),
        (["--router_model", "builtin:tiny-llama", "--data_file", pool],
         "has no router_config.json; point to a checkpoint written by train_router.py"),
        (["--router_model", ckpt, "--data_file", pool, "--score", "ifd"], "needs chat rows: pass --messages_field"),
        (["--router_model", ckpt, "--data_file", pool, "--select_ratio", "1.5"], "--select_ratio must be in (0, 1]"),
    ]
    for i, (argv, message) in enumerate(cases):
        assert message in refused(capsys, select_data.main, [*argv, "--output_dir", tmp_path / f"o{i}"])
    scored = select(tmp_path, ckpt, pool, "--max_samples", "4", out="done")
    with pytest.raises(UserError, match="already holds select_data.py results; pass --resume"):
        select(tmp_path, ckpt, pool, "--max_samples", "4", out="done")
    with pytest.raises(UserError, match="already has column"):
        select(tmp_path, ckpt, os.path.join(scored, "scored.jsonl"), out="again")


@pytest.mark.distributed
@pytest.mark.xdist_group("launchers")
def test_torchrun_two_processes_equal_one(tmp_path, pool):
    ckpt = router_checkpoint(tmp_path)
    # The default shard size cuts even this small pool (37 rows) into shards for both processes (16 rows each).
    common = ["--router_model", ckpt, "--data_file", pool, "--batch_size", "4", "--select_ratio", "0.3",
              "--disable_tqdm"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets it for each process: equal bytes need equal thread counts
    try:
        single = select(tmp_path, ckpt, pool, *common[4:], out="single")
    finally:
        torch.set_num_threads(threads)
    bin_dir = os.path.dirname(sys.executable)
    from tests.test_distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([os.path.join(bin_dir, "torchrun"), "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "select_data.py", *common, "--output_dir", str(tmp_path / "multi")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("scored.jsonl", "selected.jsonl"):
        assert open(os.path.join(single, name), "rb").read() == open(tmp_path / "multi" / name, "rb").read()
    summary = json.load(open(tmp_path / "multi" / "summary.json"))
    assert summary["processes"] == 2 and summary["shard_size"] == 16
    assert proc.stdout.count("scored 35 of 37 rows") == 1  # the report comes from one process only
