"""xla_infer.Pipeline on plain torch (CPU) against diffusers' StableDiffusionXLPipeline.

Same folder, same seeds (so the same initial latents and, for euler_a, the same step noise): our
fixed-shape loop must give diffusers' images for every scheduler, with SDXL micro-conditioning,
mixed present/absent negative prompts, and batches padded to the pipeline's batch size.
The torch_xla runs of the same comparisons are in tests/test_xla_device.py.
"""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flax_train.demo.tiny import save_tiny_pipeline
from xla_infer import SCHEDULER_NAMES, InputError, Pipeline
from sdxl_common.samplers import diffusers_scheduler

PROMPTS = ["a red circle", "a blue square on a green background"]
NEGATIVES = [None, "blurry"]
SEEDS = [5, 9]
STEPS = 3
SIZE = 64
# fp32 on the same CPU kernels: differences are float rounding of reordered but equivalent work.
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_pipeline") / "sdxl", seed=0)


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def diffusers_images(reference, pipe: Pipeline, prompts, negatives, seeds, guidance_scale=5.0, **kwargs):
    """diffusers' images, one prompt per call, each with its own seeded generator."""
    reference.scheduler = diffusers_scheduler(pipe.scheduler_name, pipe.sampler.reference.config)
    images = []
    for prompt, negative, seed in zip(prompts, negatives, seeds):
        out = reference(
            prompt, negative_prompt=negative, num_inference_steps=pipe.steps, height=pipe.height, width=pipe.width,
            guidance_scale=guidance_scale, generator=[torch.Generator().manual_seed(seed)], output_type="np",
            **kwargs,
        )
        images.append(out.images)
    return np.concatenate(images)


def load(folder, **kwargs):
    options = dict(device="cpu", dtype="fp32", batch_size=2, steps=STEPS)
    return Pipeline.from_pretrained(folder, **{**options, **kwargs})


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_matches_diffusers_for_each_scheduler(folder, reference, scheduler):
    pipe = load(folder, scheduler=scheduler)
    got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")
    expected = diffusers_images(reference, pipe, PROMPTS, NEGATIVES, SEEDS)
    assert got.shape == (2, SIZE, SIZE, 3) and expected.std() > 0.01
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_micro_conditioning_and_its_negative_variant_match_diffusers(folder, reference):
    pipe = load(folder, scheduler="euler")
    micro = dict(
        original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 64),
        negative_original_size=(32, 32), negative_crops_coords_top_left=(2, 2), negative_target_size=(48, 48),
    )
    got = pipe(PROMPTS, negative_prompts=["ugly", "blurry"], seeds=SEEDS, guidance_scale=7.5, output_type="np",
               **micro)
    expected = diffusers_images(reference, pipe, PROMPTS, ["ugly", "blurry"], SEEDS, guidance_scale=7.5, **micro)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    plain = pipe(PROMPTS, negative_prompts=["ugly", "blurry"], seeds=SEEDS, guidance_scale=7.5, output_type="np")
    assert np.abs(plain - got).max() > 1e-3  # the conditioning reaches the UNet


def test_guidance_at_most_one_means_no_guidance_as_in_diffusers(folder, reference):
    pipe = load(folder, scheduler="ddim")
    got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, guidance_scale=1.0, output_type="np")
    expected = diffusers_images(reference, pipe, PROMPTS, NEGATIVES, SEEDS, guidance_scale=1.0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_batches_are_padded_and_images_depend_only_on_prompt_and_seed(folder):
    pipe = load(folder, scheduler="euler_a")
    three = pipe(["a red circle", "a cat", "a dog"], seeds=100)
    assert [im.info["seed"] for im in three] == [100, 101, 102]
    assert three[0].size == (SIZE, SIZE) and three[0].mode == "RGB"
    alone = pipe(["a dog"], seeds=[102])[0]
    np.testing.assert_array_equal(np.asarray(three[2]), np.asarray(alone))
    other_seed = pipe(["a dog"], seeds=[103])[0]
    assert not np.array_equal(np.asarray(other_seed), np.asarray(alone))
    info = three[1].info
    assert info["prompt"] == "a cat" and info["scheduler"] == "euler_a" and info["steps"] == STEPS
    assert info["negative_prompt"] == "" and info["width"] == SIZE and info["tokens_dropped"] == 0


def test_long_prompt_is_truncated_with_a_warning_naming_the_dropped_count(folder, caplog):
    pipe = load(folder, batch_size=1, steps=1)
    long_prompt = " ".join(["red circle"] * 50)  # 100 word tokens + start/end = 102 > 77
    expected_dropped = len(pipe.tokenizer(long_prompt).input_ids) - 77
    assert expected_dropped == 25
    with caplog.at_level(logging.WARNING, logger="xla_infer"):
        image = pipe([long_prompt], negative_prompts=["short"], seeds=[0])[0]
    messages = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(messages) == 1 and "prompt 0" in messages[0] and "last 25 token(s)" in messages[0]
    assert image.info["tokens_dropped"] == 25


def test_vae_dtype_follows_its_config():
    from types import SimpleNamespace

    from xla_infer.pipeline import _vae_dtype_for

    sdxl_vae = SimpleNamespace(force_upcast=True)
    assert _vae_dtype_for(torch.float16, sdxl_vae) == torch.float32  # SDXL's VAE overflows in fp16
    assert _vae_dtype_for(torch.bfloat16, sdxl_vae) == torch.bfloat16  # bf16 has fp32's range
    assert _vae_dtype_for(torch.float16, SimpleNamespace(force_upcast=False)) == torch.float16


def test_bf16_pipeline_runs(folder):
    pipe = load(folder, dtype="bf16", steps=2)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae_dtype == torch.bfloat16
    pixels = pipe(PROMPTS, seeds=SEEDS, output_type="np")
    assert pixels.shape == (2, SIZE, SIZE, 3) and np.isfinite(pixels).all() and pixels.std() > 0.01


def test_bad_input_is_a_clear_input_error(folder, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "unet").mkdir()
    with pytest.raises(InputError, match="missing vae, text_encoder"):
        load(partial)
    with pytest.raises(InputError, match="width 61 is not a positive multiple of the VAE factor 2"):
        load(folder, width=61)
    with pytest.raises(InputError, match="steps must be a positive integer"):
        load(folder, steps=0)
    with pytest.raises(InputError, match="unknown scheduler 'lms'"):
        load(folder, scheduler="lms")
    pipe = load(folder, steps=1)
    with pytest.raises(InputError, match="1 negative prompts for 2 prompts"):
        pipe(PROMPTS, negative_prompts=["x"])
    with pytest.raises(InputError, match="no prompts"):
        pipe([])


# ---------------------------------------------------------------- prompt_2 and image-to-image


def diffusers_call(diffusers_pipe, pipe: Pipeline, seed: int, **kwargs):
    """One diffusers image with `pipe`'s scheduler and steps and one seeded generator, as np."""
    diffusers_pipe.scheduler = diffusers_scheduler(pipe.scheduler_name, pipe.sampler.reference.config)
    generator = [torch.Generator().manual_seed(seed)]
    return diffusers_pipe(num_inference_steps=pipe.steps, generator=generator, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def img2img_reference(reference):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    # The same modules; requires_aesthetics_score stays False, as for the base model.
    return StableDiffusionXLImg2ImgPipeline(
        **reference.components, force_zeros_for_empty_prompt=reference.config.force_zeros_for_empty_prompt
    )


def input_images():
    """Two different 64x64 RGB images (noisy colour gradients): one as a uint8 array, one as PIL.

    diffusers reads a numpy image as floats in [0, 1], so it is always given the PIL image.
    """
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 1, SIZE)[None, :, None] * np.array([[[1.0, 0.4, 0.1]], [[0.1, 0.5, 1.0]]])[:, None]
    pixels = 255 * np.clip(ramp + 0.3 * rng.random((2, SIZE, SIZE, 3)), 0, 1)
    return [pixels[0].astype(np.uint8), Image.fromarray(pixels[1].astype(np.uint8))]


def test_prompt_2_and_negative_prompt_2_match_diffusers(folder, reference):
    pipe = load(folder, scheduler="euler_a")
    # A list entry of None gives the second encoder the first prompt (diffusers' `prompt_2 or prompt`);
    # negative_prompt_2 is ignored where the negative is zeroed (absent), as in diffusers.
    prompts_2, negative_2 = ["a green star on a white background", None], "dark"
    got = pipe(PROMPTS, negative_prompts=NEGATIVES, prompt_2=prompts_2, negative_prompt_2=negative_2, seeds=SEEDS,
               output_type="np")
    expected = np.concatenate([
        diffusers_call(reference, pipe, seed, prompt=prompt, prompt_2=prompt_2, negative_prompt=negative,
                       negative_prompt_2=negative_2, height=SIZE, width=SIZE, guidance_scale=5.0)
        for prompt, prompt_2, negative, seed in zip(PROMPTS, prompts_2, NEGATIVES, SEEDS)
    ])
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    without = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")
    assert np.abs(without[0] - got[0]).max() > 1e-3  # prompt_2 reaches the second encoder
    assert np.abs(without[1] - got[1]).max() > 1e-3  # and so does negative_prompt_2
    info = pipe(PROMPTS, negative_prompts=NEGATIVES, prompt_2=prompts_2, negative_prompt_2=negative_2, seeds=SEEDS)
    assert info[0].info["prompt_2"] == prompts_2[0] and info[0].info["negative_prompt_2"] == ""
    assert info[1].info["prompt_2"] == PROMPTS[1] and info[1].info["negative_prompt_2"] == "dark"


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_image_to_image_matches_diffusers_img2img(folder, img2img_reference, scheduler):
    # 4 steps: strength 0.3 runs the last step only, 0.75 the last three (for dpmpp_2m its first
    # step there is first order, as in diffusers, then second order).
    pipe = load(folder, scheduler=scheduler, steps=4)
    images = input_images()
    for strength in (0.3, 0.75):
        got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, image=images, strength=strength,
                   output_type="np")
        expected = np.concatenate([
            diffusers_call(img2img_reference, pipe, seed, prompt=prompt, negative_prompt=negative,
                           image=Image.fromarray(np.asarray(image)), strength=strength, guidance_scale=5.0)
            for prompt, negative, image, seed in zip(PROMPTS, NEGATIVES, images, SEEDS)
        ])
        assert expected.std() > 0.01
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    info = pipe(PROMPTS[:1], seeds=SEEDS[:1], image=images[1], strength=0.75)[0].info
    assert info["strength"] == 0.75 and info["denoising_steps"] == 3 and info["steps"] == 4


def test_image_to_image_micro_conditioning_follows_the_img2img_pipeline(folder, img2img_reference):
    # StableDiffusionXLImg2ImgPipeline differs from the text-to-image pipeline here: a lone
    # negative_original_size is used (negative_target_size defaults to target_size), and the
    # negative rows take the positive crop corner.
    pipe = load(folder, scheduler="euler", steps=4)
    image = input_images()[1]
    micro = dict(original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(64, 48),
                 negative_original_size=(32, 32), negative_crops_coords_top_left=(2, 2))
    got = pipe(PROMPTS, negative_prompts=["ugly", "blurry"], seeds=SEEDS, image=image, strength=0.75,
               output_type="np", **micro)
    expected = np.concatenate([
        diffusers_call(img2img_reference, pipe, seed, prompt=prompt, negative_prompt=negative, image=image,
                       strength=0.75, guidance_scale=5.0, **micro)
        for prompt, negative, seed in zip(PROMPTS, ["ugly", "blurry"], SEEDS)
    ])
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_bad_image_or_strength_is_a_clear_input_error(folder):
    pipe = load(folder, steps=2)
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    cases = [
        (dict(strength=0.5), "strength is for image-to-image"),
        (dict(image=np.zeros((32, SIZE, 3), dtype=np.uint8)), "image is 64x32 pixels but the pipeline generates 64x64"),
        (dict(image=np.zeros((SIZE, 63, 3), dtype=np.uint8)), "not a multiple of the VAE factor 2"),
        (dict(image=image.astype(np.float32)), r"must be \(H, W, 3\) uint8"),
        (dict(image=[image] * 3), "3 images for 2 prompts"),
        (dict(image=image, strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(image=image, strength=0.4), "strength 0.4 of 2 steps runs no denoising step; use at least 0.5"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            pipe(PROMPTS, **kwargs)
    assert not pipe.warmed_up  # refused before compiling anything


# ---------------------------------------------------------------- inpainting and base + refiner

SMALL = dict(layers_per_block=1, transformer_layers_per_block=(1, 1))


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_pipeline") / "inpainting", seed=1, kind="inpainting",
                              **SMALL)


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_pipeline") / "refiner", seed=4, kind="refiner", **SMALL)


def inpaint_mask() -> Image.Image:
    """White (repaint) rectangles on black, one of them a grey just above the 0.5 threshold (130)
    and one just below (120): binarised as diffusers binarises."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:40, 20:52] = 255
    mask[44:60, 4:20] = 130
    mask[44:60, 30:40] = 120
    return Image.fromarray(mask)


@pytest.mark.parametrize("kind, scheduler", [("inpainting", "euler_a"), ("inpainting", "dpmpp_2m"),
                                             ("base", "ddim"), ("base", "euler_a")])
def test_inpainting_matches_diffusers(folder, inpainting_folder, reference, kind, scheduler):
    from diffusers import StableDiffusionXLInpaintPipeline

    # "inpainting": the 9-channel UNet reads the mask and the masked image's latents; "base": an
    # ordinary 4-channel UNet, the image blended back outside the mask after every step.
    model = inpainting_folder if kind == "inpainting" else folder
    pipe = load(model, scheduler=scheduler, steps=4)
    assert pipe.inpainting_unet == (kind == "inpainting")
    if kind == "inpainting":
        diffusers_pipe = StableDiffusionXLInpaintPipeline.from_pretrained(model)
    else:
        diffusers_pipe = StableDiffusionXLInpaintPipeline(
            **reference.components, force_zeros_for_empty_prompt=reference.config.force_zeros_for_empty_prompt)
    images, mask = input_images(), inpaint_mask()
    # The default strength 0.9999 skips the first of the 4 steps; 1.0 starts from pure noise; 0.5 runs 2.
    for strength in (None, 1.0, 0.5):
        kwargs = {} if strength is None else dict(strength=strength)
        got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, image=images, mask_image=np.asarray(mask),
                   output_type="np", **kwargs)
        expected = np.concatenate([
            diffusers_call(diffusers_pipe, pipe, seed, prompt=prompt, negative_prompt=negative, height=SIZE,
                           width=SIZE, image=Image.fromarray(np.asarray(image)), mask_image=mask, **kwargs)
            for prompt, negative, image, seed in zip(PROMPTS, NEGATIVES, images, SEEDS)
        ])
        assert expected.std() > 0.01
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    info = pipe(PROMPTS[:1], seeds=SEEDS[:1], image=images[1], mask_image=mask)[0].info
    assert info["strength"] == 0.9999 and info["denoising_steps"] == 3 and info["guidance_scale"] == 7.5
    assert info["inpainting"] is True


def test_inpainting_mask_forms_and_blur_match_diffusers(folder, reference):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = load(folder, scheduler="euler", steps=3)
    diffusers_pipe = StableDiffusionXLInpaintPipeline(**reference.components)
    image, mask = input_images()[1], inpaint_mask()
    common = dict(seeds=SEEDS[:1], image=image, strength=0.7, guidance_scale=4.0, output_type="np")
    # A PIL mask, its uint8 array and its float array in [0, 1] are the same mask.
    forms = [pipe(PROMPTS[:1], mask_image=m, **common)
             for m in (mask, np.asarray(mask), np.asarray(mask).astype(np.float32) / 255)]
    np.testing.assert_array_equal(forms[0], forms[1])
    np.testing.assert_array_equal(forms[0], forms[2])
    # mask_blur is diffusers' mask_processor.blur(mask, blur_factor), applied before the pipeline.
    blurred = pipe(PROMPTS[:1], mask_image=mask, mask_blur=6, **common)
    expected = diffusers_call(diffusers_pipe, pipe, SEEDS[0], prompt=PROMPTS[0], image=image, strength=0.7,
                              guidance_scale=4.0, mask_image=diffusers_pipe.mask_processor.blur(mask, blur_factor=6))
    np.testing.assert_allclose(blurred, expected, rtol=0, atol=ATOL)
    assert np.abs(blurred - forms[0]).max() > 1e-3  # the blur changed the binarised mask


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_base_and_refiner_match_the_diffusers_ensemble_recipe(folder, reference, refiner_folder, scheduler):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = load(folder, scheduler=scheduler, steps=4, refiner=refiner_folder)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder)
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    assert pipe.refiner.text_encoder is None and pipe.refiner.requires_aesthetics_score
    # 0.5: two steps each (DPM-Solver++'s schedule also allows 0.7); the refiner's time ids take
    # the aesthetic scores, given here and at their defaults (6, 2.5).
    for fraction, scores in ((0.5, dict(aesthetic_score=7.0, negative_aesthetic_score=1.5)), (0.7, {})):
        got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, denoising_end=fraction, output_type="np",
                   **scores)
        expected = []
        for prompt, negative, seed in zip(PROMPTS, NEGATIVES, SEEDS):
            # The recipe: one generator per image through both pipelines, the latents handed over.
            generator = [torch.Generator().manual_seed(seed)]
            reference.scheduler = diffusers_scheduler(scheduler, pipe.sampler.reference.config)
            refiner.scheduler = diffusers_scheduler(scheduler, pipe.refiner.sampler.reference.config)
            latents = reference(prompt, negative_prompt=negative, num_inference_steps=4, height=SIZE, width=SIZE,
                                denoising_end=fraction, output_type="latent", generator=generator).images
            expected.append(refiner(prompt, negative_prompt=negative, num_inference_steps=4, image=latents,
                                    denoising_start=fraction, generator=generator, output_type="np", **scores).images)
        expected = np.concatenate(expected)
        assert expected.std() > 0.01
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    info = pipe(PROMPTS[:1], seeds=SEEDS[:1], denoising_end=0.5)[0].info
    assert info["refiner"] == str(refiner_folder) and info["high_noise_frac"] == 0.5
    assert (info["base_steps"], info["refiner_steps"]) == (2, 2)


def test_bad_mask_or_refiner_input_is_a_clear_input_error(folder, inpainting_folder, refiner_folder):
    pipe = load(folder, steps=2)
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    cases = [
        (dict(mask_image=mask), "mask_image and mask_blur are for inpainting: give an image too"),
        (dict(image=image, mask_blur=4), "mask_blur is for inpainting: give a mask_image too"),
        (dict(image=image, mask_image=mask[:32]), "the mask is 64x32 pixels but the pipeline generates 64x64"),
        (dict(image=image, mask_image=np.zeros((SIZE, SIZE, 3), dtype=np.uint8)), "mask_image must be a PIL image"),
        (dict(image=image, mask_image=mask.astype(np.float32), mask_blur=4), "mask_blur blurs an 8-bit mask"),
        (dict(image=image, mask_image=mask, mask_blur=-1), "mask_blur must be a positive number"),
        (dict(image=image, mask_image=[mask] * 3), "3 masks for 2 prompts"),
        (dict(denoising_end=0.8), "denoising_end hands the latents over to a refiner"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            pipe(PROMPTS, **kwargs)
    assert not pipe.warmed_up  # refused before compiling anything
    inpainting = load(inpainting_folder, steps=2)
    for kwargs in (dict(), dict(image=image)):
        with pytest.raises(InputError, match="inpainting UNet"):
            inpainting(PROMPTS, **kwargs)
    with pytest.raises(InputError, match="this is a refiner model"):
        load(refiner_folder, steps=2)(PROMPTS)
    with_refiner = load(folder, steps=2, refiner=refiner_folder)
    for kwargs, message in [(dict(denoising_end=1.0), r"must be in \(0, 1\)"),
                            (dict(denoising_end=0.1), "leaves the base no step of 2"),
                            (dict(image=image, denoising_end=0.5), "denoising_end .* is for text-to-image")]:
        with pytest.raises(InputError, match=message):
            with_refiner(PROMPTS, **kwargs)
    assert not with_refiner.warmed_up
