"""models.layers.conv_nhwc: PyTorch's convolution and gradients, in the NHWC form XLA:CPU runs fast inside loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deme_jax.models.layers import NHWC, _nhwc_gradients, _xla_gradients, conv, conv_nhwc

GEOMETRIES = [  # (height, width, kernel, stride, padding)
    (16, 16, 3, 1, ((1, 1), (1, 1))),  # conv3x3
    (16, 16, 3, 2, ((0, 1), (0, 1))),  # diffusers' Downsample2D with padding 0
    (15, 13, 3, 2, ((1, 1), (1, 1))),  # odd sizes: the stride drops a row
    (9, 11, 5, 3, ((2, 1), (0, 2))),
    (12, 12, 4, 4, "VALID"),  # CLIP's patch embedding
    (7, 10, 3, 2, "SAME"),
]


def torch_reference(x, kernel, stride, pads, cotangent):
    """Output and both gradients of torch's conv2d in float64, NHWC/HWIO in and out."""
    (top, bottom), (left, right) = pads
    tx = torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2), requires_grad=True)
    tk = torch.tensor(np.asarray(kernel, np.float64).transpose(3, 2, 0, 1), requires_grad=True)
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(tx, (left, right, top, bottom)), tk, stride=stride)
    dx, dk = torch.autograd.grad(out, (tx, tk), torch.tensor(np.asarray(cotangent, np.float64).transpose(0, 3, 1, 2)))
    nhwc = lambda a: a.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    return nhwc(out), nhwc(dx), dk.numpy().transpose(2, 3, 1, 0)


@pytest.mark.reference
@pytest.mark.parametrize("height,width,size,stride,padding", GEOMETRIES)
def test_values_and_gradients_equal_pytorch(height, width, size, stride, padding):
    rng = np.random.default_rng(size * stride)
    x = rng.standard_normal((2, height, width, 5)).astype(np.float32)
    kernel = rng.standard_normal((size, size, 5, 7)).astype(np.float32)
    out, vjp = jax.vjp(lambda x, k: conv_nhwc(x, k, (stride, stride), padding), x, kernel)
    cotangent = rng.standard_normal(out.shape).astype(np.float32)
    pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (stride, stride), padding) if isinstance(
        padding, str) else padding
    expected = torch_reference(x, kernel, stride, pads, cotangent)
    # float32 against float64: sums of 45-250 products of unit normals.
    for got, want in zip((out, *vjp(cotangent)), expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # The other backends' branch (JAX's own gradients) computes the same map.
    args = ((stride, stride), tuple(map(tuple, pads)), None, x, kernel, cotangent)
    for ours, xla in zip(_nhwc_gradients(*args), _xla_gradients(*args)):
        np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5)


def test_gradients_inside_a_loop_stay_in_the_fast_form():
    """XLA:CPU leaves the gradient convolutions of ``lax.conv_general_dilated`` inside a ``lax.scan`` in other
    layouts (run as naive loops, 60x slower); ``conv_nhwc``'s are NHWC x HWIO -> NHWC there too."""
    x, kernel = jnp.ones((4, 8, 8, 16)), jnp.full((3, 3, 16, 16), 0.01)

    def forms(convolve):
        def loss(kernel, x):
            return jnp.tanh(convolve(jnp.tanh(convolve(x, kernel, (1, 1), ((1, 1), (1, 1)))), kernel, (2, 2),
                                     ((0, 1), (0, 1)))).sum()

        def body(carry, kernel):
            return carry, jax.grad(loss)(kernel, x)

        hlo = jax.jit(lambda k: jax.lax.scan(body, 0.0, k[None])[1]).lower(kernel).compile().as_text()
        return re.findall(r"convolution\(.*dim_labels=(\S+?),", hlo)

    plain = forms(lambda x, k, s, p: jax.lax.conv_general_dilated(x, k, s, p, dimension_numbers=NHWC))
    ours = forms(conv_nhwc)
    assert len(ours) == len(plain) == 5  # two forward, three gradient convolutions (x needs none)
    assert set(ours) == {"b01f_01io->b01f"}
    assert set(plain) != {"b01f_01io->b01f"}, "XLA:CPU now keeps these in NHWC form itself: conv_nhwc may go"


def test_layers_use_it_and_refuse_what_it_does_not_compute():
    module = conv(8, 3, "conv", jnp.float32)
    assert module.conv_general_dilated is conv_nhwc
    x = jnp.ones((1, 6, 6, 4))
    with pytest.raises(ValueError, match="undilated, ungrouped"):
        conv_nhwc(x, jnp.ones((3, 3, 4, 8)), (1, 1), "SAME", rhs_dilation=(2, 2))
    with pytest.raises(ValueError, match="undilated, ungrouped"):
        conv_nhwc(x, jnp.ones((3, 3, 2, 8)), (1, 1), "SAME", feature_group_count=2)
