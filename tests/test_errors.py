"""Every bad input a user can make: one sentence naming the problem and the fix, exit status 2, and earlier outputs
left as they were. Each case ended in a raw traceback or in mixed outputs before it was handled."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pretrain_encoder
import select_data
import train_router
import train_target
from lib.core.errors import DataError, run_main
from lib.models.builtin import resolve_model_path
from tests.conftest import ROOT, write_jsonl
from tests.test_encoder import query_files, tools_file
from tests.test_select_data import router_checkpoint

TINY_MOE = "builtin:tiny-mixtral"


def refused(capsys, main, argv) -> str:
    """Run a script's main the way its command line does; return the one line it printed, asserting exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


def router_argv(train_file, out, *extra):
    return ["--model_name_or_path", TINY_MOE, "--train_file", train_file, "--output_dir", out,
            "--synthetic_negatives", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--max_seq_length", "32", "--report_to", "none", "--save_strategy", "no", *extra]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Arguments that can be checked must be refused before minutes of model loading."""
    import lib.models.adapters  # noqa: F401 - binds the real loader before it is replaced below
    import lib.models.loading as loading

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", forbidden)


def test_misspelled_flag_names_the_closest_one(capsys, tmp_path, pool_files, no_model_loading):
    line = refused(capsys, train_router.main, router_argv(pool_files["train"], tmp_path / "o", "--lerning_rate", "1e-3"))
    assert line == "error: unknown flag --lerning_rate; did you mean --learning_rate?"
    line = refused(capsys, select_data.main, ["--router_model", "x", "--data_file", "y", "--output_dir", "z",
                                              "--selct_ratio", "0.2"])
    assert "did you mean --select_ratio?" in line


def test_broken_recipes(capsys, tmp_path, no_model_loading):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: builtin:tiny-mixtral\ntrain_file: [a.jsonl\n")
    line = refused(capsys, train_router.main, [bad])
    assert "is not valid YAML at line" in line and "fix the file" in line
    line = refused(capsys, train_router.main, [tmp_path])
    assert "is a folder; pass a YAML or JSON file" in line
    (tmp_path / "typo.yaml").write_text("model_name_or_path: x\ntrain_file: a\nmax_seq_lenght: 3\n")
    line = refused(capsys, train_router.main, [tmp_path / "typo.yaml"])
    assert "unknown setting(s) ['max_seq_lenght'] (did you mean 'max_seq_length'?)" in line


def test_wrong_model_id_or_path(capsys, tmp_path, pool_files):
    line = refused(capsys, train_router.main, ["--model_name_or_path", "no-such-org/no-such-model",
                                               *router_argv(pool_files["train"], tmp_path / "o")[2:]])
    # Offline the hub cannot be asked; online it answers that there is no such repository.
    assert "no-such-org/no-such-model" in line
    assert ("hub is unreachable from this machine" in line) or ("was not found on the hub" in line)
    line = refused(capsys, train_router.main, ["--model_name_or_path", "./models/nope",
                                               *router_argv(pool_files["train"], tmp_path / "o")[2:]])
    assert line == "error: --model_name_or_path ./models/nope does not exist; check the path."


def test_eval_strategy_without_held_out_rows_is_refused_before_loading(capsys, tmp_path, pool_files,
                                                                       no_model_loading):
    line = refused(capsys, train_router.main, router_argv(pool_files["train"], tmp_path / "o", "--eval_strategy",
                                                          "epoch"))
    assert "--eval_strategy epoch evaluates held-out rows, and there are none; pass --validation_file" in line
    line = refused(capsys, train_target.main, ["--model_name_or_path", "builtin:tiny-llama", "--train_file",
                                               pool_files["train"], "--output_dir", tmp_path / "t",
                                               "--eval_strategy", "steps"])
    assert "--eval_strategy steps evaluates held-out rows" in line


def test_encoder_without_validation_file_trains_without_evaluating(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDEKIT_CACHE", str(tmp_path / "cache"))
    train, _ = query_files(tmp_path)
    summary = pretrain_encoder.main([
        "--model_name_or_path", "builtin:tiny-llama", "--tools_file", tools_file(tmp_path), "--train_file", train,
        "--output_dir", str(tmp_path / "enc"), "--num_train_epochs", "1", "--num_attention_heads", "4",
        "--report_to", "none"])
    assert summary["step0"] is None and summary["final"] is None
    assert os.path.exists(tmp_path / "enc" / "trainable.safetensors")


def test_resume_without_a_checkpoint(capsys, tmp_path, pool_files, no_model_loading):
    for main, argv in [
        (train_router.main, router_argv(pool_files["train"], tmp_path / "r")),
        (train_target.main, ["--model_name_or_path", "builtin:tiny-llama", "--train_file", pool_files["train"],
                             "--output_dir", tmp_path / "t"]),
        (pretrain_encoder.main, ["--model_name_or_path", "builtin:tiny-llama", "--tools_file",
                                 tools_file(tmp_path), "--train_file", query_files(tmp_path)[0], "--output_dir",
                                 tmp_path / "e"]),
    ]:
        line = refused(capsys, main, [*argv, "--resume_from_checkpoint", "true"])
        assert "holds no checkpoint-N folder to resume from; drop the flag" in line
        line = refused(capsys, main, [*argv, "--resume_from_checkpoint", tmp_path / "gone" / "checkpoint-9"])
        assert "checkpoint-9 is not a folder; pass a checkpoint-N folder" in line


def test_rerun_into_a_used_output_dir(capsys, tmp_path, pool_files):
    out = tmp_path / "r"
    train_router.main([str(a) for a in router_argv(pool_files["train"], out, "--save_strategy", "steps",
                                                   "--save_steps", "1", "--logging_steps", "1")])
    first = (out / "metrics.jsonl").read_text()
    line = refused(capsys, train_router.main, router_argv(pool_files["train"], out))
    assert "is not empty" in line and "--overwrite_output_dir" in line
    assert (out / "metrics.jsonl").read_text() == first  # nothing touched
    # Resuming from step 1 rewrites the metrics from that step: every step appears once.
    train_router.main([str(a) for a in router_argv(pool_files["train"], out, "--save_strategy", "steps",
                                                   "--save_steps", "1", "--logging_steps", "1",
                                                   "--resume_from_checkpoint", out / "checkpoint-1")])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged if "loss" in h] == [1, 2]
    # --overwrite_output_dir replaces the earlier run: its checkpoints and metrics are gone.
    (out / "merged").mkdir()
    train_router.main([str(a) for a in router_argv(pool_files["train"], out, "--overwrite_output_dir",
                                                   "--max_steps", "1")])
    assert not (out / "merged").exists() and not (out / "checkpoint-2").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 1


def test_recipe_selection_mode_is_replaced_by_the_command_line(tmp_path, pool_files):
    ckpt = router_checkpoint(tmp_path)
    recipe = tmp_path / "select.yaml"
    recipe.write_text(f"router_model: {ckpt}\ndata_file: {pool_files['val']}\noutput_dir: {tmp_path / 's'}\n"
                      "select_ratio: 0.5\ndisable_tqdm: true\n")
    summary = select_data.main([str(recipe), "--select_top_k", "3"])
    assert summary["counts"]["selected"] == 3 and summary["selection"]["select_ratio"] is None
    # The recipe's overwrite_output_dir never beats --resume on the command line.
    recipe.write_text(recipe.read_text() + "overwrite_output_dir: true\n")
    shards = sorted(f for f in os.listdir(tmp_path / "s" / "shards") if f.startswith("scores-"))
    stamps = [os.path.getmtime(tmp_path / "s" / "shards" / s) for s in shards]
    select_data.main([str(recipe), "--resume"])
    assert [os.path.getmtime(tmp_path / "s" / "shards" / s) for s in shards] == stamps


def test_malformed_summary_and_gated_hub_repo(capsys, tmp_path, pool_files, monkeypatch):
    sel = tmp_path / "sel"
    sel.mkdir()
    shutil.copy(pool_files["train"], sel / "selected.jsonl")
    (sel / "summary.json").write_text("{broken")
    line = refused(capsys, train_target.main, ["--model_name_or_path", "builtin:tiny-llama", "--train_file",
                                               sel / "selected.jsonl", "--output_dir", tmp_path / "t"])
    assert "summary.json is not valid JSON" in line and "rerun select_data.py" in line

    import httpx2
    import huggingface_hub.errors as hub_errors

    import lib.selection.split as split

    def gated(*args, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/org/gated"))
        raise hub_errors.GatedRepoError("Access to model org/gated is restricted.", response=response)

    monkeypatch.setattr(split, "hf_hub_download", gated)
    line = refused(capsys, select_data.main, ["--router_model", "org/gated", "--data_file", pool_files["val"],
                                              "--output_dir", tmp_path / "s"])
    assert "org/gated is a gated repository on the hub" in line and "log in" in line


def test_push_to_hub_offline_is_refused_before_training(capsys, tmp_path, pool_files, monkeypatch,
                                                        no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = refused(capsys, train_router.main, router_argv(pool_files["train"], tmp_path / "o", "--push_to_hub",
                                                          "--hub_model_id", "me/routers"))
    assert "--push_to_hub needs the model hub, which is unreachable" in line


# ---- crash safety: nothing half-written ------------------------------------------------------------------------

def test_select_data_results_appear_as_a_set(capsys, tmp_path, pool_files, monkeypatch):
    ckpt = router_checkpoint(tmp_path)
    argv = ["--router_model", ckpt, "--data_file", pool_files["val"], "--output_dir", str(tmp_path / "s"),
            "--disable_tqdm"]
    import lib.selection.outputs as outputs

    real = outputs.write_json

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        select_data.main(argv)
    assert (tmp_path / "s" / "selected.jsonl").exists() and not (tmp_path / "s" / "summary.json").exists()
    # A consumer refuses the incomplete set, and says how to finish it.
    line = refused(capsys, train_target.main, ["--model_name_or_path", "builtin:tiny-llama", "--train_file",
                                               tmp_path / "s" / "selected.jsonl", "--output_dir", tmp_path / "t"])
    assert "holds an unfinished select_data.py run" in line and "--resume" in line
    monkeypatch.setattr(outputs, "write_json", real)
    summary = select_data.main([*argv, "--resume"])
    assert summary["counts"]["rows"] == 32 and (tmp_path / "s" / "summary.json").exists()


def test_evaluate_keeps_the_base_results_when_the_tuned_run_crashes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("sidekit_evaluate_script", os.path.join(ROOT, "evaluate.py"))
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": f"{i} + 1 = ?", "choices": [str(i + 1), "zero"],
                                                     "answer": 0} for i in range(4)])
    import lib.models.adapters as adapters

    def broken(model, adapter_dir):
        raise RuntimeError("the tuned run crashed")

    monkeypatch.setattr(adapters, "merge_adapter_into", broken)
    with pytest.raises(RuntimeError, match="the tuned run crashed"):
        evaluate_script.main(["--model_name_or_path", "builtin:tiny-llama", "--adapter", str(adapter),
                              "--task_file", questions, "--output_dir", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results["runs"]) == ["base"] and results["runs"]["base"]["results"]


def test_replacing_a_folder_never_leaves_it_missing(tmp_path):
    from lib.core.files import _exchange, replace_dir

    target, new = tmp_path / "merged", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "model.txt").write_text("new")
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir()
    probe_b.mkdir()
    assert _exchange(str(probe_a), str(probe_b))  # the one-step swap is what this machine uses
    replace_dir(str(new), str(target))
    assert sorted(os.listdir(target)) == ["model.txt"] and not new.exists()


def test_caches_follow_the_weights_not_the_name(tmp_path, monkeypatch):
    """A local model retrained at the same path: the embeddings cache and select_data's resume both notice."""
    monkeypatch.setenv("SIDEKIT_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    shutil.copytree(resolve_model_path("builtin:tiny-llama"), model_dir)
    train, held = query_files(tmp_path)
    argv = ["--model_name_or_path", str(model_dir), "--tools_file", tools_file(tmp_path), "--train_file", train,
            "--num_train_epochs", "1", "--num_attention_heads", "4", "--report_to", "none",
            "--overwrite_output_dir", "--output_dir", str(tmp_path / "enc")]
    first = pretrain_encoder.main(argv)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    second = pretrain_encoder.main(argv)
    assert first["model_weights"] != second["model_weights"]
    keys = os.listdir(tmp_path / "cache" / "embeddings")
    assert len([k for k in keys if k.endswith(".safetensors")]) == 4  # tools and queries, for each weights

    ckpt = router_checkpoint(tmp_path)
    pool = write_jsonl(tmp_path / "p.jsonl", [{"text": f"row {i} of the pool"} for i in range(6)])
    select_argv = ["--router_model", ckpt, "--data_file", pool, "--output_dir", str(tmp_path / "s"),
                   "--disable_tqdm", "--shard_size", "2"]
    select_data.main(select_argv)
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    name = next(k for k in tensors if k.endswith("gate.weight"))
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, os.path.join(ckpt, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="different model"):
        select_data.main([*select_argv, "--resume"])


def test_task_file_rows_are_prompted_all_or_none(tmp_path):
    from lib.eval.task_file import task_file_yaml

    row = {"question": "Pick beta.", "choices": ["alpha", "beta"], "answer": 1}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [row, {**row, "prompt": "Say beta:"}])
    with pytest.raises(DataError, match="1 of 2 rows have a 'prompt'; give every row one or none"):
        task_file_yaml(mixed, str(tmp_path))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**row, "prompt": 3}])
    with pytest.raises(DataError, match="line 1: 'prompt' must be a string"):
        task_file_yaml(bad, str(tmp_path))
    prompted = write_jsonl(tmp_path / "prompted.jsonl", [{**row, "prompt": "Say beta:"}])
    name = task_file_yaml(prompted, str(tmp_path))
    assert 'doc_to_text: "{{prompt}}"' in (tmp_path / f"{name}.yaml").read_text()
