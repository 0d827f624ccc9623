"""Long-context probe time of an encoder-decoder: lm-eval's stock HFLM against the harness' capped generation.

lm-eval 0.4.x lets an encoder-decoder's decoder run `prompt tokens + max_gen_toks` steps (eval/harness.py,
`answer_budget_generate`); the harness caps it at `max_gen_toks`. A random tiny OpenBA never emits the stop string,
which is the worst case (a pruned model that rambles). Both wrappers evaluate the same probe rows in one run; the
table gives the time of each and whether the exact-match scores agree.

    python benchmarks/eval_seq2seq_budget.py [--lengths 500 1000 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.table import format_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000], help="probe lengths (chars)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForSeq2SeqLM

    from core.openba import openba_config
    from eval.harness import EvalResult, make_lm, quiet, task_manager
    from eval.taskdata import TaskDataConfig, ensure_task_set
    from pretrain.corpus import CorpusConfig, load_or_build_corpus
    from pretrain.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="eval-budget-"))
    corpus_config = CorpusConfig(max_documents=80, validation_size=0.2)
    corpus = load_or_build_corpus(corpus_config, work)
    tokenizer = load_tokenizer(train_tokenizer(corpus, TokenizerConfig(vocab_size=1024, max_training_chars=100_000),
                                               work / "tokenizer"))
    task_data = TaskDataConfig(corpus=corpus_config, probe_kinds=("needle",), probe_lengths=tuple(args.lengths),
                               probe_depths=(0.0, 0.5, 1.0), probe_samples=1, mc_questions=4, ppl_documents=4)
    task_set = ensure_task_set(task_data, work)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(openba_config("openba-tiny", vocab_size=len(tokenizer))).eval()
    tasks = ["probe_needle"]
    manager = task_manager(tasks, task_set)

    def run(lm) -> tuple[float, EvalResult]:
        started = time.perf_counter()
        raw = simple_evaluate(model=lm, tasks=tasks, task_manager=manager)
        return time.perf_counter() - started, EvalResult.from_lm_eval(raw)

    with quiet("lm_eval.models.huggingface"):
        stock = HFLM(pretrained=model, tokenizer=tokenizer, backend="seq2seq", batch_size=4)
    stock_seconds, stock_result = run(stock)
    capped_seconds, capped_result = run(make_lm(model, tokenizer))
    rows = [(f"probe_needle_{n}", stock_result.metrics[f"probe_needle_{n}"]["exact_match"],
             capped_result.metrics[f"probe_needle_{n}"]["exact_match"]) for n in args.lengths]
    print(format_table(rows, ["task", "exact match (stock)", "exact match (capped)"]))
    print(format_table([("stock HFLM", stock_seconds, 1.0), ("harness (capped)", capped_seconds,
                                                             capped_seconds / stock_seconds)],
                       ["wrapper", "seconds", "time ratio"]))


if __name__ == "__main__":
    main()
