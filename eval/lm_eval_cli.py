"""The `lm_eval` command line, with the OpenBA family registered: same arguments, same output.

    python -m eval.lm_eval_cli --model hf --model_args pretrained=runs/s1 --include_path runs/eval_tasks \\
        --tasks corpus_ppl,corpus_mc --batch_size 4 --output_path runs/s1-lm-eval

Plain `lm_eval --model hf --model_args pretrained=DIR` works for every family transformers ships (Llama, Qwen2,
Mistral, GPT-NeoX, T5), and for OpenBA outputs with `trust_remote_code=True,backend=seq2seq`: every OpenBA
checkpoint carries its model code and `auto_map` (core/openba/modeling_openba.py). This wrapper is the way without
remote code: it imports `core.openba` (which registers the "openba" model type) in the process that runs lm-eval
(lm-eval 0.4.x has no plugin hook, transformers 5 no entry-point registry for model types), plus two things the
in-process harness (eval/harness.py) does too, so that both give the same numbers:

- it names "openba" as an encoder-decoder in the table lm-eval reads to pick its backend (otherwise lm-eval falls
  back to the causal backend for a model type it does not know, unless `backend=seq2seq` is in --model_args);
- it caps an encoder-decoder's generation at `max_gen_toks` (see `eval.harness.answer_budget_generate`).
"""

from __future__ import annotations

import sys

EPILOG = """\
This wrapper accepts exactly the arguments of `lm_eval` (lm-evaluation-harness 0.4.x); its own help follows.
example: python -m eval.lm_eval_cli --model hf --model_args pretrained=runs/s1,dtype=float32 \\
             --include_path runs/eval_tasks --tasks corpus_ppl,probe_needle --limit 50 --output_path runs/s1-eval
"""


def register_openba() -> None:
    """Make this process's lm-eval load OpenBA checkpoints with `--model hf` exactly as the harness evaluates them."""
    import core.openba  # noqa: F401  (registers the OpenBA family with the transformers Auto classes)
    from lm_eval.models.huggingface import HFLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    from eval.harness import answer_budget_generate

    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.setdefault("openba", "OpenBAForConditionalGeneration")
    if not getattr(HFLM._model_generate, "answer_budget", False):
        HFLM._model_generate = answer_budget_generate(HFLM._model_generate)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m eval.lm_eval_cli [lm_eval arguments]\n\n" + EPILOG)
    register_openba()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
