"""The training-side diffusion maths: noise schedule, noising, targets, loss weights, timesteps.

Everything here is a pure function of arrays, safe under `jax.jit`: no Python branches on traced
values. String options (prediction type, bias strategy) are static Python arguments.

Latents are NCHW, as diffusers stores them and as the latent cache holds them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")
BIAS_STRATEGIES = ("none", "earlier", "later", "range")


# --------------------------------------------------------------------------------------------
# Noise schedule
# --------------------------------------------------------------------------------------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal's cosine alpha-bar, discretised: beta_i = 1 - abar(t_{i+1}) / abar(t_i).
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_train_timesteps + 1) / num_train_timesteps
    abar = np.array([alpha_bar(t) for t in steps])
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023, Algorithm 1: shift sqrt(alpha_bar) so the last step is pure noise (SNR 0),
    # then rescale so the first step keeps its original value.
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas_from_config(config: Mapping[str, Any]) -> np.ndarray:
    """The betas (float64, on the host) a diffusers scheduler config describes.

    Keys missing from `config` take diffusers' scheduler defaults (linear 1e-4 .. 0.02 over 1000
    steps). Computed in float64: diffusers computes in float32, which agrees to about
    1e-6 relative except where 1 - alpha_bar is itself near float32 resolution (the first steps).
    """
    cfg = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    cfg.update({k: v for k, v in config.items() if v is not None})
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
    elif cfg["beta_schedule"] == "linear":
        betas = np.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=np.float64)
    elif cfg["beta_schedule"] == "scaled_linear":
        # Linear in sqrt(beta): the latent-diffusion schedule SD and SDXL were trained with.
        betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(
            f"beta_schedule {cfg['beta_schedule']!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2"
        )
    if cfg.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


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
        """Build from a diffusers `scheduler_config.json` dict (the keys that define the schedule)."""
        betas = betas_from_config(config)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prediction_type = config.get("prediction_type") or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
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


def target(schedule: NoiseSchedule, prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
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


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
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
    strategy: str = "none",
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
    if strategy not in BIAS_STRATEGIES:
        raise ValueError(f"timestep bias strategy {strategy!r} is unknown; use one of {BIAS_STRATEGIES}")
    n = int(num_train_timesteps)
    weights = np.ones(n, dtype=np.float64)
    if strategy != "none":
        if not multiplier > 0:
            raise ValueError(f"timestep bias multiplier must be > 0, got {multiplier}")
        if strategy == "range":
            end = n if end is None else end
            if not 0 <= begin < end <= n:
                raise ValueError(f"timestep bias range needs 0 <= begin < end <= {n}, got begin={begin}, end={end}")
            biased = slice(begin, end)
        else:
            if not 0 < portion <= 1:
                raise ValueError(f"timestep bias portion must be in (0, 1], got {portion}")
            count = int(portion * n)
            if count == 0:
                raise ValueError(f"timestep bias portion {portion} covers no timestep out of {n}")
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
