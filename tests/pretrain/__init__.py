"""Tests for pretrain/: corpus, tokenizer."""
