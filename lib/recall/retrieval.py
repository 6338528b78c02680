"""How a question searches the index: its frozen vector, sharpened by a query adapter trained on the run's questions.

Questions and memories are embedded alike (``lib.recall.vectors``), but a question and the memory that answers it
are worded apart ("Who is my employer?" / "The user's company is called Tube Labs."), and a small model's states
often put another memory of the same user nearer. The query adapter is a residual linear map on the question side
only, so the memory vectors (which the ``<recall>`` slots read) never change. It starts at zero (the frozen vector)
and is trained on the training questions (``--qa_file``), contrastively over the asking user's own entries: the
entries that hold the answer against the user's others. A question searches with the sum of its frozen and adapted
unit vectors, i.e. the mean of the two cosines, so that on a kind of question the adapter never saw the search stays
about as good as the frozen vector alone (``benchmarks/bench_query_adapter.py`` measures both).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lib.recall.data import as_user_question
from lib.recall.evaluation import holds_answer, normalise
from lib.recall.vectors import extract_last_token_embedding

ADAPTER_FILE = "query_adapter.safetensors"


class QueryAdapter(nn.Module):
    """``q -> unit(q) + unit(unit(q) + W unit(q) + b)``; ``W``, ``b`` start at zero."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def adapted(self, vectors: torch.Tensor) -> torch.Tensor:
        q = F.normalize(vectors.float(), dim=-1)
        return F.normalize(q + self.linear(q), dim=-1)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors.float(), dim=-1) + self.adapted(vectors)

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        from lib.core.files import atomic_path

        with atomic_path(os.path.join(folder, ADAPTER_FILE)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp)

    @classmethod
    def load(cls, folder: str) -> QueryAdapter | None:
        """The folder's adapter, or None when it has none (runs without training questions search frozen)."""
        from safetensors.torch import load_file

        path = os.path.join(folder, ADAPTER_FILE)
        if not os.path.exists(path):
            return None
        state = load_file(path)
        adapter = cls(state["linear.weight"].shape[1])
        adapter.load_state_dict(state)
        return adapter.eval()


def question_vectors(model, tokenizer, questions: list[str], *, layer: int, template: str,
                     adapter: QueryAdapter | None = None) -> torch.Tensor:
    """The search vectors of ``questions``: frozen (after "I"/"my" become "the user"/"the user's"), then adapted."""
    frozen = extract_last_token_embedding(model, tokenizer, [as_user_question(q) for q in questions], layer=layer,
                                          template=template)
    return search_vectors(frozen, adapter)


def search_vectors(frozen: torch.Tensor, adapter: QueryAdapter | None) -> torch.Tensor:
    if adapter is None:
        return frozen
    with torch.no_grad():
        return adapter(frozen)


def answer_rows(question: dict, rows, entries: list[dict]) -> list[int]:
    """The rows among ``rows`` (the asking user's) whose entry is the question's gold memory or holds its answer."""
    answer, gold = str(question.get("answer", "")), question.get("memory") or ""
    if normalise(answer) in ("", "unknown"):
        return []
    return [int(r) for r in rows if holds_answer(entries[r]["text"], answer, gold)]


def train_query_adapter(frozen: torch.Tensor, questions: list[dict], entries: list[dict], entry_vectors: np.ndarray,
                        user_rows: dict, *, epochs: int = 10, learning_rate: float = 1e-3,
                        temperature: float = 0.05, batch_size: int = 32, max_candidates: int = 256,
                        seed: int = 0) -> tuple[QueryAdapter | None, int]:
    """Train an adapter on the questions whose user has an entry holding the answer; returns it (None when no
    question has one) and the number of questions it learnt from. Candidates per question: the user's entries (at
    most ``max_candidates``, the answer's among them)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i, question in enumerate(questions):
        rows = user_rows.get(str(question["user_id"]))
        if rows is None:
            continue
        positive = answer_rows(question, rows, entries)
        if not positive:
            continue
        chosen = set(positive)
        others = [int(r) for r in rows if int(r) not in chosen]
        if len(positive) + len(others) > max_candidates:
            keep = max(0, max_candidates - len(positive))
            others = [others[j] for j in sorted(rng.choice(len(others), size=keep, replace=False))]
        pairs.append((i, positive + others, len(positive)))
    if not pairs:
        return None, 0
    generator = torch.Generator().manual_seed(seed)
    adapter = QueryAdapter(frozen.shape[1])
    table = F.normalize(torch.as_tensor(entry_vectors, dtype=torch.float32), dim=-1)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=learning_rate, weight_decay=0.0)
    for _ in range(epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = [pairs[j] for j in order[start:start + batch_size]]
            width = max(len(rows) for _, rows, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            valid = torch.zeros(len(batch), width, dtype=torch.bool)
            good = torch.zeros(len(batch), width, dtype=torch.bool)
            for b, (_, rows, n_pos) in enumerate(batch):
                ids[b, :len(rows)] = torch.tensor(rows)
                valid[b, :len(rows)] = True
                good[b, :n_pos] = True
            q = adapter.adapted(frozen[[i for i, _, _ in batch]])
            scores = torch.einsum("bd,bkd->bk", q, table[ids]) / temperature
            floor = torch.finfo(scores.dtype).min
            loss = (torch.logsumexp(scores.masked_fill(~valid, floor), 1)
                    - torch.logsumexp(scores.masked_fill(~good, floor), 1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return adapter.eval(), len(pairs)
