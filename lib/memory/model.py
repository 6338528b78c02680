"""The memory-augmented model: a frozen causal LM whose decoder layers look facts up in a bank while it reads.

Hooks on the backbone's decoder layers do the work, so the backbone object itself becomes the memory model:
``model.backbone`` can go to lm-eval, TRL or ``generate`` like any transformers model, and ``MemoryModel.forward``
/ ``generate`` simply call it. At the query layer the gate picks ``top_k`` entries for every position (causally:
a position's query never sees later tokens, so with a KV cache a generation step carries only the gate's running
sums); at each fusion layer every position attends over its entries' token representations and adds the result
through a gate that starts shut. An empty bank (or ``retrieval="none"``) skips every hook: the output is the backbone's, exactly.

The entries' frozen representations (token embeddings, the query layer's hidden states, and each fusion layer's
hidden states or token embeddings) are computed once per bank by :func:`lib.memory.features.encode_bank` and held
as buffers that are never saved: the bank itself is saved as text, so a person can edit it and a new bank can be swapped in.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from lib.core.data import PadCollator
from lib.core.errors import UserError
from lib.core.files import atomic_path
from lib.memory.bank import MemoryBank
from lib.memory.config import MemoryConfig
from lib.memory.features import cached_bank_features, encode_bank
from lib.memory.modules import NEG, MemoryFusion, MemoryGate
from lib.memory.placement import grid_side, place_entries

WEIGHTS_FILE = "trainable.safetensors"
RETRIEVALS = ("gate", "gold", "none")


def decoder_layers(backbone) -> nn.ModuleList:
    """The backbone's list of decoder layers (``model.layers`` for Llama-style models)."""
    decoder = backbone.get_decoder() if hasattr(backbone, "get_decoder") else backbone.model
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise UserError(f"{type(backbone).__name__} has no list of decoder layers (model.layers); explicit memory "
                        "supports decoder-only transformers.")
    return layers


def _whole(module: nn.Module):
    """A context in which ``module``'s parameters are whole, also when ZeRO-3 partitioned them."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _row_key(ids: torch.Tensor) -> bytes:
    """A row's identity for :meth:`MemoryModel.query_states`: its token ids without padding."""
    return ids.detach().to("cpu", torch.int64).numpy().tobytes()


class _StopForward(Exception):
    """Raised after the query layer when only the gate is wanted (the layers above would be wasted work)."""


class MemoryModel(nn.Module):
    """A frozen backbone plus MemoryGate and MemoryFusion layers, with a swappable bank."""

    def __init__(self, backbone, config: MemoryConfig):
        super().__init__()
        config.check()
        self.backbone = backbone
        self.memory_config = config
        self.config = backbone.config  # what Trainer / PEFT / lm-eval read
        if getattr(backbone, "generation_config", None) is not None:
            # backbone.generate (lm-eval) runs without a KV cache: beam search would reorder one behind the gate's
            # back. MemoryModel.generate uses one where that cannot happen.
            backbone.generation_config.use_cache = False
        self.gate = MemoryGate(config.hidden_size, key_dim=config.key_dim, top_k=config.top_k,
                               candidates=config.candidates)
        layers = decoder_layers(backbone)
        bc = backbone.config
        heads = bc.num_attention_heads
        self.fusions = nn.ModuleDict()
        for layer in sorted(set(config.fusion_layers)):
            fusion = MemoryFusion(config.hidden_size, num_heads=heads,
                                  num_kv_heads=getattr(bc, "num_key_value_heads", None) or heads,
                                  head_dim=getattr(bc, "head_dim", None) or config.hidden_size // heads,
                                  bias=bool(getattr(bc, "attention_bias", False)),
                                  eps=getattr(bc, "rms_norm_eps", 1e-6))
            with _whole(layers[layer - 1]):  # a backbone partitioned by ZeRO-3 at load time
                fusion.copy_attention(layers[layer - 1])
            self.fusions[str(layer)] = fusion
        self.retrieval = "gate"
        self.train_gate = True  # False holds the gate (no gradient) even while its parameters are trainable
        self.gumbel_temperature: float | None = None  # set during joint training: straight-through Gumbel-softmax
        self.bank: MemoryBank | None = None
        self.features = nn.Module()  # the bank's frozen token representations: buffers, never saved
        self._off = False
        self._gate_only = False
        self._capture: list[torch.Tensor] | None = None
        self.stored_query_states: dict[bytes, torch.Tensor] | None = None  # see query_states
        self._carry: dict[str, list[torch.Tensor]] = {}  # the gate's running sums while generating with a KV cache
        self._gold: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._state: dict = {}
        self.last_retrieval: dict = {}
        self._hooks = [backbone.get_decoder().register_forward_pre_hook(self._capture_inputs, with_kwargs=True)]
        for layer in sorted({config.query_layer, *config.fusion_layers}):
            self._hooks.append(layers[layer - 1].register_forward_hook(self._make_layer_hook(layer), with_kwargs=True))

    # ---- the bank ----------------------------------------------------------------------------------

    def feature_layers(self) -> list[int]:
        """Hidden states of the entries the model needs (0: token embeddings, l: the output of layer l): the
        embeddings, the query layer's output and what enters each fusion layer."""
        return sorted({0, self.memory_config.query_layer, *map(self.fusion_source, self.memory_config.fusion_layers)})

    def fusion_source(self, layer: int) -> int:
        """The entry representation fusion layer ``layer`` reads: what enters that layer (or the embeddings)."""
        return 0 if self.memory_config.memory_source == "embedding" else layer - 1

    def entry_rope(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary ``(cos, sin)`` ``(L, head_dim)`` of the positions -L..-1, where the entry sits before the
        sequence; None for a backbone without rotary embeddings."""
        rotary = getattr(self.backbone.get_decoder(), "rotary_emb", None)
        if rotary is None:
            return None
        positions = torch.arange(-length, 0, device=like.device)[None]
        cos, sin = rotary(like, positions)
        return cos[0], sin[0]

    def set_bank(self, bank: MemoryBank, features: dict[int, torch.Tensor] | None = None) -> None:
        """Use ``bank`` from now on; ``features`` from :func:`encode_bank` (computed here when not given)."""
        if bank.max_entry_tokens != self.memory_config.max_entry_tokens and len(bank):
            raise UserError(f"The bank {bank.source} holds entries of up to {bank.max_entry_tokens} tokens, the "
                            f"memory model {self.memory_config.max_entry_tokens}; load it with the same "
                            "--max_entry_tokens.")
        if features is None:
            def compute():
                with self.memory_off():
                    return encode_bank(self.backbone, bank, self.feature_layers())

            features = cached_bank_features(self.weights_fingerprint(), bank, self.feature_layers(),
                                            next(self.backbone.parameters()).dtype, compute)
        device = next(self.backbone.parameters()).device
        dtype = self.gate.query_relation.weight.dtype
        self.features = nn.Module()
        for layer in self.feature_layers():
            self.features.register_buffer(f"layer{layer}", features[layer].to(device, dtype), persistent=False)
        self.features.register_buffer("mask", bank.attention_mask.to(device), persistent=False)
        self.bank = bank
        self._bank_version = getattr(self, "_bank_version", 0) + 1
        self.refresh_placement()

    def weights_fingerprint(self) -> str:
        """The backbone weights' content fingerprint (of the files when they are on disk), computed once."""
        if getattr(self, "_weights_fingerprint", None) is None:
            from lib.core.cache import tensors_fingerprint
            from lib.models.loading import weights_fingerprint

            config = self.memory_config
            self._weights_fingerprint = (weights_fingerprint(config.base_model, config.base_model_revision)
                                         or tensors_fingerprint(dict(self.backbone.named_parameters())))
        return self._weights_fingerprint

    def entry_features(self, layer: int) -> torch.Tensor:
        return getattr(self.features, f"layer{layer}")

    def entry_keys(self) -> torch.Tensor:
        """Keys of every entry under the current gate weights ``(N, key_dim)``."""
        q = self.memory_config.query_layer
        return self.gate.entry_keys(self.entry_features(q), self.entry_features(0), self.features.mask)

    @torch.no_grad()
    def refresh_placement(self) -> None:
        """Place the entries in the product-key grid by their current keys (after the gate changed)."""
        n = len(self.bank) if self.bank is not None else 0
        device = next(self.backbone.parameters()).device
        if n == 0:
            self.cells = torch.zeros(0, dtype=torch.long, device=device)
            self.cell_entry = torch.full((1,), -1, dtype=torch.long, device=device)
            return
        keys = self.entry_keys().float()
        side = grid_side(n)
        cells = place_entries(keys.cpu()).to(device)
        cell_entry = torch.full((side * side,), -1, dtype=torch.long, device=device)
        cell_entry[cells] = torch.arange(n, device=device)
        self.cells, self.cell_entry = cells, cell_entry

    @property
    def active(self) -> bool:
        return not self._off and self.retrieval != "none" and self.bank is not None and len(self.bank) > 0

    @contextlib.contextmanager
    def memory_off(self):
        """Inside this block the backbone is exactly the frozen base model."""
        previous, self._off = self._off, True
        try:
            yield
        finally:
            self._off = previous

    # ---- forward -----------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, memory_index=None, gate_positions=None, **kwargs):
        """The backbone's forward with memory; ``memory_index (B,)`` is the gold entry for ``retrieval="gold"``.

        With ``gate_positions`` it is :meth:`gate_forward` instead (reading :attr:`stored_query_states`), so that
        gate training goes through the DDP / DeepSpeed wrapper like any forward: called around the wrapper, the
        processes' gradients would never be averaged."""
        if gate_positions is not None:
            return self.gate_forward(input_ids, attention_mask, gate_positions, states=self.stored_query_states)
        self._gold = memory_index
        kwargs.setdefault("use_cache", False)
        try:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._gold, self._state = None, {}

    def gate_forward(self, input_ids, attention_mask, positions: torch.Tensor | None = None,
                     states: dict[bytes, torch.Tensor] | None = None) -> dict:
        """Run only up to the query layer and return the gate's retrieval (gate training and measuring).

        With ``positions`` (a ``(B, T)`` bool mask) only those positions are looked up, and the returned tensors
        are ``(P, ...)`` in ``positions.nonzero()`` order; otherwise ``(B, T, ...)``. With ``states`` (from
        :meth:`query_states`) holding every row, the backbone does not run at all."""
        self._gate_only = True
        self._positions = positions
        try:
            hidden = self._stored_states(input_ids, attention_mask, states) if states else None
            if hidden is not None:
                self._capture_inputs(None, (), {"input_ids": input_ids, "attention_mask": attention_mask})
                self._retrieve(hidden)
            else:
                self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            self._gate_only, self._positions, self._state = False, None, {}
        return self.last_retrieval

    @torch.no_grad()
    def query_states(self, rows, batch_size: int = 32) -> dict[bytes, torch.Tensor]:
        """The frozen backbone's hidden states at the query layer ``{row key: (length, H)}`` for token-id rows
        (lists), read in a fixed batching so that every run gets the same values. The gate stage trains on them
        instead of running the backbone at every step. Under ZeRO-3 every process must call it with the same rows."""
        out: dict[bytes, torch.Tensor] = {}
        device = next(self.backbone.parameters()).device
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            for start in range(0, len(rows), batch_size):
                chunk = [list(r) for r in rows[start:start + batch_size]]
                batch = PadCollator(0)([{"input_ids": r, "attention_mask": [1] * len(r)} for r in chunk])
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                self._capture = []
                try:
                    with self.memory_off():
                        self.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                hidden = self._capture[0]
                for i, row in enumerate(chunk):
                    out[_row_key(ids[i, :len(row)])] = hidden[i, :len(row)].clone()
        finally:
            self._capture = None
            self.backbone.train(was_training)
        return out

    def _stored_states(self, input_ids, attention_mask, states) -> torch.Tensor | None:
        """``(B, T, H)`` query-layer states of a batch from ``states`` (zeros at padding), or None if a row is
        missing."""
        mask = attention_mask.bool()
        stored = [states.get(_row_key(ids[m])) for ids, m in zip(input_ids, mask)]
        if any(s is None for s in stored):
            return None
        hidden = stored[0].new_zeros(*input_ids.shape, stored[0].shape[-1])
        hidden[mask] = torch.cat(stored)
        return hidden

    def generate(self, *args, **kwargs):
        """``backbone.generate`` with memory, with a KV cache (the gate's pooled sums go on from step to step).
        Beam search reorders the cache behind the gate's back, so it runs without one."""
        beams = kwargs.get("num_beams") or getattr(self.backbone.generation_config, "num_beams", 1) or 1
        if beams > 1:
            kwargs["use_cache"] = False
        else:
            kwargs.setdefault("use_cache", True)
        return self.backbone.generate(*args, **kwargs)

    def reorder_cache_state(self, index: torch.Tensor) -> None:
        """What ``cache.reorder_cache(index)`` does to a KV cache, done to the gate's running sums: row i of the
        batch becomes row ``index[i]`` (repeated indices copy a prompt's state for several continuations)."""
        for name, sums in self._carry.items():
            self._carry[name] = [s.index_select(0, index.to(s.device)) for s in sums]

    # ---- hooks -------------------------------------------------------------------------------------

    def _capture_inputs(self, module, args, kwargs):
        if not self.active:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.backbone.get_input_embeddings()(input_ids)
        b, t = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        mask = mask[:, -t:] if mask is not None and mask.dim() == 2 else torch.ones(b, t, dtype=torch.long,
                                                                                     device=embeds.device)
        # With a KV cache (generation), the gate's causal pooling goes on from the sums of the tokens before.
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        carry = None
        if cache is not None and hasattr(cache, "get_seq_length"):
            if cache.get_seq_length() == 0:
                self._carry = {}
            elif not self._carry or any(sums[0].shape[0] != b for sums in self._carry.values()):
                raise UserError("A KV cache reached the memory model without the gate state of its first step; "
                                "generate through MemoryModel.generate (beam search runs without a cache).")
            carry = self._carry
        self._state = {"embeds": embeds.detach(), "mask": mask, "carry": carry}
        return

    def _make_layer_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            if self._capture is not None and layer == self.memory_config.query_layer:  # see query_states
                self._capture.append((output[0] if isinstance(output, tuple) else output).detach())
                raise _StopForward
            if not self.active or not self._state:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if layer == self.memory_config.query_layer:
                self._retrieve(hidden)
                if self._gate_only:
                    raise _StopForward
            if str(layer) in self.fusions:
                hidden_in = args[0] if args else kwargs["hidden_states"]
                hidden = self._fuse(layer, hidden_in, hidden, kwargs.get("position_embeddings"))
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return None
        return hook

    def _retrieve(self, hidden: torch.Tensor) -> None:
        state = self._state
        mask = state["mask"]
        b, t = mask.shape
        if self.retrieval == "gold":
            if self._gold is None:
                raise UserError("Gold retrieval needs each row's memory_id; the batch has none.")
            entries = self._gold.view(b, 1, 1).expand(b, t, 1)
            weights = hidden.new_zeros(b, t, 1)
            valid = torch.ones_like(entries, dtype=torch.bool)
            self.last_retrieval = {"entries": entries}
        else:
            gate_trains = self.train_gate and self.gate.query_relation.weight.requires_grad and torch.is_grad_enabled()
            keys = self.entry_keys() if gate_trains else self._frozen_keys()
            with torch.set_grad_enabled(gate_trains):
                queries = self.gate.queries(hidden.detach(), state["embeds"], mask, state["carry"])
                if self._gate_only and self._positions is not None:
                    queries = queries[self._positions]  # (P, key_dim): only where the gate is trained or measured
                entries, scores, valid = self.gate.retrieve(queries, keys, self.cells, self.cell_entry)
            if self.gumbel_temperature is not None and self.training:
                weights = torch.nn.functional.gumbel_softmax(scores.masked_fill(~valid, NEG),
                                                             tau=self.gumbel_temperature, hard=True)
            else:
                weights = torch.softmax(scores.masked_fill(~valid, NEG), dim=-1)
            self.last_retrieval = {"queries": queries, "keys": keys, "entries": entries, "scores": scores,
                                   "valid": valid}
        state["entries"], state["weights"], state["valid"] = entries, weights, valid

    def _frozen_keys(self) -> torch.Tensor:
        """Entry keys under a gate that is not training, computed once per bank and gate state."""
        version = (self._bank_version, self.gate.query_relation.weight._version,
                   self.gate.temperature.log_value._version)
        if getattr(self, "_keys_version", None) != version:
            with torch.no_grad():
                self._keys_cache = self.entry_keys()
            self._keys_version = version
        return self._keys_cache

    def _fuse(self, layer: int, hidden_in: torch.Tensor, hidden: torch.Tensor, rope) -> torch.Tensor:
        state = self._state
        entries, weights, valid = state["entries"], state["weights"], state["valid"]
        b, t, k = entries.shape
        fusion = self.fusions[str(layer)]
        tokens = self.entry_features(self.fusion_source(layer))
        length = tokens.shape[1]
        if "entry_rope" not in state:
            state["entry_rope"] = self.entry_rope(length, hidden) if rope is not None else None
        unique, inverse = torch.unique(entries, return_inverse=True)
        keys, values = fusion.project_memory(tokens[unique].to(hidden.dtype), state["entry_rope"])  # (U, L, kv, d)
        shape = (b, t, k * length, *keys.shape[2:])
        # index_select, not keys[inverse]: the backward of advanced indexing accumulates in a nondeterministic
        # order on CPU, index_select's does not (two identical runs must give identical weights).
        keys = keys.index_select(0, inverse.flatten()).view(shape)
        values = values.index_select(0, inverse.flatten()).view(shape)
        token_ok = self.features.mask[entries].bool() & valid[..., None]  # (B, T, k, L)
        # log(weight): exactly log-softmax for soft weights; for straight-through one-hot weights, 0 for the chosen
        # entry and about -9 for the others, whose gradient still reaches the gate.
        bias = torch.log(weights + 1e-4)[..., None].expand(b, t, k, length)
        bias = bias.masked_fill(~token_ok, NEG).reshape(b, t, k * length)
        return fusion(hidden_in, hidden, keys, values, bias, rope)

    # ---- saving and loading ------------------------------------------------------------------------

    def memory_state(self) -> dict[str, torch.Tensor]:
        """The memory parts' weights (gate and fusions, parameters and saved buffers), never the backbone's."""
        state = {}
        for prefix, module in (("gate.", self.gate), ("fusions.", self.fusions)):
            for name, tensor in module.state_dict().items():
                state[prefix + name] = tensor.detach().cpu().contiguous()
        return state

    def save(self, output_dir: str) -> None:
        """memory_config.json, the memory parts (trainable.safetensors) and the bank (memory_bank.jsonl)."""
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        if self.bank is not None:
            self.memory_config.bank_size = len(self.bank)
            self.memory_config.bank_fingerprint = self.bank.fingerprint()
            self.bank.save(output_dir)
        with atomic_path(os.path.join(output_dir, WEIGHTS_FILE)) as tmp:
            save_file(self.memory_state(), tmp, metadata={"format": "pt"})
        self.memory_config.save(output_dir)

    def load_memory_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load the memory parts strictly; another stage's or model's weights are one sentence."""
        own = self.memory_state()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        reshaped = sorted(f"{n} {tuple(tensors[n].shape)} vs {tuple(own[n].shape)}" for n in own
                          if n in tensors and tensors[n].shape != own[n].shape)
        if missing or unexpected or reshaped:
            problems = [f"{label} {names[:3]}" for label, names in
                        (("missing", missing), ("unexpected", unexpected), ("different shapes", reshaped)) if names]
            raise UserError(f"{source} does not match these memory settings and this backbone "
                            f"({'; '.join(problems)}); use the settings and base model that wrote it.")
        with torch.no_grad():
            for prefix, module in (("gate.", self.gate), ("fusions.", self.fusions)):
                module.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})


def memory_parts_from(folder: str, backbone, *, stage_check: tuple[str, ...] | None = None) -> MemoryModel:
    """A MemoryModel around ``backbone`` with the memory parts saved in ``folder`` (no bank set yet)."""
    from safetensors.torch import load_file

    config = MemoryConfig.load(folder)
    if stage_check and config.stage not in stage_check:
        raise UserError(f"{folder} was written by the {config.stage or 'unknown'} stage; this step continues from "
                        f"{' or '.join(stage_check)}.")
    size = backbone.config.hidden_size
    if config.hidden_size != size:
        raise UserError(f"{folder} holds memory parts for a backbone of hidden size {config.hidden_size}, but "
                        f"{config.base_model} here has {size}; load the base model they were trained with.")
    model = MemoryModel(backbone, config)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise UserError(f"{folder} holds no {WEIGHTS_FILE}; pass a finished run's output folder.")
    model.load_memory_state(load_file(path), folder)
    return model


def load_memory_model(folder: str, *, bank: str | MemoryBank | None = None, dtype: str = "auto",
                      truncate_entries: bool = False) -> tuple[MemoryModel, object]:
    """Load a saved memory model in one call: ``(model, tokenizer)`` with the folder's bank or ``bank``."""
    from lib.models.loading import load_model, load_tokenizer

    config = MemoryConfig.load(folder)
    tokenizer = load_tokenizer(config.base_model, revision=config.base_model_revision)
    backbone = load_model(config.base_model, dtype=dtype, revision=config.base_model_revision)
    backbone.requires_grad_(False)
    model = memory_parts_from(folder, backbone)
    if not isinstance(bank, MemoryBank):
        bank = MemoryBank.load(bank or folder, tokenizer, max_entry_tokens=config.max_entry_tokens,
                               truncate=truncate_entries, allow_empty=True)
    model.set_bank(bank)
    return model.eval(), tokenizer
