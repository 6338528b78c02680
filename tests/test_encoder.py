import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pretrain_encoder
from lib.core.errors import UserError
from lib.tools.data import load_tools, resource_matrix
from lib.tools.losses import balanced_tool_weights, group_loss, residual_logits, tool_encoder_loss, tool_logits
from lib.tools.modules import ToolEncoder
from tests.conftest import ROOT, write_jsonl

TOOLS = [
    {"name": "fast-asr", "description": "Speech recognition on small devices.",
     "resources": {"latency_ms": 50, "memory_gb": 0.2}, "group": "asr"},
    {"name": "big-asr", "description": "Speech recognition with the best accuracy.",
     "resources": {"latency_ms": 2000, "memory_gb": 10}, "group": "asr"},
    {"name": "ner", "description": "Finds names of people and places in text.", "resources": {"latency_ms": 30}},
    {"name": "translator", "description": "Translates text between languages.",
     "resources": {"latency_ms": 300, "memory_gb": 2}},
]


def tools_file(tmp_path, tools=TOOLS, name="tools.json"):
    path = tmp_path / name
    path.write_text(json.dumps(tools))
    return str(path)


def query_files(tmp_path):
    train, held = [], []
    for i in range(12):
        train.append({"query": f"Transcribe recording {i} as fast as possible.", "tool": "fast-asr", "kind": "resource"})
        train.append({"query": f"Transcribe recording {i} with top accuracy.", "tool": "big-asr", "kind": "resource"})
        train.append({"query": f"Find the people named in letter {i}.", "tool": "ner", "kind": "semantic"})
        train.append({"query": f"Translate note {i} into French.", "tool": "translator"})
    held = [{"query": "Transcribe this call quickly.", "tool": "fast-asr", "kind": "resource"},
            {"query": "Transcribe this call very accurately.", "tool": "big-asr", "kind": "resource"},
            {"query": "Translate this into German.", "tool": "translator", "kind": "semantic"}]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "held.jsonl", held)


def encoder(d_resource=None, heads=4):
    torch.manual_seed(0)
    semantic = torch.randn(4, 64)
    features, _ = resource_matrix(load_tools_from(TOOLS))
    return ToolEncoder(semantic, features, d_resource=d_resource, num_attention_heads=heads, dropout=0.0)


def load_tools_from(tools):
    from lib.tools.data import Tool

    return [Tool(t["name"], t["description"], {k: float(v) for k, v in t["resources"].items()}) for t in tools]


def test_tools_file_validation(tmp_path):
    cases = [
        ([{"name": "a", "desc": "x"}], "tool 'a' uses the old field 'desc'; rename it to 'description'"),
        ([{"name": "a"}], "tool 'a' has no 'description'"),
        ([{"name": "a", "description": "  "}], "tool 'a' has an empty 'description'"),
        ([{"name": "a", "description": "x"}, {"name": "a", "description": "y"}], "lists the tool 'a' twice"),
        ([{"name": "a", "description": "x", "resources": {"latency_ms": "fast"}}],
         "resource 'latency_ms' is 'fast'; resources must be finite numbers"),
    ]
    for i, (tools, message) in enumerate(cases):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_tools(tools_file(tmp_path, tools, f"t{i}.json"))
    assert [t.name for t in load_tools(tools_file(tmp_path))] == [t["name"] for t in TOOLS]


def test_resource_features_are_normalised_with_missing_flags():
    features, keys = resource_matrix(load_tools_from(TOOLS))
    assert keys == ["latency_ms", "memory_gb"]
    assert features.shape == (4, 4)
    assert features[:, 0].mean().abs() < 1e-6  # z-scored (log scale: latency spans 30..2000)
    assert features[2, 1] == 0 and features[2, 3] == 0  # ner reports no memory: value 0, flag 0
    assert features[0, 3] == 1


def test_step0_tool_vectors_are_the_semantic_embeddings():
    enc = encoder()
    tools, residual = enc()
    assert torch.equal(tools, enc.semantic) and torch.count_nonzero(residual) == 0
    assert enc.alpha.item() == 0.0
    # What trains is the resource MLP and the fusion, the gate included; the semantic table is a fixed buffer.
    assert {n.split(".")[0] for n, _ in enc.named_parameters()} == {"resource_in", "tool_term", "resource_out",
                                                                      "attention", "fuse_out", "alpha"}
    assert "semantic" in dict(enc.named_buffers())
    # Once the gate is open, a loss on the tool vectors reaches every trained parameter.
    with torch.no_grad():
        enc.alpha.fill_(0.5)
    tools, _ = enc()
    tools.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_the_gate_gets_a_gradient_while_closed():
    enc = encoder()
    query = torch.randn(6, 64)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    resource_rows = torch.tensor([1, 1, 0, 0, 1, 1])
    tools, residual = enc()
    loss, _, _ = tool_encoder_loss(tool_logits(query, tools, enc.center, 0.05),
                                   residual_logits(query, residual, enc.semantic, enc.center, 0.05),
                                   target, resource_rows, 1.0)
    loss.backward()
    assert enc.alpha.grad is not None and enc.alpha.grad.abs() > 0
    # With the gate closed the fusion itself gets no gradient yet: tanh(0) = 0 multiplies it.
    assert enc.fuse_out.weight.grad.abs().sum() == 0


def test_predict_returns_what_its_steps_record_and_leaves_none_for_the_next_evaluation(tmp_path):
    import datasets

    from lib.tools.args import EncoderTrainingArguments
    from lib.tools.trainer import EncoderTrainer, encoder_metrics

    def rows(seed):
        g = torch.Generator().manual_seed(seed)
        return datasets.Dataset.from_dict({"query_emb": torch.randn(6, 64, generator=g).tolist(),
                                           "tool": [0, 1, 2, 3, 0, 1], "resource": [True, True] + [False] * 4})

    def trainer():
        args = EncoderTrainingArguments(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=4,
                                        num_attention_heads=4, eval_strategy="no", use_cpu=True)
        return EncoderTrainer(model=encoder(), args=args, compute_metrics=encoder_metrics)

    def measured(metrics):  # timings aside
        return {k: v for k, v in metrics.items() if not k.endswith(("runtime", "per_second", "preparation_time"))}

    def logged_evaluation(t, data):  # what evaluate logs: its metrics and what its steps recorded
        t.evaluate(data)
        return measured(t.state.log_history[-1])

    used = trainer()
    predicted = measured(used.predict(rows(0), metric_key_prefix="eval").metrics)
    assert {"eval_top1", "eval_loss/tool", "eval_loss/resource", "eval_gate/alpha"} <= set(predicted)
    assert predicted["eval_gate/alpha"] == 0.0
    assert logged_evaluation(used, rows(0)).items() >= predicted.items()  # the same numbers evaluate logs
    # an evaluation after predict averages its own batches only, as a fresh trainer's does
    used.predict(rows(0))
    assert logged_evaluation(used, rows(1)) == logged_evaluation(trainer(), rows(1))


def test_group_loss_contrasts_a_query_with_its_group_only():
    logits = torch.randn(5, 4, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 2])  # fast-asr and big-asr do the same job
    target = torch.tensor([0, 1, 2, 1, 3])
    loss, rows = group_loss(logits, target, groups)
    assert rows == 3  # the queries for ner and translator have nobody to be contrasted with
    expected = F.cross_entropy(logits[[0, 1, 3]][:, :2], target[[0, 1, 3]])
    assert torch.allclose(loss, expected)
    # scores of tools outside the group do not move the term; no grouped rows gives zero with a gradient
    shifted = logits.detach().clone()
    shifted[:, 2:] += 5.0
    assert torch.allclose(group_loss(shifted, target, groups)[0], expected)
    zero, none = group_loss(logits, torch.tensor([2, 3]), groups)
    assert none == 0 and zero == 0
    zero.backward()
    assert logits.grad is not None


def test_balanced_tool_weights_make_every_tool_count_the_same():
    targets = [0] * 30 + [1] * 10 + [2] * 2  # tool 3 has no queries
    weight = balanced_tool_weights(targets, 4)
    per_tool = torch.bincount(torch.tensor(targets), minlength=4).float() * weight
    assert torch.allclose(per_tool[:3], per_tool[0].expand(3)) and weight[3] == 0
    assert torch.isclose(weight[:3].mean(), torch.tensor(1.0))
    # the weighted tool term is the mean over tools of each tool's mean cross-entropy
    logits = torch.randn(len(targets), 4)
    target = torch.tensor(targets)
    _, tool_ce, _ = tool_encoder_loss(logits, logits, target, torch.zeros(len(targets)), 1.0, weight)
    per_row = F.cross_entropy(logits, target, reduction="none")
    assert torch.isclose(tool_ce, torch.stack([per_row[target == t].mean() for t in range(3)]).mean())


def run(tmp_path, *extra, out="enc", epochs="6"):
    train, held = query_files(tmp_path)
    out_dir = str(tmp_path / out)
    summary = pretrain_encoder.main([
        "--model_name_or_path", "builtin:tiny-llama", "--tools_file", tools_file(tmp_path), "--train_file", train,
        "--validation_file", held, "--output_dir", out_dir, "--num_train_epochs", epochs,
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--num_attention_heads", "4",
        "--d_resource", "32", "--report_to", "none", "--seed", "0", *extra])
    return out_dir, summary


def test_training_opens_the_gate_logs_and_caches_embeddings(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDEKIT_CACHE", str(tmp_path / "cache"))
    calls = []
    from lib.tools import embeddings as encoder_module

    real = encoder_module.embed_texts

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "embed_texts", counting)
    out, summary = run(tmp_path)
    assert calls == [4, 51]  # the tools, then train + held-out queries
    assert summary["alpha"]["first"] == 0.0 and abs(summary["alpha"]["last"]) > 1e-3
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    steps = [h for h in state["log_history"] if "loss" in h and "gate/alpha" in h]
    assert len(steps) == state["global_step"]  # gate/alpha every step
    assert all("train/tool_acc" in h and "loss/resource" in h and "loss/group" in h for h in steps)
    assert {"eval_top1", "eval_top3", "eval_top1_semantic", "eval_top1_resource"} <= set(summary["final"])
    predictions = [json.loads(line) for line in open(os.path.join(out, "heldout_predictions.jsonl"))]
    held_rows = [json.loads(line) for line in open(query_files(tmp_path)[1])]
    assert [p["query"] for p in predictions] == [r["query"] for r in held_rows]
    assert all(p["predicted"] == p["top3"][0] and p["correct"] == (p["predicted"] == p["tool"]) for p in predictions)
    assert sum(p["correct"] for p in predictions) / len(predictions) == pytest.approx(summary["final"]["eval_top1"])
    first_eval = next(h for h in state["log_history"] if "eval_top1" in h)
    assert first_eval["step"] == 0 and first_eval["eval_gate/alpha"] == 0.0  # step 0: semantics only
    config = json.load(open(os.path.join(out, "encoder_config.json")))
    assert config["tools"] == [t["name"] for t in TOOLS] and config["groups"] == {"fast-asr": "asr", "big-asr": "asr"}
    # A rerun finds both tables in the cache and runs no LLM forward pass, and computes exactly what the first run
    # did (which began by building the builtin model into the fresh cache).
    calls.clear()
    again, summary_again = run(tmp_path, out="again")
    assert calls == []
    def accuracy(metrics):
        return {k: v for k, v in metrics.items() if "top" in k or "loss" in k}

    assert accuracy(summary_again["final"]) == accuracy(summary["final"])
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(out, "trainable.safetensors")), load_file(os.path.join(again, "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted_and_mismatched_checkpoints_are_named(tmp_path):
    full, _ = run(tmp_path, "--save_strategy", "epoch", out="full", epochs="4")
    ckpts = sorted((d for d in os.listdir(full) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    resumed, _ = run(tmp_path, "--resume_from_checkpoint", os.path.join(full, ckpts[1]), out="resumed", epochs="4")
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(full, "trainable.safetensors")), load_file(os.path.join(resumed, "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    with pytest.raises(UserError, match=r"does not match this model \(different shapes \['resource_in.bias \(32,\) vs \(16,\)"):
        run(tmp_path, "--d_resource", "16", "--resume_from_checkpoint", os.path.join(full, ckpts[0]), out="bad")


def test_query_lora_starts_at_pure_semantics_trains_adapters_only_and_resumes(tmp_path):
    from safetensors.torch import load_file

    _, frozen = run(tmp_path, out="frozen", epochs="1")
    full, summary = run(tmp_path, "--query_lora_r", "4", "--save_strategy", "epoch", out="lora", epochs="4")
    # LoRA's B starts at zero: the step-0 queries are the frozen embeddings, so the scores are pure semantics
    for key in ("eval_loss", "eval_top1", "eval_top3"):
        assert summary["step0"][key] == pytest.approx(frozen["step0"][key], abs=1e-5), key
    tensors = load_file(os.path.join(full, "trainable.safetensors"))
    llm_keys = [k for k in tensors if k.startswith("query_llm.")]
    assert llm_keys and all(".lora_A." in k or ".lora_B." in k for k in llm_keys)  # the LLM's own weights stay out
    assert any(tensors[k].abs().sum() > 0 for k in llm_keys if ".lora_B." in k)  # the adapters trained
    assert {"tools.alpha", "tools.semantic", "tools.resources"} <= set(tensors) and summary["query_lora_r"] == 4
    assert json.load(open(os.path.join(full, "query_adapter", "adapter_config.json")))["r"] == 4
    ckpts = sorted((d for d in os.listdir(full) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    resumed, _ = run(tmp_path, "--query_lora_r", "4", "--resume_from_checkpoint", os.path.join(full, ckpts[1]),
                     out="resumed", epochs="4")
    again = load_file(os.path.join(resumed, "trainable.safetensors"))
    assert again.keys() == tensors.keys()
    for k in tensors:
        assert torch.allclose(tensors[k], again[k], atol=1e-6), k


@pytest.mark.distributed
@pytest.mark.xdist_group("launchers")
@pytest.mark.parametrize("zero,lora", [("zero2", []), ("zero2", ["--query_lora_r", "4"]), ("zero3", ["--query_lora_r", "4"])])
def test_deepspeed_two_processes(tmp_path, zero, lora):
    from safetensors.torch import load_file

    from tests.test_distributed import run_launcher

    train, held = query_files(tmp_path)
    out = tmp_path / "ds"
    proc = run_launcher("deepspeed", "pretrain_encoder.py", [
        "--model_name_or_path", "builtin:tiny-llama", "--tools_file", tools_file(tmp_path), "--train_file", train,
        "--validation_file", held, "--output_dir", str(out), "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--num_attention_heads", "4",
        "--report_to", "none", "--deepspeed", f"ds_configs/{zero}.json", *lora])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.load(open(out / "encoder_config.json"))
    assert abs(summary["alpha"]["last"]) > 0
    # eval_on_start works under DeepSpeed: the step-0 evaluation is pure semantics, gate shut.
    assert summary["step0"]["step"] == 0 and summary["step0"]["eval_gate/alpha"] == 0.0
    # Both processes trained as one job: 48 training queries, 8 per process and step, so 3 steps per epoch.
    assert json.load(open(out / "trainer_state.json"))["global_step"] == 6
    # the held-out predictions come back whole and in order from both processes
    predictions = [json.loads(line) for line in open(out / "heldout_predictions.jsonl")]
    assert [p["query"] for p in predictions] == [json.loads(line)["query"] for line in open(held)]
    tensors = load_file(out / "trainable.safetensors")
    adapters = [k for k in tensors if k.startswith("query_llm.")]
    if lora:  # the adapters are saved whole (not ZeRO-3 partitions) and trained
        assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
        assert all(tensors[k].numel() > 0 for k in adapters)
        assert any(tensors[k].abs().sum() > 0 for k in adapters if ".lora_B." in k)
    else:
        assert not adapters


def test_example_tool_set_is_valid_and_its_query_files_are_current():
    from lib.tools.data import load_tool_queries

    tools = load_tools(os.path.join(ROOT, "recipes", "tools", "tools.json"))
    assert len(tools) == 20 and all(t.resources for t in tools)
    names = [t.name for t in tools]
    counts = {}
    for split in ("train", "heldout"):
        queries, _, resource = load_tool_queries(os.path.join(ROOT, "recipes", "tools", f"{split}_queries.jsonl"), names)
        counts[split] = (set(queries), sum(resource))
    assert not counts["train"][0] & counts["heldout"][0]  # held-out phrasings never occur in training
    assert counts["heldout"][1] > 0
    proc = subprocess.run([sys.executable, "-c", "import make_queries, json; print(json.dumps("
                           "[make_queries.queries('train'), make_queries.queries('heldout')]))"],
                          cwd=os.path.join(ROOT, "recipes", "tools"), capture_output=True, text=True, timeout=60)
    train, held = json.loads(proc.stdout)
    for split, rows in (("train", train), ("heldout", held)):
        with open(os.path.join(ROOT, "recipes", "tools", f"{split}_queries.jsonl")) as f:
            assert [json.loads(line) for line in f] == rows, f"rerun recipes/tools/make_queries.py ({split})"


def test_pooling_options_equal_their_definitions_on_each_text_alone(tiny_llama):
    from lib.tools.embeddings import PROMPT_TEMPLATE, embed_texts, embeddings_cache_key, pool_hidden

    hidden = torch.tensor([[[1.0], [2.0], [4.0], [9.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert pool_hidden(hidden, mask, "mean").item() == pytest.approx(7 / 3)
    assert pool_hidden(hidden, mask, "weighted_mean").item() == pytest.approx((1 + 2 * 2 + 3 * 4) / 6)
    assert pool_hidden(hidden, mask, "last").item() == 4.0
    model, tokenizer = tiny_llama
    texts = ["Transcribe this call.", "Find the people named in this long letter from my aunt, please."]
    for pooling, layer in (("mean", -1), ("weighted_mean", 2), ("last", 1), ("prompt_last", -1), ("prompt_last", 2)):
        batched = embed_texts(model, tokenizer, texts, pooling=pooling, layer=layer)  # padded together
        for text, row in zip(texts, batched, strict=True):
            wrapped = PROMPT_TEMPLATE.format(text=text) if pooling == "prompt_last" else text
            ids = tokenizer(wrapped, return_tensors="pt")
            with torch.no_grad():
                states = model(**ids, output_hidden_states=True).hidden_states[layer][0]
            weights = torch.arange(1, len(states) + 1, dtype=torch.float32)[:, None]
            want = {"mean": states.mean(0), "weighted_mean": (states * weights).sum(0) / weights.sum(),
                    "last": states[-1], "prompt_last": states[-1]}[pooling]
            torch.testing.assert_close(row, want, atol=1e-4, rtol=1e-4)
    # Caches keep their earlier keys; a layer or the prompt makes another key.
    keys = {embeddings_cache_key("w", {}, texts, p, layer) for p, layer in (("mean", -1), ("mean", 2),
                                                                              ("prompt_last", -1), ("last", -1))}
    assert len(keys) == 4
    assert embeddings_cache_key("w", {}, texts, "mean") == embeddings_cache_key("w", {}, texts, "mean", -1)
