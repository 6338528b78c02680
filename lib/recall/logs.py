"""Chat logs in, and what a run remembers about them: the state file and the lock.

Logs are jsonl / json / parquet files, or a folder of them, with rows
``{"conversation_id", "user_id", "timestamp", "messages": [{"role", "content"}, ...]}``. The state file
(``state.json`` in the output folder) maps every processed conversation id to a hash of its content, so a rerun
extracts only new or changed conversations. A lock file beside the output folder refuses a second run at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from typing import Iterator

from lib.core.data import check_messages, load_rows
from lib.core.errors import DataError, UserError
from lib.core.files import write_json

STATE_FILE = "state.json"
LOG_SUFFIXES = (".jsonl", ".json", ".parquet")
REQUIRED = ("conversation_id", "user_id", "timestamp", "messages")


def log_files(source: str) -> list[str]:
    """The log files of ``source``: the file itself, or the log files directly inside a folder (sorted)."""
    if not os.path.exists(source):
        raise DataError(f"{source} does not exist; pass a chat-log file (.jsonl, .json, .parquet) or a folder of them.")
    if os.path.isfile(source):
        return [source]
    files = sorted(os.path.join(source, name) for name in os.listdir(source) if name.endswith(LOG_SUFFIXES))
    if not files:
        raise DataError(f"{source} holds no .jsonl, .json or .parquet chat-log files.")
    return files


def read_conversations(source: str) -> list[dict]:
    """Every conversation of the logs, checked; a conversation id seen twice keeps its last row."""
    conversations: dict[str, dict] = {}
    for path in log_files(source):
        rows = load_rows(path)
        missing = [name for name in REQUIRED if name not in rows.column_names]
        if missing:
            raise DataError(f"{path} has no {', '.join(repr(m) for m in missing)} field; chat-log rows need "
                            f"{', '.join(REQUIRED)}.")
        for i, row in enumerate(rows):
            for name in ("conversation_id", "user_id"):
                if row[name] in (None, ""):
                    raise DataError(f"{path} row {i}: '{name}' is empty; every conversation needs one.")
            messages = check_messages(row["messages"], path, i, "messages")
            conversations[str(row["conversation_id"])] = {
                "conversation_id": str(row["conversation_id"]), "user_id": str(row["user_id"]),
                "timestamp": str(row["timestamp"]),
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    return list(conversations.values())


def conversation_hash(conversation: dict) -> str:
    payload = json.dumps([conversation["user_id"], conversation["timestamp"], conversation["messages"]],
                         sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_state(output_dir: str) -> dict:
    """``{"conversations": {id: hash}}`` of the last finished run in ``output_dir`` (empty without one)."""
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.exists(path):
        return {"conversations": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_state(output_dir: str, conversations: list[dict], previous: dict) -> None:
    state = dict(previous)
    state["conversations"] = {c["conversation_id"]: conversation_hash(c) for c in conversations}
    write_json(os.path.join(output_dir, STATE_FILE), state)


def new_or_changed(conversations: list[dict], state: dict) -> list[dict]:
    known = state.get("conversations", {})
    return [c for c in conversations if known.get(c["conversation_id"]) != conversation_hash(c)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(output_dir: str) -> Iterator[str]:
    """Hold ``<output_dir>.lock`` for the run; another live run holding it is refused, a stale one (its process is
    gone) is taken over."""
    path = os.path.abspath(output_dir).rstrip(os.sep) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise UserError(f"Another recall-memory run (process {pid}) is writing {output_dir}; wait for it to "
                                f"finish, or delete {path} if that process is not one of ours.") from None
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield path
        finally:
            os.remove(path)
        return
    raise UserError(f"Could not take the lock {path}; delete it if no run is writing {output_dir}.")


def given_entries(path: str) -> list[dict]:
    """Entries written elsewhere (``--memories_file``): {user_id, text} rows, or {user_id, memory}; rows with
    ``"current": false`` (a value replaced later) are left out."""
    rows = load_rows(path)
    field = "text" if "text" in rows.column_names else "memory" if "memory" in rows.column_names else None
    if field is None or "user_id" not in rows.column_names:
        raise DataError(f"{path} needs user_id and text (or memory) in every row.")
    entries = []
    for i, row in enumerate(rows):
        if row.get("current") is False:
            continue  # a generator's fact that a later one replaced
        if not row[field] or not row["user_id"]:
            raise DataError(f"{path} row {i}: empty user_id or {field}.")
        entries.append({"user_id": str(row["user_id"]), "text": row[field],
                        "conversation_id": str(row.get("conversation_id") or f"given-{i}"),
                        "timestamp": str(row.get("timestamp") or "")})
    return entries
