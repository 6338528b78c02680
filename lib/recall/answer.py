"""Answer time: the question searches the user's memories, and the model gets one ``<recall>`` slot per memory.

    from lib.recall.answer import RecallAssistant
    assistant = RecallAssistant("outputs/recall")
    assistant.answer("What is my dog called?", user_id="u0042")
    # {"answer": "Rex", "said": "The user's dog is called Rex.\nAnswer: Rex", "memories": [(cosine, text), ...]}

    python -m lib.recall.ask outputs/recall --user_id u0042 "What is my dog called?"
"""

from __future__ import annotations

import json
import os

import torch

from lib.recall.data import final_answer
from lib.recall.evaluation import ask_prompts, generate_with_memories
from lib.recall.index import MemoryIndex
from lib.recall.model import load_recall_model
from lib.recall.retrieval import QueryAdapter, question_vectors


class RecallAssistant:
    """A trained recall model with its memory index (both from one output folder)."""

    def __init__(self, folder: str, *, model_args=None, top_k: int | None = None, device: str | None = None):
        self.model, self.tokenizer = load_recall_model(folder, model_args=model_args)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.index = MemoryIndex.load(folder)
        self.query_adapter = QueryAdapter.load(folder)
        summary = os.path.join(folder, "summary.json")
        settings = {}
        if os.path.exists(summary):
            with open(summary) as f:
                settings = json.load(f).get("settings", {})
        self.top_k = top_k or settings.get("top_k", 3)

    def question_vectors(self, questions: list[str]) -> torch.Tensor:
        cfg = self.model.recall_config
        return question_vectors(self.model.model, self.tokenizer, questions, layer=cfg.vector_layer,
                                template=cfg.vector_template, adapter=self.query_adapter)

    def retrieve(self, questions: list[str], user_ids: list[str], k: int | None = None) -> list[list[tuple[float, int]]]:
        """The ``k`` nearest entry rows of each question's own user: ``[[(cosine, row), ...], ...]``."""
        vectors = self.question_vectors(questions).numpy()
        return [self.index.search_rows(v[None], user, k or self.top_k)[0] for v, user in zip(vectors, user_ids)]

    def answer_many(self, questions: list[str], user_ids: list[str], *, k: int | None = None,
                    max_new_tokens: int = 32, batch_size: int = 16) -> list[dict]:
        hits = self.retrieve(questions, user_ids, k)
        slot = self.model.recall_config.recall_token
        prompts = ask_prompts(self.tokenizer, questions, [len(h) for h in hits], slot)
        vectors = [torch.from_numpy(self.index.vectors([row for _, row in h])) for h in hits]
        answers = generate_with_memories(self.model, self.tokenizer, prompts, vectors, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size)
        return [{"answer": final_answer(a), "said": a,
                 "memories": [(round(s, 4), self.index.entries[row]["text"]) for s, row in h]}
                for a, h in zip(answers, hits)]

    def answer(self, question: str, user_id: str, **kwargs) -> dict:
        return self.answer_many([question], [user_id], **kwargs)[0]
