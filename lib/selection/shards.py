"""select_data.py's shards: the unit of resuming and of sharing work between processes.

The pool is cut into fixed shards of consecutive rows, each scored into its own small parquet file written
atomically under ``output_dir/shards/``, next to a manifest of what the scores depend on (settings, the model's
weights, the data). A rerun with ``--resume`` skips finished shards and refuses if anything in the manifest changed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lib.core.cache import file_digest
from lib.core.errors import UserError
from lib.core.files import atomic_path, write_json
from lib.selection.args import SelectArguments
from lib.selection.scores import ROUTER_SCORES

# Columns select_data.py adds to every row; an input that already has one of them is refused.
SCORE_COLUMNS = (*ROUTER_SCORES, "quality_score_layers", "perplexity", "ifd", "ifd_loss_conditioned",
                 "ifd_loss_alone", "fasttext", "probe", "selection_score", "n_tokens", "truncated", "skip_reason")


SHARD_FORMAT_VERSION = 2


def shard_size_for(n_rows: int, requested: int | None) -> int:
    """Rows per shard: ``--shard_size``, or by default about 64 shards (16 to 2048 rows each).

    It depends on the pool alone, never on the number of processes, so the batches (and the bytes written) are the
    same however many processes score; and a small pool still has a shard for each of up to 64 processes.
    """
    if requested:
        return requested
    return min(2048, max(16, math.ceil(n_rows / 64)))


def data_fingerprint(source: str, ds) -> str:
    if os.path.isfile(source):
        return file_digest(source)
    return "datasets:" + str(getattr(ds, "_fingerprint", "unknown"))


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

    columns: dict[str, list] = {"row": list(range(start, start + len(rows)))}
    for key in SCORE_COLUMNS:
        if key in rows[0]:
            columns[key] = [r[key] for r in rows]
    table = pa.table({k: pa.array(v, type=_column_type(k)) for k, v in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _column_type(name: str):

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

    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(shard_dir, s))]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {shard_dir} are missing after scoring")
    table = pa.concat_tables([pq.read_table(shard_path(shard_dir, s)) for s in range(n_shards)])
    rows = table.column("row").to_pylist()
    if rows != list(range(n_rows)):
        raise RuntimeError(f"shards in {shard_dir} do not cover rows 0..{n_rows - 1} exactly once")
    return table.drop_columns(["row"])

