"""Staged recipes: a recipe is a list of named stages (prune, recover, align) with gates between them."""
