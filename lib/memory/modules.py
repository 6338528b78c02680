"""The trained parts of explicit memory: MemoryNorm, the product-key MemoryGate and the gated MemoryFusion.

The gate reads the frozen model's hidden states at one layer. At every position t the query is an attention-
weighted mean of MemoryNorm(h_1..h_t) (causal: a position never sees later tokens, and a generation step
continues running sums), split in two halves; each half is scored against sqrt(N) sub-keys, the top candidates of both halves are
combined, and the best ``top_k`` cells of the grid are the retrieved entries (Lample et al., 2019). Sub-keys come
from the entries' content: an entry's key is a projection of its frozen embedding, a row key the mean of its row's
keys' first halves, a column key the mean of its column's keys' second halves. Adding or editing an entry
therefore gives it a meaningful key with no retraining.

Each fusion layer lets every position attend over the token representations of its retrieved entries (plus a
learned "nothing" slot) with the gate's log-weights as attention bias, through a copy of the backbone layer's own
attention, and adds the result through a gate that starts shut: ``h + tanh(alpha) * fuse(h, memory)``,
``alpha = 0``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NEG = -1e4  # a finite "minus infinity": fully masked rows stay finite in low precision


class MemoryNorm(nn.RMSNorm):
    """RMSNorm on the gate's query path (its own class, so freezing can select it by name)."""


def causal_attention_pool(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                          carry: list | None = None) -> torch.Tensor:
    """``out[:, t] = sum_{s<=t} softmax(scores[:, :t+1]) * values[:, s]`` over the unmasked positions.

    One pass with cumulative sums. Scores are bounded (tanh, at most 8), so a fixed shift by that bound keeps every
    weight representable, and the sums can go on where an earlier call stopped: ``carry`` (a list, empty at the
    first call) holds the running sums and is updated, so a generation step reads only its new tokens.
    values ``(B, T, D)``, scores ``(B, T)``, mask ``(B, T)``.
    """
    scores = 8.0 * torch.tanh(scores.float() / 8.0)
    scores = scores.masked_fill(mask == 0, -30.0)
    weights = torch.exp(scores - 8.0) * mask
    num = torch.cumsum(weights[..., None] * values.float(), dim=1)
    den = torch.cumsum(weights, dim=1)
    if carry is not None:
        if carry:
            num, den = num + carry[0][:, None], den + carry[1][:, None]
        carry[:] = [num[:, -1], den[:, -1]]
    return (num / den[..., None].clamp_min(1e-30)).to(values.dtype)


def attention_pool(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What :func:`causal_attention_pool` gives at the last position, for all positions at once: ``(B, D)``."""
    scores = 8.0 * torch.tanh(scores.float() / 8.0)
    weights = torch.softmax(scores.masked_fill(mask == 0, -30.0), dim=-1) * mask
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.einsum("bt,btd->bd", weights.to(values.dtype), values)


class Temperature(nn.Module):
    """The gate's learnable inverse temperature, ``10 * exp(-log_value)``. A module of its own so that ZeRO-3, which
    gathers a module's parameters when it is called, gathers it wherever the gate's methods use it."""

    def __init__(self):
        super().__init__()
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot take.
        self.log_value = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor:
        return 10.0 * torch.exp(-self.log_value)


class MemoryGate(nn.Module):
    """Product-key lookup of the bank from the frozen model's states at the query layer.

    A key has two halves, scored separately (the product-key split):

    * the first half names the **entity**: a learned attention-weighted mean of the frozen *token embeddings*
      (which tokens count is decided from MemoryNorm(hidden)), through a fixed random projection shared by queries
      and entries. Two texts naming the same entity share its tokens, so a name never seen in training still
      matches its entries; a learned projection here would memorise the training names instead.
    * the second half is the **relation** (a learned attention-weighted mean of MemoryNorm(hidden), projected
      separately for queries and entries: what is asked about, and what an entry states) next to a second, smaller
      fixed projection of the entity. The grid's rows then group entities and its columns group (relation,
      entity) pairs, so one row and one column meet at one entry; with the relation alone in the second half, a
      row's several entries of one relation would compete for the same few columns.

    Every part is unit-normalised, so a score is a sum of cosines times a learned inverse temperature.
    """

    def __init__(self, hidden_size: int, *, key_dim: int = 128, top_k: int = 4, candidates: int = 16,
                 eps: float = 1e-6, seed: int = 0):
        super().__init__()
        if key_dim % 4:
            raise ValueError(f"key_dim must be a multiple of 4, got {key_dim}")
        self.hidden_size, self.key_dim, self.top_k, self.candidates = hidden_size, key_dim, top_k, candidates
        half, quarter = key_dim // 2, key_dim // 4
        self.norm = MemoryNorm(hidden_size, eps=eps)
        self.entry_norm = MemoryNorm(hidden_size, eps=eps)
        self.entity_pool = nn.Linear(hidden_size, 1)
        self.entry_entity_pool = nn.Linear(hidden_size, 1)
        self.relation_pool = nn.Linear(hidden_size, 1)
        self.entry_relation_pool = nn.Linear(hidden_size, 1)
        self.query_relation = nn.Linear(hidden_size, quarter)
        self.entry_relation = nn.Linear(hidden_size, quarter)
        # Fixed (seeded, saved with the weights): orthonormal columns keep distinct token sets apart.
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(hidden_size, half + quarter, generator=generator) / math.sqrt(hidden_size)
        if half + quarter <= hidden_size:
            projection = torch.linalg.qr(projection)[0]
        self.register_buffer("entity_projection", projection.contiguous())
        self.temperature = Temperature()
        for pool in (self.entity_pool, self.entry_entity_pool, self.relation_pool, self.entry_relation_pool):
            nn.init.zeros_(pool.weight)  # start from plain means
            nn.init.zeros_(pool.bias)

    @property
    def scale(self) -> torch.Tensor:
        """Inverse temperature of the scores (10 at initialisation: the cosines give a usable softmax)."""
        return self.temperature()

    def _keys(self, hidden, embeds, mask, norm, entity_pool, relation_pool, relation, pool=None, carry=None):
        def pooled(values, scores, name):  # causal unless ``pool`` is given; continues carry[name] when given
            if pool is not None:
                return pool(values, scores, mask)
            return causal_attention_pool(values, scores, mask, None if carry is None else carry.setdefault(name, []))

        half = self.key_dim // 2
        normed = norm(hidden)
        entity = pooled(embeds, entity_pool(normed).squeeze(-1), "entity")
        entity = entity.to(self.entity_projection.dtype) @ self.entity_projection
        rel = relation(pooled(normed, relation_pool(normed).squeeze(-1), "relation"))
        unit = nn.functional.normalize
        entity = entity.to(rel.dtype)
        second = torch.cat([unit(rel, dim=-1), unit(entity[..., half:], dim=-1)], dim=-1) / math.sqrt(2.0)
        return torch.cat([unit(entity[..., :half], dim=-1), second], dim=-1)

    def queries(self, hidden: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                carry: dict | None = None) -> torch.Tensor:
        """Causal queries ``(B, T, key_dim)`` from hidden states and token embeddings ``(B, T, H)``; with ``carry``
        (a dict, empty at a sequence's start) the T tokens continue the ones earlier calls read."""
        return self._keys(hidden, embeds, mask, self.norm, self.entity_pool, self.relation_pool, self.query_relation,
                          carry=carry)

    def entry_keys(self, hidden: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Keys ``(N, key_dim)`` of entries from their frozen hidden states and token embeddings ``(N, L, H)``: the
        same pooling as a query at the entry's last token, computed for that position only."""
        return self._keys(hidden, embeds, mask, self.entry_norm, self.entry_entity_pool, self.entry_relation_pool,
                          self.entry_relation, pool=attention_pool)

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Exact scores ``(..., N)`` of queries against every entry key."""
        return (queries @ keys.T) * self.scale.to(queries.dtype)

    def sub_keys(self, keys: torch.Tensor, cells: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row keys ``(side, key_dim/2)`` and column keys ``(side, key_dim/2)``: means of the entries' key halves."""
        half = self.key_dim // 2
        rows, cols = cells // side, cells % side
        row_keys = keys.new_zeros(side, half).index_add(0, rows, keys[:, :half])
        col_keys = keys.new_zeros(side, half).index_add(0, cols, keys[:, half:])
        row_n = torch.bincount(rows, minlength=side).clamp_min(1).to(keys.dtype)[:, None]
        col_n = torch.bincount(cols, minlength=side).clamp_min(1).to(keys.dtype)[:, None]
        return row_keys / row_n, col_keys / col_n

    def half_scores(self, queries: torch.Tensor, row_keys: torch.Tensor, col_keys: torch.Tensor):
        """Row and column scores ``(..., side)`` each."""
        half = self.key_dim // 2
        scale = self.scale.to(queries.dtype)
        return (queries[..., :half] @ row_keys.T) * scale, (queries[..., half:] @ col_keys.T) * scale

    def lookup(self, row_scores: torch.Tensor, col_scores: torch.Tensor, cell_entry: torch.Tensor,
               top_k: int | None = None, empty: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k occupied cells: ``(entry indices, cell scores, valid)``, each ``(..., k)``.

        The best k cells by ``row + column`` score always lie among the k best rows x k best columns, so taking
        ``max(k, candidates)`` of each half returns exactly the top k of scoring every cell. Empty cells
        (``cell_entry == -1``) are never returned; fewer than k entries come back marked invalid. ``empty`` (the
        number of empty cells) can be given once per bank, so that a lookup never counts over the whole grid.
        """
        side = row_scores.shape[-1]
        if empty is None:
            empty = int((cell_entry < 0).sum())
        k = min(top_k or self.top_k, cell_entry.numel() - empty)
        # Widen the window by the number of empty cells, so that k occupied cells always lie inside it.
        c = min(side, max(k, self.candidates) + empty)
        top_r, idx_r = row_scores.topk(c, dim=-1)
        top_c, idx_c = col_scores.topk(c, dim=-1)
        combined = top_r[..., :, None] + top_c[..., None, :]  # (..., c, c)
        cells = idx_r[..., :, None] * side + idx_c[..., None, :]
        entry = cell_entry[cells]
        combined = combined.masked_fill(entry < 0, float("-inf"))
        scores, flat = combined.flatten(-2).topk(k, dim=-1)
        chosen = entry.flatten(-2).gather(-1, flat)
        valid = torch.isfinite(scores)
        return chosen.clamp_min(0), scores.masked_fill(~valid, NEG), valid

    def retrieve(self, queries: torch.Tensor, keys: torch.Tensor, cells: torch.Tensor, cell_entry: torch.Tensor,
                 top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gate's retrieval: ``candidates**2`` cells from the product keys, re-ranked by the entries' exact
        scores. Returns ``(entries, exact scores, valid)``, each ``(..., k)``. Cost grows like sqrt(N) plus the
        fixed candidate set, never like N."""
        side = math.isqrt(cell_entry.numel())
        row_keys, col_keys = self.sub_keys(keys, cells, side)
        rs, cs = self.half_scores(queries, row_keys, col_keys)
        window = min(self.candidates ** 2, len(keys))
        cand, _, cand_valid = self.lookup(rs, cs, cell_entry, top_k=window, empty=cell_entry.numel() - len(keys))
        picked = keys.index_select(0, cand.flatten()).view(*cand.shape, -1)  # deterministic backward on CPU
        exact = (queries[..., None, :] * picked).sum(-1) * self.scale.to(queries.dtype)
        exact = exact.masked_fill(~cand_valid, float("-inf"))
        k = min(top_k or self.top_k, cand.shape[-1])
        scores, order = exact.topk(k, dim=-1)
        valid = torch.isfinite(scores)
        return cand.gather(-1, order), scores.masked_fill(~valid, NEG), valid


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding in the rotate-half convention of Llama-family models; cos/sin broadcast to x."""
    from transformers.models.llama.modeling_llama import rotate_half

    return x * cos + rotate_half(x) * sin


class MemoryFusion(nn.Module):
    """One fusion layer: every position reads its retrieved entries' tokens the way the backbone's own attention at
    this layer reads context, and the result is added through a gate that starts shut.

    The norm and the q/k/v/o projections have the shapes of the backbone layer's self-attention and start as copies
    of it (:meth:`copy_attention`); the entry tokens are the frozen model's hidden states entering this layer, read
    alone and placed just before the sequence (rotary positions -L..-1), so at initialisation a position attends
    to an entry as it would to the entry's text written before the question. Measured on the builtin model with
    the gold entry, the gates forced open and no training at all, this alone lifted test-people answer accuracy
    (log-likelihood ranking) from 0.15 to 0.44; a freshly initialised cross-attention learned nothing from the same
    data. A per-head "nothing" logit lets a head
    ignore the memory (like the attention sink it has in context), and the gate's log-weights bias the logits.
    """

    def __init__(self, hidden_size: int, *, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, eps: float = 1e-6):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.norm = MemoryNorm(hidden_size, eps=eps)
        self.q = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        # -8: measured on the builtin model, the copied heads' logits for entry tokens mostly lie below 0, so a null
        # logit of 0 silenced the memory (base accuracy), while -8 kept nearly all of it and still gets gradient.
        self.null_logit = nn.Parameter(torch.full((num_heads,), -8.0))
        self.alpha = nn.Parameter(torch.zeros(1))
        self.last_gate: torch.Tensor | None = None

    @torch.no_grad()
    def copy_attention(self, layer: nn.Module) -> bool:
        """Start from the decoder layer's own input norm and attention projections (Llama-style names:
        ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``). Returns False, leaving the random start, when the layer
        has no such parts of the same shapes."""
        attention = getattr(layer, "self_attn", None)
        pairs = [(self.norm, getattr(layer, "input_layernorm", None))]
        pairs += [(mine, getattr(attention, f"{name}_proj", None)) for mine, name in
                  ((self.q, "q"), (self.k, "k"), (self.v, "v"), (self.o, "o"))]
        if any(theirs is None or not hasattr(theirs, "weight") or theirs.weight.shape != mine.weight.shape
               or (getattr(theirs, "bias", None) is None) != (getattr(mine, "bias", None) is None)
               for mine, theirs in pairs):
            return False
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight)
            if getattr(mine, "bias", None) is not None:
                mine.bias.copy_(theirs.bias)
        return True

    def project_memory(self, tokens: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of entry tokens ``(U, L, H)`` -> ``(U, L, kv_heads, head_dim)`` each; ``rope`` the
        ``(cos, sin)`` of the entry positions ``(L, head_dim)``."""
        u, length, _ = tokens.shape
        normed = self.norm(tokens)
        keys = self.k(normed).view(u, length, self.num_kv_heads, self.head_dim)
        if rope is not None:
            keys = rotate(keys, rope[0][:, None].to(keys.dtype), rope[1][:, None].to(keys.dtype))
        return keys, self.v(normed).view(u, length, self.num_kv_heads, self.head_dim)

    def forward(self, hidden_in: torch.Tensor, hidden_out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor, rope: tuple | None = None) -> torch.Tensor:
        """``hidden_in`` / ``hidden_out`` ``(B, T, H)``: the decoder layer's input and output; keys/values
        ``(B, T, M, kv_heads, head_dim)`` (M = k entries x L tokens); bias ``(B, T, M)`` holds the gate's
        log-weights and the padding mask; ``rope`` the layer's ``(cos, sin)`` ``(B, T, head_dim)``.
        Returns ``hidden_out + tanh(alpha) * fused``."""
        b, t, m = bias.shape
        kv, groups, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = self.q(self.norm(hidden_in)).view(b, t, self.num_heads, hd)
        if rope is not None:
            q = rotate(q, rope[0][:, :, None].to(q.dtype), rope[1][:, :, None].to(q.dtype))
        q = q.view(b, t, kv, groups, hd)
        logits = torch.einsum("btkgd,btmkd->btkgm", q, keys) / math.sqrt(hd)
        logits = logits + bias[:, :, None, None, :].to(q.dtype)
        null = self.null_logit.view(kv, groups, 1).to(q.dtype).expand(b, t, kv, groups, 1)
        attn = torch.softmax(torch.cat([null, logits], dim=-1).float(), dim=-1).to(values.dtype)
        read = torch.einsum("btkgm,btmkd->btkgd", attn[..., 1:], values).reshape(b, t, self.num_heads * hd)
        gate = torch.tanh(self.alpha)
        # Kept for logging: under ZeRO-3 alpha is only whole inside this forward.
        self.last_gate = gate.detach().float().reshape(())
        return hidden_out + gate.to(hidden_out.dtype) * self.o(read)
