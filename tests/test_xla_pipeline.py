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

from flax_train.demo.tiny import save_tiny_pipeline
from xla_infer import SCHEDULER_NAMES, InputError, Pipeline
from xla_infer.schedulers import diffusers_scheduler

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
