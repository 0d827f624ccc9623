"""LOGO long-context alignment (arXiv 2410.18533): preference data, position synthesis, the reference-free loss.

Files, one idea each:
    losses.py     LOGO's loss and the SimPO / DPO / ORPO baselines, on per-response log-likelihoods
    positions.py  position synthesis: a short real context carrying position ids of a long window
    packing.py    per-response log-likelihoods with the context shared by all responses
    batches.py    preference rows -> token batches (with synthesised positions), resumable iteration
    objective.py  the loss as the shared Trainer's loss_fn (DPO reference: a frozen copy or LoRA switched off)
    scoring.py    chunk importance scorers (pluggable registry)
    data.py       preference-data construction from long documents (offline facts by default)
    build_data.py CLI: python -m align.build_data
    logo.py       the training stage and CLI: python -m align.logo
    text_rows.py  plain-text continuation rows (the text regulariser's data)
"""
