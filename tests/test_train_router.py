import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_router
from lib.core.errors import UserError
from lib.models.builtin import resolve_model_path
from tests.conftest import ROOT, write_jsonl


def run(tmp_path, train_file, *extra, model="builtin:tiny-mixtral", out="out"):
    out_dir = str(tmp_path / out)
    argv = ["--model_name_or_path", model, "--train_file", train_file, "--output_dir", out_dir,
            "--per_device_train_batch_size", "8", "--max_seq_length", "48", "--learning_rate", "5e-3",
            "--logging_steps", "2", "--report_to", "none", "--seed", "7", *extra]
    train_router.main(argv)
    return out_dir


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def test_only_routers_change_and_checkpoints_hold_only_what_trained(tmp_path, pool_files):
    out = run(tmp_path, pool_files["train"], "--synthetic_negatives", "--num_train_epochs", "2",
              "--validation_file", pool_files["val"], "--eval_strategy", "epoch", "--save_full_model")
    # --save_full_model: a complete transformers checkpoint in which only the routers differ from the base model.
    before = weights(resolve_model_path("builtin:tiny-mixtral"))
    after = weights(out)
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    # Mixtral checkpoints keep the hub's on-disk name (block_sparse_moe) for what is mlp.gate in memory.
    assert changed == [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)]
    assert all(after[k].dtype == torch.float32 for k in changed)
    # Epoch checkpoints: the trained routers, router_config.json and the optimizer state, no backbone weights.
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert len(ckpts) == 2
    for c in ckpts:
        folder = os.path.join(out, c)
        cfg = json.load(open(os.path.join(folder, "router_config.json")))
        assert cfg["garbage_experts"] == {"0": [3], "1": [3]} and cfg["num_experts"] == 4
        assert cfg["base_model"] == "builtin:tiny-mixtral" and cfg["base_model_fingerprint"].startswith("sha256:")
        assert cfg["scoring"]["append_eos"] is True  # text rows end with the EOS token (tests/test_row_end_token.py)
        assert not any(f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(folder))
        trained = load_file(os.path.join(folder, "trainable.safetensors"))
        assert sorted(trained) == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
        assert os.path.exists(os.path.join(folder, "optimizer.pt"))
    assert folder_bytes(os.path.join(out, ckpts[0])) < os.path.getsize(os.path.join(out, "model.safetensors"))
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    keys = set().union(*state["log_history"])
    for name in ["router/entropy", "router/garbage_mass_good", "router/garbage_mass_bad", "loss/lm",
                 "loss/route", "loss/aux", "eval_router/auroc"]:
        assert name in keys, name
    assert "held-out AUROC" in open(os.path.join(out, "README.md")).read()
    # The final routers differ from their initial values, layer by layer.
    final = load_file(os.path.join(out, "trainable.safetensors"))
    for i in range(2):
        initial = before[f"model.layers.{i}.block_sparse_moe.gate.weight"]
        assert not torch.allclose(final[f"model.layers.{i}.mlp.gate.weight"], initial, atol=1e-4)


def test_resume_equals_uninterrupted(tmp_path, pool_files):
    common = ["--synthetic_negatives", "--num_train_epochs", "2"]
    full = run(tmp_path, pool_files["train"], *common, out="full")
    first = sorted((d for d in os.listdir(full) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))[0]
    resumed = run(tmp_path, pool_files["train"], *common, "--resume_from_checkpoint",
                  os.path.join(full, first), out="resumed")
    a = load_file(os.path.join(full, "trainable.safetensors"))
    b = load_file(os.path.join(resumed, "trainable.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k
    la = [h["loss"] for h in json.load(open(os.path.join(full, "trainer_state.json")))["log_history"] if "loss" in h]
    lb = [h["loss"] for h in json.load(open(os.path.join(resumed, "trainer_state.json")))["log_history"] if "loss" in h]
    assert la[-1] == pytest.approx(lb[-1], rel=1e-5)


def test_chat_rows_labels_and_probe_selection(tmp_path, paragraphs):
    rows = []
    for i, p in enumerate(paragraphs[:24]):
        rows.append({"messages": [{"role": "user", "content": f"Explain topic {i}."},
                                  {"role": "assistant", "content": p}], "label": 1})
        rows.append({"messages": [{"role": "user", "content": f"Explain topic {i}."},
                                  {"role": "assistant", "content": " ".join(reversed(p.split()))}], "label": 0})
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = run(tmp_path, data, "--messages_field", "messages", "--label_field", "label", "--max_steps", "3",
              "--garbage_selection", "probe", "--garbage_expert_ratio", "0.25", model="builtin:tiny-olmoe")
    cfg = json.load(open(os.path.join(out, "router_config.json")))
    assert cfg["method"] == "probe" and all(len(v) == 2 for v in cfg["garbage_experts"].values())


def test_routers_trained_on_assistant_turns_record_it_for_scoring(tmp_path, paragraphs, capsys):
    import select_data

    rows = [{"messages": [{"role": "user", "content": f"Explain topic {i}."},
                          {"role": "assistant", "content": p if i % 2 else " ".join(reversed(p.split()))}],
             "label": i % 2} for i, p in enumerate(paragraphs[:24])]
    rows.append({"messages": [{"role": "user", "content": " ".join(paragraphs[300:306])},
                              {"role": "assistant", "content": "Cut off."}], "label": 1})
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = run(tmp_path, data, "--messages_field", "messages", "--label_field", "label", "--max_steps", "2",
              "--score_tokens", "assistant", model="builtin:tiny-olmoe")
    assert "'train_no_assistant_tokens_skipped': 1" in capsys.readouterr().out  # its answer lies past 48 tokens
    scoring = json.load(open(os.path.join(out, "router_config.json")))["scoring"]
    assert scoring["score_tokens"] == "assistant" and scoring["append_eos"] is False  # chat rows have their own end
    selected = str(tmp_path / "sel")
    select_data.main(["--router_model", out, "--data_file", data, "--messages_field", "messages", "--output_dir",
                      selected, "--disable_tqdm"])
    assert json.load(open(os.path.join(selected, "summary.json")))["settings"]["score_tokens"] == "assistant"
    with pytest.raises(UserError, match="pass --messages_field"):
        run(tmp_path, data, "--score_tokens", "assistant", "--max_steps", "1", out="text")


def test_upcycled_dense_model_trains(tmp_path, pool_files):
    out = run(tmp_path, pool_files["train"], "--synthetic_negatives", "--max_steps", "2",
              "--upcycle_experts", "4", "--upcycle_top_k", "2", model="builtin:tiny-qwen3")
    cfg = json.load(open(os.path.join(out, "router_config.json")))
    assert cfg["upcycle"] == {"num_experts": 4, "top_k": 2, "noise": 0.0, "seed": 0}
    # select_data.py rebuilds the model: the base model, upcycled the same way, with the trained routers.
    from lib.selection.checkpoint import load_scoring_model

    scoring = load_scoring_model(out, want_router=True, dtype="float32", attn_implementation=None,
                                 experts_implementation=None, revision=None, trust_remote_code=False,
                                 device=torch.device("cpu"))
    assert scoring.model.config.model_type == "qwen3_moe" and scoring.model.config.num_experts == 4
    trained = load_file(os.path.join(out, "trainable.safetensors"))
    params = dict(scoring.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in trained.items())


def test_bad_inputs_give_one_sentence(tmp_path, pool_files):
    with pytest.raises(UserError, match="is not an MoE model .*--upcycle_experts"):
        run(tmp_path, pool_files["train"], "--synthetic_negatives", model="builtin:tiny-llama")
    with pytest.raises(UserError, match="has no field 'body'"):
        run(tmp_path, pool_files["train"], "--text_field", "body", "--synthetic_negatives")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine text", "label": 1}, {"text": "x y", "label": "maybe"}])
    with pytest.raises(UserError, match=r"bad.jsonl row 1: field 'label' is 'maybe'"):
        run(tmp_path, bad, "--label_field", "label")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        run(tmp_path, str(tmp_path / "empty.jsonl"), "--synthetic_negatives")
    with pytest.raises(UserError, match="no garbage rows .*--synthetic_negatives"):
        run(tmp_path, pool_files["train"])


def test_cli_prints_one_line_for_user_errors(tmp_path, pool_files):
    proc = subprocess.run(
        [sys.executable, "train_router.py", "--model_name_or_path", "builtin:tiny-llama", "--train_file",
         pool_files["train"], "--output_dir", str(tmp_path / "o"), "--synthetic_negatives"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: builtin:tiny-llama is not an MoE model")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["benchmarks/bench_router.py", "-m lib.selection.pools"])  # scripts: test_help.py
def test_help_is_fast_and_complete(script):
    proc = subprocess.run([sys.executable, *script.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


def test_local_router_gradient_trains_and_validates(tmp_path, pool_files):
    out = run(tmp_path, pool_files["train"], "--synthetic_negatives", "--max_steps", "3",
              "--router_gradient", "local", "--lm_loss_coef", "0")
    before = weights(resolve_model_path("builtin:tiny-mixtral"))
    trained = load_file(os.path.join(out, "trainable.safetensors"))
    assert sorted(trained) == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    for i in range(2):
        assert not torch.equal(trained[f"model.layers.{i}.mlp.gate.weight"],
                               before[f"model.layers.{i}.block_sparse_moe.gate.weight"])
    with pytest.raises(UserError, match="--router_gradient local .* set --lm_loss_coef 0"):
        run(tmp_path, pool_files["train"], "--synthetic_negatives", "--router_gradient", "local", out="o2")


def test_the_readme_trackers_record_the_router_metrics(tmp_path, pool_files, monkeypatch):
    """--report_to tensorboard and trackio work after make setup, and see the metrics logged through log()."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    recipe = tmp_path / "trackers.yaml"
    recipe.write_text(f"model_name_or_path: builtin:tiny-mixtral\ntrain_file: {pool_files['train']}\n"
                      "report_to: [tensorboard, trackio]\n")
    out = str(tmp_path / "out")
    train_router.main([str(recipe), "--output_dir", out, "--synthetic_negatives", "--max_steps", "2",
                       "--logging_steps", "1", "--save_strategy", "no", "--max_seq_length", "32"])
    events = [os.path.join(root, f) for root, _, files in os.walk(os.path.join(out, "runs")) for f in files]
    accumulator = EventAccumulator(events[0])
    accumulator.Reload()
    assert {"train/router/entropy", "train/loss/route"} <= set(accumulator.Tags()["scalars"])
    databases = [f for f in os.listdir(tmp_path / "trackio") if f.endswith(".db")]
    assert databases and b"router/entropy" in (tmp_path / "trackio" / databases[0]).read_bytes()


def test_routers_train_in_fp32_inside_a_bf16_model(tmp_path, pool_files):
    """--dtype bfloat16: the backbone stays bf16, the routers are held and trained in fp32."""
    from lib.models.moe import find_moe_routers

    seen = {}
    import lib.selection.trainer as router_trainer

    original = router_trainer.RouterTrainer.train

    def spy(self, *args, **kwargs):
        seen["router"] = {r.name: r.module.weight.dtype for r in self.routers}
        seen["backbone"] = self.model.model.embed_tokens.weight.dtype
        return original(self, *args, **kwargs)

    router_trainer.RouterTrainer.train = spy
    try:
        out = run(tmp_path, pool_files["train"], "--synthetic_negatives", "--max_steps", "2", "--dtype", "bfloat16")
    finally:
        router_trainer.RouterTrainer.train = original
    assert set(seen["router"].values()) == {torch.float32} and seen["backbone"] == torch.bfloat16
    trained = load_file(os.path.join(out, "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in trained.values()) and find_moe_routers
