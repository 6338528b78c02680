"""train_memory.py --memory_type recall: chat logs -> memory entries -> vectors and index -> <recall> training.

A run reads the logs, extracts entries from the conversations that are new or changed since the last finished run
in --output_dir (its state.json), merges them into the memory (duplicates dropped, contradicted entries replaced),
embeds the new entries, rebuilds the index and trains the recall model: from scratch on every entry the first
time, or, when the folder holds a model, from that model on the new entries plus as many earlier ones (so old
memories are rehearsed, not forgotten). Everything is written into ``<output_dir>.staging`` and swapped in at the
end, so a crash leaves the previous model, adapter and index as they were; ``<output_dir>.lock`` refuses a second
run at once. Under torchrun each process extracts a share of the conversations; everything after that is the same
on every process, and training is data-parallel.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import time


def run(argv=None) -> dict:
    import logging

    import numpy as np
    import torch
    import transformers
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from lib.core.args import parse_args, resume_argument
    from lib.core.callbacks import (
        MetricsFileCallback,
        SafeCallback,
        load_user_callbacks,
    )
    from lib.core.errors import UserError
    from lib.core.files import replace_dir
    from lib.core.hub import check_push_to_hub
    from lib.memory.args import MemoryTypeArguments
    from lib.models.args import ModelArguments
    from lib.models.loading import load_model_and_tokenizer
    from lib.recall.args import (
        RecallDataArguments,
        RecallModelArguments,
        RecallTrainingArguments,
    )
    from lib.recall.extraction import extract_entries
    from lib.recall.index import MemoryIndex
    from lib.recall.logs import (
        given_entries,
        new_or_changed,
        read_conversations,
        read_state,
        run_lock,
    )
    from lib.recall.model import (
        CONFIG_FILE,
        RecallConfig,
        build_recall_model,
        load_recall_model,
    )
    from lib.recall.outputs import push_run, write_run_files
    from lib.recall.retrieval import QueryAdapter, question_vectors, search_vectors, train_query_adapter
    from lib.recall.updates import merge_entries
    from lib.recall.vectors import extract_last_token_embedding

    model_args, data_args, recall_args, args, _ = parse_args(
        (ModelArguments, RecallDataArguments, RecallModelArguments, RecallTrainingArguments, MemoryTypeArguments),
        argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    transformers.utils.logging.set_verbosity_warning()
    check_push_to_hub(args.push_to_hub, args.hub_model_id)
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise UserError(f"--memory_type recall does not run under ZeRO-3 (--deepspeed {args.deepspeed}): extraction, "
                        "the vectors and the index need the whole model in every process; use DDP (torchrun) or "
                        "ZeRO-2 (--deepspeed ds_configs/zero2.json), which shards the LoRA's gradients and "
                        "optimizer states.")
    user_callbacks = load_user_callbacks(args.callbacks)
    main_process = args.process_index == 0
    out = os.path.abspath(args.output_dir)
    staging = out + ".staging"
    times: dict[str, float] = {}

    def say(message: str) -> None:
        if main_process:
            print(message, flush=True)

    lock = run_lock(out) if main_process else _no_lock()
    with lock:
        previous_run = os.path.exists(os.path.join(out, CONFIG_FILE)) and not args.overwrite_output_dir
        if os.path.isdir(out) and os.listdir(out) and not previous_run and not args.overwrite_output_dir:
            raise UserError(f"--output_dir {out} holds something other than a recall-memory run; pass "
                            "--overwrite_output_dir to replace it, or choose another folder.")
        if main_process and os.path.isdir(staging) and not args.resume_from_checkpoint:
            shutil.rmtree(staging)  # what a crashed run left: its model never replaced the finished one
        args.output_dir = staging
        state = read_state(out) if previous_run else {"conversations": {}}
        set_seed(args.seed)

        # ---- 1. memory entries: from the logs' new conversations, or given --------------------------------
        start = time.time()
        base, tokenizer = load_model_and_tokenizer(model_args, args)
        base.requires_grad_(False)
        old = MemoryIndex.load(out) if previous_run else None
        counts = {"conversations": 0, "new_conversations": 0, "messages_read": 0, "extracted": 0}
        if data_args.memories_file:
            entries, replaced, changed = given_entries(data_args.memories_file), [], set()
            conversations = []
            counts["extracted"] = len(entries)
        else:
            conversations = read_conversations(data_args.chat_logs)
            todo = new_or_changed(conversations, state)
            counts.update(conversations=len(conversations), new_conversations=len(todo))
            say(f"chat logs: {len(conversations)} conversations, {len(todo)} new or changed since the last run")
            extractor, extractor_tokenizer = base, tokenizer
            if recall_args.extractor_model:
                extractor, extractor_tokenizer = load_model_and_tokenizer(
                    ModelArguments(model_name_or_path=recall_args.extractor_model), args)
            extractor_tokenizer.padding_side = "left"
            # Each process reads its share of the conversations; the entries are gathered in conversation order.
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            share = todo[args.process_index::world] if world > 1 else todo
            new, counts["messages_read"] = extract_entries(
                extractor.eval(), extractor_tokenizer, share, batch_size=recall_args.extraction_batch_size,
                max_new_tokens=recall_args.extraction_max_new_tokens, check_grounding=recall_args.check_grounding,
                min_logprob=recall_args.extraction_min_logprob,
                progress=lambda done, total: say(f"extraction: {done}/{total} messages") if done % 256 < 16 or
                done == total else None)
            if world > 1:
                parts = [None] * world
                torch.distributed.all_gather_object(parts, (new, counts["messages_read"]))
                new = [entry for part, _ in parts for entry in part]
                counts["messages_read_per_process"] = [read for _, read in parts]
                counts["messages_read"] = sum(counts["messages_read_per_process"])
            counts["extracted"] = len(new)
            changed = {c["conversation_id"] for c in todo}
            entries, replaced = merge_entries(old.entries if old else [], new, changed)
        times["extraction_s"] = time.time() - start
        if not entries:
            raise UserError("No memory entries: the extractor found no fact about any user in the logs; check the "
                            "logs, or try a stronger --extractor_model.")
        say(f"memory: {len(entries)} entries of {len({e['user_id'] for e in entries})} users "
            f"({counts['extracted']} extracted now, {len(replaced)} replaced by later ones)")

        # ---- 2. vectors and index (earlier entries keep their stored vectors) -----------------------------
        start = time.time()
        known = {(e["user_id"], e["text"]): i for i, e in enumerate(old.entries)} if old else {}
        fresh = [i for i, e in enumerate(entries) if (e["user_id"], e["text"]) not in known]
        fresh_rows = set(fresh)
        vectors = np.zeros((len(entries), base.config.hidden_size), dtype=np.float32)
        if old and len(fresh) < len(entries):
            reused = [i for i in range(len(entries)) if i not in fresh_rows]
            vectors[reused] = old.vectors([known[(entries[i]["user_id"], entries[i]["text"])] for i in reused])
        if fresh:
            vectors[fresh] = extract_last_token_embedding(
                base, tokenizer, [entries[i]["text"] for i in fresh], layer=recall_args.vector_layer,
                template=recall_args.vector_template).numpy()
        index = MemoryIndex(entries, vectors, exact_limit=recall_args.exact_index_limit)
        table = torch.from_numpy(index.vectors(list(range(len(entries)))))
        times["vectors_s"] = time.time() - start
        say(f"index: {len(index)} entries ({index.kind}), {len(fresh)} embedded now")

        # ---- 3. rows: every entry (when continuing: the new ones, and --rehearsal_ratio times as many earlier ones) --
        questions, slots, recited, sft = [], [], [], []
        # The previous run's adapter is kept when this run has no questions to train it on.
        adapter = QueryAdapter.load(out) if old and recall_args.query_adapter_epochs > 0 else None
        if data_args.qa_file:
            from lib.recall.training import load_qa_rows, qa_slots

            questions = [q for q in load_qa_rows(data_args.qa_file, data_args.max_qa_rows, args.seed)
                         if str(q["user_id"]) in index.user_rows]
            frozen = question_vectors(base, tokenizer, [q["question"] for q in questions],
                                      layer=recall_args.vector_layer, template=recall_args.vector_template)
            if recall_args.query_adapter_epochs > 0:
                start = time.time()
                adapter, counts["adapter_questions"] = train_query_adapter(
                    frozen, questions, entries, table.numpy(), index.user_rows,
                    epochs=recall_args.query_adapter_epochs, seed=args.seed)
                adapter = _same_on_every_process(adapter)
                times["query_adapter_s"] = time.time() - start
                say(f"query adapter: trained on {counts['adapter_questions']} questions")
            search = search_vectors(frozen, adapter).numpy()
            # Some more than top_k: a question's unanswerable copy reads the nearest entries without its answer.
            k = 2 * recall_args.top_k + 2
            hits = [index.search_rows(v[None], str(q["user_id"]), k)[0] for v, q in zip(search, questions)]
            questions, slots, recited = qa_slots(questions, hits, entries, top_k=recall_args.top_k,
                                                 unanswerable_ratio=recall_args.unanswerable_ratio, seed=args.seed)
        if data_args.sft_file:
            from lib.core.data import check_messages, load_rows

            ds = load_rows(data_args.sft_file)
            if "messages" not in ds.column_names:
                raise UserError(f"{data_args.sft_file} has no 'messages' field; instruction rows need one.")
            sft = [check_messages(m, data_args.sft_file, i, "messages") for i, m in enumerate(ds["messages"])]
        continuing = old is not None and _has_model(out)
        train_entries = list(range(len(entries)))
        if continuing:
            rng = random.Random(args.seed)
            rest = [i for i in train_entries if i not in fresh_rows]
            rehearsed = min(len(rest), max(1, round(recall_args.rehearsal_ratio * len(fresh))))
            train_entries = sorted(fresh + rng.sample(rest, rehearsed))
            chosen = [j for j, s in enumerate(slots) if any(r in fresh_rows for r in s)]  # questions the news touch
            questions, slots, recited = ([questions[j] for j in chosen], [slots[j] for j in chosen],
                                         [recited[j] for j in chosen])
        recall_config = RecallConfig(base_model=model_args.model_name_or_path, vector_dim=vectors.shape[1],
                                     hidden_size=base.config.hidden_size, vector_layer=recall_args.vector_layer,
                                     vector_template=recall_args.vector_template, lora_r=recall_args.lora_r,
                                     lora_alpha=recall_args.lora_alpha,
                                     lora_target_modules=recall_args.lora_target_modules)
        from lib.recall.training import build_rows, train_recall

        def rows_for(entry_rows, picked):
            return build_rows(tokenizer, entries, entry_rows, [questions[j] for j in picked],
                              [slots[j] for j in picked], [recited[j] for j in picked], sft,
                              sft_mix_ratio=data_args.sft_mix_ratio, max_length=data_args.max_length,
                              slot=recall_config.recall_token, seed=args.seed)

        # ---- 4. K-fold cross-validation over entries ------------------------------------------------------
        folds = []
        if recall_args.k_folds and not continuing:
            from lib.recall.evaluation import reconstruction

            start = time.time()
            order = list(range(len(entries)))
            random.Random(args.seed).shuffle(order)
            for k in range(recall_args.k_folds):
                held = set(order[k::recall_args.k_folds])
                keep = [i for i in order if i not in held]
                picked = [j for j, s in enumerate(slots) if not set(s) & held]
                fold_args = copy.deepcopy(args)
                fold_args.output_dir = os.path.join(staging, f"fold-{k}")
                fold_args.save_strategy = "no"
                fold_tokenizer = copy.deepcopy(tokenizer)
                model = build_recall_model(copy.deepcopy(base), fold_tokenizer, recall_config)
                train_recall(model, fold_tokenizer, rows_for(sorted(keep), picked), table, fold_args,
                             sft_loss=data_args.sft_loss)
                held_rows = sorted(held)
                result = reconstruction(model.eval(), fold_tokenizer, [entries[i]["text"] for i in held_rows],
                                        table[held_rows], controls=False)
                folds.append({"fold": k, "held_out_entries": len(held_rows), **result})
                say(f"fold {k + 1}/{recall_args.k_folds}: held-out exact match {result['exact_match']:.3f}, token "
                    f"accuracy {result['token_accuracy']:.3f}")
                del model
            times["k_folds_s"] = time.time() - start

        # ---- 5. the final model ----------------------------------------------------------------------------
        start = time.time()
        if continuing:
            model, tokenizer = load_recall_model(out, model_args=model_args, trainable=True)
            args.learning_rate *= recall_args.rerun_learning_rate_scale  # new entries without forgetting the rest
        else:
            model = build_recall_model(base, tokenizer, recall_config)
        train_ds = rows_for(train_entries, range(len(questions)))
        say(f"training rows: {len(train_ds)} ({len(train_entries)} entries, {len(questions)} questions, "
            f"instruction mix {data_args.sft_mix_ratio}, {data_args.sft_loss} loss)"
            + (" — continuing the previous model" if continuing else ""))

        def save_files(folder: str) -> None:
            model.save(folder)

        resume = resume_argument(args.resume_from_checkpoint)
        if resume is True:
            resume = get_last_checkpoint(staging) if os.path.isdir(staging) else None
            if resume is None:
                raise UserError(f"--resume_from_checkpoint true: {staging} holds no checkpoint of an unfinished run.")
        trainer = None
        if continuing and not fresh:
            say("no new memories: the model stays as it is")
        else:
            trainer = train_recall(model, tokenizer, train_ds, table, args, save_files=save_files, resume=resume,
                                   callbacks=[SafeCallback(MetricsFileCallback()), *user_callbacks],
                                   sft_loss=data_args.sft_loss)
        times["training_s"] = time.time() - start

        # ---- 6. save everything into the staging folder, then swap it in -----------------------------------
        summary = {
            "counts": {**counts, "entries": len(entries), "replaced": len(replaced), "embedded": len(fresh),
                       "train_rows": len(train_ds), "train_entries": len(train_entries), "questions": len(questions)},
            "continued_from_previous": continuing, "index": index.kind, "times": times,
            "settings": {"top_k": recall_args.top_k, "vector_layer": recall_args.vector_layer,
                         "query_adapter": adapter is not None,
                         "k_folds": recall_args.k_folds, "sft_mix_ratio": data_args.sft_mix_ratio,
                         "sft_loss": data_args.sft_loss, "base_model": model_args.model_name_or_path,
                         "learning_rate": args.learning_rate,
                         "extractor_model": recall_args.extractor_model or model_args.model_name_or_path},
            "final_loss": {k: v for h in (trainer.state.log_history if trainer else []) for k, v in h.items()
                           if k.startswith("loss/")},
        }
        if folds:
            ems = np.array([f["exact_match"] for f in folds])
            accs = np.array([f["token_accuracy"] for f in folds])
            summary["k_fold"] = {"folds": folds, "exact_match_mean": float(ems.mean()),
                                 "exact_match_std": float(ems.std()), "token_accuracy_mean": float(accs.mean()),
                                 "token_accuracy_std": float(accs.std())}
        if trainer is not None:
            trainer.save_model(staging)
        elif main_process:
            save_files(staging)
            tokenizer.save_pretrained(staging)
        if main_process:
            if adapter is not None:
                adapter.save(staging)
            write_run_files(staging, out, model, tokenizer, index, replaced, conversations, state, summary,
                            recall_args)
            for path in [os.path.join(staging, n) for n in os.listdir(staging)]:
                if os.path.basename(path).startswith(("checkpoint-", "fold-")):
                    shutil.rmtree(path)
            replace_dir(staging, out)
            say(f"recall model, index and {len(entries)} memories: {out}")
        args.output_dir = out
        if args.push_to_hub and main_process:
            push_run(out, args, recall_args)
    return summary


def _no_lock():
    import contextlib

    return contextlib.nullcontext()


def _has_model(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, "adapter_config.json"))


def _same_on_every_process(adapter):
    """Under torchrun every process searches with the main process's adapter (so all build the same rows)."""
    import torch

    if adapter is None or not torch.distributed.is_initialized():
        return adapter
    state = [{k: v.detach().cpu() for k, v in adapter.state_dict().items()}]
    torch.distributed.broadcast_object_list(state, src=0)
    adapter.load_state_dict(state[0])
    return adapter
