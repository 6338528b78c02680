"""What a recall-memory run writes besides the model: index, entries, history, state, summary, model card; and the
hub upload (model parts only, unless asked)."""

from __future__ import annotations

import os


def write_run_files(staging, out, model, tokenizer, index, replaced, conversations, state, summary, recall_args):
    import json

    from lib.core.cards import write_model_card
    from lib.core.files import atomic_path, write_json
    from lib.recall.logs import write_state

    index.save(staging)
    history = []
    old_history = os.path.join(out, "history.jsonl")
    if os.path.exists(old_history):
        with open(old_history, encoding="utf-8") as f:
            history = [json.loads(line) for line in f]
    with atomic_path(os.path.join(staging, "history.jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in history + replaced)
    write_state(staging, conversations, state)
    write_json(os.path.join(staging, "summary.json"), summary)
    if recall_args.merge_adapter:
        merged = model.model.merge_and_unload()
        merged.save_pretrained(os.path.join(staging, "merged"))
        tokenizer.save_pretrained(os.path.join(staging, "merged"))
    cfg = model.recall_config
    write_model_card(staging, title=f"Recall-token memory for {cfg.base_model}", lines=[
        (f"LoRA (r {cfg.lora_r}), the `{cfg.recall_token}` token's embedding row and a 2-layer projector "
         f"({cfg.vector_dim} -> {cfg.hidden_size}) for `{cfg.base_model}`: given `{cfg.recall_token}` and a memory's "
         "vector, the model writes the memory out or answers from it."),
        "",
        f"- memory vectors: last-token hidden state (layer {cfg.vector_layer}) of the frozen model",
        "- questions search with those vectors" + (" and a query adapter trained on the training questions "
                                                   "(`query_adapter.safetensors`)"
                                                   if summary["settings"].get("query_adapter") else ""),
        f"- {summary['counts']['entries']} memory entries; the index and entries are personal data and are not "
        "pushed to the hub unless asked (`--push_memories`)",
        "",
        "Ask with `python -m lib.recall.ask FOLDER --user_id ID \"question\"`.",
    ], library_name="peft", tags=["recall-memory", "lora"], base_model=cfg.base_model)


def push_run(out, args, recall_args):
    from huggingface_hub import HfApi

    ignore = [] if recall_args.push_memories else ["memories.faiss", "memories.jsonl", "history.jsonl",
                                                   "state.json", "summary.json"]
    api = HfApi()
    api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo or None)
    api.upload_folder(folder_path=out, repo_id=args.hub_model_id, ignore_patterns=ignore + ["checkpoint-*"],
                      commit_message="recall-token memory")
