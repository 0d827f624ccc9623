"""Continual pretraining: offline data, tokenizer, objectives (UL2 R/S/X, causal, prefix), trainer, long context."""
