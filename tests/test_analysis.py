"""Gradient conflict and loss landscape: hand computations, and `deme analyze` end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from deme_jax.analysis import cosine_matrix, filter_normalized_direction, interval_gradients, landscape
from deme_jax.commands.analyze import run as analyze
from deme_jax.diffusion import add_noise, epsilon_loss, make_schedule
from deme_jax.interop import save_orbax_model
from deme_jax.models import UNet2D, init_params

MODEL = UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
               layers_per_block=1, norm_num_groups=4)


def test_cosine_matrix_by_hand():
    m = cosine_matrix(np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(m, [[1, 0, s], [0, 1, s], [s, s, 1]], atol=1e-12)


@pytest.mark.slow  # 24 s
def test_interval_gradient_is_the_gradient_of_that_interval_loss():
    params = init_params(MODEL, jax.random.key(0))
    schedule = make_schedule()
    images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1), minval=-1, maxval=1)
    rng = jax.random.key(2)
    grads = interval_gradients(MODEL, params, schedule, images, [0, 300, 1000], rng)
    # by hand for interval 1: the same uniform draws scaled into [300, 1000), the same noise
    rng_t, rng_noise = jax.random.split(rng)
    noise = jax.random.normal(rng_noise, images.shape)
    t = (300 + jax.random.uniform(rng_t, (4,)) * 700).astype(jnp.int32)
    loss = lambda p: epsilon_loss(MODEL.apply({"params": p}, add_noise(schedule, images, noise, t), t), noise).mean()
    expected = jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(jax.grad(loss)(params))])
    np.testing.assert_allclose(grads[1], expected, rtol=1e-5, atol=1e-7)
    assert grads.shape == (2, expected.size)


def test_filter_normalized_direction_matches_each_filter_norm():
    params = init_params(MODEL, jax.random.key(0))
    direction = filter_normalized_direction(params, jax.random.key(3))
    kernel, d = params["conv_in"]["kernel"], direction["conv_in"]["kernel"]
    norm = lambda x: np.sqrt((np.asarray(x) ** 2).sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(norm(d), norm(kernel), rtol=1e-5)
    assert not np.any(direction["conv_in"]["bias"])  # biases get no direction
    assert np.any(d != kernel)


def test_landscape_centre_is_the_held_out_loss_and_a_zero_direction_is_flat():
    params = init_params(MODEL, jax.random.key(0))
    schedule = make_schedule()
    images = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1), minval=-1, maxval=1)
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    d1 = filter_normalized_direction(params, jax.random.key(4))
    grid = landscape(MODEL, params, schedule, images, d1, zero, [0, 500, 1000], np.linspace(-1, 1, 3),
                     jax.random.key(5))
    assert grid.shape == (3, 3, 3)
    t = ((jnp.arange(8) + 0.5) * 1000 / 8).astype(jnp.int32)
    noise = jax.random.normal(jax.random.key(5), images.shape)
    per_example = epsilon_loss(MODEL.apply({"params": params}, add_noise(schedule, images, noise, t), t), noise)
    assert grid[0, 1, 1] == pytest.approx(float(per_example.mean()), rel=1e-5)
    assert grid[1, 1, 1] == pytest.approx(float(per_example[:4].mean()), rel=1e-5)  # t < 500: the first half
    np.testing.assert_allclose(grid[:, 0, :], grid[:, 2, :], rtol=1e-6)  # the second direction is zero
    assert not np.allclose(grid[0, 1, 0], grid[0, 1, 1])


def test_analyze_a_model_writes_heatmap_and_landscape(tmp_path):
    path = save_orbax_model(MODEL, init_params(MODEL, jax.random.key(0)), tmp_path / "model")
    config = default.get_config()
    config.data.update(dict(name="mnist", image_size=8, channels=1))
    config.analyze.update(dict(model=str(path), num_images=8, num_batches=2, landscape_images=16, grid_size=3))
    summary = analyze(config, tmp_path / "run")
    out = tmp_path / "run" / "analysis"
    conflict = np.load(out / "gradient_conflict.npy")
    assert conflict.shape == (4, 4)
    np.testing.assert_allclose(np.diag(conflict), 1, atol=1e-9)
    np.testing.assert_allclose(conflict, conflict.T, atol=1e-12)
    assert np.all(np.abs(conflict) <= 1 + 1e-9)
    assert np.load(out / "landscape.npz")["loss"].shape == (5, 3, 3)
    assert (out / "gradient_conflict.png").is_file() and (out / "landscape.png").is_file()
    assert summary["directions"] == "random" and json.loads((out / "summary.json").read_text()) == summary
    config.analyze.directions = "sideways"
    with pytest.raises(ValueError, match="config.analyze.directions='sideways'"):
        analyze(config, tmp_path / "run")
