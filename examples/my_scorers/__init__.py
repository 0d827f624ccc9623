"""Example user scorers for `compress.neuron` / `compress.score` (see README, "Write your own scorer")."""
