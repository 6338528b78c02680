"""2-process CPU runs: DDP (torchrun), DeepSpeed ZeRO-2 and ZeRO-3 (deepspeed launcher)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lib.models.builtin import resolve_model_path
from tests.conftest import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("launchers")]
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    """A free port from this pytest-xdist worker's own range: launcher tests run on both workers at once (two
    xdist groups), and a port the OS hands out to one worker could otherwise be taken by the other's launcher in
    the seconds before torchrun binds it. Within a worker, launches run one after another."""
    import random

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + 2000 * (index % 10)
    for port in random.sample(range(low, low + 2000), 2000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{low + 1999}")


def run_launcher(launcher, script, args):
    """``torchrun`` (DDP) or ``deepspeed`` with 2 CPU processes, from the repository root."""
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_port", port, script]
    else:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", port, script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT,
           "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    # DeepSpeed's CPU all-reduce never removes its 67 MB shared-memory files; run_main does, on every exit path.
    left = [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in n]
    assert not left, f"{launcher} left shared-memory files behind: {left}"
    return proc


def launch(launcher, out_dir, train_file, *extra, model="builtin:tiny-mixtral", script="train_router.py"):
    return run_launcher(launcher, script, [
        "--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(out_dir),
        "--synthetic_negatives", "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--max_seq_length", "48", "--learning_rate", "5e-3", "--logging_steps", "1", "--report_to", "none",
        "--save_strategy", "no", "--seed", "3", "--save_full_model", *extra])


def check_only_routers_changed(out_dir, model):
    """--save_full_model's checkpoint differs from the base model in the routers alone, and both processes trained
    together: after 4 steps of 4 rows per process over 96 rows (48 good + 48 synthetic), 4 / 12 of an epoch."""
    before = load_file(os.path.join(resolve_model_path(model), "model.safetensors"))
    after = load_file(os.path.join(out_dir, "model.safetensors"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith(".gate.weight") and "shared" not in k for k in changed), changed
    assert len(changed) == 2  # one router per layer of the tiny models
    state = json.load(open(os.path.join(out_dir, "trainer_state.json")))
    assert state["epoch"] == pytest.approx(4 / 12), "the 2 processes did not train as one job"
    return load_file(os.path.join(out_dir, "trainable.safetensors"))


@pytest.fixture(scope="module")
def ddp_routers(tmp_path_factory, pool_files):
    out = tmp_path_factory.mktemp("ddp")
    proc = launch("torchrun", out, pool_files["train"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return check_only_routers_changed(out, "builtin:tiny-mixtral")


def test_ddp_trains_only_routers(ddp_routers):
    assert set(ddp_routers) == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_matches_ddp(stage, tmp_path, pool_files, ddp_routers):
    proc = launch("deepspeed", tmp_path, pool_files["train"], "--deepspeed", f"ds_configs/{stage}.json",
                  "--save_strategy", "steps", "--save_steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    routers = check_only_routers_changed(tmp_path, "builtin:tiny-mixtral")
    for name, weight in ddp_routers.items():
        assert torch.allclose(routers[name], weight, atol=1e-5), (stage, name, (routers[name] - weight).abs().max())
    # The DeepSpeed checkpoint leaves the frozen weights out, and resuming from it reproduces the uninterrupted run
    # (under ZeRO-3 only, where resuming has the most to get wrong: partitioned weights, a non-strict module load;
    # one launch less keeps the suite's time down).
    engine_state = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in
                       os.walk(tmp_path / "checkpoint-2" / "global_step2") for f in files)
    assert engine_state < os.path.getsize(os.path.join(resolve_model_path("builtin:tiny-mixtral"), "model.safetensors"))
    if stage != "zero3":
        return
    resumed = tmp_path / "resumed"
    proc = launch("deepspeed", resumed, pool_files["train"], "--deepspeed", f"ds_configs/{stage}.json",
                  "--resume_from_checkpoint", str(tmp_path / "checkpoint-2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = load_file(os.path.join(resumed, "trainable.safetensors"))
    for name, weight in routers.items():
        assert torch.allclose(again[name], weight, atol=1e-6), (stage, name, (again[name] - weight).abs().max())


# Qwen3-MoE under ZeRO-3 is the README's own command (tests/test_readme.py).
@pytest.mark.parametrize("model", ["builtin:tiny-olmoe", "builtin:tiny-qwen2-moe"])
def test_zero3_router_only_other_families(model, tmp_path, pool_files):
    proc = launch("deepspeed", tmp_path, pool_files["train"], "--deepspeed", "ds_configs/zero3.json", model=model)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_only_routers_changed(tmp_path, model)


def test_zero3_fails_without_the_input_grad_fix(tmp_path, pool_files):
    """Negative control: the same ZeRO-3 run with the fix removed hits the original backward failure."""
    proc = launch("deepspeed", tmp_path, pool_files["train"], "--deepspeed", "ds_configs/zero3.json",
                  script="tests/zero3_without_fix.py")
    assert proc.returncode != 0
    assert "The size of tensor a (0) must match the size of tensor b" in proc.stderr + proc.stdout


# ---- train_target.py: LoRA under DDP, ZeRO-2 and ZeRO-3 ------------------------------------------------------

def launch_target(launcher, out_dir, train_file, *extra):
    return run_launcher(launcher, "train_target.py", [
        "--model_name_or_path", "builtin:tiny-llama", "--train_file", train_file, "--dataset_text_field", "text",
        "--output_dir", str(out_dir), "--use_peft", "--lora_r", "4", "--lora_dropout", "0", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--max_length", "64", "--learning_rate", "5e-3", "--logging_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--seed", "3", "--activation_checkpointing", "false", *extra])


@pytest.fixture(scope="module")
def ddp_adapter(tmp_path_factory, pool_files):
    out = tmp_path_factory.mktemp("ddp_lora")
    proc = launch_target("torchrun", out, pool_files["train"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_two_processes_trained_as_one(out)
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def assert_two_processes_trained_as_one(out_dir):
    # 3 steps of 2 rows per process over the 48 rows: 3 / 12 of an epoch (one process alone would be at 3 / 24).
    state = json.load(open(os.path.join(out_dir, "trainer_state.json")))
    assert state["epoch"] == pytest.approx(3 / 12), state["epoch"]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_lora_target_deepspeed_matches_ddp(stage, tmp_path, pool_files, ddp_adapter):
    proc = launch_target("deepspeed", tmp_path, pool_files["train"], "--deepspeed", f"ds_configs/{stage}.json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_two_processes_trained_as_one(tmp_path)
    adapter = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert adapter.keys() == ddp_adapter.keys()
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    for name, weight in ddp_adapter.items():
        assert torch.allclose(adapter[name], weight, atol=1e-5), (stage, name, (adapter[name] - weight).abs().max())


def test_runs_end_cleanly_when_gloo_threads_finish_late():
    """Regression: a successful 2-process run aborted at exit ("terminate called without an active exception")
    when gloo's worker threads finished after the interpreter began shutting down. tests/exit_race.py makes that
    timing certain (one core, idle-class gloo threads); its --without-fix mode aborts every time."""
    proc = run_launcher("torchrun", "tests/exit_race.py", [])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "terminate called" not in out
    assert out.count(" done") == 2


@pytest.mark.parametrize("failing", ["all", "1"])
def test_a_user_error_ends_every_rank_at_once_and_is_printed_once(failing):
    import time

    start = time.time()
    proc = run_launcher("torchrun", "tests/rank_error.py", [failing])
    elapsed = time.time() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert len(errors) == 1, out[-3000:]
    # Every rank fails alike: rank 0 says it. Rank 1 alone: it says so itself, after its grace period.
    assert errors[0] == ("error: the input of rank 0 is bad; fix it." if failing == "all"
                         else "error (rank 1): the input of rank 1 is bad; fix it.")
    assert elapsed < 120  # not the process group's 30-minute timeout


# ---- explicit memory: the joint stage (gate and fusion both train) under DDP, ZeRO-2 and ZeRO-3 ----------------

@pytest.fixture(scope="module")
def memory_setup(tmp_path_factory):
    """The tiny fact set and a stage-1 gate to continue from (trained in this process: one step)."""
    import train_router
    from lib.memory import facts
    from tests.test_memory_model import stage_args

    d = tmp_path_factory.mktemp("memory")
    facts.build(str(d), people_count=12, seed=2, general_rows=0)
    train_router.main(["--router_type", "memory_gate", *stage_args(d, d / "gate", "--max_steps", "1",
                                                                   "--eval_strategy", "no")])
    return d


def launch_joint(launcher, setup, out_dir, *extra):
    from tests.test_memory_model import stage_args

    args = stage_args(setup, out_dir, "--init_from", str(setup / "gate"), "--max_steps", "2", "--eval_strategy",
                      "no", "--save_strategy", "no", "--per_device_train_batch_size", "4", *extra)
    # Settings of the saved gate (query layer, key width) come from --init_from; drop the ones it fixes.
    return run_launcher(launcher, "train_joint.py", args)


@pytest.fixture(scope="module")
def ddp_memory(tmp_path_factory, memory_setup):
    out = tmp_path_factory.mktemp("ddp_memory")
    proc = launch_joint("torchrun", memory_setup, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(os.path.join(out, "trainable.safetensors"))


def test_memory_joint_ddp_trains_gate_and_fusion(ddp_memory, memory_setup):
    before = load_file(os.path.join(memory_setup / "gate", "trainable.safetensors"))
    changed = {n.split(".")[0] for n in before if n in ddp_memory and not torch.equal(before[n], ddp_memory[n])}
    assert changed == {"gate"} | ({"fusions"} if any(n.startswith("fusions.") for n in before) else set())
    assert any(n.startswith("fusions.") for n in ddp_memory)


def test_memory_gate_stage_ddp_equals_zero3(tmp_path, memory_setup):
    # Stage 1 trains the gate on stored query-layer states through the wrapped model's forward. Called around the
    # DDP wrapper (as it once was), the processes' gradients were never averaged and the weights differed from
    # ZeRO-3's by whole learning-rate steps.
    from tests.test_memory_model import stage_args

    weights = {}
    for launcher, extra in (("torchrun", ()), ("deepspeed", ("--deepspeed", "ds_configs/zero3.json"))):
        out = tmp_path / launcher
        args = ["--router_type", "memory_gate", *stage_args(memory_setup, out, "--max_steps", "3", "--eval_strategy",
                                                            "no", "--save_strategy", "no",
                                                            "--per_device_train_batch_size", "4", *extra)]
        proc = run_launcher(launcher, "train_router.py", args)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "query-layer states of" in proc.stdout
        weights[launcher] = load_file(os.path.join(out, "trainable.safetensors"))
    ddp, zero3 = weights["torchrun"], weights["deepspeed"]
    start = load_file(os.path.join(memory_setup / "gate", "trainable.safetensors"))
    assert ddp.keys() == zero3.keys() and any(not torch.equal(ddp[n], start[n]) for n in ddp if n.startswith("gate."))
    for name, weight in ddp.items():
        if name.endswith("_pool.bias"):
            # A pooling bias shifts every score of a softmax equally: its gradient is zero up to rounding, which
            # Adam turns into steps of random sign.
            continue
        assert torch.allclose(zero3[name], weight, atol=1e-5), (name, (zero3[name] - weight).abs().max())


# ZeRO-2 runs in tests/test_readme.py (the README's deepspeed command for train_memory.py).
@pytest.mark.parametrize("stage", ["zero3"])
def test_memory_joint_deepspeed_matches_ddp(stage, tmp_path, memory_setup, ddp_memory):
    proc = launch_joint("deepspeed", memory_setup, tmp_path, "--deepspeed", f"ds_configs/{stage}.json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = load_file(os.path.join(tmp_path, "trainable.safetensors"))
    assert weights.keys() == ddp_memory.keys()
    for name, weight in ddp_memory.items():
        if name.endswith("_pool.bias"):
            # Zero gradient up to rounding (a softmax shift): Adam turns the two reductions' last bits into steps of
            # either sign, so these alone may differ (once in a few loaded runs).
            continue
        assert torch.allclose(weights[name], weight, atol=1e-5), (stage, name, (weights[name] - weight).abs().max())
