"""The <recall> model itself: the token row, the slots that read projected vectors, and the plain model that lm-eval
scores (LoRA and the token row merged in, tied embeddings included)."""

import copy

import pytest
import torch

from lib.core.errors import UserError

TINY = "builtin:tiny-llama"


# ---- the <recall> model ------------------------------------------------------------------------------------

def test_recall_token_row_starts_at_the_mean_and_slots_read_the_projected_vectors(tiny_llama):
    from lib.recall.model import RecallConfig, build_recall_model

    base, tokenizer = copy.deepcopy(tiny_llama[0]), copy.deepcopy(tiny_llama[1])
    mean = base.get_input_embeddings().weight.mean(0).clone()
    cfg = RecallConfig(base_model=TINY, vector_dim=8, hidden_size=base.config.hidden_size)
    model = build_recall_model(base, tokenizer, cfg)
    rid = model.recall_token_id
    assert tokenizer.convert_ids_to_tokens(rid) == "<recall>"
    row = model.model.get_input_embeddings()(torch.tensor([[rid]]))[0, 0]
    torch.testing.assert_close(row, mean)
    # Only LoRA, the token row and the projector train.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens" in n or n.startswith("projector.") for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)
    ids = torch.tensor([[5, rid, 6, rid], [rid, 7, 8, 9]])
    vectors = torch.randn(2, 2, 8)
    embeds = model.embed(ids, vectors)
    plain = model.model.get_input_embeddings()(ids)
    proj = model.projector(vectors)
    torch.testing.assert_close(embeds[0, 1], plain[0, 1] + proj[0, 0])
    torch.testing.assert_close(embeds[0, 3], plain[0, 3] + proj[0, 1])
    torch.testing.assert_close(embeds[1, 0], plain[1, 0] + proj[1, 0])
    torch.testing.assert_close(embeds[:, 2], plain[:, 2])
    with pytest.raises(UserError, match="one vector per slot"):
        model.embed(ids, vectors[:, :1])


def test_the_plain_model_for_lm_eval_equals_the_recall_model_without_slots_and_ties_its_embeddings(tiny_llama):
    from lm_eval.models.huggingface import HFLM

    from lib.recall.model import RecallConfig, build_recall_model, plain_language_model

    base, tokenizer = copy.deepcopy(tiny_llama[0]), copy.deepcopy(tiny_llama[1])
    base.config.tie_word_embeddings = True  # as SmolLM2: lm-eval's tie_weights failed on the wrapped tied embedding
    base.lm_head.weight = base.get_input_embeddings().weight
    model = build_recall_model(base, tokenizer, RecallConfig(base_model=TINY, vector_dim=8,
                                                             hidden_size=base.config.hidden_size))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained state: LoRA B and the <recall> row away from their starting values
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens" in name:
                param.add_(0.05 * torch.randn_like(param))
    plain = plain_language_model(model.eval())
    assert not any("lora_" in n or "trainable_tokens" in n for n, _ in plain.named_parameters())
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    ids = torch.tensor([[5, 6, 7, 12], [8, 9, 10, 11]])  # the tied output rows include the trained <recall> row
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits,
                                   atol=1e-5, rtol=1e-5)
    HFLM(pretrained=plain, tokenizer=tokenizer, batch_size=2, device="cpu")  # ties the weights again: must not fail
    assert any("lora_" in n for n, _ in model.named_parameters())  # the recall model itself is untouched


def test_recall_training_can_batch_rows_of_similar_length(tiny_llama, tmp_path):
    """--group_by_length was a dead field once transformers 5 renamed it train_sampling_strategy: asking for it
    changed nothing."""
    import datasets
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lib.recall.args import RecallTrainingArguments
    from lib.recall.data import RecallCollator
    from lib.recall.model import RecallConfig, build_recall_model
    from lib.recall.trainer import RecallTrainer

    assert RecallTrainingArguments(output_dir=str(tmp_path)).train_sampling_strategy == "random"
    assert RecallTrainingArguments(output_dir=str(tmp_path), group_by_length=True).train_sampling_strategy == \
        "group_by_length"
    base, tokenizer = copy.deepcopy(tiny_llama[0]), copy.deepcopy(tiny_llama[1])
    model = build_recall_model(base, tokenizer, RecallConfig(base_model=TINY, vector_dim=8,
                                                             hidden_size=base.config.hidden_size))
    lengths = [3, 40, 5, 4, 38, 6, 39, 3]
    rows = datasets.Dataset.from_list([{"input_ids": [5] * n, "attention_mask": [1] * n, "labels": [5] * n,
                                        "memory_ids": [], "task": 2} for n in lengths])
    args = RecallTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none",
                                   group_by_length=True)
    trainer = RecallTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                            data_collator=RecallCollator(torch.zeros(1, 8), tokenizer.pad_token_id))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert lengths[list(sampler)[0]] == 40  # the longest row leads the first batch, as the sampler promises


def _kl_setup(tiny_llama, tmp_path, sft_loss):
    from lib.recall.args import RecallTrainingArguments
    from lib.recall.data import RecallCollator, recall_row, sft_row
    from lib.recall.model import RecallConfig, build_recall_model
    from lib.recall.trainer import RecallTrainer

    base, tokenizer = copy.deepcopy(tiny_llama[0]), copy.deepcopy(tiny_llama[1])
    model = build_recall_model(base, tokenizer, RecallConfig(base_model=TINY, vector_dim=8,
                                                             hidden_size=base.config.hidden_size))
    chat = [{"role": "user", "content": "How was the weekend?"},
            {"role": "assistant", "content": "Quiet, I read a book about old boats."}]
    rows = [recall_row(tokenizer, 0, "The user's dog is called Rex.", "<recall>"),
            sft_row(tokenizer, chat), sft_row(tokenizer, chat[:1] + [{"role": "assistant", "content": "Busy."}])]
    args = RecallTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none",
                                   save_strategy="no")
    collator = RecallCollator(torch.randn(1, 8), tokenizer.pad_token_id)
    trainer = RecallTrainer(model=model, args=args, processing_class=tokenizer, data_collator=collator,
                            sft_loss=sft_loss)
    return model, trainer, collator(rows)


def test_kl_instruction_loss_is_the_divergence_from_the_model_with_its_lora_off(tiny_llama, tmp_path):
    """--sft_loss kl: an instruction row's answer tokens count KL(base || model) (the base being the same model
    with its LoRA off), recall and QA rows their cross-entropy; zero on instruction rows while the LoRA is zero."""
    import torch.nn.functional as F

    model, trainer, batch = _kl_setup(tiny_llama, tmp_path, "kl")
    sft_only = {k: v[1:] for k, v in batch.items()}
    assert float(trainer.compute_loss(model, sft_only)) < 1e-6  # LoRA B starts at zero: the model is the base
    _, ce_trainer, _ = _kl_setup(tiny_llama, tmp_path, "ce")
    assert float(ce_trainer.compute_loss(model, sft_only)) > 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    loss = trainer.compute_loss(model, batch)
    # The reference: full logits with and without the LoRA, each row's answer tokens by hand.
    with torch.no_grad():
        plain = model(batch["input_ids"], batch["attention_mask"], batch["memory_vectors"]).logits
        with model.model.disable_adapter():
            off = model(batch["input_ids"], batch["attention_mask"], batch["memory_vectors"]).logits
    total, count = 0.0, 0
    for row in range(3):
        for t in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target == -100:
                continue
            log_model = F.log_softmax(plain[row, t].float(), -1)
            if row == 0:
                total += float(-log_model[target])
            else:
                log_base = F.log_softmax(off[row, t].float(), -1)
                total += float((log_base.exp() * (log_base - log_model)).sum())
            count += 1
    assert abs(float(loss) - total / count) < 1e-4
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_recall_config_reads_the_target_modules_of_earlier_runs(tmp_path):
    import json

    from lib.models.adapters import peft_target_modules
    from lib.recall.model import CONFIG_FILE, RecallConfig

    RecallConfig(base_model=TINY, vector_dim=8, hidden_size=64, lora_target_modules="q_proj, v_proj").save(tmp_path)
    assert peft_target_modules(RecallConfig.load(tmp_path).lora_target_modules) == ["q_proj", "v_proj"]
    raw = json.load(open(tmp_path / CONFIG_FILE))
    raw["lora_target_modules"] = ["q_proj", "k_proj"]  # how runs before --lora_target_modules wrote it
    json.dump(raw, open(tmp_path / CONFIG_FILE, "w"))
    assert peft_target_modules(RecallConfig.load(tmp_path).lora_target_modules) == ["q_proj", "k_proj"]
    assert peft_target_modules(RecallConfig(base_model=TINY, vector_dim=8, hidden_size=64).lora_target_modules) == \
        "all-linear"
