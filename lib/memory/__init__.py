"""Explicit memory on a frozen LLM: the bank, the product-key MemoryGate, the gated MemoryFusion, MemoryNorm, and the
fictional-facts generator they are measured on."""
