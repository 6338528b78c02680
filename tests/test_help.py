"""Every script's --help: complete (its own flags listed) and printed before any model loads. One process runs them
all (each one in a fresh process would pay the same imports again)."""

import subprocess
import sys

from tests.conftest import ROOT

SCRIPTS = {
    "train_router.py": ["--router_type", "--synthetic_negatives"],
    "select_data.py": ["--select_ratio", "--score"],
    "train_target.py": ["--use_peft"],
    "evaluate.py": ["--tasks", "--recall_model", "--probe_file"],
    "pretrain_encoder.py": ["--tools_file"],
    "train_fusion.py": ["--init_from"],
    "train_joint.py": ["--gate_loss_coef"],
    "train_memory.py": ["--memory_type"],
    "train_memory.py --memory_type recall": ["--chat_logs", "--k_folds", "--extractor_model"],
}
RUN_ALL = """
import runpy, sys
for command in sys.argv[1:]:
    script, *flags = command.split()
    print(f"===== {command}", flush=True)
    sys.argv = [script, *flags, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
"""


def test_every_script_prints_its_complete_help():
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(part.split("\n", 1) for part in proc.stdout.split("===== ")[1:])
    assert list(printed) == list(SCRIPTS)
    for command, flags in SCRIPTS.items():
        assert "usage" in printed[command].lower(), command
        for flag in flags:
            assert flag in printed[command], (command, flag)
