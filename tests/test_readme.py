"""Every command in the README's code blocks, run as written, in order, so that the README cannot drift.

Only what a CPU test can afford changes: the model becomes a tiny builtin one, training stops after a few steps
(with a checkpoint each step, so the resume command has one), scoring and evaluation see a few rows, and the
launchers start 2 CPU processes on free ports. ``python`` commands run in this process (the scripts' ``main`` with
their own exit handling); ``torchrun``, ``deepspeed`` and ``accelerate launch`` commands run as launched.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from lib.core.errors import run_main
from tests.conftest import ROOT

# A group of its own (the commands run in order in one workspace), beside test_distributed.py's "launchers": the
# two serial groups run on the two xdist workers at once (ports: tests/test_distributed.py::free_port).
pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("readme")]
BIN = os.path.dirname(sys.executable)
MODELS = {"builtin:smollm2-135m-instruct": "builtin:tiny-llama", "Qwen/Qwen3-30B-A3B": "builtin:tiny-qwen3-moe"}
TRAINERS = ("train_router.py", "train_target.py", "pretrain_encoder.py", "train_fusion.py", "train_joint.py",
            "train_memory.py")
LAUNCHERS = ("torchrun", "deepspeed", "accelerate")


def readme_commands() -> list[str]:
    """Commands of the README's bash blocks (continuation lines joined, comments dropped), benchmarks aside: each
    benchmark has its own smoke test."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line.startswith(("python ", *(f"{launcher} " for launcher in LAUNCHERS))):
                if "benchmarks/" not in line:
                    commands.append(line)
    return commands


def free_port() -> str:
    from tests.test_distributed import free_port as port

    return str(port())


def adapt(argv: list[str]) -> list[str]:
    """The same command, small enough for a CPU test."""
    argv = [MODELS.get(a, a) for a in argv]
    script = next((a for a in argv if a.endswith(".py")), "")
    recipe = next((a for a in argv if a.startswith("recipes/") and a.endswith(".yaml")), None)
    if recipe and os.path.basename(script) in TRAINERS:
        argv += ["--model_name_or_path", "builtin:tiny-llama"]  # the recipes name the real model
    if os.path.basename(script) in TRAINERS:
        argv += ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1"]
        if "--report_to" not in argv:
            argv += ["--report_to", "none"]
        if recipe and recipe.startswith("recipes/memory/"):
            # the tiny models' small tokenizer spends more tokens per bank entry than SmolLM2's
            argv += ["--max_entry_tokens", "48", "--max_train_rows", "16", "--max_eval_rows", "8",
                     "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"]
    if os.path.basename(script) == "train_memory.py" and "recipes/recall/train_recall_smollm2.yaml" in argv:
        # the tiny random model extracts no memory from the logs: give it the generator's entries
        argv += ["--memories_file", "data/chats/facts.jsonl", "--max_qa_rows", "8", "--per_device_train_batch_size",
                 "4"]
    if "lib.recall.chats" in argv:
        argv += ["--users", "6"]
    elif script == "select_data.py":
        argv += ["--max_samples", "24", "--disable_tqdm"]
    elif script == "evaluate.py" and "--recall_model" in argv:
        argv += ["--max_new_tokens", "3"] + (["--probe_limit", "4"] if "--probe_file" in argv else [])
        if "--limit" in argv:
            argv[argv.index("--limit") + 1] = "2"
    elif script == "evaluate.py" and "--memory_model" in argv:
        argv[argv.index("--qa_limit") + 1] = "4"
        argv += ["--max_new_tokens", "3"]
    elif script == "evaluate.py":
        if "--limit" in argv:
            argv[argv.index("--limit") + 1] = "2"
        else:
            argv += ["--limit", "2"]
    for flag in ("--num_gpus", "--nproc_per_node", "--num_processes"):
        if flag in argv:
            argv[argv.index(flag) + 1] = "2"
    if argv[0] in ("torchrun", "deepspeed"):
        argv[1:1] = ["--master_port", free_port()]
    if argv[0] == "accelerate":
        argv[2:2] = ["--main_process_port", free_port()]
    return argv


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_runs():
    scripts = " ".join(COMMANDS)
    for needed in ("lib.selection.pools", *TRAINERS, "select_data.py", "evaluate.py", "torchrun", "deepspeed",
                   "accelerate launch"):
        assert needed in scripts, needed
    assert len(COMMANDS) >= 20


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder that looks like the repository root (scripts, recipes, configs) where outputs can pile up."""
    root = tmp_path_factory.mktemp("readme")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("recipes", "ds_configs", "lib"):
            os.symlink(os.path.join(ROOT, name), root / name)
    return root


def run_in_process(argv: list[str]) -> None:
    import importlib.util

    if argv[1] == "-m":
        module = __import__(argv[2], fromlist=["main"])
        module.main(argv[3:])
        return
    path = os.path.join(ROOT, argv[1])
    spec = importlib.util.spec_from_file_location(f"readme_{os.path.basename(path)[:-3]}", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        run_main(script.main, argv[2:])
    except SystemExit as exc:
        assert exc.code in (0, None), f"{' '.join(argv)} exited with {exc.code}"


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[c[:80] for c in COMMANDS])
def test_readme_command(index, workspace, monkeypatch):
    argv = adapt(shlex.split(COMMANDS[index]))
    monkeypatch.chdir(workspace)
    if argv[0] == "python":
        run_in_process(argv)
        return
    argv[0] = os.path.join(BIN, argv[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{(proc.stdout + proc.stderr)[-4000:]}"
