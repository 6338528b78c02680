"""The batched scorer: the minimal forward pass each score needs, over length-sorted, token-budgeted batches."""

from __future__ import annotations

import math
from typing import Any

import torch

from lib.models.moe import RouterCapture
from lib.selection.args import SelectArguments
from lib.selection.rows import Item, prepare_rows, row_texts
from lib.selection.scores import (
    ROUTER_SCORES,
    finite_or_none,
    masked_mean_nll,
    router_row_scores,
    selection_score,
)


class _StopForward(Exception):
    """Raised from the last router's hook: nothing after it is needed for router scores."""


class BatchScorer:
    """Runs the minimal forward pass a score needs and returns per-row scores of one padded batch.

    Router scores need every sparse layer's router logits and nothing after the last router, so the forward
    pass stops there: the last sparse layer's experts, any later layers, the final norm and the LM head never
    run. Perplexity-style scores (``lm=True``) run the backbone to its last hidden state and apply the LM head
    row by row, so the ``(tokens, vocab)`` log-probabilities of a whole batch never exist at once.
    """

    def __init__(self, model, *, routers=None, garbage_masks=None, top_k: int = 1, lm: bool = False,
                 targets_only: bool = False):
        self.model = model
        self.routers = routers or []
        self.garbage_masks = garbage_masks
        self.top_k = top_k
        self.lm = lm
        self.targets_only = targets_only  # router scores read only the target tokens (assistant turns)
        self._head_checked = False
        self._head_is_exact = True
        if not self.routers and not lm:
            raise ValueError("BatchScorer needs routers, lm=True, or both")

    def _stop(self, module, inputs, output):
        raise _StopForward

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:

        out: dict[str, torch.Tensor] = {}
        if self.lm and not self._head_checked:
            self._check_head(input_ids, attention_mask)
        capture = RouterCapture(self.routers)
        try:
            with capture:
                if self.lm:
                    nll = self._nll(input_ids, attention_mask,
                                    attention_mask if target_mask is None else target_mask)
                else:
                    # Registered after the capture hooks, so it fires once the last logits are recorded.
                    stop = self.routers[-1].module.register_forward_hook(self._stop)
                    try:
                        self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    finally:
                        stop.remove()
        except _StopForward:
            pass
        if self.routers:
            if len(capture.logits) != len(self.routers):
                raise RuntimeError(f"captured {len(capture.logits)} router outputs, expected {len(self.routers)}")
            scored = target_mask if self.targets_only and target_mask is not None else attention_mask
            out.update(router_row_scores(capture.logits, self.garbage_masks, scored, self.top_k))
        if self.lm:
            out["nll"] = nll
        return out

    def _row_logits(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden[i:i + 1])
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return softcap * torch.tanh(logits / softcap) if softcap else logits

    def _check_head(self, input_ids, attention_mask) -> None:
        """Families with extra logit transforms would make the row-wise head differ from the model's own
        logits; check once on one row and use the full forward pass from then on if so."""
        self._head_checked = True
        model = self.model
        ref = model(input_ids=input_ids[:1], attention_mask=attention_mask[:1], use_cache=False).logits
        hidden = model.base_model(input_ids=input_ids[:1], attention_mask=attention_mask[:1], use_cache=False)[0]
        n = int(attention_mask[0].sum())
        mine = self._row_logits(hidden, 0)
        self._head_is_exact = torch.allclose(mine[:, :n].float(), ref[:, :n].float(), rtol=1e-3, atol=1e-3)

    def _nll(self, input_ids, attention_mask, target_mask) -> torch.Tensor:
        if not self._head_is_exact:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return masked_mean_nll(logits, input_ids, target_mask)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return torch.cat([
            masked_mean_nll(self._row_logits(hidden, i), input_ids[i:i + 1], target_mask[i:i + 1])
            for i in range(len(input_ids))
        ])


class HiddenPooler:
    """Each row's hidden states at one layer, mean-pooled over its non-padding tokens in fp32 (the probe's features).

    ``layer`` indexes ``hidden_states`` of transformers' ``output_hidden_states``: 0 is the embeddings, L the
    output of decoder layer L. Below the last layer the forward pass stops at the input of decoder layer ``layer``
    (which is ``hidden_states[layer]``), so the layers above it and the LM head never run.
    """

    def __init__(self, model, layer: int):
        self.model = model
        self.layer = layer
        blocks = getattr(model.base_model, "layers", None)
        n_layers = model.config.get_text_config().num_hidden_layers
        whole = isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n_layers
        self._stop_at = blocks[layer] if whole and layer < n_layers else None
        self._hidden = None

    def _capture(self, module, args, kwargs):
        self._hidden = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 target_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        run = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if self._stop_at is None:
            hidden = self.model.base_model(**run, output_hidden_states=True).hidden_states[self.layer]
        else:
            hook = self._stop_at.register_forward_pre_hook(self._capture, with_kwargs=True)
            try:
                self.model.base_model(**run)
            except _StopForward:
                pass
            finally:
                hook.remove()
            hidden, self._hidden = self._hidden, None
        mask = attention_mask.to(torch.float32)[..., None]
        return {"features": (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1)}


def length_batches(lengths: list[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory shows up at once).

    A batch holds at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens (one over-long row still
    forms a batch of its own). Ties keep input order, so batching is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _pad(items: list[Item], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(it.ids) for it in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.long)
    targets = torch.zeros((len(items), longest), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it.ids)
        ids[r, :n] = torch.tensor(it.ids)
        mask[r, :n] = 1
        targets[r, :n] = torch.tensor(it.targets) if it.targets is not None else 1
    return ids.to(device), mask.to(device), targets.to(device)


def run_items(scorer, items: list[Item], *, pad_id: int, device, batch_size: int, max_batch_tokens: int,
              on_batch=None) -> list[dict[str, Any]]:
    """Score sequences in length-sorted batches; results come back in input order."""
    results: list[dict[str, Any] | None] = [None] * len(items)
    for batch in length_batches([len(it.ids) for it in items], batch_size, max_batch_tokens):
        ids, mask, targets = _pad([items[i] for i in batch], pad_id, device)
        out = scorer(ids, mask, targets)
        out = {k: v.cpu().tolist() for k, v in out.items()}
        for r, i in enumerate(batch):
            results[i] = {k: v[r] for k, v in out.items()}
        if on_batch is not None:
            on_batch(len(batch))
    return results  # type: ignore[return-value]


def score_shard(values: list, *, scorer, tokenizer, args: SelectArguments, max_len: int, device,
                want_router: bool, alone_scorer=None, baseline=None, on_rows=None,
                eos_id: int | None = None) -> list[dict[str, Any]]:
    """Per-row score columns of one shard (every row gets a dict, skipped rows with nulls and a reason).

    ``alone_scorer`` (ifd only) scores the answers without their questions; ``baseline`` is the trained fasttext
    or probe model (lib/selection/baselines.py); ``eos_id`` is appended to text rows that fit (routers trained
    with ``--append_eos``).
    """
    chat = bool(args.messages_field)
    if args.score == "fasttext":
        return _fasttext_shard(values, baseline, tokenizer, chat=chat, on_rows=on_rows)
    prepared = prepare_rows(values, tokenizer, chat=chat, max_len=max_len, ifd=args.score == "ifd",
                            assistant_only=args.score_tokens == "assistant", eos_id=eos_id)
    live = [i for i, p in enumerate(prepared) if p.main is not None]
    pad_id = tokenizer.pad_token_id
    run = dict(pad_id=pad_id, device=device, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    main = run_items(scorer, [prepared[i].main for i in live], on_batch=on_rows, **run)
    alone = None
    if args.score == "ifd":
        alone = run_items(alone_scorer, [prepared[i].alone for i in live], **run)
    probe = baseline.p_good([r["features"] for r in main]) if args.score == "probe" and main else None
    if on_rows is not None:
        on_rows(0, skipped=len(values) - len(live))

    rows: list[dict[str, Any]] = []
    by_index = {i: k for k, i in enumerate(live)}
    for i, p in enumerate(prepared):
        row: dict[str, Any] = {"truncated": p.truncated, "skip_reason": p.skip_reason, "n_tokens": 0}
        k = by_index.get(i)
        res = main[k] if k is not None else {}
        if want_router:
            for name in ROUTER_SCORES:
                row[name] = finite_or_none(res.get(name))
            layers = res.get("quality_score_layers")
            row["quality_score_layers"] = None if k is None or row["quality_score"] is None else [float(x) for x in layers]
        if k is not None:
            row["n_tokens"] = len(p.main.ids)
        if args.score == "perplexity":
            nll = finite_or_none(res.get("nll"))
            row["_nll"] = nll
            row["perplexity"] = None if nll is None else math.exp(nll)
        if args.score == "ifd":
            cond = finite_or_none(res.get("nll"))
            solo = finite_or_none(alone[k].get("nll")) if k is not None else None
            row["ifd_loss_conditioned"], row["ifd_loss_alone"] = cond, solo
            row["ifd"] = cond / solo if cond is not None and solo else None
        if args.score == "probe":
            row["probe"] = finite_or_none(float(probe[k])) if k is not None else None
        rows.append(_finish(row, args.score))
    return rows


def _fasttext_shard(values: list, baseline, tokenizer, *, chat: bool, on_rows=None) -> list[dict[str, Any]]:
    """fastText reads the rendered rows whole (no truncation); ``n_tokens`` counts the words it reads."""
    texts, reasons = row_texts(values, tokenizer, chat=chat)
    rows = []
    for text, reason in zip(texts, reasons, strict=True):
        row = {"truncated": False, "skip_reason": reason, "n_tokens": 0 if text is None else len(text.split()),
               "fasttext": None if text is None else finite_or_none(baseline.p_good(text))}
        rows.append(_finish(row, "fasttext"))
    if on_rows is not None:
        on_rows(len(values))
    return rows


def _finish(row: dict[str, Any], score: str) -> dict[str, Any]:
    row["selection_score"] = finite_or_none(selection_score(score, row))
    if row["skip_reason"] is None and row["selection_score"] is None:
        row["skip_reason"] = "no scoreable tokens"
    row.pop("_nll", None)
    return row
