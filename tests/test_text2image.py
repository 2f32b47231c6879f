"""Stable Diffusion end to end against diffusers' StableDiffusionPipeline, and its directories in and out."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.numpy import load_file

from deme_jax import text2image
from deme_jax.cli import main
from deme_jax.images import to_uint8
from deme_jax.interop import load_diffusers_model, load_stable_diffusion, save_stable_diffusion
from tests.sd_util import tiny_pipeline

pytestmark = pytest.mark.reference

PROMPTS = ["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"]
DIFFUSERS_SCHEDULERS = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler, "pndm": PNDMScheduler}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_v(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("sd_v"), prediction_type="v_prediction", seed=1)


def diffusers_images(pipe, scheduler, latents_nhwc, steps=10, guidance=7.5):
    options = {"skip_prk_steps": True} if scheduler == "pndm" else {}  # as Stable Diffusion's configs say
    pipe.scheduler = DIFFUSERS_SCHEDULERS[scheduler].from_config(pipe.scheduler.config, **options)
    latents = torch.from_numpy(np.asarray(latents_nhwc)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                    output_type="np").images


def our_images(path, scheduler, latents, steps=10, guidance=7.5):
    pipeline = load_stable_diffusion(path)
    return text2image.generate(pipeline, PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                               latents=latents, scheduler=scheduler)


def latents_for(seed=0):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "pndm"])
def test_generate_matches_stable_diffusion_pipeline(sd, scheduler):
    # <= 1e-4 on images in [0, 1] (measured 1.1e-6 with DDIM): ten guided steps amplify the float32 rounding of
    # each network call.
    pipe, path = sd
    latents = latents_for()
    ours = our_images(path, scheduler, latents)
    ref = diffusers_images(pipe, scheduler, latents)
    assert ours.shape == ref.shape == (2, 16, 16, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ref - 0.5).mean() > 1e-3  # not a blank image


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "pndm"])
def test_v_prediction_matches(sd_v, scheduler):
    pipe, path = sd_v
    latents = latents_for(seed=1)
    assert np.abs(our_images(path, scheduler, latents) - diffusers_images(pipe, scheduler, latents)).max() <= 1e-4


def test_prompts_and_guidance_change_the_images(sd):
    """What the agreement above must tell apart: another prompt or no guidance moves pixels by ~0.1, 1e5 times the
    measured agreement, so swapped guidance halves or prompts could not pass it."""
    pipe, path = sd
    latents = latents_for()
    guided, unguided = our_images(path, "ddim", latents), our_images(path, "ddim", latents, guidance=1.0)
    swapped = text2image.generate(load_stable_diffusion(path), PROMPTS[::-1], num_inference_steps=10,
                                  guidance_scale=7.5, latents=latents, scheduler="ddim")
    assert np.abs(guided - unguided).max() > 1e-2 and np.abs(guided - swapped).max() > 1e-2


def test_without_guidance_matches(sd):
    pipe, path = sd
    latents = latents_for(seed=2)
    ours, ref = our_images(path, "ddim", latents, guidance=1.0), diffusers_images(pipe, "ddim", latents, guidance=1.0)
    assert np.abs(ours - ref).max() <= 1e-4


def weights_of(directory):
    """Every safetensors file's tensors; text encoder keys without ``text_model.`` (transformers 4 wrote it, as we
    do, and every version reads it; transformers 5 writes a fresh model without it)."""
    return {path.relative_to(directory).as_posix(): {k.removeprefix("text_model."): v for k, v in
                                                      load_file(path).items()}
            for path in sorted(directory.rglob("*.safetensors"))}


def assert_same_weights(original, written):
    assert original.keys() == written.keys()
    for name, tensors in original.items():
        assert tensors.keys() == written[name].keys(), name
        for key, value in tensors.items():
            assert value.dtype == written[name][key].dtype and np.array_equal(value, written[name][key]), key


def test_save_is_bit_identical_and_loads_in_diffusers(sd, tmp_path):
    pipe, path = sd
    pipeline = load_stable_diffusion(path)
    saved = save_stable_diffusion(pipeline, tmp_path / "saved")
    assert_same_weights(weights_of(path), weights_of(saved))
    reloaded = StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)
    latents = latents_for(seed=3)
    assert np.array_equal(diffusers_images(reloaded, "ddim", latents), diffusers_images(pipe, "ddim", latents))


def test_fp16_variant_loads(sd, tmp_path):
    pipe, _ = sd
    pipe.to(torch.float16).save_pretrained(tmp_path / "fp16", variant="fp16")
    pipe.to(torch.float32)
    pipeline = load_stable_diffusion(tmp_path / "fp16", variant="fp16")
    unet = pipe.unet.state_dict()["conv_in.weight"].half().float().numpy()
    ours = np.asarray(pipeline.params["unet"]["conv_in"]["kernel"]).transpose(3, 2, 0, 1)
    assert np.array_equal(ours, unet)


def copy_of(path, tmp_path):
    return shutil.copytree(path, tmp_path / "copy")


def test_missing_component_is_named(sd, tmp_path):
    path = copy_of(sd[1], tmp_path)
    shutil.rmtree(path / "vae")
    with pytest.raises(FileNotFoundError, match="vae/"):
        load_stable_diffusion(path)


def test_pickle_weights_are_refused(sd, tmp_path):
    path = copy_of(sd[1], tmp_path)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ValueError, match="pickle.*deme convert"):
        load_stable_diffusion(path)


@pytest.mark.parametrize("component, message", [("text_encoder_2", "SDXL"), ("controlnet", "ControlNet")])
def test_other_pipelines_are_refused(sd, tmp_path, component, message):
    path = copy_of(sd[1], tmp_path)
    index = json.loads((path / "model_index.json").read_text())
    index[component] = ["transformers", "CLIPTextModelWithProjection"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        load_stable_diffusion(path)


def test_inexpressible_config_key_is_named(sd, tmp_path):
    path = copy_of(sd[1], tmp_path)
    config = json.loads((path / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="addition_embed_type"):
        load_diffusers_model(path / "unet")


def test_shape_mismatch_names_the_key(sd, tmp_path):
    path = copy_of(sd[1], tmp_path)
    config = json.loads((path / "vae" / "config.json").read_text())
    config["latent_channels"] = 8
    (path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Shape mismatch for .*conv"):
        load_stable_diffusion(path)


def test_empty_prompt_list(sd):
    with pytest.raises(ValueError, match="at least one prompt"):
        text2image.generate(load_stable_diffusion(sd[1]), [], num_inference_steps=2)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_convert_to_orbax_and_back_is_bit_identical(sd, tmp_path, component):
    main(["convert", str(sd[1] / component), str(tmp_path / "orbax")])
    main(["convert", str(tmp_path / "orbax"), str(tmp_path / "back")])
    assert_same_weights(weights_of(sd[1] / component), weights_of(tmp_path / "back"))


def test_sample_command_writes_the_images_and_a_grid(sd, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog on a skateboard\n")
    main(["sample", "--model", str(sd[1]), "--prompt", "a red cube", "--prompts", str(tmp_path / "prompts.txt"),
          "--steps", "3", "--sampler", "dpmpp_2m", "--batch-size", "2", "--out", str(tmp_path / "grid.png")])
    written = sorted((tmp_path / "grid").glob("*.png"))
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
    assert (tmp_path / "grid.png").is_file()
    assert (tmp_path / "grid" / "prompts.txt").read_text().splitlines()[2] == "00002.png\ta dog on a skateboard"
    second_batch = text2image.generate(load_stable_diffusion(sd[1]), ["a dog on a skateboard", ""],
                                       num_inference_steps=3, scheduler="dpmpp_2m",
                                       rng=jax.random.fold_in(jax.random.key(0), 1))
    assert np.array_equal(np.asarray(Image.open(written[2])), to_uint8(second_batch[0] * 2 - 1))


def test_sample_command_refuses_a_pixel_sampler_for_prompts(sd, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", str(sd[1]), "--prompt", "a cat", "--sampler", "ddpm"])
    assert exit_info.value.code == 2 and "dpmpp_2m" in capsys.readouterr().err
