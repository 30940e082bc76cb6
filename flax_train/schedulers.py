"""Sampling schedulers for the JAX sampler: Euler (discrete) and DDIM, deterministic.

Each scheduler is split in two, so the denoising loop can run inside `jax.lax.fori_loop`:

* `make_scheduler(name, scheduler_config, num_inference_steps)` computes, once on the host with
  numpy, every number a step needs (timesteps, sigmas or alpha products): a `SamplerTables`.
* `step(tables, i, model_output, sample)` and `scale_model_input(tables, i, sample)` are pure
  functions of a (possibly traced) step index i: they only index those tables.

They follow diffusers' `EulerDiscreteScheduler` and `DDIMScheduler` (eta = 0): the same timestep
spacings (`leading`, `trailing`, `linspace`), `steps_offset`, `init_noise_sigma`, `set_alpha_to_one`,
`clip_sample`, for epsilon and v-prediction models. The tables are computed in float64 and stored
in float32. Config options outside that (Karras sigmas, thresholding, ...) raise ValueError rather
than being silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_train.diffusion import PREDICTION_TYPES, betas_from_config

SPACINGS = ("leading", "trailing", "linspace")


def _static(default: Any = None) -> Any:
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EulerTables:
    """Euler: x_{i+1} = x_i + (x_i - x0_hat) / sigma_i * (sigma_{i+1} - sigma_i)."""

    timesteps: np.ndarray  # (n,) float32, what the UNet is told
    sigmas: np.ndarray  # (n + 1,) float32, noise level before each step; the last is 0
    init_noise_sigma: float = _static(1.0)
    prediction_type: str = _static("epsilon")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMTables:
    """DDIM (eta = 0): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat."""

    timesteps: np.ndarray  # (n,) float32 (integer values)
    alphas_cumprod: np.ndarray  # (n,) float32, abar at each step's timestep
    alphas_cumprod_prev: np.ndarray  # (n,) float32, abar the step moves to
    init_noise_sigma: float = _static(1.0)
    prediction_type: str = _static("epsilon")
    clip_sample_range: float | None = _static(None)  # clip x0_hat to +-range; None: no clipping


SamplerTables = Union[EulerTables, DDIMTables]


# --------------------------------------------------------------------------------------------
# Host side: tables
# --------------------------------------------------------------------------------------------

# The defaults of diffusers' scheduler classes, for keys a config leaves out (as `from_config` does).
_EULER_DEFAULTS = dict(timestep_spacing="linspace", steps_offset=0, prediction_type="epsilon")
_DDIM_DEFAULTS = dict(
    timestep_spacing="leading",
    steps_offset=0,
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=True,
)


def _with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(defaults)
    cfg.update({k: v for k, v in config.items() if v is not None})
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {cfg['prediction_type']!r} is not supported; use one of {PREDICTION_TYPES}")
    if cfg["timestep_spacing"] not in SPACINGS:
        raise ValueError(f"timestep_spacing {cfg['timestep_spacing']!r} is not supported; use one of {SPACINGS}")
    return cfg


def _reject(cfg: Mapping[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    value = cfg.get(key)
    if value is not None and value not in allowed:
        raise ValueError(f"scheduler option {key}={value!r} is not supported by the JAX sampler")


def _timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
    """Timesteps from noisiest to cleanest (float64), as diffusers spaces them.

    `linspace` may give fractional values; the callers round where their scheduler does.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        # Multiples of the integer stride, shifted by steps_offset: SDXL's config gives 1, 1 + k, ...
        return (np.arange(n) * (num_train // n))[::-1].astype(np.float64) + steps_offset
    # trailing: count down from the last training step. Written as T - k * T / n rather than
    # diffusers' arange(T, 0, -T / n), which yields an extra timestep for some n (61, 103, ...).
    return np.round(num_train - np.arange(n) * (num_train / n)) - 1


def _check_steps(num_inference_steps: int, num_train: int) -> None:
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(f"num_inference_steps must be in [1, {num_train}], got {num_inference_steps}")


def make_euler(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> EulerTables:
    """Tables of diffusers' EulerDiscreteScheduler after `set_timesteps(num_inference_steps)`."""
    cfg = _with_defaults(scheduler_config, _EULER_DEFAULTS)
    _reject(cfg, "interpolation_type", ("linear",))
    _reject(cfg, "timestep_type", ("discrete",))
    _reject(cfg, "final_sigmas_type", ("zero",))
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        _reject(cfg, key, (False,))
    betas = betas_from_config(cfg)
    num_train = len(betas)
    _check_steps(num_inference_steps, num_train)

    alphas_cumprod = np.cumprod(1.0 - betas)
    if cfg.get("rescale_betas_zero_snr", False):
        # As diffusers' Euler does: SNR exactly 0 would make the first sigma infinite.
        alphas_cumprod[-1] = 2.0**-24
    train_sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)

    timesteps = _timesteps(cfg["timestep_spacing"], num_train, num_inference_steps, cfg["steps_offset"])
    # diffusers keeps linspace timesteps in float32 before interpolating; do the same.
    timesteps = timesteps.astype(np.float32)
    sigmas = np.interp(timesteps.astype(np.float64), np.arange(num_train), train_sigmas)
    sigmas = np.concatenate([sigmas, [0.0]])

    max_sigma = float(sigmas.max())
    # Euler's sample is x_t / sqrt(abar_t), whose std is sqrt(sigma^2 + 1) for a unit-variance x_t.
    # diffusers scales the initial noise by exactly that for leading spacing and by sigma (nearly
    # equal at sigma_max) for the others; we do the same to reproduce its trajectories.
    if cfg["timestep_spacing"] == "leading":
        init_noise_sigma = (max_sigma**2 + 1.0) ** 0.5
    else:
        init_noise_sigma = max_sigma
    return EulerTables(
        timesteps=timesteps,
        sigmas=sigmas.astype(np.float32),
        init_noise_sigma=float(np.float32(init_noise_sigma)),
        prediction_type=cfg["prediction_type"],
    )


def make_ddim(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> DDIMTables:
    """Tables of diffusers' DDIMScheduler after `set_timesteps(num_inference_steps)`, for eta = 0."""
    cfg = _with_defaults(scheduler_config, _DDIM_DEFAULTS)
    _reject(cfg, "thresholding", (False,))
    betas = betas_from_config(cfg)
    num_train = len(betas)
    _check_steps(num_inference_steps, num_train)
    alphas_cumprod = np.cumprod(1.0 - betas)

    timesteps = _timesteps(cfg["timestep_spacing"], num_train, num_inference_steps, cfg["steps_offset"])
    timesteps = np.round(timesteps).astype(np.int64)
    # diffusers' DDIM always steps back by the stride T // n, whatever the spacing (so with
    # trailing spacing the timestep it moves to is not always the next one in the list).
    prev = timesteps - num_train // num_inference_steps
    final = 1.0 if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    prev_alphas = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final)
    return DDIMTables(
        timesteps=timesteps.astype(np.float32),
        alphas_cumprod=alphas_cumprod[timesteps].astype(np.float32),
        alphas_cumprod_prev=prev_alphas.astype(np.float32),
        init_noise_sigma=1.0,
        prediction_type=cfg["prediction_type"],
        clip_sample_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
    )


_MAKERS = {
    "euler": make_euler,
    "EulerDiscreteScheduler": make_euler,
    "ddim": make_ddim,
    "DDIMScheduler": make_ddim,
}


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int) -> SamplerTables:
    """Host-side tables for `name` ("euler" or "ddim", or the diffusers class name) and a step count.

    `scheduler_config` is a diffusers scheduler config dict (e.g. `scheduler/scheduler_config.json`
    of an SDXL folder); keys it leaves out take the chosen scheduler's diffusers defaults.
    """
    if name not in _MAKERS:
        raise ValueError(f"scheduler {name!r} is not supported; use one of {sorted(_MAKERS)}")
    return _MAKERS[name](scheduler_config, int(num_inference_steps))


# --------------------------------------------------------------------------------------------
# Device side: pure step functions of a (possibly traced) step index
# --------------------------------------------------------------------------------------------


def _at(table: np.ndarray | jax.Array, i: int | jax.Array) -> jax.Array:
    # jnp indexing accepts a traced index (numpy's would not) and reads the table as float32.
    return jnp.asarray(table, dtype=jnp.float32)[i]


def scale_model_input(tables: SamplerTables, i: int | jax.Array, sample: jax.Array) -> jax.Array:
    """The UNet input at step i: Euler divides by sqrt(sigma^2 + 1), DDIM passes it through."""
    if isinstance(tables, EulerTables):
        sigma = _at(tables.sigmas, i)
        return (sample / jnp.sqrt(sigma**2 + 1.0)).astype(sample.dtype)
    return sample


def step(tables: SamplerTables, i: int | jax.Array, model_output: jax.Array, sample: jax.Array) -> jax.Array:
    """One denoising step from step i's sample to the next one, computed in float32."""
    model_output = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    if isinstance(tables, EulerTables):
        prev = _euler_step(tables, i, model_output, x)
    elif isinstance(tables, DDIMTables):
        prev = _ddim_step(tables, i, model_output, x)
    else:
        raise TypeError(f"expected EulerTables or DDIMTables, got {type(tables).__name__}")
    return prev.astype(sample.dtype)


def _euler_step(tables: EulerTables, i: int | jax.Array, model_output: jax.Array, x: jax.Array) -> jax.Array:
    # x_next = x + (x - x0_hat) / sigma * (sigma_next - sigma), with x0_hat eliminated
    # algebraically: going through x0_hat would subtract two numbers of size sigma * |noise| to get
    # a small one, which loses float32 digits when sigma is large (4096 at zero terminal SNR).
    sigma = _at(tables.sigmas, i)
    sigma_next = _at(tables.sigmas, i + 1)
    if tables.prediction_type == "epsilon":
        # x0_hat = x - sigma * eps, so the derivative is eps itself.
        return x + (sigma_next - sigma) * model_output
    # v_prediction, with x in the sigma (variance-exploding) parameterisation:
    # x0_hat = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1).
    x_coef = (1.0 + sigma * sigma_next) / (sigma**2 + 1.0)
    v_coef = (sigma_next - sigma) / jnp.sqrt(sigma**2 + 1.0)
    return x_coef * x + v_coef * model_output


def _ddim_step(tables: DDIMTables, i: int | jax.Array, model_output: jax.Array, x: jax.Array) -> jax.Array:
    alpha = _at(tables.alphas_cumprod, i)
    alpha_prev = _at(tables.alphas_cumprod_prev, i)
    sqrt_alpha, sqrt_one_minus_alpha = jnp.sqrt(alpha), jnp.sqrt(1.0 - alpha)
    if tables.prediction_type == "epsilon":
        x0 = (x - sqrt_one_minus_alpha * model_output) / sqrt_alpha
        eps = model_output
    else:  # v_prediction
        x0 = sqrt_alpha * x - sqrt_one_minus_alpha * model_output
        eps = sqrt_alpha * model_output + sqrt_one_minus_alpha * x
    if tables.clip_sample_range is not None:
        x0 = jnp.clip(x0, -tables.clip_sample_range, tables.clip_sample_range)
    return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1.0 - alpha_prev) * eps
