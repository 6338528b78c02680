import pytest
import torch

from lib.core.errors import UserError
from lib.core.freezing import freeze_all_but
from lib.models.builtin import TINY_ARCHS, resolve_model_path
from lib.models.loading import load_model
from lib.models.moe import RouterCapture, find_moe_routers
from lib.models.upcycling import upcycle_to_moe
from lib.selection.split import ExpertSplit, load_router_config, save_router_config

MOE_ARCHS = ["mixtral", "qwen3-moe", "qwen2-moe", "olmoe"]


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_builtins_load_and_run(arch):
    model = load_model(f"builtin:tiny-{arch}")
    out = model(torch.randint(0, 100, (2, 7)))
    assert out.logits.shape[:2] == (2, 7)


def test_unknown_builtin_lists_the_choices():
    with pytest.raises(UserError, match="Unknown builtin model 'builtin:tiny-gpt9'.*builtin:tiny-mixtral"):
        resolve_model_path("builtin:tiny-gpt9")
    assert resolve_model_path("org/some-model") == "org/some-model"


@pytest.mark.parametrize("arch,moe_class", [("llama", "MixtralForCausalLM"), ("qwen3", "Qwen3MoeForCausalLM")])
def test_upcycled_model_equals_dense_model(arch, moe_class, tmp_path):
    dense = load_model(f"builtin:tiny-{arch}").eval()
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2).eval()
    assert type(moe).__name__ == moe_class
    x = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = dense(x, attention_mask=mask).logits
        got = moe(x, attention_mask=mask).logits
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    # The routers are fresh and really route: four different experts get picked across tokens.
    with RouterCapture(find_moe_routers(moe)) as cap, torch.no_grad():
        moe(x)
    assert len(cap.logits[0].topk(2, dim=-1).indices.unique()) > 2
    # It saves and loads as an ordinary transformers checkpoint.
    moe.save_pretrained(tmp_path / "m")
    reloaded = load_model(str(tmp_path / "m")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x, attention_mask=mask).logits, got)
    assert reloaded.config.upcycled_from["num_experts"] == 4


def test_upcycle_noise_is_seeded_and_makes_experts_differ():
    dense = load_model("builtin:tiny-llama")
    a = upcycle_to_moe(dense, 4, 2, noise=0.01, seed=1)
    b = upcycle_to_moe(dense, 4, 2, noise=0.01, seed=1)
    w = a.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(w, b.model.layers[0].mlp.experts.gate_up_proj)
    assert not torch.equal(w[0], w[1])


def test_upcycling_refuses_unsupported_models():
    with pytest.raises(UserError, match="supports dense llama, mistral, qwen3 models, not 'mixtral'"):
        upcycle_to_moe(load_model("builtin:tiny-mixtral"), 4, 2)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routers_found_by_class_or_exact_name(arch):
    model = load_model(f"builtin:tiny-{arch}")
    routers = find_moe_routers(model)
    cfg = model.config
    assert [r.layer for r in routers] == list(range(cfg.num_hidden_layers))
    assert all(r.name.endswith(".mlp.gate") for r in routers)
    assert not any("shared_expert_gate" in r.name for r in routers)
    with RouterCapture(routers) as cap, torch.no_grad():
        model(torch.randint(0, 100, (2, 5)))
    assert [t.shape for t in cap.logits] == [(10, routers[0].num_experts)] * len(routers)


def test_dense_model_has_no_routers():
    assert find_moe_routers(load_model("builtin:tiny-llama")) == []


def test_freezing_is_exact_and_leaves_shared_expert_gate_frozen():
    model = load_model("builtin:tiny-qwen2-moe")
    routers = find_moe_routers(model)
    trainable = freeze_all_but(model, module_names=[r.name for r in routers], verbose=False)
    assert trainable == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert not model.model.layers[0].mlp.shared_expert_gate.weight.requires_grad
    assert not model.model.layers[0].mlp.experts.gate_up_proj.requires_grad
    trainable = freeze_all_but(model, param_suffixes=["mlp.gate.weight"], verbose=False)
    assert len(trainable) == 2
    with pytest.raises(UserError, match="No module named"):
        freeze_all_but(model, module_names=["model.layers.0.mlp.router"], verbose=False)


def test_expert_split_by_index_probe_and_roundtrip(tmp_path):
    routers = find_moe_routers(load_model("builtin:tiny-qwen3-moe"))
    split = ExpertSplit.by_index(routers, 0.25)
    assert split.garbage_experts == {0: [6, 7], 1: [6, 7]}
    assert split.masks()[0].tolist() == [False] * 6 + [True] * 2
    garbage = torch.tensor([[0.1, 0.5, 0.0, 0.0, 0.1, 0.2, 0.1, 0.0], [0.3] * 8])
    good = torch.tensor([[0.1, 0.1, 0.0, 0.0, 0.1, 0.0, 0.1, 0.0], [0.3] * 8])
    probe = ExpertSplit.by_probe(routers, 0.25, garbage, good)
    assert probe.garbage_experts == {0: [1, 5], 1: [0, 1]}  # ties go to the lowest ids
    save_router_config(str(tmp_path), probe, routers, {"base_model": "x"})
    cfg = load_router_config(str(tmp_path))
    assert ExpertSplit.from_dict(cfg) == probe and cfg["router_modules"][0] == "model.layers.0.mlp.gate"
    with pytest.raises(UserError, match="missing does not exist; check the path"):
        load_router_config(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no router_config.json"):
        load_router_config(str(tmp_path / "empty"))
    (tmp_path / "empty" / "router_config.json").write_text("{not json")
    with pytest.raises(UserError, match="router_config.json is not valid JSON"):
        load_router_config(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        ExpertSplit.by_index(routers, 1.0)


def _router_grads(model, routers, detach):
    from lib.selection.losses import load_balancing_loss, routing_loss

    model.zero_grad(set_to_none=True)
    x = torch.randint(0, 1000, (4, 16))
    torch.manual_seed(0)
    with RouterCapture(routers, detach=detach) as cap:
        model(x, use_cache=False, logits_to_keep=1)
    masks = ExpertSplit.by_index(routers, 0.25).masks()
    is_garbage = torch.tensor([True, False, True, False])[:, None].expand(4, 16).reshape(-1)
    keep = torch.ones(64, dtype=torch.bool)
    loss = routing_loss(cap.logits, masks, is_garbage, keep) + 0.1 * load_balancing_loss(cap.logits, 2, keep)
    loss.backward()
    return [r.module.weight.grad.clone() for r in routers]


def _full_and_local_grads(model):
    routers = find_moe_routers(model)
    freeze_all_but(model, module_names=[r.name for r in routers], verbose=False)
    torch.manual_seed(1)
    full = _router_grads(model, routers, detach=False)
    torch.manual_seed(1)
    return full, _router_grads(model, routers, detach=True)


def test_local_router_gradient_is_exact_for_identical_experts_only():
    full, local = _full_and_local_grads(upcycle_to_moe(load_model("builtin:tiny-llama"), 4, 2))
    for f, l in zip(full, local, strict=True):
        assert torch.allclose(f, l, atol=1e-7)
    # With distinct experts, earlier routers also shape later layers' inputs: the gradients differ.
    full, local = _full_and_local_grads(load_model("builtin:tiny-mixtral"))
    assert torch.allclose(full[-1], local[-1], atol=1e-7)  # the last router has nothing downstream to shape
    assert not torch.allclose(full[0], local[0], atol=1e-6)


def test_builtin_models_build_on_any_rank_and_under_zero3(tmp_path, monkeypatch):
    """The first process to need a builtin builds it; as rank 1 of a job, with a ZeRO-3 config active, the cached
    copy must still be a complete plain checkpoint (transformers saves weights from rank 0 only, and ZeRO-3
    would partition a model built from its config)."""
    import transformers.distributed.mixin as mixin
    from transformers.integrations import HfDeepSpeedConfig

    from lib.models import builtin as loading

    monkeypatch.setenv("SIDEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    ds_config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 8,
                                   "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1})
    assert ds_config.is_zero3()
    path = loading.resolve_model_path("builtin:tiny-qwen3-moe")
    assert path.startswith(str(tmp_path))
    del ds_config
    monkeypatch.undo()
    model = load_model(path)
    reference = load_model("builtin:tiny-qwen3-moe")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
