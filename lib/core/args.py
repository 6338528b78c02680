"""Command lines and recipes: ``script.py [recipe.yaml|json] [--field value ...]`` into argument dataclasses.

Values in the recipe become the defaults and flags on the command line override them. Every mistake is one
sentence: an unknown flag (with the closest known one), a recipe that is not a YAML/JSON mapping, a setting the
script does not have, an invalid value. ``--help`` lists the script's own settings and the common Trainer ones;
``--help_all`` lists everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from typing import Any

import yaml
from transformers import HfArgumentParser

from lib.core.errors import UserError

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")

# Trainer settings worth seeing in --help (the other ~100 appear with --help_all).
COMMON_TRAINER_FLAGS = frozenset({
    "output_dir", "overwrite_output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "lr_scheduler_type",
    "warmup_steps", "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
    "seed", "bf16", "fp16", "gradient_checkpointing", "report_to", "run_name", "push_to_hub", "hub_model_id",
    "resume_from_checkpoint", "deepspeed", "dataloader_num_workers", "max_length", "callbacks",
})
# Settings that exclude each other: when the command line sets one, the recipe's values for the others are dropped.
EXCLUSIVE_GROUPS = (
    ("select_ratio", "select_top_k", "score_threshold"),
    ("resume", "overwrite_output_dir"),
)


def read_recipe(path: str) -> dict[str, Any]:
    """A recipe file as a mapping of setting names to values; anything else is one sentence."""
    if os.path.isdir(path):
        raise UserError(f"Recipe {path} is a folder; pass a YAML or JSON file (e.g. recipes/train_router_smollm2.yaml).")
    if not os.path.exists(path):
        raise UserError(f"Recipe {path} does not exist; pass an existing YAML/JSON file or only flags.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"Recipe {path} is not valid YAML{where} ({problem}); fix the file.") from None
    except json.JSONDecodeError as err:
        raise UserError(f"Recipe {path} is not valid JSON at line {err.lineno} ({err.msg}); fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Recipe {path} must be a mapping of setting names to values, got {type(data).__name__}.")
    return data


def peek_setting(argv: list[str], name: str) -> Any:
    """The value of setting ``name`` on the command line (``--name v`` or ``--name=v``) or else in the recipe, without
    parsing anything else (scripts that switch on it, like ``train_router.py --router_type``)."""
    argv = _split_launcher_flags(argv, False)  # the deepspeed launcher's --local_rank=N comes before the recipe
    flag = f"--{name}"
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    if argv and not argv[0].startswith("-") and argv[0].endswith(RECIPE_SUFFIXES) and os.path.isfile(argv[0]):
        return read_recipe(argv[0]).get(name)
    return None


def resume_argument(value: str | bool | None) -> str | bool | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true`` for the newest one in output_dir."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true" or None
    return value or None


def _split_launcher_flags(argv: list[str], accepts_local_rank: bool) -> list[str]:
    """The deepspeed launcher (and torch.distributed.launch) put ``--local_rank=N`` before the script's own
    arguments; move it after the recipe path, or drop it for scripts that take no such setting (the rank is also in
    the environment)."""
    rank_flags = [a for a in argv if a.startswith(("--local_rank=", "--local-rank="))]
    rest = [a for a in argv if a not in rank_flags]
    return rest + ([f.replace("--local-rank=", "--local_rank=") for f in rank_flags] if accepts_local_rank else [])


def _own_fields(dataclass_types: tuple) -> set[str]:
    """Fields declared by the toolkit's own classes (always shown in --help)."""
    own = set()
    for dc in dataclass_types:
        for cls in dc.__mro__:
            if cls.__module__.startswith("lib.") and dataclasses.is_dataclass(cls):
                own.update(cls.__dict__.get("__annotations__", {}))
    return own


def _hide_uncommon_flags(parser: argparse.ArgumentParser, dataclass_types: tuple) -> None:
    own = _own_fields(dataclass_types)
    for action in parser._actions:
        if action.dest not in own and action.dest not in COMMON_TRAINER_FLAGS and action.dest != "help":
            action.help = argparse.SUPPRESS
    parser.epilog = "Trainer settings not listed here: --help_all."


def _refuse(message: str) -> None:
    raise UserError(message)


def parse_args(dataclass_types: tuple, argv: list[str] | None = None):
    """Parse ``[recipe.yaml|json] [--flag value ...]`` into the given dataclasses (recipe values become defaults)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init}
    argv = _split_launcher_flags(argv, "local_rank" in known)
    parser = HfArgumentParser(dataclass_types)
    parser.error = lambda message: _refuse(f"{message[0].upper()}{message[1:]}; see --help.")
    if "--help_all" in argv:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        _hide_uncommon_flags(parser, dataclass_types)
    recipe: dict[str, Any] = {}
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    if argv and not argv[0].startswith("-"):
        # The first argument, when it is not a flag, is the recipe.
        path = argv.pop(0)
        if not os.path.isdir(path) and not path.endswith(RECIPE_SUFFIXES):
            raise UserError(f"The first argument, {path}, is taken as a recipe and must be a .yaml, .yml or .json "
                            "file; pass settings as --flag value.")
        recipe = read_recipe(path)
        unknown = sorted(set(recipe) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"Recipe {path} has unknown setting(s) {unknown}{hint}; check the spelling against --help.")
        for group in EXCLUSIVE_GROUPS:
            if given & set(group):
                for name in set(group) - given:
                    recipe.pop(name, None)
        given |= set(recipe)
        # Settings given by the recipe are no longer required on the command line.
        for action in parser._actions:
            if action.dest in recipe:
                action.required = False
        parser.set_defaults(**recipe)
    namespace, remaining = parser.parse_known_args(args=argv)
    if remaining:
        flag = next((a for a in remaining if a.startswith("-")), remaining[0])
        name = flag.lstrip("-").split("=", 1)[0]
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; see --help for the settings this script takes."
        what = "unknown flag" if flag.startswith("-") else "unexpected argument"
        if not flag.startswith("-") and flag.endswith(RECIPE_SUFFIXES):
            hint = "; a recipe file must come first, before any flag."
        raise UserError(f"{what} {flag}{hint}")
    outputs = []
    for dc in dataclass_types:
        names = {f.name for f in dataclasses.fields(dc) if f.init}
        values = {k: v for k, v in vars(namespace).items() if k in names}
        try:
            outputs.append(dc(**values))
        except UserError:
            raise
        except ValueError as err:  # the libraries' own argument checks (TrainingArguments, SFTConfig)
            message = " ".join(str(err).split())
            raise UserError(message if message.endswith(".") else message + ".") from None
    for obj in outputs:
        # Which settings the user wrote (command line or recipe), for defaults that depend on the rest of the run.
        object.__setattr__(obj, "_given", frozenset(given & {f.name for f in dataclasses.fields(obj)}))
    return tuple(outputs)


def given_settings(args) -> frozenset[str]:
    """The settings of ``args`` (a dataclass from :func:`parse_args`) that the command line or the recipe set."""
    return getattr(args, "_given", frozenset())
