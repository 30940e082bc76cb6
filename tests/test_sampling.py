"""The JAX SDXL sampler against diffusers' StableDiffusionXLPipeline on a tiny random SDXL.

The UNet is diffusers' own torch module, called from inside the jitted JAX loop through
`jax.pure_callback`, so any difference comes from the sampler: guidance, micro-conditioning,
batching, the scheduler tables and steps.
"""
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from flax_train import sampling, schedulers
from flax_train.models import clip
from flax_train.demo.tiny import build_tokenizer, tiny_component_configs

from sdxl_common.samplers import diffusers_scheduler
from test_schedulers import SDXL_SCHEDULER_CONFIG

LATENT_SIZE = 8


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    tokenizer = CLIPTokenizer.from_pretrained(build_tokenizer(folder / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(build_tokenizer(folder / "tokenizer_2", pad_token="!"))
    configs = tiny_component_configs(
        vocab_size=len(tokenizer), image_size=2 * LATENT_SIZE, layers_per_block=1, transformer_layers_per_block=(1, 1)
    )
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**configs["vae"]).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**configs["unet"]).eval(),
        scheduler=diffusers_scheduler("euler", SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _torch_unet_fn(unet):
    """A JAX-callable stand-in for the Flax UNet that runs the torch UNet on the host."""

    def host_call(sample, timesteps, context, text_embeds, time_ids):
        with torch.no_grad():
            out = unet(
                torch.from_numpy(np.asarray(sample)),
                torch.from_numpy(np.asarray(timesteps)),
                encoder_hidden_states=torch.from_numpy(np.asarray(context)),
                added_cond_kwargs={
                    "text_embeds": torch.from_numpy(np.asarray(text_embeds)),
                    "time_ids": torch.from_numpy(np.asarray(time_ids)),
                },
            ).sample
        return out.numpy()

    def unet_fn(sample, timesteps, context, *, text_embeds, time_ids):
        result = jax.ShapeDtypeStruct(sample.shape, jnp.float32)
        return jax.pure_callback(host_call, result, sample, timesteps, context, text_embeds, time_ids)

    return unet_fn


def test_make_time_ids():
    ids = sampling.make_time_ids((1024, 768), (16, 32), (512, 512), batch=3)
    assert ids.shape == (3, 6) and ids.dtype == jnp.float32
    np.testing.assert_array_equal(ids, np.tile([1024, 768, 16, 32, 512, 512], (3, 1)))
    with pytest.raises(ValueError, match="corner"):
        sampling.make_time_ids((1024, 768), (16,), (512, 512), batch=1)


# (scheduler, overrides of the SDXL config, steps, batch, separate negative micro-conditioning)
SAMPLER_CASES = [
    ("euler", {}, 4, 1, True),
    ("euler", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 3, 2, False),
    ("ddim", {}, 4, 1, True),
    ("ddim", {"timestep_spacing": "trailing"}, 3, 2, False),
    ("dpmpp_2m", {}, 4, 1, True),
    ("dpmpp_2m", {"prediction_type": "v_prediction"}, 3, 2, False),
]


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=lambda c: f"{c[0]}-{c[2]}steps-batch{c[3]}-{'-'.join(c[1])}")
def test_sample_latents_matches_sdxl_pipeline(pipeline, case):
    name, overrides, steps, batch, separate_negative = case
    config = dict(SDXL_SCHEDULER_CONFIG, **overrides)
    unet_config = pipeline.unet.config
    seq_len, context_dim = 77, unet_config.cross_attention_dim
    pooled_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim

    rng = np.random.default_rng(1)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    latents = normal(batch, 4, LATENT_SIZE, LATENT_SIZE)
    prompt_embeds, pooled = normal(batch, seq_len, context_dim), normal(batch, pooled_dim)
    neg_prompt_embeds, neg_pooled = normal(batch, seq_len, context_dim), normal(batch, pooled_dim)
    size, crop, target = (96, 80), (8, 4), (64, 64)
    # diffusers repeats [negative, positive] time ids per sample, which pairs them with the right
    # embeddings only for batch 1; with a larger batch both must be equal for it to be correct.
    neg_size, neg_crop, neg_target = ((48, 40), (0, 0), (64, 48)) if separate_negative else (size, crop, target)
    guidance = 5.0

    pipeline.scheduler = diffusers_scheduler(name, config)
    expected = pipeline(
        prompt_embeds=torch.from_numpy(prompt_embeds),
        pooled_prompt_embeds=torch.from_numpy(pooled),
        negative_prompt_embeds=torch.from_numpy(neg_prompt_embeds),
        negative_pooled_prompt_embeds=torch.from_numpy(neg_pooled),
        latents=torch.from_numpy(latents),
        height=2 * LATENT_SIZE,
        width=2 * LATENT_SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        original_size=size,
        crops_coords_top_left=crop,
        target_size=target,
        negative_original_size=neg_size,
        negative_crops_coords_top_left=neg_crop,
        negative_target_size=neg_target,
        output_type="latent",
    ).images.numpy()

    tables = schedulers.make_scheduler(name, config, steps)
    sample = jax.jit(functools.partial(sampling.sample_latents, _torch_unet_fn(pipeline.unet), tables))
    time_ids = sampling.make_time_ids(size, crop, target, batch)
    neg_time_ids = sampling.make_time_ids(neg_size, neg_crop, neg_target, 1)  # batch 1 broadcasts

    def run(guidance_scale, neg_time_ids):
        out = sample(latents, prompt_embeds, pooled, time_ids, neg_prompt_embeds, neg_pooled, neg_time_ids,
                     guidance_scale)
        return np.asarray(out)

    tolerance = 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(run(guidance, neg_time_ids), expected, rtol=1e-5, atol=tolerance)

    # The comparison must be sensitive to what is being tested: guidance and the negative inputs.
    assert np.abs(run(1.0, neg_time_ids) - expected).max() > 1000 * tolerance
    if separate_negative:
        assert np.abs(run(guidance, time_ids) - expected).max() > 10 * tolerance


def _wrap_text_encoder(model):
    """A stand-in for the Flax CLIP encoders: same outputs, as JAX arrays, from token ids."""

    def call(ids):
        with torch.no_grad():
            out = model(torch.from_numpy(np.asarray(ids)), output_hidden_states=True)
        return SimpleNamespace(
            hidden_states=tuple(jnp.asarray(h.numpy()) for h in out.hidden_states),
            text_embeds=jnp.asarray(out.text_embeds.numpy()) if hasattr(out, "text_embeds") else None,
        )

    return call


def test_encode_prompts_matches_pipeline(pipeline):
    prompts = ["a red circle on a blue background", "two green cats"]
    with torch.no_grad():
        expected, _, expected_pooled, _ = pipeline.encode_prompt(
            prompts, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )

    def tokenize(tokenizer):
        return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids

    embeds, pooled = clip.encode_prompts(
        _wrap_text_encoder(pipeline.text_encoder),
        _wrap_text_encoder(pipeline.text_encoder_2),
        tokenize(pipeline.tokenizer),
        tokenize(pipeline.tokenizer_2),
    )
    assert embeds.shape == tuple(expected.shape) and pooled.shape == tuple(expected_pooled.shape)
    np.testing.assert_allclose(embeds, expected.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pooled, expected_pooled.numpy(), rtol=1e-6, atol=1e-6)


class _HostVAE:
    """A stand-in for the Flax VAE: the torch VAE's decoder behind `decode` and `config`."""

    def __init__(self, vae):
        self.vae = vae
        self.config = dict(vae.config)
        self.decoded = None

    def decode(self, z):
        self.decoded = np.asarray(z)
        with torch.no_grad():
            return jnp.asarray(self.vae.decode(torch.from_numpy(self.decoded)).sample.numpy())


def test_decode_latents_matches_pipeline_postprocessing(pipeline):
    latents = np.random.default_rng(2).standard_normal((2, 4, LATENT_SIZE, LATENT_SIZE)).astype(np.float32)
    vae = _HostVAE(pipeline.vae)
    images = np.asarray(sampling.decode_latents(vae, jnp.asarray(latents)))
    np.testing.assert_allclose(vae.decoded, latents / pipeline.vae.config.scaling_factor, rtol=1e-6)

    with torch.no_grad():
        decoded = pipeline.vae.decode(torch.from_numpy(latents) / pipeline.vae.config.scaling_factor).sample
    expected = np.stack([np.asarray(im) for im in pipeline.image_processor.postprocess(decoded, output_type="pil")])
    assert images.dtype == np.uint8 and images.shape == expected.shape == (2, 2 * LATENT_SIZE, 2 * LATENT_SIZE, 3)
    np.testing.assert_array_equal(images, expected)
    assert len(np.unique(images)) > 10


def test_decode_latents_unnormalises_with_latents_mean_and_std():
    mean, std, factor = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 1.0, 4.0], 0.5
    seen = {}

    def decode(z):
        seen["z"] = np.asarray(z)
        return z[:, :3] * 0.25

    vae = SimpleNamespace(config={"scaling_factor": factor, "latents_mean": mean, "latents_std": std}, decode=decode)
    latents = np.random.default_rng(3).standard_normal((1, 4, 4, 4)).astype(np.float32)
    images = np.asarray(sampling.decode_latents(vae, latents))
    z = latents * np.reshape(std, (1, 4, 1, 1)) / factor + np.reshape(mean, (1, 4, 1, 1))
    np.testing.assert_allclose(seen["z"], z, rtol=1e-6)
    decoded = seen["z"][:, :3] * np.float32(0.25)
    expected = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(images, expected)
    assert images.min() == 0 and images.max() == 255  # both ends of the clipping are exercised
