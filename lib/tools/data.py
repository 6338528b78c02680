"""The tool encoder's inputs: ``tools.json`` (validated), resource facts as features, and query rows."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from lib.core.data import load_rows
from lib.core.errors import DataError, UserError


@dataclass
class Tool:
    name: str
    description: str
    resources: dict[str, float]
    group: str | None = None  # tools that do the same job share one; resources decide between them

    def text(self) -> str:
        return f"{self.name}: {self.description}"


def load_tools(path: str) -> list[Tool]:
    """Read and validate ``tools.json`` (a list of ``{"name", "description", "resources": {...}, "group"?}``)."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass --tools_file with a JSON list of tools.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}).") from err
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} must hold a non-empty JSON list of tools.")
    tools, seen = [], set()
    for i, entry in enumerate(data):
        where = f"{path} tool {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise UserError(f"{where} needs a non-empty string 'name'.")
        name = entry["name"].strip()
        where = f"{path} tool '{name}'"
        if name in seen:
            raise UserError(f"{path} lists the tool '{name}' twice; tool names must be unique.")
        seen.add(name)
        if "description" not in entry:
            if "desc" in entry:
                raise UserError(f"{where} uses the old field 'desc'; rename it to 'description'.")
            raise UserError(f"{where} has no 'description'; every tool needs one (its semantic embedding reads it).")
        description = entry["description"]
        if not isinstance(description, str) or not description.strip():
            raise UserError(f"{where} has an empty 'description'; describe what the tool does.")
        resources = entry.get("resources", {})
        if not isinstance(resources, dict):
            raise UserError(f"{where}: 'resources' must be an object of numeric facts, e.g. {{\"latency_ms\": 40}}.")
        clean = {}
        for key, value in resources.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{where}: resource '{key}' is {value!r}; resources must be finite numbers.")
            clean[key] = float(value)
        group = entry.get("group")
        if group is not None and (not isinstance(group, str) or not group.strip()):
            raise UserError(f"{where}: 'group' is {group!r}; give a name shared by the tools that do the same job.")
        tools.append(Tool(name, description.strip(), clean, group.strip() if group else None))
    return tools


def tool_groups(tools: list[Tool]) -> list[list[int]]:
    """The tools' indices by job, in order of first appearance: the members of each ``"group"``, and every tool
    without a group alone."""
    groups: dict[str, list[int]] = {}
    for i, tool in enumerate(tools):
        groups.setdefault(tool.group or "\0" + tool.name, []).append(i)
    return list(groups.values())


def resource_matrix(tools: list[Tool]) -> tuple[torch.Tensor, list[str]]:
    """``(tools, 2 * keys)``: each resource z-scored over the tools (log scale for positive, wide-ranging facts such
    as latency or memory), plus a 0/1 column saying whether the tool reports it. Missing values are 0."""
    keys = sorted({k for t in tools for k in t.resources})
    cols, masks = [], []
    for key in keys:
        values = [t.resources.get(key) for t in tools]
        present = [v for v in values if v is not None]
        use_log = all(v > 0 for v in present) and max(present) / max(min(present), 1e-12) > 20
        xs = [math.log(v) if use_log else v for v in present]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) or 1.0
        cols.append([0.0 if v is None else ((math.log(v) if use_log else v) - mean) / std for v in values])
        masks.append([0.0 if v is None else 1.0 for v in values])
    if not keys:
        return torch.zeros(len(tools), 0), []
    features = torch.tensor(cols + masks, dtype=torch.float32).T.contiguous()
    return features, keys


def load_tool_queries(source: str, tool_names: list[str], *, query_field: str = "query", tool_field: str = "tool",
                      kind_field: str = "kind") -> tuple[list[str], list[int], list[int]]:
    """``(queries, tool indices, resource flags)`` from rows of ``{"query", "tool", "kind"?}``.

    ``kind`` "resource" marks a query that only resource facts can settle ("the fastest ...", "fits in 4 GB");
    anything else, or no kind, is a semantic query.
    """
    ds = load_rows(source)
    for name in (query_field, tool_field):
        if name not in ds.column_names:
            raise DataError(f"{source} has no field '{name}' (fields: {', '.join(ds.column_names)}).")
    index = {name: i for i, name in enumerate(tool_names)}
    kinds = ds[kind_field] if kind_field in ds.column_names else [None] * len(ds)
    queries, tools, resource = [], [], []
    for row, (query, tool, kind) in enumerate(zip(ds[query_field], ds[tool_field], kinds, strict=True)):
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{source} row {row}: field '{query_field}' is empty.")
        if tool not in index:
            raise DataError(f"{source} row {row}: tool '{tool}' is not in the tools file; fix the name or add the tool.")
        queries.append(query.strip())
        tools.append(index[tool])
        resource.append(int(kind == "resource"))
    return queries, tools, resource

