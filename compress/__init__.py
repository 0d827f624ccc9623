"""Structured pruning: adapters per model family, importance scoring through hooks, and the pruners."""
