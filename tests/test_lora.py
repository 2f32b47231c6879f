"""LoRA replicas: adapters start at the pretrained model, their task vectors are B A scaled, they merge as dense
replicas, a step trains only them, and diffusers (with peft) loads the exported weights to the same UNet.

Tolerances: float32 rounding. The task vector of ``W + d`` is ``d`` to within 2 ulps (the rounding of ``W + d``);
the merge and the diffusers output agree to ~1e-7 relative (a transposed or misplaced adapter gives ~1e-1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from deme_jax.interop import load_lora, save_lora
from deme_jax.interop.lora import WEIGHTS_NAME
from deme_jax.interop.torch_layout import state_dict_from_params
from deme_jax.interop.unet_condition import model_to_config
from deme_jax.merge import merge, task_vectors
from deme_jax.models import UNet2DCondition, apply_lora, dense_delta, init_lora, lora_targets
from tests.test_unet_condition import FAST_COMPILE, ONE_LEVEL, TINY, inputs, random_params, rel_err, torch_forward

pytestmark = pytest.mark.reference

MODEL = UNet2DCondition(**TINY)
SMALL = UNet2DCondition(**ONE_LEVEL)  # for what needs no forward pass of MODEL: fewer leaves, faster compiles
RANK, SCALE = 3, 0.75
INCLUDE = ("attention", "convolution")


@pytest.fixture(scope="module")
def setup():
    """The tiny UNet's random parameters, inputs and one compiled forward pass for any parameters."""
    params = random_params(MODEL)
    x, t, text = inputs(dict(TINY, sample_size=4), [10, 900])
    forward = jax.jit(lambda p: MODEL.apply({"params": p}, x, t, text), compiler_options=FAST_COMPILE)
    return params, (x, t, text), forward


@pytest.fixture(scope="module")
def small_params():
    return random_params(SMALL)


def trained_adapters(params, seed: int):
    """Adapters as after training: A and B both random, so every adapted kernel moves."""
    rng = np.random.default_rng(seed)
    lora = init_lora(params, RANK, jax.random.key(seed), lora_targets(params, INCLUDE))
    return jax.tree_util.tree_map(lambda a: a + 0.3 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), lora)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def test_targets_are_the_chosen_groups():
    params = random_params(MODEL.clone(channel_projection=True))
    names = {g: {".".join(t) for t in lora_targets(params, g)} for g in ("attention", "convolution", "projection")}
    # 4 transformer blocks (1 down, 1 mid, 2 up) x self- and cross-attention x q, k, v, out.
    assert "mid_block.attentions_0.transformer_blocks_0.attn2.to_out_0" in names["attention"]
    assert len(names["attention"]) == 4 * 2 * 4
    assert {"conv_in", "conv_out", "down_blocks_0.downsamplers_0.conv", "down_blocks_1.resnets_0.conv_shortcut",
            "mid_block.attentions_0.proj_in"} <= names["convolution"]
    assert names["projection"] == {f"{b}.channel_projection" for b in
                                   ("down_blocks_0", "down_blocks_1", "mid_block", "up_blocks_0", "up_blocks_1")}
    assert not names["convolution"] & names["projection"]
    assert not any("time_embedding" in n or ".ff." in n for n in set().union(*names.values()))
    assert set(lora_targets(params)) == set(lora_targets(params, "attention"))


def test_zero_b_starts_exactly_at_the_pretrained_model(setup):
    params, _, forward = setup
    lora = init_lora(params, RANK, jax.random.key(0), lora_targets(params, INCLUDE))
    applied = apply_lora(params, lora, SCALE)
    for path, value in flat(params).items():
        np.testing.assert_array_equal(flat(applied)[path], value)
    np.testing.assert_array_equal(forward(applied), forward(params))
    for path, a in flat(lora).items():  # peft's init: A uniform in +-1/sqrt(fan_in), B zero
        if path[-2] == "lora_A":
            bound = 1 / np.sqrt(np.prod(a.shape[:-1]))
            assert 0.5 * bound < np.abs(a).max() <= bound, path
        else:
            assert not np.any(a), path


def test_dense_delta_is_the_task_vector(small_params):
    params = small_params
    lora = trained_adapters(params, 1)
    both = jax.jit(lambda p, l: (dense_delta(p, l, SCALE), task_vectors(p, [apply_lora(p, l, SCALE)])[0]))
    delta, tau = map(flat, both(params, lora))
    lora = flat(lora)
    adapted = {p[:-2] + ("kernel",) for p in lora}
    for path, w in flat(params).items():
        if path not in adapted:
            assert not np.any(delta[path]) and not np.any(tau[path]), path
            continue
        a, b = (np.asarray(lora[path[:-1] + (n, "kernel")], np.float64) for n in ("lora_A", "lora_B"))
        expected = SCALE * (a.reshape(-1, RANK) @ b.reshape(RANK, -1)).reshape(w.shape)
        assert rel_err(delta[path], expected) <= 1e-6, path
        # (W + d) - W is d up to the rounding of W + d, an ulp of the larger of W and W + d; compiled in one
        # program, XLA rounds the d of W + d differently from dense_delta's: 2 ulps (measured: 2).
        ulp = np.spacing(np.maximum(np.abs(w), np.abs(w + delta[path])))
        assert np.all(np.abs(tau[path] - delta[path]) <= 2 * ulp), path


def test_merging_lora_replicas_is_task_arithmetic_on_their_dense_deltas(small_params):
    params = small_params
    adapters = [trained_adapters(params, seed) for seed in (2, 3, 4)]
    weights = np.asarray([0.5, 0.3, 0.4], np.float32)
    merged, deltas = jax.jit(lambda p, adapters: (
        merge(p, [apply_lora(p, lora, SCALE) for lora in adapters], weights),
        [dense_delta(p, lora, SCALE) for lora in adapters]))(params, adapters)
    merged, deltas = flat(merged), [flat(d) for d in deltas]
    moved = 0
    for path, w in flat(params).items():
        expected = sum(wi * np.asarray(d[path], np.float64) for wi, d in zip(weights, deltas))
        if not np.any(expected):
            np.testing.assert_array_equal(merged[path], w)
            continue
        moved += 1
        assert rel_err(np.asarray(merged[path], np.float64) - w, expected) <= 1e-5, path
    assert moved == len(lora_targets(params, INCLUDE))


def test_a_step_trains_only_the_adapters(small_params):
    """A jitted optax step on the adapters of a one-level UNet: the loss moves, base parameters stay bit for bit."""
    params = small_params
    x, t, text = inputs(dict(ONE_LEVEL, sample_size=4), [10, 900])
    lora = init_lora(params, RANK, jax.random.key(5), lora_targets(params, "attention"))
    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(lora, opt_state, base):
        loss = lambda l: jnp.mean((SMALL.apply({"params": apply_lora(base, l, SCALE)}, x, t, text) - 1.0) ** 2)
        value, grads = jax.value_and_grad(loss)(lora)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    once, opt_state, first_loss = step(lora, optimizer.init(lora), params)
    twice, _, second_loss = step(once, opt_state, params)
    assert second_loss != first_loss
    for path, a in flat(lora).items():
        if path[-2] == "lora_A":  # B = 0 gives A no gradient in the first step; B's gradient moves A next
            np.testing.assert_array_equal(flat(once)[path], a)
            assert np.any(flat(twice)[path] != a), path
        else:
            assert np.all(flat(once)[path] != 0), path
    applied = flat(apply_lora(params, twice, SCALE))
    adapted = {p[:-2] + ("kernel",) for p in flat(lora)}
    for path, w in flat(params).items():
        if path in adapted:
            assert np.any(applied[path] != w), path
        else:
            np.testing.assert_array_equal(applied[path], w)


def test_exported_lora_loads_in_diffusers(setup, tmp_path):
    """Through the UNet half of ``StableDiffusionPipeline.load_lora_weights``: lora_state_dict, then
    load_lora_into_unet (peft's LoRA layers: base output plus scale * B(A(x)), unmerged)."""
    params, (x, t, text), forward = setup
    lora = trained_adapters(params, 6)
    save_lora(lora, tmp_path, SCALE)
    keys = load_file(tmp_path / WEIGHTS_NAME)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert keys[f"{prefix}.lora_A.weight"].shape == (RANK, 16)
    assert keys[f"{prefix}.lora_B.weight"].shape == (16, RANK)
    assert keys["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape == (RANK, 16, 3, 3)
    assert keys["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (16, RANK, 1, 1)

    reloaded, scale = load_lora(tmp_path)
    assert scale == SCALE
    assert flat(reloaded).keys() == flat(lora).keys()
    for path, value in flat(lora).items():
        np.testing.assert_array_equal(flat(reloaded)[path], value)

    unet = UNet2DConditionModel.from_config(model_to_config(MODEL)).eval()
    unet.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict_from_params(params).items()})
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(tmp_path, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, metadata=metadata)
    reference = torch_forward(unet, x, t, text)
    ours = forward(apply_lora(params, lora, SCALE))
    assert rel_err(ours, reference) <= 1e-5
    assert rel_err(forward(params), reference) > 1e-2  # the adapters matter


# --- bad input: each error names the field and the fix ---------------------------------------------------


@pytest.mark.parametrize("rank,include,message", [
    (0, "attention", r"rank=0: the LoRA rank must be a positive integer"),
    (-2, "attention", r"rank=-2: the LoRA rank must be a positive integer"),
    (9, "attention", r"rank=9 exceeds the kernel .*attn2.to_[kv] of shape \(8, 16\).* Use rank <= 8"),
    (5, ("attention", "convolution"), r"rank=5 exceeds the kernel conv_out of shape \(3, 3, 16, 4\).* rank <= 4"),
])
def test_bad_rank_is_refused(setup, rank, include, message):
    params = setup[0]
    with pytest.raises(ValueError, match=message):
        init_lora(params, rank, jax.random.key(0), lora_targets(params, include))


def test_bad_targets_are_refused(setup):
    params = setup[0]
    with pytest.raises(ValueError, match=r"include=\('attention', 'mlp'\) names unknown groups \['mlp'\]; choose"):
        lora_targets(params, ("attention", "mlp"))
    with pytest.raises(ValueError, match=r"selects no kernel .* channel_projection=True"):
        lora_targets(params, "projection")
    with pytest.raises(ValueError, match=r"targets \['conv_in2'\] name no kernel .* lora_targets\(params"):
        init_lora(params, RANK, jax.random.key(0), [("conv_in2",)])


def test_adapters_of_another_model_are_refused(setup, small_params):
    lora = init_lora(setup[0], RANK, jax.random.key(0), lora_targets(setup[0], "convolution"))
    with pytest.raises(ValueError, match=r"lora_params\[down_blocks_0.downsamplers_0.conv\] does not adapt a kernel "
                                         r"of this model \(kernel None"):
        apply_lora(small_params, lora, SCALE)


def test_foreign_lora_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pytorch_lora_weights.safetensors is missing"):
        load_lora(tmp_path)
    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 16), np.float32)},
              kohya)
    with pytest.raises(ValueError, match=r"is not UNet LoRA weights in the diffusers/peft layout"):
        load_lora(kohya)
