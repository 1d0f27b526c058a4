import math

import pytest
import torch

from dfkt import losses


def test_kd_loss_is_tau_squared_batchmean_kl():
    torch.manual_seed(0)
    s, t, tau = torch.randn(3, 5), torch.randn(3, 5), 3.0
    p_t, log_p_s = torch.softmax(t / tau, 1), torch.log_softmax(s / tau, 1)
    per_sample = (p_t * (p_t.log() - log_p_s)).sum(1)
    assert losses.kd_loss(s, t, tau).item() == pytest.approx(tau**2 * per_sample.mean().item(), rel=1e-5)


def test_kd_loss_zero_for_identical_and_positive_otherwise():
    t = torch.tensor([[2.0, 0.0, -1.0]])
    assert losses.kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([[0.0, 2.0, -1.0]])
    # By hand: τ² Σ p_t (log p_t - log p_s) with τ = 1.
    p_t, p_s = torch.softmax(t, 1), torch.softmax(s, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum().item()
    assert losses.kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-5)
    assert losses.kd_loss(s, t, 2.0).item() > 0


def test_one_hot_loss_is_cross_entropy_to_own_argmax():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # Row 1: p = (3/4, 1/4) -> -log 3/4; row 2: tie, argmax 0 -> -log 1/2.
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert losses.one_hot_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_class_balance_loss_is_minus_entropy_of_mean_prediction():
    uniform = torch.eye(4) * 50  # four confident samples, one per class -> p̄ uniform
    assert losses.class_balance_loss(uniform).item() == pytest.approx(-math.log(4), rel=1e-4)
    one_class = torch.tensor([[50.0, 0, 0, 0]] * 4)
    assert losses.class_balance_loss(one_class).item() == pytest.approx(0.0, abs=1e-4)
    assert losses.class_balance_loss(uniform, log_base=10).item() == pytest.approx(-math.log10(4), rel=1e-4)


def test_pairwise_diversity_loss_by_hand():
    images = torch.tensor([[0.0, 0.0], [3.0, 4.0]]).reshape(2, 1, 1, 2)  # ‖x₂ − x₁‖ = 5
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])  # p: (1,0) vs (0,1) -> ‖Δp‖ = √2
    expected = 1.0 / (5.0 / math.sqrt(2.0))
    assert losses.pairwise_diversity_loss(images, logits).item() == pytest.approx(expected, rel=1e-5)


def test_pairwise_diversity_pairs_halves_over_the_whole_batch():
    # Four samples: pairs are (0, 2) and (1, 3); norms are taken over both pairs together.
    images = torch.tensor([[0.0], [0.0], [3.0], [0.0]]).reshape(4, 1, 1, 1)
    logits = torch.tensor([[100.0, 0], [100.0, 0], [100.0, 0], [0, 100.0]])
    image_gap, prob_gap = 3.0, math.sqrt(2.0)  # only pair 0 differs in x, only pair 1 in p
    assert losses.pairwise_diversity_loss(images, logits).item() == pytest.approx(prob_gap / image_gap, rel=1e-5)


def test_exp_penalty_value_gradient_and_clamp():
    loss = torch.tensor(1.5, requires_grad=True)
    value, clamped = losses.exp_penalty(loss, torch.tensor(1.0), max_exponent=30.0)
    value.backward()
    assert value.item() == pytest.approx(math.exp(0.5)) and not clamped
    assert loss.grad.item() == pytest.approx(math.exp(0.5))  # d/dL exp(L - r) = exp(L - r)
    big, clamped = losses.exp_penalty(torch.tensor(1000.0), 0.0, max_exponent=30.0)
    assert clamped and math.isfinite(big.item()) and big.item() == pytest.approx(math.exp(30.0))


def test_activation_loss_is_minus_mean_absolute_feature():
    assert losses.activation_loss(torch.tensor([[1.0, -3.0], [2.0, 0.0]])).item() == pytest.approx(-1.5)


def test_mode_seeking_loss_by_hand():
    images = torch.tensor([[0.0, 0.0], [1.0, 3.0]])  # halves differ by mean |dx| = 2
    z = torch.tensor([[0.0], [4.0]])  # mean |dz| = 4
    assert losses.mode_seeking_loss(images, z, eps=0.0).item() == pytest.approx(2.0)


def test_logit_l1_is_the_mean_absolute_gap():
    s, t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 5.0]])
    assert losses.logit_l1(s, t).item() == pytest.approx(2.0)


def test_attention_transfer_zero_for_equal_maps_positive_otherwise():
    f = torch.randn(2, 3, 4, 4)
    assert losses.attention_transfer_loss([f], [f * 2]).item() == pytest.approx(0.0, abs=1e-7)  # scale-free
    g = torch.zeros(1, 1, 2, 2)
    g[0, 0, 0, 0] = 1.0
    h = torch.zeros(1, 1, 2, 2)
    h[0, 0, 1, 1] = 1.0
    # maps (1,0,0,0) and (0,0,0,1): mean squared difference 2/4
    assert losses.attention_transfer_loss([g], [h]).item() == pytest.approx(0.5)


def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    # horizontal diffs (-1, -1): norm √2; vertical 0; diagonals (1 at [1,0]-[0,1] -> 0-1 = -1) and (0-1 = -1)
    assert losses.total_variation(x).item() == pytest.approx(math.sqrt(2) + 0 + 1 + 1)


def test_js_divergence_bounds_and_competition():
    a = torch.tensor([[50.0, -50.0]])
    b = torch.tensor([[-50.0, 50.0]])
    assert losses.js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.js_divergence(a, b).item() == pytest.approx(math.log(2), rel=1e-4)
    assert losses.competition_loss(a, b, temperature=1.0).item() == pytest.approx(1 - math.log(2), rel=1e-4)


def test_adversarial_kl_counts_only_samples_where_student_agrees():
    teacher = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # agrees on sample 0 only
    t, s = torch.log_softmax(teacher, 1), torch.log_softmax(student[:1], 1)
    kl0 = (t[0].exp() * (t[0] - s[0])).sum()
    assert losses.adversarial_kl_loss(student, teacher).item() == pytest.approx(-kl0.item() / 2)


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0]])
    assert losses.soft_cross_entropy(logits, torch.tensor([[0.3, 0.7]])).item() == pytest.approx(math.log(2))


def test_info_nce_prefers_the_matching_positive():
    anchors = torch.eye(2)
    assert losses.info_nce(anchors, torch.eye(2), torch.zeros(0, 2), 1.0).item() == pytest.approx(
        -math.log(math.e / (math.e + 1))
    )
    swapped = losses.info_nce(anchors, torch.eye(2).flip(0), torch.zeros(0, 2), 1.0)
    assert swapped.item() > math.log(2)
    with_bank = losses.info_nce(anchors, torch.eye(2), torch.eye(2), 1.0)  # identical negatives make it harder
    assert with_bank.item() > losses.info_nce(anchors, torch.eye(2), torch.zeros(0, 2), 1.0).item()


def test_entropy_and_information_maximization_by_hand():
    uniform = torch.zeros(2, 4)
    assert losses.entropy(uniform).item() == pytest.approx(math.log(4))
    confident_and_balanced = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert losses.information_maximization_loss(confident_and_balanced).item() == pytest.approx(-math.log(2), abs=1e-6)
    collapsed = torch.tensor([[50.0, 0.0], [50.0, 0.0]])
    assert losses.information_maximization_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    # uncertain but balanced: mean entropy ln 4 minus the entropy of the mean, ln 4
    assert losses.information_maximization_loss(torch.zeros(2, 4)).item() == pytest.approx(0.0, abs=1e-6)
    one_uncertain = torch.tensor([[0.0, 0.0], [50.0, 0.0]])  # H̄ = ln2/2; p̄ = (3/4, 1/4)
    h_mean = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert losses.information_maximization_loss(one_uncertain).item() == pytest.approx(
        math.log(2) / 2 - h_mean, abs=1e-5
    )


def test_neighbour_affinity_and_dispersion_by_hand():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    neighbours = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.0, 1.0]]])  # N=2, K=2, C=2
    # sample 0: 1 + 0.5; sample 1: 1 + 1 -> mean 1.75
    assert losses.neighbour_affinity_loss(probs, neighbours).item() == pytest.approx(-1.75)
    weights = torch.tensor([[1.0, 0.1], [1.0, 0.1]])
    assert losses.neighbour_affinity_loss(probs, neighbours, weights).item() == pytest.approx(-(1.05 + 1.1) / 2)
    assert losses.dispersion_loss(probs).item() == pytest.approx(0.0)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert losses.dispersion_loss(same).item() == pytest.approx(1.0)  # (1 + 1) / 2
