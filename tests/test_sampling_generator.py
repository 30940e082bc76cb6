"""The JAX generator (validation images, `flax-train sample`, the demo) against diffusers' SDXL pipeline."""

import numpy as np
import pytest
import torch

from flax_train.sampling import Generator
from sdxl_common.prompts import read_prompt_file
from flax_train.demo.tiny import save_tiny_pipeline

RESOLUTION = 32
STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("generate") / "pipe", seed=3, image_size=RESOLUTION, layers_per_block=1)


@pytest.fixture(scope="module")
def generator(folder):
    return Generator(folder, scheduler="euler", num_steps=STEPS)


def test_images_match_diffusers_pipeline(folder, generator):
    from diffusers import StableDiffusionXLPipeline

    prompts = ["a red circle on a blue background", "a green square on a yellow background"]
    negative = "a white triangle"
    ours = np.stack([np.asarray(image) for image in generator(prompts, negative_prompt=negative, seed=7, guidance_scale=4.0)])

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.asarray(generator.initial_latents(len(prompts), seed=7)))
    with torch.no_grad():
        theirs = pipe(
            prompt=prompts,
            negative_prompt=[negative] * len(prompts),
            latents=latents,
            height=RESOLUTION,
            width=RESOLUTION,
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            output_type="np",
        ).images
    assert ours.shape == (2, RESOLUTION, RESOLUTION, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.float64) - theirs * 255.0).max()
    print(f"generator vs diffusers max abs diff: {diff:.3f} (of 255)")
    # uint8 rounding is at most 0.5; the rest is float32 noise through 3 steps and the decoder.
    assert diff <= 1.0


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])  # euler_a: step noise, from the seed too
def test_each_image_depends_only_on_its_own_seed(folder, generator, scheduler):
    if scheduler != "euler":
        generator = Generator(folder, scheduler=scheduler, num_steps=STEPS)
    batch = generator(["a red circle on a blue background", "a black square on a white background"], seed=10)
    alone = generator(["a black square on a white background"], seed=11)
    assert np.array_equal(np.asarray(batch[1]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


def test_resolution_must_fit_the_vae(folder):
    with pytest.raises(ValueError, match="not divisible by the VAE"):
        Generator(folder, resolution=RESOLUTION + 1, load_unet=False)


def test_prompt_file_errors_name_the_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    assert read_prompt_file(good) == ["a red circle", "a blue square"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: not UTF-8"):
        read_prompt_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(empty)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_a_rematerialised_training_unet_samples_the_same_images(folder, generator, remat):
    """Validation samples with the UNet as training built it, rematerialised blocks included."""
    from flax import nnx

    import flax_train.models as models

    unet = models.load(folder, subfolder="unet", remat=remat)
    graphdef, params = nnx.split(unet, nnx.Param)
    embeds = generator.encode(["a red circle on a blue background"], [None])
    images = generator.generate_from_embeds(graphdef, params, embeds, seed=5)
    plain = generator.generate_from_embeds(*nnx.split(generator.unet, nnx.Param), embeds, seed=5)
    np.testing.assert_array_equal(images, plain)
