"""Across the two halves of the product: Flax UNet weights -> diffusers folder -> PyTorch generation.

A UNet trained in Flax is exported with `flax_train.export`; `xla_infer` and diffusers load the
folder, and for the same initial noise `xla_infer` draws the same images as the Flax generator.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from flax_train import models, weights
from flax_train.export import export_pipeline
from flax_train.generate import Generator
from flax_train.tiny import save_tiny_pipeline

RESOLUTION = 32
STEPS = 3
PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]
NEGATIVE = "a white triangle"


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
