"""models.layers.GroupNorm and its hand-written backward pass against PyTorch's group_norm in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deme_jax.models.layers import GroupNorm, group_normalize

pytestmark = pytest.mark.reference


def torch_reference(x, scale, bias, groups, eps, cotangent):
    """Output and gradients (x, scale, bias) of torch.nn.functional.group_norm in float64, channels moved first."""
    to_torch = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)
    tx, tscale, tbias = to_torch(np.moveaxis(np.asarray(x, np.float64), -1, 1)), to_torch(scale), to_torch(bias)
    out = torch.nn.functional.group_norm(tx, groups, tscale, tbias, eps)
    grads = torch.autograd.grad(out, (tx, tscale, tbias), torch.tensor(np.moveaxis(cotangent, -1, 1)))
    as_numpy = lambda a: a.detach().numpy()
    return (np.moveaxis(as_numpy(out), 1, -1), np.moveaxis(as_numpy(grads[0]), 1, -1), as_numpy(grads[1]),
            as_numpy(grads[2]))


def inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    return (rng.standard_normal(shape).astype(np.float32) * 3 + 2, rng.uniform(0.5, 1.5, channels).astype(np.float32),
            rng.standard_normal(channels).astype(np.float32), rng.standard_normal(shape))


@pytest.mark.parametrize("shape,groups", [((2, 5, 7, 12), 4), ((3, 4, 4, 32), 32), ((2, 9, 8), 2), ((2, 3, 3, 6), 1)])
def test_values_and_gradients_equal_pytorch(shape, groups):
    x, scale, bias, cotangent = inputs(shape)
    eps = 1e-6
    out, vjp = jax.vjp(lambda *a: group_normalize(*a, groups, eps), x, scale, bias)
    grads = vjp(jnp.asarray(cotangent, jnp.float32))
    expected = torch_reference(x, scale, bias, groups, eps, cotangent)
    # float32 against float64: a few ulps of values ~1, gradients summed over up to 280 elements.
    for got, want, tol in zip((out, *grads), expected, (2e-6, 2e-5, 1e-4, 1e-4)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)


def test_bf16_input_keeps_float32_statistics_and_bf16_gradient():
    x, scale, bias, cotangent = inputs((2, 4, 4, 8))
    x16 = jnp.asarray(x, jnp.bfloat16)
    out, vjp = jax.vjp(lambda x: group_normalize(x, scale, bias, 4, 1e-6), x16)
    (dx,) = vjp(jnp.asarray(cotangent, jnp.float32))
    assert out.dtype == jnp.float32 and dx.dtype == jnp.bfloat16
    # The bf16 input's values, normalised in float32: the only rounding is the input's.
    expected = torch_reference(np.asarray(x16, np.float32), scale, bias, 4, 1e-6, cotangent)
    np.testing.assert_allclose(np.asarray(out), expected[0], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(dx, np.float32), expected[1], rtol=1e-2, atol=1e-2)  # bf16: 8 bits


def test_module_under_vmap_and_checkpoint_equals_plain_calls():
    x, scale, bias, cotangent = inputs((3, 2, 4, 4, 8))
    module = GroupNorm(groups=4, eps=1e-5)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    assert jax.tree.map(jnp.shape, module.init(jax.random.key(0), x[0])) == jax.tree.map(jnp.shape, params)
    loss = lambda p, x: jnp.sum(module.apply(p, x) * cotangent[0])
    plain = [jax.grad(loss, (0, 1))(params, x[i]) for i in range(3)]
    mapped = jax.vmap(jax.grad(jax.checkpoint(loss), (0, 1)), in_axes=(None, 0))(params, x)
    for i in range(3):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-6), mapped, plain[i])


def test_channels_that_do_not_split_into_groups_are_refused():
    with pytest.raises(ValueError, match="12 channels do not split into 5 groups"):
        GroupNorm(groups=5, eps=1e-5).init(jax.random.key(0), jnp.zeros((1, 2, 2, 12)))
