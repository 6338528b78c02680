"""Stage 2 of data selection: score every row of a pool with trained routers (or a baseline) and keep the best.

The pool is cut into fixed shards of consecutive rows. Each shard is tokenised, sorted by length, scored in
token-budgeted batches and written atomically as its own small parquet file, so an interrupted run resumes
from the shards on disk and ``torchrun`` ranks simply take every N-th shard. Because a shard's batches never
depend on the number of processes, the merged result is the same however many processes scored it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lib.errors import UserError

logger = logging.getLogger(__name__)

ROUTER_SCORES = ("quality_score", "quality_logodds", "routed_share")
LM_SCORES = ("perplexity", "ifd")
SCORES = ROUTER_SCORES + LM_SCORES
# Columns select_data.py adds to every row; an input that already has one of them is refused.
SCORE_COLUMNS = (*ROUTER_SCORES, "quality_score_layers", "perplexity", "ifd", "ifd_loss_conditioned",
                 "ifd_loss_alone", "selection_score", "n_tokens", "truncated", "skip_reason")
SHARD_FORMAT_VERSION = 1


@dataclass
class SelectArguments:
    router_model: str = field(
        metadata={"help": "A train_router.py checkpoint (folder with router_config.json). For --score perplexity "
                          "or ifd any causal LM works (hub id, local path or builtin name)."}
    )
    data_file: str = field(metadata={"help": "The pool: .jsonl/.json/.parquet/.csv file or a `datasets` hub name."})
    output_dir: str = field(metadata={"help": "Where scored.*, selected.*, summary.json and scores.png go."})
    split: str = field(default="train", metadata={"help": "Split of a hub dataset or saved DatasetDict."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of a hub dataset."})
    text_field: str = field(default="text", metadata={"help": "Column holding plain text."})
    messages_field: str | None = field(
        default=None, metadata={"help": "Column holding chat messages (rendered with the chat template)."}
    )
    score: str = field(
        default="quality_score",
        metadata={"help": "Score used for ranking. quality_score: 1 - mean garbage-bin mass; quality_logodds: mean "
                          "logsumexp(quality logits) - logsumexp(garbage logits); routed_share: share of top-k slots "
                          "on quality experts; perplexity: the model's own perplexity (lower is better); ifd: "
                          "instruction-following difficulty of chat rows.", "choices": list(SCORES)},
    )
    select_ratio: float | None = field(
        default=None, metadata={"help": "Keep this fraction of the pool (default 0.3 when no other mode is set)."}
    )
    select_top_k: int | None = field(default=None, metadata={"help": "Keep this many rows."})
    score_threshold: float | None = field(
        default=None, metadata={"help": "Keep rows whose selection_score is at least this."}
    )
    output_format: str = field(default="jsonl", metadata={"help": "Format of scored/selected.", "choices": ["jsonl", "parquet"]})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Rows are truncated (and flagged) beyond this; default: the checkpoint's "
                                        "training length, else 512."}
    )
    batch_size: int = field(default=32, metadata={"help": "Most rows per forward pass."})
    max_batch_tokens: int = field(
        default=8192, metadata={"help": "Most padded tokens per forward pass (rows x longest row)."}
    )
    shard_size: int = field(default=2048, metadata={"help": "Rows per shard: the unit of resuming and of sharing work."})
    resume: bool = field(default=False, metadata={"help": "Reuse the shards an interrupted run left in --output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Discard earlier results in --output_dir."})
    max_samples: int | None = field(default=None, metadata={"help": "Score only the first N rows (for a quick look)."})
    dtype: str = field(
        default="auto", metadata={"help": "Model dtype; auto = bfloat16 on GPU, float32 on CPU. Scores are fp32.",
                                  "choices": ["auto", "float32", "bfloat16", "float16"]}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel (flash_attention_2 -> sdpa -> eager fallback).",
                                "choices": ["flash_attention_2", "sdpa", "eager"]}
    )
    experts_implementation: str | None = field(
        default=None, metadata={"help": "MoE experts kernel (transformers' default when unset).",
                                "choices": ["eager", "grouped_mm", "batched_mm"]}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of --router_model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self):
        modes = [m for m in ("select_ratio", "select_top_k", "score_threshold") if getattr(self, m) is not None]
        if len(modes) > 1:
            raise UserError(f"Choose one selection mode, got {', '.join('--' + m for m in modes)}.")
        if not modes:
            self.select_ratio = 0.3
        if self.select_ratio is not None and not 0 < self.select_ratio <= 1:
            raise UserError(f"--select_ratio must be in (0, 1], got {self.select_ratio}.")
        if self.select_top_k is not None and self.select_top_k < 1:
            raise UserError(f"--select_top_k must be at least 1, got {self.select_top_k}.")
        for name in ("batch_size", "max_batch_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise UserError(f"--max_seq_length must be at least 2, got {self.max_seq_length}.")
        if self.score == "ifd" and not self.messages_field:
            raise UserError("--score ifd compares the answer's loss with and without its question, so it needs chat "
                            "rows: pass --messages_field.")


# --------------------------------------------------------------------------------------------------
# Rows -> token sequences
# --------------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One sequence to run: token ids and which tokens count as targets (for perplexity-style losses)."""

    ids: list[int]
    targets: list[int] | None = None


@dataclass
class PreparedRow:
    main: Item | None  # the row as text (router scores, perplexity) or question+answer (ifd)
    alone: Item | None = None  # ifd: the answer without its question
    truncated: bool = False
    skip_reason: str | None = None


def _encode(tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], list[bool]]:
    # One token past the limit tells truncated rows apart from rows of exactly max_len tokens.
    enc = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_len + 1)["input_ids"]
    return [ids[:max_len] for ids in enc], [len(ids) > max_len for ids in enc]


def _skip_reason_text(value: Any) -> str | None:
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    return None if value.strip() else "empty"


def _skip_reason_messages(value: Any) -> str | None:
    if value is None:
        return "missing"
    from lib.data import is_message_list

    if not is_message_list(value):
        return "not a list of {role, content} messages"
    return None if any(m["content"].strip() for m in value) else "empty"


def prepare_rows(values: list, tokenizer, *, chat: bool, max_len: int, ifd: bool) -> list[PreparedRow]:
    """Validate, render and tokenise one shard's rows. Bad rows get a ``skip_reason`` instead of an error."""
    from lib.data import render_messages

    reasons = [(_skip_reason_messages if chat else _skip_reason_text)(v) for v in values]
    rows = [PreparedRow(None, skip_reason=r) for r in reasons]
    live = [i for i, r in enumerate(reasons) if r is None]
    if not ifd:
        texts = [render_messages(tokenizer, values[i]) if chat else values[i] for i in live]
        ids, truncated = _encode(tokenizer, texts, max_len) if texts else ([], [])
        for i, row_ids, cut in zip(live, ids, truncated, strict=True):
            rows[i] = PreparedRow(Item(row_ids), truncated=cut)
        return rows
    for i in live:
        rows[i] = _prepare_ifd(values[i], tokenizer, max_len)
    return rows


def _prepare_ifd(messages: list[dict], tokenizer, max_len: int) -> PreparedRow:
    """Question = every turn before the last assistant turn (with the generation prompt); answer = that turn."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return PreparedRow(None, skip_reason="no assistant turn")
    if last == 0:
        return PreparedRow(None, skip_reason="no question before the answer")
    answer = tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"]
    if not answer:
        return PreparedRow(None, skip_reason="empty answer")
    prompt_text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if len(prompt) >= max_len:
        return PreparedRow(None, truncated=True, skip_reason="question longer than max_seq_length")
    conditioned = (prompt + answer)[:max_len]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    alone = (bos + answer)[:max_len]
    truncated = len(prompt) + len(answer) > max_len or len(bos) + len(answer) > max_len
    main = Item(conditioned, [0] * len(prompt) + [1] * (len(conditioned) - len(prompt)))
    # Without a BOS token the first answer token has nothing to be predicted from.
    return PreparedRow(main, Item(alone, [0] * len(bos) + [1] * (len(alone) - len(bos))), truncated=truncated)


def length_batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory shows up at once).

    A batch holds at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens (one over-long row still
    forms a batch of its own). Ties keep input order, so batching is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _pad(items: list[Item], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(it.ids) for it in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    targets = torch.zeros((len(items), longest), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it.ids)
        ids[r, :n] = torch.tensor(it.ids)
        mask[r, :n] = 1
        targets[r, :n] = torch.tensor(it.targets) if it.targets is not None else 1
    return ids.to(device), mask.to(device), targets.to(device)


def run_items(scorer, items: list[Item], *, pad_id: int, device, batch_size: int, max_batch_tokens: int,
              on_batch=None) -> list[dict[str, Any]]:
    """Score sequences in length-sorted batches; results come back in input order."""
    results: list[dict[str, Any] | None] = [None] * len(items)
    for batch in length_batches([len(it.ids) for it in items], batch_size, max_batch_tokens):
        ids, mask, targets = _pad([items[i] for i in batch], pad_id, device)
        out = scorer(ids, mask, targets)
        out = {k: v.cpu().tolist() for k, v in out.items()}
        for r, i in enumerate(batch):
            results[i] = {k: v[r] for k, v in out.items()}
        if on_batch is not None:
            on_batch(len(batch))
    return results  # type: ignore[return-value]


def _finite(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def selection_score(score: str, row: dict[str, Any]) -> float | None:
    """The value rows are ranked by, higher is better.

    quality_* / routed_share: the score itself. perplexity: minus the mean token NLL (= -log perplexity).
    ifd: the IFD itself when below 1 (harder instructions first, as in the IFD paper); rows whose answer is
    no easier with the question than without (IFD >= 1, usually misaligned pairs) rank below all others.
    """
    if score == "perplexity":
        nll = row.get("_nll")
        return None if nll is None else -nll
    if score == "ifd":
        ifd = row.get("ifd")
        if ifd is None:
            return None
        return ifd if ifd < 1 else -ifd
    return row.get(score)


def score_shard(values: list, *, scorer, tokenizer, args: SelectArguments, max_len: int, device,
                want_router: bool, alone_scorer=None, on_rows=None) -> list[dict[str, Any]]:
    """Per-row score columns of one shard (every row gets a dict, skipped rows with nulls and a reason).

    ``alone_scorer`` (ifd only) scores the answers without their questions.
    """
    chat = bool(args.messages_field)
    prepared = prepare_rows(values, tokenizer, chat=chat, max_len=max_len, ifd=args.score == "ifd")
    live = [i for i, p in enumerate(prepared) if p.main is not None]
    pad_id = tokenizer.pad_token_id
    run = dict(pad_id=pad_id, device=device, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    main = run_items(scorer, [prepared[i].main for i in live], on_batch=on_rows, **run)
    alone = None
    if args.score == "ifd":
        alone = run_items(alone_scorer, [prepared[i].alone for i in live], **run)
    if on_rows is not None:
        on_rows(0, skipped=len(values) - len(live))

    rows: list[dict[str, Any]] = []
    by_index = {i: k for k, i in enumerate(live)}
    for i, p in enumerate(prepared):
        row: dict[str, Any] = {"truncated": p.truncated, "skip_reason": p.skip_reason, "n_tokens": 0}
        k = by_index.get(i)
        res = main[k] if k is not None else {}
        if want_router:
            for name in ROUTER_SCORES:
                row[name] = _finite(res.get(name))
            layers = res.get("quality_score_layers")
            row["quality_score_layers"] = None if k is None or row["quality_score"] is None else [float(x) for x in layers]
        if k is not None:
            row["n_tokens"] = len(p.main.ids)
        if args.score == "perplexity":
            nll = _finite(res.get("nll"))
            row["_nll"] = nll
            row["perplexity"] = None if nll is None else math.exp(nll)
        if args.score == "ifd":
            cond = _finite(res.get("nll"))
            solo = _finite(alone[k].get("nll")) if k is not None else None
            row["ifd_loss_conditioned"], row["ifd_loss_alone"] = cond, solo
            row["ifd"] = cond / solo if cond is not None and solo else None
        row["selection_score"] = _finite(selection_score(args.score, row))
        if row["skip_reason"] is None and row["selection_score"] is None:
            row["skip_reason"] = "no scoreable tokens"
        row.pop("_nll", None)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Selection, outputs
# --------------------------------------------------------------------------------------------------

def select_indices(scores: list[float | None], args: SelectArguments, n_total: int) -> list[int]:
    """Indices of the kept rows, best first; ties go to the earlier row. Rows without a score are never kept."""
    ranked = sorted((i for i, s in enumerate(scores) if s is not None), key=lambda i: (-scores[i], i))
    if args.score_threshold is not None:
        return [i for i in ranked if scores[i] >= args.score_threshold]
    if args.select_top_k is not None:
        return ranked[: args.select_top_k]
    return ranked[: min(len(ranked), max(1, round(args.select_ratio * n_total)))]


def score_statistics(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    q = np.quantile(a, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "p10": float(q[0]),
            "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p90": float(q[4]), "max": float(a.max())}


def plot_scores(path: str, values: list[float], cut: float | None, score: str, n_selected: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.files import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
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
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Fingerprints, shards, distributed bookkeeping
# --------------------------------------------------------------------------------------------------

def file_fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def data_fingerprint(source: str, ds) -> str:
    if os.path.isfile(source):
        return file_fingerprint(source)
    return "datasets:" + str(getattr(ds, "_fingerprint", "unknown"))


def model_fingerprint(model, routers) -> str:
    """Hash of the model config and the router weights: what the scores depend on that training changes."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for r in routers:
        h.update(r.name.encode())
        h.update(r.module.weight.detach().float().cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()


class Dist:
    """The few collective operations select_data.py needs; a no-op outside torchrun."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            # Ranks wait for each other only at the merge; a long pool on unequal hardware needs patience.
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=6))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def shard_path(shard_dir: str, shard: int) -> str:
    return os.path.join(shard_dir, f"scores-{shard:06d}.parquet")


def check_output_dir(args: SelectArguments, manifest: dict) -> bool:
    """Refuse to clobber earlier results or to resume shards made with other settings; True if results exist.

    Only reads, so every process can run it and fail with the same sentence.
    """
    manifest_path = os.path.join(args.output_dir, "shards", "manifest.json")
    existing = os.path.exists(manifest_path) or any(
        os.path.exists(os.path.join(args.output_dir, f"{n}.{fmt}"))
        for n in ("scored", "selected") for fmt in ("jsonl", "parquet"))
    if not existing or args.overwrite_output_dir:
        return existing
    if not args.resume:
        raise UserError(
            f"{args.output_dir} already holds select_data.py results; pass --resume to continue that run or "
            "--overwrite_output_dir to replace it."
        )
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if changed:
            raise UserError(
                f"Cannot resume in {args.output_dir}: its shards were scored with different {', '.join(changed)}; "
                "rerun with the original settings, or pass --overwrite_output_dir to start over."
            )
    return existing


def prepare_output_dir(args: SelectArguments, manifest: dict, existing: bool) -> None:
    """Clear earlier results when asked to overwrite them, and record the settings of this run's shards."""
    import shutil

    from lib.files import write_json

    shard_dir = os.path.join(args.output_dir, "shards")
    if existing and args.overwrite_output_dir:
        for name in os.listdir(args.output_dir):
            if name == "shards":
                shutil.rmtree(shard_dir)
            elif name.split(".")[0] in ("scored", "selected", "summary", "scores"):
                os.remove(os.path.join(args.output_dir, name))
    os.makedirs(shard_dir, exist_ok=True)
    write_json(os.path.join(shard_dir, "manifest.json"), manifest)


def write_shard(path: str, start: int, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lib.files import atomic_path

    columns: dict[str, list] = {"row": list(range(start, start + len(rows)))}
    for key in SCORE_COLUMNS:
        if key in rows[0]:
            columns[key] = [r[key] for r in rows]
    table = pa.table({k: pa.array(v, type=_column_type(k)) for k, v in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _column_type(name: str):
    import pyarrow as pa

    if name in ("row", "n_tokens"):
        return pa.int64()
    if name == "truncated":
        return pa.bool_()
    if name == "skip_reason":
        return pa.string()
    if name == "quality_score_layers":
        return pa.list_(pa.float64())
    return pa.float64()


def merge_shards(shard_dir: str, n_shards: int, n_rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(shard_dir, s))]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {shard_dir} are missing after scoring")
    table = pa.concat_tables([pq.read_table(shard_path(shard_dir, s)) for s in range(n_shards)])
    rows = table.column("row").to_pylist()
    if rows != list(range(n_rows)):
        raise RuntimeError(f"shards in {shard_dir} do not cover rows 0..{n_rows - 1} exactly once")
    return table.drop_columns(["row"])


# --------------------------------------------------------------------------------------------------
# The whole stage
# --------------------------------------------------------------------------------------------------

def run_selection(args: SelectArguments) -> dict[str, Any]:
    """Score, select and write everything; returns the summary (on every rank; only rank 0 writes files)."""
    from tqdm.auto import tqdm

    from lib.data import DataError, check_fields, load_rows
    from lib.files import package_versions, write_json, write_table
    from lib.models.loading import load_model, load_tokenizer, resolve_model_path
    from lib.models.moe import ExpertSplit, find_moe_routers, find_router_config, keep_routers_fp32, load_router_config
    from lib.scoring import BatchScorer

    dist = Dist()
    started = time.time()
    try:
        # ---- data ----------------------------------------------------------------------------------
        with dist.main_first():
            ds = load_rows(args.data_file, split=args.split, config_name=args.dataset_config_name)
        if args.max_samples:
            ds = ds.select(range(min(len(ds), args.max_samples)))
        column = args.messages_field or args.text_field
        check_fields(ds, args.data_file, text_field=args.text_field, messages_field=args.messages_field,
                     label_field=None)
        clash = [c for c in ds.column_names if c in SCORE_COLUMNS]
        if clash:
            raise DataError(f"{args.data_file} already has column(s) {clash} that select_data.py writes; rename or "
                            "drop them first (is this an already-scored file?).")

        # ---- model ---------------------------------------------------------------------------------
        path = resolve_model_path(args.router_model)
        want_router = args.score in ROUTER_SCORES or find_router_config(path, args.model_revision) is not None
        router_cfg = load_router_config(path, args.model_revision) if want_router else {}
        device = torch.device(f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
        attn = args.attn_implementation or "sdpa"
        with dist.main_first():
            tokenizer = load_tokenizer(args.router_model, revision=args.model_revision,
                                       trust_remote_code=args.trust_remote_code)
            model = load_model(args.router_model, dtype=dtype, attn_implementation=attn,
                               experts_implementation=args.experts_implementation, revision=args.model_revision,
                               trust_remote_code=args.trust_remote_code)
        model.to(device).eval()
        routers, masks, top_k = [], None, 1
        if want_router:
            routers = find_moe_routers(model)
            split = ExpertSplit.from_dict(router_cfg)
            if [r.layer for r in routers] != split.layers:
                raise UserError(
                    f"{args.router_model}: router_config.json lists router layers {split.layers} but the model has "
                    f"routers in layers {[r.layer for r in routers]}; point to the checkpoint folder it was saved with."
                )
            keep_routers_fp32(routers)
            masks, top_k = split.masks(device), split.top_k
        scorer = BatchScorer(model, routers=routers, garbage_masks=masks, top_k=top_k,
                             lm=args.score in LM_SCORES)
        alone_scorer = BatchScorer(model, lm=True) if args.score == "ifd" else None
        max_len = args.max_seq_length or int(router_cfg.get("scoring", {}).get("max_seq_length") or 512)

        # ---- shards --------------------------------------------------------------------------------
        n_rows = len(ds)
        n_shards = math.ceil(n_rows / args.shard_size)
        shard_dir = os.path.join(args.output_dir, "shards")
        manifest = {
            "format_version": SHARD_FORMAT_VERSION, "score": args.score, "model": model_fingerprint(model, routers),
            "data": data_fingerprint(args.data_file, ds), "rows": n_rows, "shard_size": args.shard_size,
            "max_seq_length": max_len, "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
            "field": column, "dtype": dtype, "device_type": device.type,
        }
        existing = check_output_dir(args, manifest)
        dist.barrier()  # every rank has checked before rank 0 changes anything
        if dist.main:
            prepare_output_dir(args, manifest, existing)
        dist.barrier()
        pending = [s for s in range(n_shards) if not os.path.exists(shard_path(shard_dir, s))]
        dist.barrier()  # every rank has listed the finished shards before anyone writes a new one
        mine = pending[dist.rank::dist.world]
        my_rows = sum(min(args.shard_size, n_rows - s * args.shard_size) for s in mine)
        bar = tqdm(total=my_rows, unit="row", dynamic_ncols=True, disable=args.disable_tqdm or not dist.main,
                   desc=f"scoring ({args.score})" + (f", rank 0 of {dist.world}" if dist.world > 1 else ""))

        def on_rows(n: int, skipped: int = 0) -> None:
            bar.update(n + skipped)

        score_started = time.time()
        for s in mine:
            start = s * args.shard_size
            values = ds.select(range(start, min(n_rows, start + args.shard_size)))[column]
            rows = score_shard(values, scorer=scorer, tokenizer=tokenizer, args=args, max_len=max_len,
                               device=device, want_router=want_router, alone_scorer=alone_scorer,
                               on_rows=on_rows)
            write_shard(shard_path(shard_dir, s), start, rows)
        bar.close()
        scoring_seconds = time.time() - score_started
        dist.barrier()

        # ---- merge, select, write (rank 0) ---------------------------------------------------------
        summary: dict[str, Any] = {}
        if dist.main:
            scores_table = merge_shards(shard_dir, n_shards, n_rows)
            base = ds.with_format("arrow")[0:n_rows]
            scored = base
            for name in scores_table.column_names:
                scored = scored.append_column(name, scores_table.column(name))
            values = scores_table.column("selection_score").to_pylist()
            chosen = select_indices(values, args, n_rows)
            selected = scored.take(chosen)
            ext = args.output_format
            write_table(scored, os.path.join(args.output_dir, f"scored.{ext}"), ext)
            write_table(selected, os.path.join(args.output_dir, f"selected.{ext}"), ext)
            valid = [v for v in values if v is not None]
            cut = values[chosen[-1]] if chosen else None
            reasons: dict[str, int] = {}
            for r in scores_table.column("skip_reason").to_pylist():
                if r is not None:
                    reasons[r] = reasons.get(r, 0) + 1
            summary = {
                "counts": {"rows": n_rows, "scored": len(valid), "unscored": n_rows - len(valid),
                           "selected": len(chosen),
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
                "max_seq_length": max_len,
                "dtype": dtype,
                "device": device.type,
                "processes": dist.world,
                "versions": package_versions(("torch", "transformers", "datasets", "sidekit")),
                "timing": {"scoring_seconds_rank0": round(scoring_seconds, 3),
                           "rows_per_second_rank0": round(my_rows / scoring_seconds, 2) if scoring_seconds > 0 else None,
                           "total_seconds": round(time.time() - started, 3)},
                "files": {"scored": f"scored.{ext}", "selected": f"selected.{ext}", "plot": "scores.png"},
            }
            plot_scores(os.path.join(args.output_dir, "scores.png"), valid, cut, args.score, len(chosen))
            write_json(os.path.join(args.output_dir, "summary.json"), summary)
        dist.barrier()
        return dist.broadcast(summary)
    finally:
        dist.close()
