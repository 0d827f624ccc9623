"""The answer-choice probe tasks' metrics, from lm-eval's log-likelihood of " candidate" after the prompt for each of
a row's candidates. Plain Python with no imports: eval.taskdata copies this file beside the task YAMLs, where lm-eval's
`!function` looks for it, so a task set evaluates with stock lm-eval alone."""


def process_results(doc, results):
    """`gold_loglik`: the answer's log-likelihood in nats per character of " answer" (the space included: 7 characters
    for a secret number, 9 for a kv value), so it compares across tokenizers as bits per byte does. `gold_rank`: 1 +
    the number of candidates with a higher total log-likelihood than the answer (1 = best, len(candidates) = worst;
    the candidates are distinct, so a tie is a real tie and counts for the answer)."""
    lls = [ll for ll, _ in results]
    gold = lls[doc["candidates"].index(doc["answer"])]
    return {"gold_loglik": gold / len(" " + doc["answer"]), "gold_rank": 1 + sum(ll > gold for ll in lls)}
