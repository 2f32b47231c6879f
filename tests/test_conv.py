"""models.layers.conv_nhwc: PyTorch's convolution and gradients, in the NHWC form XLA:CPU runs fast inside loops,
and Winograd's F(2x2, 3x3) where it pays on CPUs (models.winograd)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deme_jax.models import winograd
from deme_jax.models.layers import NHWC, _nhwc_gradients, _xla_gradients, conv, conv_nhwc
from deme_jax.models.winograd import winograd_conv3x3, winograd_pays

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


def convolution_hlo(fn, *args) -> list[str]:
    return re.findall(r"convolution\(", jax.jit(fn).lower(*args).compile().as_text())


@pytest.mark.reference
@pytest.mark.parametrize("batch,height,width,pads,chunk_bytes", [
    (3, 16, 16, ((1, 1), (1, 1)), None),  # one chunk
    (6, 16, 16, ((1, 1), (1, 1)), 16 * 64 * 24 * 4 * 2),  # three chunks of two images
    (4, 15, 9, ((1, 1), (1, 1)), 1),  # odd sizes (half tiles cropped), one image per chunk
    (2, 12, 10, ((2, 0), (0, 1)), None),  # asymmetric padding
    (2, 10, 12, ((0, 0), (2, 2)), None),  # a VALID convolution's input-gradient padding
])
def test_winograd_is_as_close_to_float64_as_the_direct_convolution(batch, height, width, pads, chunk_bytes,
                                                                    monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(height * width)
    x = rng.standard_normal((batch, height, width, 24)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 24, 20)).astype(np.float32)
    out_shape = (batch, height + sum(pads[0]) - 2, width + sum(pads[1]) - 2, 20)
    want = torch_reference(x, kernel, 1, pads, np.zeros(out_shape, np.float32))[0]
    got = np.asarray(winograd_conv3x3(x, kernel, pads))
    direct = np.asarray(jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=NHWC))
    assert got.shape == want.shape == out_shape
    # The transforms' coefficients are 0, +-1 and +-1/2: the rounding error is of the direct convolution's order
    # (sums of 216 products of unit normals, ~1e-6 of the output's scale), far below a wrong tile or offset (~1).
    assert np.abs(got - want).max() <= max(4 * np.abs(direct - want).max(), 1e-6 * np.abs(want).max())


@pytest.mark.reference
def test_conv_nhwc_runs_winograd_where_it_pays_with_pytorchs_values_and_gradients():
    """On CPUs: the forward and the input gradient of a 3x3 stride-1 convolution with enough channels and tiles
    run as Winograd (no convolution left in the compiled forward; only the kernel gradient's in the backward)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32, 32, 64)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32)
    pads = ((1, 1), (1, 1))
    assert winograd_pays(x.shape, kernel.shape, (1, 1), pads, x.dtype)
    assert winograd_pays((2, 64, 64, 320), (3, 3, 320, 320), (1, 1), pads, np.float32)  # SD 1.5's UNet, CFG batch
    for size, channels in ((256, 256), (512, 128)):  # SD 1.5's VAE decoder: memory-bound as Winograd
        assert not winograd_pays((1, size, size, channels), (3, 3, channels, channels), (1, 1), pads, np.float32)
    assert not winograd_pays(x.shape, kernel.shape, (1, 1), pads, jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, k: conv_nhwc(x, k, (1, 1), pads), x, kernel)
    cotangent = rng.standard_normal(out.shape).astype(np.float32)
    for got, want in zip((out, *vjp(cotangent)), torch_reference(x, kernel, 1, pads, cotangent)):
        # float32 sums of 576 (output, input gradient) to 4096 (kernel gradient) products against float64.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if jax.default_backend() == "cpu":
        assert convolution_hlo(lambda x, k: conv_nhwc(x, k, (1, 1), pads), x, kernel) == []
        gradients = jax.grad(lambda x, k: (conv_nhwc(x, k, (1, 1), pads) ** 2).sum(), (0, 1))
        assert len(convolution_hlo(gradients, x, kernel)) == 1
        # Too few channels: the direct convolution.
        assert not winograd_pays(x.shape, (3, 3, 64, 32), (1, 1), pads, x.dtype)
        assert len(convolution_hlo(lambda x, k: conv_nhwc(x, k, (1, 1), pads), x, kernel[..., :32])) == 1


SHARDED_WINOGRAD = """
import json
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from deme_jax.models import winograd

winograd.CHUNK_BYTES = 1  # as few images per chunk as keep the batch sharded: two chunks of four
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 16, 16, 8)).astype(np.float32)
kernel = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
pads = ((1, 1), (1, 1))
convolve = jax.jit(lambda x, k: winograd.winograd_conv3x3(x, k, pads))
batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
sharded = convolve(jax.device_put(x, batch), kernel)
direct = jax.lax.conv_general_dilated(x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
print(json.dumps({"devices": len(sharded.sharding.device_set), "spec": str(sharded.sharding.spec),
                  "vs_one_device": float(np.abs(np.asarray(sharded) - np.asarray(convolve(x, kernel))).max()),
                  "vs_direct": float(np.abs(np.asarray(sharded) - np.asarray(direct)).max())}))
"""


def test_winograd_on_a_batch_sharded_over_devices_computes_the_one_device_result():
    """Four forced CPU devices, the batch split over them, in chunks: the result stays split, with the values of one
    device's."""
    proc = subprocess.run([sys.executable, "-c", SHARDED_WINOGRAD], cwd=Path(__file__).parents[1],
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and "data" in result["spec"]
    assert result["vs_one_device"] <= 1e-5 and result["vs_direct"] <= 1e-4
