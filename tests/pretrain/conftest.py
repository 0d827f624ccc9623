"""Stock-style checkpoints of the transformers families (tests/pretrain/stock.py), shared by the pretrain tests."""

from tests.pretrain.stock import stock_corpus, stock_dirs  # noqa: F401  (fixtures)
