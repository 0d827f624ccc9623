"""Generation on a T5 whose decoder is deeper than its encoder: transformers 5.x sizes the stock decoder cache by the
encoder's depth; the project's generate calls hand it caches that fit (core/generation.py)."""

import torch

from core.generation import generate_kwargs, needs_own_cache
from tests.factory import tiny_config, tiny_model


def test_only_a_decoder_deeper_than_the_cache_needs_its_own():
    assert needs_own_cache(tiny_config("t5", num_layers=3, num_decoder_layers=4))
    assert not needs_own_cache(tiny_config("t5", num_layers=4, num_decoder_layers=4))
    assert not needs_own_cache(tiny_config("t5", num_layers=4, num_decoder_layers=2))
    assert not needs_own_cache(tiny_config("llama"))
    assert generate_kwargs(tiny_model("llama")) == {}


def test_generate_with_the_projects_cache_equals_generation_without_a_cache():
    model = tiny_model("t5", num_layers=2, num_decoder_layers=4)
    prompt = torch.tensor([[5, 9, 14, 22, 1]])
    reference = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, **generate_kwargs(model))
    assert torch.equal(cached, reference) and cached.shape[1] > 2


def test_the_harness_generates_on_such_a_t5():
    """lm-eval's generation path as the gates run it (eval.harness's HFLM subclass), on the asymmetric T5."""
    from eval.harness import harness_lm_class
    from tests.factory import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = tiny_model("t5", vocab_size=len(tokenizer), num_layers=2, num_decoder_layers=4)
    lm = harness_lm_class()(pretrained=model, tokenizer=tokenizer, backend="seq2seq", batch_size=1)
    context = torch.tensor([tokenizer("Question: what? Answer:")["input_ids"]])
    output = lm._model_generate(context, max_length=context.shape[1] + 5, stop=["\n"], do_sample=False)
    reference = model.generate(context, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(output[0, : reference.shape[1]], reference[0])
