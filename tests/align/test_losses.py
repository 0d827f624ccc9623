"""Preference losses: each equals a hand computation on a toy batch, and LOGO's gradient raises the preferred
response's log-likelihood (on toy numbers and through a tiny model's optimizer step)."""

import math

import pytest
import torch

from align.losses import LossConfig, ResponseLogps, logo_preset, preference_loss
from align.packing import response_logps
from core.errors import UserError
from tests.align.conftest import preference_batch
from tests.factory import tiny_model

# two rows, preferred + two dis-preferred responses: summed log-probs and token counts
SUMS = [[-4.0, -9.0, -12.0], [-6.0, -5.0, -16.0]]
COUNTS = [[4, 3, 6], [3, 5, 4]]


def toy(sums=SUMS, counts=COUNTS) -> ResponseLogps:
    return ResponseLogps(torch.tensor(sums, requires_grad=True), torch.tensor(counts))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_logo_loss_equals_hand_computation_with_paper_defaults():
    config = LossConfig()  # beta 10, gamma 3, lambda 0.1, M 2
    loss, metrics = preference_loss(config, toy())
    terms = []
    for sums, counts in zip(SUMS, COUNTS):
        chosen = sums[0] / counts[0]
        rejected = (sums[1] / counts[1] + sums[2] / counts[2]) / 2
        terms.append(-log_sigmoid(10 * chosen - 10 * rejected - 3))
    nll = -(SUMS[0][0] + SUMS[1][0]) / (COUNTS[0][0] + COUNTS[1][0])
    expected = sum(terms) / 2 + 0.1 * nll
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["nll_chosen"] == pytest.approx(nll)


def test_logo_with_one_rejected_is_simpo_plus_sft():
    logo = LossConfig(num_rejected=1, sft_weight=0.0, beta=2.5, gamma=0.25)
    simpo = LossConfig(loss="simpo", num_rejected=1, beta=2.5, gamma=0.25)
    assert preference_loss(logo, toy())[0].item() == pytest.approx(preference_loss(simpo, toy())[0].item())


def test_simpo_averages_pairwise_losses_over_rejected():
    loss, _ = preference_loss(LossConfig(loss="simpo", beta=2.0, gamma=0.5), toy())
    expected = 0.0
    for sums, counts in zip(SUMS, COUNTS):
        chosen = sums[0] / counts[0]
        for j in (1, 2):
            expected += -log_sigmoid(2.0 * (chosen - sums[j] / counts[j]) - 0.5) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_uses_summed_log_ratios_against_the_reference():
    reference = ResponseLogps(torch.tensor([[-5.0, -8.0, -10.0], [-6.5, -6.0, -15.0]]), torch.tensor(COUNTS))
    loss, _ = preference_loss(LossConfig(loss="dpo", dpo_beta=0.1), toy(), reference)
    expected = 0.0
    for sums, refs in zip(SUMS, reference.sum_logp.tolist()):
        for j in (1, 2):
            margin = (sums[0] - refs[0]) - (sums[j] - refs[j])
            expected += -log_sigmoid(0.1 * margin) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(LossConfig(loss="dpo"), toy())


def test_orpo_adds_the_odds_ratio_term_to_the_preferred_nll():
    loss, _ = preference_loss(LossConfig(loss="orpo", orpo_weight=0.1), toy())

    def log_odds(p: float) -> float:
        return p - math.log(1 - math.exp(p))

    ratio = 0.0
    for sums, counts in zip(SUMS, COUNTS):
        chosen = sums[0] / counts[0]
        for j in (1, 2):
            ratio += -log_sigmoid(log_odds(chosen) - log_odds(sums[j] / counts[j])) / 4
    nll = -(SUMS[0][0] + SUMS[1][0]) / (COUNTS[0][0] + COUNTS[1][0])
    assert loss.item() == pytest.approx(nll + 0.1 * ratio, rel=1e-6)


@pytest.mark.parametrize("name", ["logo", "simpo", "orpo"])
def test_gradient_raises_preferred_and_lowers_rejected_log_likelihood(name):
    policy = toy()
    loss, _ = preference_loss(LossConfig(loss=name), policy)
    loss.backward()
    grad = policy.sum_logp.grad
    assert (grad[:, 0] < 0).all()  # descending the loss raises log p(y_w)
    assert (grad[:, 1:] > 0).all()  # and lowers log p(y_l)


def test_a_logo_step_on_a_tiny_model_raises_the_preferred_log_likelihood():
    model = tiny_model("llama").train()
    batch = preference_batch(rows=2, responses=3)
    config = logo_preset("mistral-7b")  # beta 2.5: a random model's margins sit in the sigmoid's slope
    before = response_logps(model, batch).mean_logp.detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss, _ = preference_loss(config, response_logps(model, batch))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = response_logps(model, batch).mean_logp
    assert (after[:, 0] > before[:, 0]).all()
    assert (after[:, 0] - after[:, 1:].mean(1) > before[:, 0] - before[:, 1:].mean(1)).all()


def test_presets_have_the_papers_numbers_and_bad_settings_are_user_errors():
    assert logo_preset("llama3-8b").gamma == pytest.approx(10 * 0.3)
    assert logo_preset("mistral-7b").beta == 2.5
    assert logo_preset("llama2-7b").gamma == pytest.approx(3 * 0.2)
    with pytest.raises(UserError, match="preset"):
        logo_preset("gpt-5")
    with pytest.raises(UserError, match="num_rejected"):
        LossConfig(num_rejected=0)
    with pytest.raises(UserError, match="dis-preferred"):
        preference_loss(LossConfig(num_rejected=3), toy())
