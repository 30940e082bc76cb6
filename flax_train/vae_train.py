"""Brief training of a small AutoencoderKL, so that the demo's latents decode to real images.

The demo pipeline is built offline with random weights; a random VAE would turn every sample into
noise. `train_vae` trains the folder's Flax VAE on the demo images for about a minute on a CPU and
writes it back in place, with `scaling_factor` chosen as SDXL's was: 1 / std of the latents, so that
the latents the UNet learns on have about unit variance.

    report = train_vae("runs/demo/model/vae", images)   # uint8 NHWC
    python -m flax_train.vae_train --image-size 64      # measures the demo-sized run
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from flax_train import models
from flax_train.models.vae import AutoencoderKL, sample_posterior

# Tuned so that the demo-sized run (64x64 images, the tiny pipeline's VAE) takes about a minute
# on a 2-core CPU and decodes the synthetic shapes with the right colours (see `main`).
DEFAULT_STEPS = 300
DEFAULT_BATCH_SIZE = 8
DEFAULT_LEARNING_RATE = 2e-3
# The KL term is a per-element mean, like the reconstruction term. It only has to keep the
# latents from drifting to large or tiny scales; much larger weights blur the reconstructions.
DEFAULT_KL_WEIGHT = 1e-3


def _check_images(images: Any, in_channels: int, factor: int) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array (N, H, W, C) of uint8, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != in_channels:
        raise ValueError(f"images must have shape (N, H, W, {in_channels}), got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: the VAE needs at least one image to train on")
    height, width = images.shape[1:3]
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not divisible by the VAE's downsampling factor {factor}")
    return images


def _to_model_input(images: np.ndarray) -> jax.Array:
    """uint8 NHWC -> float32 NCHW in [-1, 1], the VAE's input convention."""
    return jnp.asarray(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), jnp.float32) / 127.5 - 1.0


def _to_uint8(x: jax.Array) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    pixels = np.asarray(jnp.clip((x + 1.0) * 127.5, 0.0, 255.0).round())
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


def _batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def vae_loss(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    x: jax.Array,
    key: jax.Array,
    kl_weight: float,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """MSE + L1 of decode(posterior sample) against the input, plus `kl_weight` x KL(posterior || N(0, 1)).

    Decoding a sample rather than the mean teaches the decoder to tolerate latents that are a little
    off, which is what a briefly trained UNet produces. L1 sharpens the flat colour regions that
    MSE alone leaves soft.
    """
    vae = nnx.merge(graphdef, params, rest)
    mean, logvar = vae.encode(x)
    recon = vae.decode(sample_posterior(mean, logvar, key)).astype(jnp.float32)
    error = recon - x
    reconstruction = jnp.mean(jnp.square(error)) + jnp.mean(jnp.abs(error))
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return reconstruction + kl_weight * kl, (reconstruction, kl)


def train_step(
    state: tuple[nnx.State, optax.OptState],
    pixels: jax.Array,
    indices: jax.Array,
    key: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    kl_weight: float,
) -> tuple[tuple[nnx.State, optax.OptState], dict[str, jax.Array]]:
    params, opt_state = state
    k_flip, k_sample = jax.random.split(key)
    x = pixels[indices]
    # Mirror images: the shapes and colours look the same either way, and the VAE sees more variety.
    flip = jax.random.bernoulli(k_flip, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[..., ::-1], x)
    (loss, (reconstruction, kl)), grads = jax.value_and_grad(vae_loss, has_aux=True)(
        params, graphdef, rest, x, k_sample, kl_weight
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), {"loss": loss, "reconstruction": reconstruction, "kl": kl}


def encode_means(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Posterior means (N, latent_channels, h, w) of uint8 NHWC images, unscaled."""
    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
    return np.concatenate([np.asarray(encode(state, _to_model_input(images[b]))) for b in _batches(len(images), batch_size)])


def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 NHWC images through encode (posterior mean) and decode, back to uint8 NHWC."""
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    images = _check_images(images, vae.config["in_channels"], factor)
    graphdef, state = nnx.split(vae)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return np.concatenate([_to_uint8(apply(state, _to_model_input(images[b]))) for b in _batches(len(images), batch_size)])


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images (inf when they are identical)."""
    mse = np.mean(np.square(original.astype(np.float64) - reconstruction.astype(np.float64))) / 255.0**2
    return math.inf if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def train_vae(
    vae_folder: str | Path,
    images: np.ndarray,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Trains the AutoencoderKL in `vae_folder` on uint8 NHWC `images` and writes it back in place.

    The config's `scaling_factor` becomes 1 / std of the posterior means of `images`, so scaled
    latents have unit variance. Returns {"initial_loss", "final_loss", "psnr", "scaling_factor",
    "latent_mean", "latent_std", "steps", "seconds"}; `psnr` (dB) is of the posterior-mean
    reconstructions of `images` after training.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    if not kl_weight >= 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight!r}")
    started = time.perf_counter()
    vae = models.load(vae_folder)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{vae_folder} holds a {type(vae).__name__}, not an AutoencoderKL")
    factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    images = _check_images(images, vae.config["in_channels"], factor)

    # Cosine decay to 0 after a short warm-up: a high rate early, a settled model at the end.
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(20, steps // 10 + 1), steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    state = (params, optimizer.init(params))
    step = jax.jit(
        functools.partial(train_step, graphdef=graphdef, rest=rest, optimizer=optimizer, kl_weight=kl_weight),
        donate_argnums=0,
    )

    pixels = _to_model_input(images)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    batch = min(batch_size, len(images))
    order = np.empty(0, np.int64)
    history: list[jax.Array] = []
    bar = tqdm(range(steps), desc="train vae", unit="step", disable=not progress)
    for i in bar:
        # Epochs of shuffled images, each image once per epoch.
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        indices, order = order[:batch], order[batch:]
        state, step_metrics = step(state, pixels, jnp.asarray(indices), jax.random.fold_in(key, i))
        history.append(step_metrics["loss"])
        # Read the loss one step late, so the host never waits on the step it just queued.
        if len(history) > 1 and (i % 10 == 0 or i == steps - 1):
            bar.set_postfix(loss=f"{float(history[-2]):.4f}")
    losses = np.asarray(jax.device_get(history), np.float64)
    nnx.update(vae, state[0])

    means = encode_means(vae, images, batch_size=max(batch_size, 32))
    latent_std = float(means.std())
    if not math.isfinite(latent_std) or latent_std <= 0:
        raise FloatingPointError(f"latent std {latent_std} after training; the VAE diverged (losses end {losses[-5:]})")
    scaling_factor = 1.0 / latent_std
    vae.config = models.freeze_config({**models.thaw_config(vae.config), "scaling_factor": scaling_factor})
    models.save(vae, vae_folder)

    # The first and last few losses are averaged: single-batch losses are noisy.
    window = max(1, min(10, steps // 5))
    return {
        "initial_loss": float(losses[:window].mean()),
        "final_loss": float(losses[-window:].mean()),
        "psnr": psnr(images, reconstruct(vae, images)),
        "scaling_factor": scaling_factor,
        "latent_mean": float(means.mean()),
        "latent_std": latent_std,
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }
