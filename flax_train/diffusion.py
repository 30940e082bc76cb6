"""The training-side diffusion maths: noise schedule, noising, targets, loss weights, timesteps.

Everything here is a pure function of arrays, safe under `jax.jit`: no Python branches on traced
values. String options (prediction type, bias strategy) are static Python arguments.

Latents are NCHW, as diffusers stores them and as the latent cache holds them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, get_args

import jax
import jax.numpy as jnp
import numpy as np
from sdxl_common.errors import BadInput

PredictionType = Literal["epsilon", "v_prediction"]
TimestepBias = Literal["none", "earlier", "later", "range"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
TIMESTEP_BIAS_STRATEGIES: tuple[str, ...] = get_args(TimestepBias)
# The beta schedules diffusers' Euler and DDIM schedulers implement too, so that validation
# sampling can follow the schedule a model is trained on.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# --------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------


def _betas(config: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """The betas (float64) and prediction type that diffusers' DDPMScheduler makes of `config`.

    Computed here rather than by building a DDPMScheduler, whose import (diffusers and torch) would
    cost every training process several seconds of start-up; tests/test_diffusion.py checks every
    schedule against DDPMScheduler. As in diffusers, a schedule is computed in float32 and missing
    keys take DDPMScheduler's defaults; the zero-terminal-SNR rescale is done in float64 (diffusers
    does it in float32, where recovering betas as 1 - abar_t / abar_{t-1} cancels to ~1e-4).
    """
    # A JSON null means "unset": the default applies.
    config = {k: v for k, v in config.items() if v is not None}
    schedule = config.get("beta_schedule", "linear")
    prediction_type = config.get("prediction_type", "epsilon")
    if "trained_betas" not in config and schedule not in BETA_SCHEDULES:
        raise BadInput(f"beta_schedule {schedule!r} is not supported; use one of {BETA_SCHEDULES}")
    if prediction_type not in PREDICTION_TYPES:
        raise BadInput(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
    try:
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if "trained_betas" in config:
            betas = np.asarray(config["trained_betas"], np.float32)
        elif schedule == "linear":
            betas = np.linspace(start, end, n).astype(np.float32)
        elif schedule == "scaled_linear":
            betas = np.square(np.linspace(start**0.5, end**0.5, n).astype(np.float32))
        else:  # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal (2021), betas capped at 0.999
            alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32)
    except (TypeError, ValueError) as e:
        raise BadInput(f"scheduler config: {e}") from e
    if betas.ndim != 1 or betas.size < 2 or not np.all((betas >= 0) & (betas <= 1)):
        raise BadInput(f"scheduler config: the betas must be at least 2 values in [0, 1], got {betas.size}")
    betas = betas.astype(np.float64)
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas, prediction_type


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(abar_t) so the last timestep is pure noise and the first is unchanged
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    abar = np.square((root - last) * first / (first - last))
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep tables of the forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    A pytree of float32 arrays of length num_train_timesteps, so it can be passed into jitted
    functions (or closed over as constants). `prediction_type` is static metadata: the default the
    scheduler config names; the trainer may override it.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    prediction_type: str = dataclasses.field(default="epsilon", metadata=dict(static=True))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers `scheduler_config.json` dict, as diffusers' DDPMScheduler reads it.

        Missing keys take DDPMScheduler's defaults (linear 1e-4 .. 0.02 over 1000 steps). diffusers
        computes the betas in float32; the products and the zero-SNR rescale are done in float64
        here, then every table is stored in float32.
        """
        betas, prediction_type = _betas(config)
        # Zero terminal SNR gives a last beta of exactly 1, hence alphas_cumprod exactly 0 there.
        alphas_cumprod = np.cumprod(1.0 - betas)
        f32 = lambda x: jnp.asarray(x, dtype=jnp.float32)  # noqa: E731
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(alphas_cumprod),
            sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
            prediction_type=prediction_type,
        )


def _per_sample(table: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """table[t] shaped (B, 1, 1, ...) to broadcast against a (B, ...) batch, in its dtype."""
    values = table[t].astype(like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, with t an integer array of shape (B,)."""
    return _per_sample(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _per_sample(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho's v-parameterisation)."""
    return _per_sample(schedule.sqrt_alphas_cumprod, t, x0) * noise - _per_sample(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * x0


def target(
    schedule: NoiseSchedule, prediction_type: PredictionType, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """What the UNet is trained to predict: the noise ("epsilon") or the velocity ("v_prediction")."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")


# --------------------------------------------------------------------------------------------
# Loss weighting
# --------------------------------------------------------------------------------------------


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps t."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float, prediction_type: PredictionType) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per timestep in t.

    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1).
    """
    s = snr(schedule, t)
    if prediction_type == "epsilon":
        # Written as min(1, gamma / snr) so that a zero terminal SNR gives its limit, 1, not 0/0.
        return jnp.minimum(1.0, gamma / s)
    if prediction_type == "v_prediction":
        return jnp.minimum(s, gamma) / (s + 1.0)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")


# --------------------------------------------------------------------------------------------
# Timestep sampling
# --------------------------------------------------------------------------------------------


def timestep_weights(
    num_train_timesteps: int,
    strategy: TimestepBias = "none",
    multiplier: float = 1.0,
    portion: float = 0.25,
    begin: int = 0,
    end: int | None = None,
) -> np.ndarray:
    """Sampling probabilities over timesteps that favour part of the schedule.

    Starts from equal weights; `earlier` multiplies the first `int(portion * T)` timesteps by
    `multiplier`, `later` the last ones, `range` those in [begin, end); then normalises to sum 1.
    `none` gives the uniform distribution. Invalid settings raise ValueError.
    """
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise BadInput(f"timestep bias strategy {strategy!r} is unknown; use one of {TIMESTEP_BIAS_STRATEGIES}")
    n = int(num_train_timesteps)
    weights = np.ones(n, dtype=np.float64)
    if strategy != "none":
        if not multiplier > 0:
            raise BadInput(f"timestep bias multiplier must be > 0, got {multiplier}")
        if strategy == "range":
            end = n if end is None else end
            if not 0 <= begin < end <= n:
                raise BadInput(f"timestep bias range needs 0 <= begin < end <= {n}, got begin={begin}, end={end}")
            biased = slice(begin, end)
        else:
            if not 0 < portion <= 1:
                raise BadInput(f"timestep bias portion must be in (0, 1], got {portion}")
            count = int(portion * n)
            if count == 0:
                raise BadInput(f"timestep bias portion {portion} covers no timestep out of {n}")
            biased = slice(0, count) if strategy == "earlier" else slice(n - count, n)
        weights[biased] *= multiplier
    return (weights / weights.sum()).astype(np.float32)


def sample_timesteps(
    key: jax.Array,
    batch: int,
    weights: jax.Array | np.ndarray | None,
    num_train_timesteps: int | None = None,
) -> jax.Array:
    """Draw `batch` integer timesteps: from `weights` (probabilities over timesteps) or uniformly.

    With weights None, `num_train_timesteps` must be given.
    """
    if weights is None:
        if num_train_timesteps is None:
            raise ValueError("sample_timesteps needs num_train_timesteps when weights is None")
        return jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
    weights = jnp.asarray(weights)
    return jax.random.choice(key, weights.shape[0], (batch,), replace=True, p=weights).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Noise and caption dropout
# --------------------------------------------------------------------------------------------


def sample_noise(
    key: jax.Array, shape: tuple[int, ...], offset: float | jax.Array = 0.0, dtype: Any = jnp.float32
) -> jax.Array:
    """Standard normal noise for NCHW latents, plus `offset` times a per-image, per-channel constant.

    The offset ("noise offset") lets the model learn to change an image's mean brightness, which
    noise with exactly zero mean per channel never asks of it.
    """
    if len(shape) != 4:
        raise ValueError(f"sample_noise expects an NCHW shape, got {shape}")
    key_pixels, key_offset = jax.random.split(key)
    # Drawn flat and reshaped: XLA's CPU compiler takes seconds on a rank-4 jax.random.normal and a
    # fraction of that on a rank-1 one; the values are equally standard normal.
    noise = jax.random.normal(key_pixels, (math.prod(shape),), dtype).reshape(shape)
    per_channel = jax.random.normal(key_offset, (shape[0] * shape[1],), dtype).reshape(shape[0], shape[1], 1, 1)
    return noise + jnp.asarray(offset, dtype) * per_channel


def drop_captions(
    key: jax.Array,
    prompt_embeds: jax.Array,
    pooled: jax.Array,
    empty_prompt_embeds: jax.Array,
    empty_pooled: jax.Array,
    p: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Replace each sample's text conditioning with the empty prompt's, with probability p.

    Drawn afresh every step (so every image is seen both captioned and uncaptioned over a run),
    which is what classifier-free guidance needs the model to learn. `prompt_embeds` is (B, L, D),
    `pooled` (B, P); the empty-prompt embeddings are (L, D) / (P,) or with a leading 1.
    """
    drop = jax.random.bernoulli(key, p, (prompt_embeds.shape[0],))
    empty = jnp.broadcast_to(empty_prompt_embeds.astype(prompt_embeds.dtype), prompt_embeds.shape)
    empty_p = jnp.broadcast_to(empty_pooled.astype(pooled.dtype), pooled.shape)
    return (
        jnp.where(drop[:, None, None], empty, prompt_embeds),
        jnp.where(drop[:, None], empty_p, pooled),
    )
