"""The JAX SDXL sampler: text encoding, the guided denoising loop, VAE decoding.

The pieces are written against plain callables and duck-typed modules, so they take the Flax
models of `flax_train.models` as they are, and stand-ins in tests:

* `encode_prompts(text_encoder, text_encoder_2, ids1, ids2)`: the encoders return objects with
  `.hidden_states` (embeddings output, then every layer's) and, for encoder 2, `.text_embeds`.
* `sample_latents(unet_fn, tables, ...)`: `unet_fn(sample, timesteps, encoder_hidden_states, *,
  text_embeds, time_ids) -> prediction`, NCHW in and out, the Flax UNet's calling convention.
* `decode_latents(vae, latents)`: `vae.decode(z)` maps latents (already divided by the scaling
  factor) to NCHW images in [-1, 1]; `vae.config` holds `scaling_factor`.

All of it is jittable; the denoising loop is one `jax.lax.fori_loop` whose body is the same graph
at every step (the scheduler tables are indexed by the traced step index).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from flax_train import schedulers
from flax_train.schedulers import SamplerTables

UNetFn = Callable[..., jax.Array]


def make_time_ids(
    original_size: Sequence[int],
    crop_top_left: Sequence[int],
    target_size: Sequence[int],
    batch: int,
) -> jax.Array:
    """SDXL's micro-conditioning, (batch, 6) float32: [orig_h, orig_w, crop_top, crop_left, target_h, target_w].

    Sizes are (height, width) in pixels; the crop corner is (top, left).
    """
    if not len(original_size) == len(crop_top_left) == len(target_size) == 2:
        raise ValueError(
            f"expected (h, w) sizes and a (top, left) corner, got {original_size}, {crop_top_left}, {target_size}"
        )
    values = [*original_size, *crop_top_left, *target_size]
    return jnp.tile(jnp.asarray(values, dtype=jnp.float32)[None, :], (batch, 1))


def encode_prompts(
    text_encoder: Any, text_encoder_2: Any, ids1: jax.Array, ids2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Token ids of both tokenizers, (B, 77) each -> (prompt_embeds (B, 77, D1 + D2), pooled (B, P)).

    SDXL conditions on the penultimate hidden states of both encoders (before the final layer norm),
    concatenated along channels, and on the projected pooled output of encoder 2.
    """
    out1 = text_encoder(ids1)
    out2 = text_encoder_2(ids2)
    prompt_embeds = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
    return prompt_embeds, out2.text_embeds


def _to_batch(x: jax.Array, batch: int) -> jax.Array:
    """Broadcast an input with a leading batch dimension of 1 or `batch` to `batch` rows."""
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, (batch,) + x.shape[1:])


def sample_latents(
    unet_fn: UNetFn,
    tables: SamplerTables,
    latents: jax.Array,
    prompt_embeds: jax.Array,
    pooled_embeds: jax.Array,
    time_ids: jax.Array,
    neg_prompt_embeds: jax.Array,
    neg_pooled_embeds: jax.Array,
    neg_time_ids: jax.Array,
    guidance_scale: float | jax.Array,
) -> jax.Array:
    """Denoise `latents` with classifier-free guidance over all steps of `tables`.

    `latents` (B, 4, h, w) is unit-variance noise; it is scaled by the scheduler's
    `init_noise_sigma` here, as diffusers' pipelines do with the `latents` they are given.
    Text inputs are (B, L, D) / (B, P) / (B, 6); any of them may have a batch of 1 instead of B.
    Each step makes one UNet call on the doubled batch [negative; positive] and combines the two
    predictions as uncond + guidance_scale * (cond - uncond). Returns the final latents (not
    divided by the VAE scaling factor).
    """
    batch = latents.shape[0]
    context = jnp.concatenate([_to_batch(neg_prompt_embeds, batch), _to_batch(prompt_embeds, batch)])
    text_embeds = jnp.concatenate([_to_batch(neg_pooled_embeds, batch), _to_batch(pooled_embeds, batch)])
    all_time_ids = jnp.concatenate([_to_batch(neg_time_ids, batch), _to_batch(time_ids, batch)])
    timesteps = jnp.asarray(tables.timesteps, dtype=jnp.float32)

    def denoise_step(i: jax.Array, x: jax.Array) -> jax.Array:
        model_input = schedulers.scale_model_input(tables, i, jnp.concatenate([x, x]))
        t = jnp.broadcast_to(timesteps[i], (2 * batch,))
        prediction = unet_fn(model_input, t, context, text_embeds=text_embeds, time_ids=all_time_ids)
        uncond, cond = jnp.split(prediction.astype(jnp.float32), 2)
        guided = uncond + guidance_scale * (cond - uncond)
        return schedulers.step(tables, i, guided, x)

    x = latents * jnp.asarray(tables.init_noise_sigma, latents.dtype)
    return jax.lax.fori_loop(0, timesteps.shape[0], denoise_step, x)


def decode_latents(vae: Any, latents: jax.Array, scaling_factor: float | None = None) -> jax.Array:
    """Latents (B, 4, h, w) -> uint8 images (B, H, W, 3), as diffusers' SDXL pipeline decodes them.

    Divides by the VAE's scaling factor (or, for VAEs whose config has `latents_mean` and
    `latents_std`, un-normalises with those), decodes, and maps [-1, 1] to 0..255.
    """
    config = getattr(vae, "config", None) or {}
    if scaling_factor is None:
        scaling_factor = config["scaling_factor"]
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        z = latents * jnp.reshape(jnp.asarray(std), shape) / scaling_factor + jnp.reshape(jnp.asarray(mean), shape)
    else:
        z = latents / scaling_factor
    images = vae.decode(z).astype(jnp.float32)
    images = jnp.clip(images / 2 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(images, (0, 2, 3, 1)) * 255).astype(jnp.uint8)
