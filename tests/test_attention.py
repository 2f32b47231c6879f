"""Attention in query chunks (models.layers.attention) equals plain attention, and keeps less for the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deme_jax.models import layers

pytestmark = pytest.mark.reference


def reference(q, k, v, heads):
    """Softmax attention in float64 numpy, heads split off the channel axis."""
    split = lambda y: np.asarray(y, np.float64).reshape(*y.shape[:2], heads, -1).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    out = (probs / probs.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(*out.shape[:1], out.shape[2], -1)


def qkv(queries, keys, width=16, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, n, width)).astype(np.float32) for n in (queries, keys, keys))


@pytest.mark.parametrize("queries,keys", [(64, 64), (67, 7), (3, 200)])  # 67 x 7: the last chunk is padded
def test_chunks_equal_plain_attention_values_and_gradients(queries, keys, monkeypatch):
    q, k, v = qkv(queries, keys)
    loss = lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, heads=4)))
    plain_out, plain_grads = layers.attention(q, k, v, 4), jax.grad(loss, (0, 1, 2))(q, k, v)
    monkeypatch.setattr(layers, "ATTENTION_PLAIN_SCORES", 0)
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_SCORES", 128)  # 2 queries a chunk at 64 keys, 18 at 7 keys
    chunked_out, chunked_grads = layers.attention(q, k, v, 4), jax.grad(loss, (0, 1, 2))(q, k, v)
    expected = reference(q, k, v, 4)
    for out in (plain_out, chunked_out):
        assert np.abs(np.asarray(out) - expected).max() <= 1e-5
    for chunked, plain in zip(chunked_grads, plain_grads):
        np.testing.assert_allclose(chunked, plain, rtol=1e-5, atol=1e-5)


def test_long_attention_keeps_no_probabilities_for_the_backward_pass(monkeypatch):
    """At 4,096 positions plain attention keeps the (4096 x 4096) probabilities per head; chunks keep q, k, v."""
    q, k, v = (jax.ShapeDtypeStruct((1, 4096, 64), jnp.float32),) * 3
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(layers.attention(q, k, v, heads=2)), (0, 1, 2)))
    chunked = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    monkeypatch.setattr(layers, "ATTENTION_PLAIN_SCORES", 2**30)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(layers.attention(q, k, v, heads=2)), (0, 1, 2)))
    plain = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    probabilities = 2 * 4096 * 4096 * 4  # bytes for both heads
    assert plain >= probabilities
    assert chunked <= probabilities / 3  # a few chunks of 256 x 4,096 scores in flight
