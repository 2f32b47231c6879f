"""3x3 stride-1 convolutions by Winograd's F(2x2, 3x3), for CPUs.

XLA:CPU's direct convolutions run at the speed of PyTorch's (oneDNN) on the
UNets' shapes, so a faster forward needs fewer multiplications: F(2x2, 3x3)
computes each 2x2 output tile from a 4x4 input tile with 16 products per
channel pair instead of 36, as 16 matmuls over channels. The transforms' matrices
hold only 0, +-1 and +-1/2, so float32 results are as close to float64 as the
direct convolution's (measured: largest error 4.9e-7 of the output's scale,
direct 7.4e-7). The matmuls are memory-bound unless their operands stay in
cache, so the batch runs in chunks of about ``CHUNK_BYTES`` of transformed tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INPUT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # B^T: input tile -> 4x4 transform
KERNEL = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # G: 3x3 kernel -> 4x4 transform
OUTPUT = ((1, 1, 1, 0), (0, 1, -1, -1))  # A^T: 4x4 products -> 2x2 output tile
CHUNK_BYTES = 8 * 2**20  # transformed tiles per chunk: the best of 2-16 MiB on a 2-core CPU (32 MiB L3)
MIN_CHANNELS = 64  # with fewer input or output channels the direct convolution was as fast or faster
MIN_TILES = 1024  # with fewer output tiles per call (batch x tile rows x tile columns), likewise


def _tiles(size, pads) -> tuple[int, int]:
    """Output tile rows and columns of an input of ``size`` (height, width) padded by ``pads``."""
    return tuple(-(-(n + lo + hi - 2) // 2) for n, (lo, hi) in zip(size, pads))


def _image_bytes(tiles, channels, dtype) -> int:
    """One image's transformed tiles (or products, whichever has more channels)."""
    return 16 * tiles[0] * tiles[1] * channels * jnp.dtype(dtype).itemsize


def winograd_pays(x_shape, kernel_shape, strides, pads, dtype) -> bool:
    """Whether ``winograd_conv3x3`` applies and beats XLA:CPU's direct convolution.

    Measured in float32 on the CIFAR-10, demo and SD 1.5 models' shapes (2-core
    CPU): up to 2.3x faster inside these bounds, up to 2.7x slower outside them.
    Too few channels or tiles leave the matmuls too small; an image whose
    transformed tiles outgrow ``CHUNK_BYTES`` per 64 channels is memory-bound
    (the VAE decoder's 256x256 and 512x512 layers, 1.2-1.8x slower).
    """
    channels = min(kernel_shape[2:])
    tiles = _tiles(x_shape[1:3], pads)
    return (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1) and dtype == jnp.float32
            and min(p for pair in pads for p in pair) >= 0 and channels >= MIN_CHANNELS
            and x_shape[0] * tiles[0] * tiles[1] >= MIN_TILES
            and _image_bytes(tiles, max(kernel_shape[2:]), dtype) <= CHUNK_BYTES * (channels // MIN_CHANNELS))


def _sandwich(matrix, grid):
    """``matrix @ grid @ matrix.T`` for a small constant matrix and a grid (list of rows) of arrays, each entry one
    sum of the grid's entries (zeros skipped), so that XLA fuses a whole transform into one pass over memory."""
    out = []
    for row_i in matrix:
        out.append([])
        for row_j in matrix:
            terms = [(a * b, grid[i][j]) for i, a in enumerate(row_i) for j, b in enumerate(row_j) if a * b]
            parts = [part if c == 1 else -part if c == -1 else part * np.float32(c) for c, part in terms]
            out[-1].append(sum(parts[1:], parts[0]))
    return out


def _convolve(x, transformed_kernel, pads, tiles):
    """The convolution of a chunk of images, padded here: padding the whole batch before chunking ran 1.4x slower."""
    (rows, cols), batch, (height, width, channels) = tiles, x.shape[0], x.shape[1:]
    (top, _), (left, _) = pads
    x = jnp.pad(x, ((0, 0), (top, 2 * rows + 2 - height - top), (left, 2 * cols + 2 - width - left), (0, 0)))
    grid = [[x[:, i:i + 2 * rows - 1:2, j:j + 2 * cols - 1:2] for j in range(4)] for i in range(4)]
    transformed = jnp.stack([v for row in _sandwich(INPUT, grid) for v in row]).reshape(16, -1, channels)
    products = jnp.einsum("stc,sco->sto", transformed, transformed_kernel).reshape(4, 4, batch, rows, cols, -1)
    out = _sandwich(OUTPUT, [[products[i, j] for j in range(4)] for i in range(4)])
    return jnp.stack([jnp.stack(row, axis=3) for row in out], axis=2).reshape(batch, 2 * rows, 2 * cols, -1)


def winograd_conv3x3(x, kernel, pads):
    """``lax.conv_general_dilated`` of NHWC ``x`` with an HWIO 3x3 ``kernel``, stride 1, non-negative ``pads``."""
    batch, height, width, _ = x.shape
    tiles = _tiles((height, width), pads)
    transformed_kernel = jnp.stack([u for row in _sandwich(KERNEL, [list(r) for r in kernel]) for u in row])
    image_bytes = _image_bytes(tiles, max(kernel.shape[2:]), x.dtype)
    # Chunks of a multiple of the device count keep a batch sharded over the devices sharded (XLA gathers it else).
    every = jax.device_count() if batch % jax.device_count() == 0 else 1
    limit = max(CHUNK_BYTES, every * image_bytes)
    chunk = max(d for d in range(every, batch + 1, every) if batch % d == 0 and d * image_bytes <= limit)
    if chunk == batch:
        y = _convolve(x, transformed_kernel, pads, tiles)
    else:
        # Chunk j holds images j, j + n, j + 2n, ...: a batch sharded in blocks stays sharded within each chunk.
        x = x.reshape(chunk, batch // chunk, *x.shape[1:])
        y = jnp.zeros((chunk, batch // chunk, 2 * tiles[0], 2 * tiles[1], kernel.shape[-1]), x.dtype)

        def step(j, y):
            part = jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(y, _convolve(part, transformed_kernel, pads, tiles), j, axis=1)

        y = jax.lax.fori_loop(0, batch // chunk, step, y).reshape(batch, *y.shape[2:])
    return y[:, :height + sum(pads[0]) - 2, :width + sum(pads[1]) - 2]
