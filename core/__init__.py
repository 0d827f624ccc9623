"""Shared plumbing below the stages: config loading, the stage contract, checkpoint I/O and the OpenBA family."""
