"""The trained parts of explicit memory: MemoryNorm, the product-key MemoryGate and the gated MemoryFusion.

The gate reads the frozen model's hidden states at one layer. At every position t the query is an attention-
weighted mean of MemoryNorm(h_1..h_t) (causal, so a position never sees later tokens and generation needs no
state), split in two halves; each half is scored against sqrt(N) sub-keys, the top candidates of both halves are
combined, and the best ``top_k`` cells of the grid are the retrieved entries (Lample et al., 2019). Sub-keys come
from the entries' content: an entry's key is a projection of its frozen embedding, a row key the mean of its row's
keys' first halves, a column key the mean of its column's keys' second halves. Adding or editing an entry
therefore gives it a meaningful key with no retraining.

Each fusion layer lets every position attend over the token representations of its retrieved entries (plus a
learned "nothing" slot) with the gate's log-weights as attention bias, and adds the result through a gate that
starts shut: ``h + tanh(alpha) * fuse(h, memory)``, ``alpha = 0``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NEG = -1e4  # a finite "minus infinity": fully masked rows stay finite in low precision


class MemoryNorm(nn.RMSNorm):
    """RMSNorm on the gate's query path (its own class, so freezing can select it by name)."""


def causal_attention_pool(values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[:, t] = sum_{s<=t} softmax(scores[:, :t+1]) * values[:, s]`` over the unmasked positions.

    One pass with cumulative sums; scores are bounded (tanh), so the shift by the row maximum keeps every weight
    representable. values ``(B, T, D)``, scores ``(B, T)``, mask ``(B, T)``.
    """
    scores = 8.0 * torch.tanh(scores.float() / 8.0)
    scores = scores.masked_fill(mask == 0, -30.0)
    shift = scores.max(dim=1, keepdim=True).values.detach()
    weights = torch.exp(scores - shift) * mask
    num = torch.cumsum(weights[..., None] * values.float(), dim=1)
    den = torch.cumsum(weights, dim=1)[..., None].clamp_min(1e-30)
    return (num / den).to(values.dtype)


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

    def _keys(self, hidden, embeds, mask, norm, entity_pool, relation_pool, relation, pool=None):
        pool = pool or causal_attention_pool
        half = self.key_dim // 2
        normed = norm(hidden)
        entity = pool(embeds, entity_pool(normed).squeeze(-1), mask)
        entity = entity.to(self.entity_projection.dtype) @ self.entity_projection
        rel = relation(pool(normed, relation_pool(normed).squeeze(-1), mask))
        unit = nn.functional.normalize
        entity = entity.to(rel.dtype)
        second = torch.cat([unit(rel, dim=-1), unit(entity[..., half:], dim=-1)], dim=-1) / math.sqrt(2.0)
        return torch.cat([unit(entity[..., :half], dim=-1), second], dim=-1)

    def queries(self, hidden: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Causal queries ``(B, T, key_dim)`` from hidden states and token embeddings ``(B, T, H)``."""
        return self._keys(hidden, embeds, mask, self.norm, self.entity_pool, self.relation_pool, self.query_relation)

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


class MemoryFusion(nn.Module):
    """Cross-attention from each position to its retrieved entries' tokens, added through a shut gate."""

    def __init__(self, hidden_size: int, *, fusion_dim: int = 256, num_heads: int = 4):
        super().__init__()
        if fusion_dim % num_heads:
            raise ValueError(f"fusion_dim {fusion_dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, fusion_dim // num_heads
        self.norm = MemoryNorm(hidden_size)
        self.memory_norm = MemoryNorm(hidden_size)
        self.q = nn.Linear(hidden_size, fusion_dim, bias=False)
        self.k = nn.Linear(hidden_size, fusion_dim, bias=False)
        self.v = nn.Linear(hidden_size, fusion_dim, bias=False)
        self.o = nn.Linear(fusion_dim, hidden_size, bias=False)
        # The "nothing relevant" slot: attending to it adds nothing.
        self.null_key = nn.Parameter(torch.zeros(fusion_dim))
        self.alpha = nn.Parameter(torch.zeros(1))
        self.last_gate: torch.Tensor | None = None

    def project_memory(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of entry tokens ``(..., L, H)`` -> ``(..., L, fusion_dim)`` each."""
        normed = self.memory_norm(tokens)
        return self.k(normed), self.v(normed)

    def forward(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        """hidden ``(B, T, H)``; keys/values ``(B, T, M, D)`` (M = k entries x L tokens); bias ``(B, T, M)`` holds
        the gate's log-weights and the padding mask. Returns ``hidden + tanh(alpha) * fused``."""
        b, t, m, _ = keys.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q(self.norm(hidden)).view(b, t, heads, hd)
        k, v = keys.view(b, t, m, heads, hd), values.view(b, t, m, heads, hd)
        # The null slot's logit is scored apart, so the large (B, T, M, D) keys and values are never copied.
        scale = 1.0 / math.sqrt(hd)
        null = (q * self.null_key.view(heads, hd).to(q.dtype)).sum(-1, keepdim=True) * scale  # (B, T, heads, 1)
        logits = torch.einsum("bthd,btmhd->bthm", q, k) * scale + bias[:, :, None, :].to(q.dtype)
        attn = torch.softmax(torch.cat([null, logits], dim=-1).float(), dim=-1).to(v.dtype)
        fused = self.o(torch.einsum("bthm,btmhd->bthd", attn[..., 1:], v).reshape(b, t, heads * hd))
        gate = torch.tanh(self.alpha)
        # Kept for logging: under ZeRO-3 alpha is only whole inside this forward.
        self.last_gate = gate.detach().float().reshape(())
        return hidden + gate.to(hidden.dtype) * fused
