"""Beyond the paper's grid: merge weights learned by gradient descent, and partitions from gradient conflict.

The learned weights on a tiny UNet against finite differences and a task vector known to help; `deme finetune`
with partition="conflict", `deme merge` with search="gradient" and `deme analyze` end to end.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from deme_jax.analysis import gradient_conflict
from deme_jax.data import heldout_images, training_batches
from deme_jax.deme import (
    conflict_partition,
    finetune,
    load_pretrained,
    load_replicas,
    merge_replicas,
    uniform_partition,
)
from deme_jax.deme.finetune import PARTITION_FILE, partition_of, validate_deme_config, with_conflict_partition
from deme_jax.deme.merging import learn_weights, make_merged_losses, validate_merge_config
from deme_jax.diffusion import add_noise, epsilon_loss, make_schedule
from deme_jax.interop import load_orbax_model, save_orbax_model
from deme_jax.merge import merge, weight_groups
from deme_jax.merge.search import gradient_search
from deme_jax.models import UNet2D, init_params
from deme_jax.train import ConfigError
from tests.metrics_util import read_scalars
from tests.test_finetune import tiny_config

MODEL = UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
               down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
               layers_per_block=1, norm_num_groups=4)
SCHEDULE = make_schedule()
PARTITION = np.array([0, 500, 1000])
DATA = default.get_config().data
DATA.update(dict(name="mnist", image_size=8, channels=1))


def perturbed(tree, seed, scale):
    """``tree`` plus Gaussian noise of ``scale`` times each leaf's spread (in numpy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) + np.float32(scale * np.std(x)) * rng.standard_normal(x.shape, np.float32), tree)


def stacked(*trees):
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)


# One loss for every test here, compiled once per weight shape: the held-out loss per interval of the merged
# model, its mean and the mean's gradient in the weights.
LOSSES = make_merged_losses(MODEL, SCHEDULE, PARTITION)
LOSS_AND_GRAD = jax.jit(jax.value_and_grad(lambda w, *args: (jnp.mean(losses := LOSSES(w, *args)), losses),
                                           has_aux=True))


def mean_loss(weights, *args):
    return float(LOSS_AND_GRAD(weights, *args)[0][0])


def loss_args(base, replicas, images, key):
    """``(base, replicas, images, rng, reference)`` for LOSSES, the reference being base's loss per interval
    (the merge with zero weights, which is base)."""
    rng = jax.random.key(key)  # (jitted as gradient_search jits it, so that its compilation serves both)
    return base, replicas, images, rng, jax.jit(LOSSES)(jnp.zeros(2), base, replicas, images, rng, jnp.ones(2))


def random_setup():
    """A random tiny UNet, two replicas near it, and 16 random images: the arguments of LOSSES."""
    base = init_params(MODEL, jax.random.key(0))
    replicas = stacked(perturbed(base, 1, 0.2), perturbed(base, 2, 0.2))
    images = jax.random.uniform(jax.random.key(3), (16, 8, 8, 1), minval=-1, maxval=1)
    return loss_args(base, replicas, images, 4)


@pytest.mark.parametrize("granularity", ["replica", "block"])
def test_gradient_in_the_merge_weights_matches_finite_differences(granularity):
    args = random_setup()
    shape = (2,) if granularity == "replica" else (2, len(weight_groups(args[0])))
    weights = jax.random.uniform(jax.random.key(5), shape, minval=-0.5, maxval=1.0)
    grad = np.asarray(LOSS_AND_GRAD(weights, *args)[1]).ravel()
    h = 1e-2  # central differences: error O(h^2) against float32 rounding of O(1e-7 / h)
    steps = h * np.eye(weights.size).reshape(-1, *shape)
    finite = np.array([(mean_loss(weights + e, *args) - mean_loss(weights - e, *args)) / (2 * h) for e in steps])
    np.testing.assert_allclose(grad, finite, rtol=2e-2, atol=2e-4)
    assert np.abs(grad).max() > 1e-2  # a gradient to compare, not zeros


def test_tied_block_weights_give_the_per_replica_loss_and_gradient():
    args = random_setup()
    w = jnp.array([0.3, 0.7])
    tied = jnp.repeat(w[:, None], len(weight_groups(args[0])), axis=1)
    (loss, _), grad = LOSS_AND_GRAD(w, *args)
    (tied_loss, _), tied_grad = LOSS_AND_GRAD(tied, *args)
    assert float(tied_loss) == pytest.approx(float(loss), rel=1e-6)
    # the gradient of a per-replica weight is the sum of its blocks' gradients
    np.testing.assert_allclose(tied_grad.sum(1), grad, rtol=1e-5, atol=1e-8)


def trained_model(steps=60):
    """The tiny UNet after ``steps`` Adam steps on 8x8 digits: a model near a minimum of the denoising loss."""
    images = jnp.asarray(np.concatenate(training_batches(DATA, 4, 64, 0)))
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, state, key):
        k_index, k_t, k_noise = jax.random.split(key, 3)
        x = images[jax.random.randint(k_index, (32,), 0, len(images))]
        t = jax.random.randint(k_t, (32,), 0, 1000)
        noise = jax.random.normal(k_noise, x.shape)
        loss = lambda p: epsilon_loss(MODEL.apply({"params": p}, add_noise(SCHEDULE, x, noise, t), t), noise).mean()
        updates, state = optimizer.update(jax.grad(loss)(params), state)
        return optax.apply_updates(params, updates), state

    params = init_params(MODEL, jax.random.key(0))
    state = optimizer.init(params)
    for k in range(steps):
        params, state = step(params, state, jax.random.key(k))
    return params


def test_learned_weights_recover_the_task_vector_that_helps():
    # The base is a trained model knocked off its minimum; replica 0 is the trained model (its task vector
    # undoes the knock, so weight 1 is best), replica 1 the base knocked further (weight 0 is best).
    good = trained_model()
    base = perturbed(good, 1, 0.3)
    replicas = stacked(good, perturbed(base, 2, 0.3))
    images = heldout_images(DATA, 32)
    fit, stop = loss_args(base, replicas, images[:16], 4), loss_args(base, replicas, images[16:], 5)
    weights, best_step, trace = gradient_search(LOSSES, [0.5, 0.5], fit, stop, max_steps=150, lr=0.05, patience=10)
    np.testing.assert_allclose(weights, [1.0, 0.0], atol=0.15)
    assert trace[best_step][1].mean() < 0.7 * trace[0][1].mean()  # and the held-back loss fell with them
    assert len(trace) - 1 - best_step == 10  # it stopped `patience` steps after the lowest held-back loss


# The search itself on a quadratic: loss per "interval" (w - a) ** 2 on the fit data, (w - b) ** 2 held back.
quadratic = lambda w, target: (w - target) ** 2


def test_the_penalty_pulls_the_weights_to_the_start():
    fit = stop = (jnp.array([1.0, 1.0]),)
    final = lambda trace: 1 - np.sqrt(trace[-1][0])  # the weights of the last step, from its loss (w - 1) ** 2
    free = gradient_search(quadratic, [0.0, 0.0], fit, stop, max_steps=300, lr=0.05, patience=300)[2]
    np.testing.assert_allclose(final(free), [1.0, 1.0], atol=2e-2)
    # penalty p: minimise mean((w - 1) ** 2) + p * mean(w ** 2), at w = 1 / (1 + p)
    pulled = gradient_search(quadratic, [0.0, 0.0], fit, stop, max_steps=300, lr=0.05, penalty=3.0, patience=300)[2]
    np.testing.assert_allclose(final(pulled), [0.25, 0.25], atol=2e-2)
    with pytest.raises(ValueError, match=r"penalty=-1.0 must be >= 0: .*use 0 for none"):
        gradient_search(quadratic, [0.0, 0.0], fit, stop, max_steps=20, lr=0.05, penalty=-1.0)


def test_early_stopping_keeps_the_weights_best_on_the_held_back_data():
    # fit pulls to 1, the held-back data prefers 0.3: the search passes 0.3 on its way and keeps it
    weights, best_step, trace = gradient_search(quadratic, [0.0], (jnp.array([1.0]),), (jnp.array([0.3]),),
                                                max_steps=500, lr=0.01, patience=5)
    assert abs(weights[0] - 0.3) < 0.02 and len(trace) == best_step + 6
    assert trace[best_step][1][0] == min(stop[0] for _, stop in trace)


@pytest.mark.parametrize("fields, message", [
    (dict(search="gradient", penalty=-0.5), r"config.merge.penalty=-0.5 is negative.*use 0 \(no pull\) or a positive"),
    (dict(search="gradient", granularity="layer"), r"config.merge.granularity='layer': use one of \['replica', "),
    (dict(search="gradient", penalty_target="mean"), r"config.merge.penalty_target='mean'"),
    (dict(search="gradient", metric="fid"), r"config.merge.metric='fid' has no gradient: .*metric='heldout_loss'"),
    (dict(search="gradient", stop_fraction=1.0), r"config.merge.stop_fraction=1.0 must lie in \(0, 1\)"),
    (dict(search="gradient", penalty_target="grid", weight_values=tuple(range(11))), r"would grid 11\*\*4"),
])
def test_bad_gradient_search_config_names_the_field(fields, message):
    config = tiny_config("/")
    config.merge.update(fields)
    with pytest.raises(ConfigError, match=message):
        validate_merge_config(config.merge, 4)


def test_bad_conflict_partition_config_names_the_field(tmp_path):
    config = tiny_config(tmp_path, num_replicas=4, partition="conflict", conflict_bins=3)
    with pytest.raises(ConfigError, match=r"config.deme.conflict_bins=3 with num_replicas=4: .* between N=4 and "
                                          r"T=1000 bins"):
        validate_deme_config(config)
    with pytest.raises(ConfigError, match=r"needs the pretrained model's gradient similarity: run `deme finetune`"):
        with_conflict_partition(tiny_config(tmp_path, partition="conflict"), tmp_path, MODEL, None, SCHEDULE, None)


def test_learn_weights_starts_from_the_grid_and_logs_its_trace(tmp_path):
    from clu import metric_writers

    config = tiny_config("/")
    config.merge.update(dict(search="gradient", granularity="block", penalty_target="grid", penalty=0.1,
                             max_steps=6, patience=3, lr=0.05))
    base, replicas, _, _, _ = random_setup()
    writer = metric_writers.create_default_writer(tmp_path)
    weights, candidates, details = learn_weights(config, MODEL, SCHEDULE, PARTITION, base, replicas,
                                                 heldout_images(DATA, 16), writer)
    writer.flush()
    groups = details["groups"]
    assert weights.shape == (2, len(groups)) and "mid_block" in groups
    assert len(candidates) == 4  # the grid it starts from: values (0, 1) for 2 replicas
    grid_best = min(candidates, key=lambda c: c[1])[0]
    assert details["start"] == [[w] * len(groups) for w in grid_best]
    assert details["fit_images"] == details["stop_images"] == 8 and 1 <= len(details["trace"]) <= 7
    stops = [np.mean(step["stop"]) for step in details["trace"]]
    assert stops[details["best_step"]] == min(stops)
    scalars = read_scalars(tmp_path)  # the trace in TensorBoard: each interval and the mean, every step
    assert set(scalars["merge/stop/500-1000"]) == set(range(len(stops)))
    assert scalars["merge/fit"][0] == pytest.approx(np.mean(details["trace"][0]["fit"]), rel=1e-5)
    assert scalars["merge/stop/0-500"][details["best_step"]] == pytest.approx(
        details["trace"][details["best_step"]]["stop"][0], rel=1e-5)


def test_conflict_partition_is_chosen_once_and_kept(tmp_path):
    config = tiny_config(tmp_path, partition="conflict", conflict_bins=5)
    config.analyze.update(dict(num_images=8, num_batches=1))
    params = init_params(MODEL, jax.random.key(0))
    chosen = with_conflict_partition(config.copy_and_resolve_references(), tmp_path, MODEL, params, SCHEDULE,
                                     gradient_conflict)
    record = json.loads((tmp_path / PARTITION_FILE).read_text())
    bins = uniform_partition(1000, 5)
    similarity = np.asarray(record["similarity"])
    assert record["bins"] == bins.tolist() and similarity.shape == (5, 5)
    np.testing.assert_allclose(np.diag(similarity), 1, atol=1e-6)
    assert record["boundaries"] == conflict_partition(similarity, bins, 2).tolist() == list(chosen.deme.boundaries)
    assert record["within_similarity"] >= record["within_similarity_equal_bins"] - 1e-12
    assert partition_of(chosen, SCHEDULE).tolist() == record["boundaries"]
    # a restart reads the choice back and measures nothing
    again = with_conflict_partition(config.copy_and_resolve_references(), tmp_path, MODEL, None, SCHEDULE, None)
    assert list(again.deme.boundaries) == record["boundaries"]
    config.deme.conflict_bins = 10
    with pytest.raises(ConfigError, match=r"holds 2 intervals of 5 bins, but config.deme has num_replicas=2 and "
                                          r"conflict_bins=10: finetune in a new workdir"):
        with_conflict_partition(config, tmp_path, MODEL, None, SCHEDULE, None)


# End to end through the commands: a conflict partition, learned weights for its replicas, the figures.


@pytest.fixture(scope="module")
def conflict_run(tmp_path_factory):
    pretrained = save_orbax_model(MODEL, init_params(MODEL, jax.random.key(0)),
                                  tmp_path_factory.mktemp("pretrained") / "model")
    config = tiny_config(pretrained, partition="conflict", conflict_bins=5)
    config.train.update(dict(num_steps=2, eval_every=0, sample_every=0))
    config.analyze.update(dict(num_images=8, num_batches=1, landscape_images=16, grid_size=3))
    workdir = tmp_path_factory.mktemp("conflict")
    finetune(config, workdir, gradient_conflict)
    return config, workdir


@pytest.mark.slow
def test_conflict_run_merged_with_learned_weights_and_analysed(conflict_run, tmp_path):
    from deme_jax.commands.analyze import run as analyze

    config, workdir = conflict_run
    boundaries = json.loads((workdir / PARTITION_FILE).read_text())["boundaries"]
    # the run's config carries the boundaries, so merging and analysis read this partition
    assert json.loads((workdir / "config.json").read_text())["deme"]["boundaries"] == boundaries
    assert load_replicas(workdir)[2].tolist() == boundaries

    config = config.copy_and_resolve_references()
    config.merge.update(dict(search="gradient", granularity="block", max_steps=4, patience=2))
    out = tmp_path / "merge_gradient"
    result = merge_replicas(config, workdir, out)
    assert result["partition"] == boundaries and np.shape(result["weights"]) == (2, len(result["groups"]))
    assert result["start"] == [[0.5] * len(result["groups"])] * 2  # uniform: 1 / N
    assert (out / "search.png").is_file() and "merge/stop" in read_scalars(out) and not (workdir / "merge").exists()
    _, merged = load_orbax_model(out / "orbax")
    _, replicas, _, _ = load_replicas(workdir)
    *_, base = load_pretrained(config)
    expected = merge(base, replicas, jnp.asarray(result["weights"]))
    for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

    summary = analyze(config, workdir)
    assert summary["conflict_partition"] == boundaries
    assert (workdir / "analysis" / "conflict_partition.png").is_file()
    # the partition's similarity is the one `deme analyze` measures over the same bins
    config.analyze.update(dict(model=str(config.deme.pretrained), num_intervals=5))
    analyze(config, tmp_path / "bins")
    np.testing.assert_allclose(np.load(tmp_path / "bins" / "analysis" / "gradient_conflict.npy"),
                               json.loads((workdir / PARTITION_FILE).read_text())["similarity"], atol=1e-6)
