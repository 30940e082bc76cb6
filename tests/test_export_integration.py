"""Across the two halves of the product: Flax UNet weights -> diffusers folder -> PyTorch generation.

A UNet trained in Flax is exported with `flax_train.export`; `xla_infer` and diffusers load the
folder, and for the same initial noise `xla_infer` draws the same images as the Flax generator.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from flax_train import models
from flax_train.models import weights
from flax_train.export import export_pipeline
from flax_train.sampling import Generator
from flax_train.demo.tiny import save_tiny_pipeline

RESOLUTION = 32
STEPS = 3
PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]
NEGATIVE = "a white triangle"
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = save_tiny_pipeline(root / "base", seed=5, image_size=RESOLUTION, layers_per_block=1)
    unet = models.load(base, subfolder="unet")
    # Stand-in for training: move every weight, so the export cannot pass by copying the base.
    graphdef, params = nnx.split(unet, nnx.Param)
    noise = np.random.default_rng(0)
    params = jax.tree.map(lambda v: v + 0.01 * noise.standard_normal(v.shape).astype(v.dtype), params)
    trained = nnx.merge(graphdef, params)
    out = export_pipeline(trained, base, root / "export")
    return base, out, trained


def test_export_is_a_complete_diffusers_folder_with_the_trained_unet(exported):
    import torch
    from diffusers import StableDiffusionXLPipeline

    base, out, trained = exported
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    ours = weights.to_torch_state_dict(trained)
    theirs = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    base_unet = StableDiffusionXLPipeline.from_pretrained(base).unet.state_dict()
    assert any(not torch.equal(base_unet[k], pipe.unet.state_dict()[k]) for k in base_unet)
    for name in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (out / name).is_dir(), name


def test_xla_infer_draws_the_flax_generators_images(exported):
    from xla_infer import Pipeline
    from xla_infer.schedulers import draw_noise

    _, out, _ = exported
    pipe = Pipeline.from_pretrained(
        out, device="cpu", dtype="fp32", batch_size=2, height=RESOLUTION, width=RESOLUTION, steps=STEPS, scheduler="euler"
    )
    torch_images = pipe(PROMPTS, negative_prompts=NEGATIVE, seeds=[11, 12], guidance_scale=4.0, output_type="np")

    latents, _ = draw_noise([11, 12], pipe.latent_shape, STEPS, False)
    generator = Generator(out, scheduler="euler", num_steps=STEPS, resolution=RESOLUTION)
    jax_images = generator(PROMPTS, negative_prompt=NEGATIVE, guidance_scale=4.0, latents=latents.numpy())
    jax_images = np.stack([np.asarray(image) for image in jax_images]).astype(np.float64)
    diff = np.abs(jax_images - np.asarray(torch_images) * 255.0).max()
    print(f"xla_infer (torch) vs flax generator max abs diff: {diff:.3f} (of 255)")
    assert diff <= 1.0


# --------------------------------------------------------------------------------------------
# One meaning of "no prompt": a demo-shaped export (zero-terminal-SNR v-prediction, force_zeros
# in model_index.json) gives the same images in the JAX sampler, xla_infer and diffusers when each
# is called with its default arguments, and with a negative prompt.


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    from flax_train.demo import __main__ as demo, tiny

    root = tmp_path_factory.mktemp("demo_export")
    base = save_tiny_pipeline(root / "base", seed=2, image_size=RESOLUTION, scheduler=demo.SCHEDULER, **tiny.DEMO_SIZES)
    unet = models.load(base, subfolder="unet")
    graphdef, params = nnx.split(unet, nnx.Param)
    noise = np.random.default_rng(1)
    params = jax.tree.map(lambda v: v + 0.05 * noise.standard_normal(v.shape).astype(v.dtype), params)
    return export_pipeline(nnx.merge(graphdef, params), base, root / "export")


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["default", "negative_prompt"])
def test_jax_sampler_xla_infer_and_diffusers_agree(demo_export, negative):
    import torch
    from diffusers import StableDiffusionXLPipeline
    from xla_infer import Pipeline
    from xla_infer.schedulers import draw_noise

    assert json.loads((demo_export / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    options = {} if negative is None else {"negative_prompt": negative}
    seeds = [21, 22]

    pipe = Pipeline.from_pretrained(demo_export, dtype="fp32", batch_size=2, height=RESOLUTION, width=RESOLUTION, steps=STEPS)
    xla_options = {} if negative is None else {"negative_prompts": negative}
    xla = np.asarray(pipe(PROMPTS, seeds=seeds, guidance_scale=GUIDANCE, output_type="np", **xla_options)) * 255.0

    latents, _ = draw_noise(seeds, pipe.latent_shape, STEPS, False)
    generator = Generator(demo_export, num_steps=STEPS, resolution=RESOLUTION)
    ours = np.stack([np.asarray(im) for im in generator(PROMPTS, guidance_scale=GUIDANCE, latents=latents.numpy(), **options)])

    reference = StableDiffusionXLPipeline.from_pretrained(demo_export)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = reference(
            prompt=PROMPTS, latents=latents, height=RESOLUTION, width=RESOLUTION, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, output_type="np", **options,
        ).images * 255.0

    jax_vs_diffusers = np.abs(ours - theirs).max()
    xla_vs_diffusers = np.abs(xla - theirs).max()
    print(f"max abs diff (of 255): JAX sampler {jax_vs_diffusers:.3f}, xla_infer {xla_vs_diffusers:.3f} vs diffusers")
    # uint8 rounding is at most 0.5 per side; the rest is float32 noise through the steps and decoder.
    assert jax_vs_diffusers <= 1.0 and xla_vs_diffusers <= 1.0

    if negative is None:
        # The rule decides the images: the encoded empty prompt would give others.
        encoded_empty = generator(PROMPTS, negative_prompt="", guidance_scale=GUIDANCE, latents=latents.numpy())
        assert np.abs(np.stack([np.asarray(im) for im in encoded_empty]) - ours).max() > 8.0
