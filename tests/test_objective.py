"""DeMe's loss and the re-weighting baselines against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deme_jax.deme.objective import deme_loss, uncertainty_reduction, uncertainty_weighted_loss
from deme_jax.diffusion import add_noise, epsilon_loss, make_schedule, prediction_target
from deme_jax.diffusion.weighting import epsilon_loss_per_target_loss, min_snr_weight, p2_weight, snr


def test_deme_loss_by_hand():
    noise = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    student = jnp.array([[0.0, 0.0], [0.0, 1.0]])
    teacher = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    # denoising: [(1 + 0) / 2, (0 + 1) / 2]; consistency: [(4 + 0) / 2, 0]
    np.testing.assert_allclose(deme_loss(student, teacher, noise, 1.0), [0.5 + 2.0, 0.5])
    np.testing.assert_allclose(deme_loss(student, teacher, noise, 0.5), [0.5 + 1.0, 0.5])


def test_consistency_term_pulls_only_the_student():
    noise, teacher = jnp.ones((1, 3)), jnp.zeros((1, 3))
    grad_student, grad_teacher = jax.grad(lambda s, t: deme_loss(s, t, noise).sum(), argnums=(0, 1))(
        jnp.full((1, 3), 0.5), teacher)
    np.testing.assert_allclose(grad_teacher, 0.0)
    # d/ds [mean((s - 1)^2) + mean(s^2)] = 2 (s - 1) / 3 + 2 s / 3 = 0 at s = 0.5
    np.testing.assert_allclose(grad_student, 0.0, atol=1e-7)


def test_weightings_by_hand():
    schedule = make_schedule()
    t = jnp.array([0, 500, 999])
    abar = np.asarray(schedule.alphas_cumprod)[[0, 500, 999]]
    expected_snr = abar / (1 - abar)
    np.testing.assert_allclose(snr(schedule, t), expected_snr, rtol=1e-6)
    np.testing.assert_allclose(min_snr_weight(schedule, t, 5.0), np.minimum(expected_snr, 5) / expected_snr,
                               rtol=1e-6)
    assert float(min_snr_weight(schedule, t, 5.0)[2]) == pytest.approx(1.0)  # low SNR: unweighted
    np.testing.assert_allclose(p2_weight(schedule, t, 1.0, 1.0), 1 / (1 + expected_snr), rtol=1e-6)
    np.testing.assert_allclose(p2_weight(schedule, t, 0.5, 2.0), (2 + expected_snr) ** -0.5, rtol=1e-6)


def test_v_prediction_weights_give_the_epsilon_objective():
    """On a v-prediction schedule the weights carry the factor that turns the v loss into the epsilon loss:
    Min-SNR is then diffusers' min(SNR, gamma) / (SNR + 1) (its training scripts' v-prediction branch)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    import torch

    schedule = make_schedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type="v_prediction")
    t = jnp.array([0, 10, 400, 999])
    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    reference_snr = compute_snr(reference, torch.tensor(np.asarray(t))).numpy()
    np.testing.assert_allclose(min_snr_weight(schedule, t, 5.0), np.minimum(reference_snr, 5) / (reference_snr + 1),
                               rtol=1e-5)
    # the identity behind it: at one x_t, the epsilon loss of a prediction is the v loss times the factor
    rng = np.random.default_rng(0)
    x0, noise, eps_pred = (jnp.asarray(rng.standard_normal((4, 3, 3, 2)), jnp.float32) for _ in range(3))
    x_t = add_noise(schedule, x0, noise, t)
    abar = schedule.alphas_cumprod[t][:, None, None, None]
    v_pred = (eps_pred - jnp.sqrt(1 - abar) * x_t) / jnp.sqrt(abar)  # the v that implies eps_pred at x_t
    np.testing.assert_allclose(epsilon_loss(v_pred, prediction_target(schedule, x0, noise, t))
                               * epsilon_loss_per_target_loss(schedule, t), epsilon_loss(eps_pred, noise), rtol=1e-4)
    np.testing.assert_allclose(p2_weight(schedule, t, 1.0, 1.0), abar.ravel() / (1 + snr(schedule, t)), rtol=1e-6)
    np.testing.assert_array_equal(epsilon_loss_per_target_loss(make_schedule(), t), 1.0)


def test_uncertainty_weighting_by_hand():
    losses = jnp.array([1.0, 2.0, 4.0])
    task = jnp.array([0, 1, 1])
    s = jnp.array([0.0, jnp.log(2.0)])
    # [1 * 1 + 0, 2 / 2 + ln 2, 4 / 2 + ln 2] averaged
    expected = (1.0 + (1.0 + np.log(2)) + (2.0 + np.log(2))) / 3
    assert float(uncertainty_weighted_loss(losses, task, s)) == pytest.approx(expected, rel=1e-6)
    # the optimum of exp(-s) L + s is s = log L
    grad = jax.grad(lambda s: uncertainty_weighted_loss(jnp.array([3.0]), jnp.array([0]), s))(jnp.log(jnp.array([3.0])))
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_uncertainty_reduction_assigns_equal_timestep_intervals():
    per_example = jnp.array([1.0, 2.0, 3.0, 4.0])
    t = jnp.array([0, 249, 250, 999])  # tasks 0, 0, 1, 3 of 4
    s = jnp.array([0.5, -1.0, 0.0, 2.0])
    expected = np.mean([np.exp(-0.5) * 1 + 0.5, np.exp(-0.5) * 2 + 0.5, np.exp(1.0) * 3 - 1.0, np.exp(-2.0) * 4 + 2])
    reduce = uncertainty_reduction(1000, 4)
    assert float(reduce(per_example, t, {"log_variances": s})) == pytest.approx(expected, rel=1e-6)
