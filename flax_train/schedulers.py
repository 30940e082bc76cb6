"""Sampling schedulers for the JAX sampler: Euler (discrete) and DDIM, deterministic.

Each scheduler is split in two, so the denoising loop can run inside `jax.lax.fori_loop`:

* `make_scheduler(name, scheduler_config, num_inference_steps)` reads, once on the host, every
  number a step needs (timesteps, sigmas or alpha products) into a `SamplerTables`.
* `step(tables, i, model_output, sample)` and `scale_model_input(tables, i, sample)` are pure
  functions of a (possibly traced) step index i: they only index those tables.

The tables are read from diffusers' own `EulerDiscreteScheduler` and `DDIMScheduler` (eta = 0)
after `set_timesteps`, so timestep spacing, `steps_offset`, `init_noise_sigma`, `set_alpha_to_one`,
`clip_sample` and the beta schedule are whatever diffusers makes of the config; the step functions
cover epsilon and v-prediction models. Config options the step functions cannot reproduce
(Karras sigmas, thresholding, ...) raise ValueError rather than being silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Union, get_args

import jax
import jax.numpy as jnp
import numpy as np

from flax_train.diffusion import PREDICTION_TYPES
from sdxl_common.errors import BadInput

Sampler = Literal["euler", "ddim"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
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

# For each config option the device step depends on, the values it reproduces. Anything else
# raises rather than sampling something other than what diffusers would.
_EULER_OPTIONS: dict[str, tuple[Any, ...]] = dict(
    timestep_spacing=SPACINGS,
    prediction_type=PREDICTION_TYPES,
    interpolation_type=("linear",),
    timestep_type=("discrete",),
    final_sigmas_type=("zero",),
    use_karras_sigmas=(False,),
    use_exponential_sigmas=(False,),
    use_beta_sigmas=(False,),
)
_DDIM_OPTIONS: dict[str, tuple[Any, ...]] = dict(
    timestep_spacing=SPACINGS, prediction_type=PREDICTION_TYPES, thresholding=(False,)
)


def _configured(cls: type, options: Mapping[str, tuple[Any, ...]], config: Mapping[str, Any], steps: int) -> Any:
    """A diffusers scheduler of class `cls` built from `config`, its options checked, timesteps set."""
    # A JSON null means "unset": let the class default apply instead of storing None.
    config = {k: v for k, v in config.items() if v is not None}
    try:
        scheduler = cls.from_config(config)
    except (NotImplementedError, ValueError, ImportError) as e:  # unknown beta_schedule, no scipy, ...
        raise BadInput(f"scheduler config not accepted by diffusers' {cls.__name__}: {e}") from e
    for key, allowed in options.items():
        value = scheduler.config.get(key)
        if value is not None and value not in allowed:
            raise BadInput(f"scheduler option {key}={value!r} is not supported by the JAX sampler; use {allowed}")
    num_train = scheduler.config.num_train_timesteps
    if not 1 <= steps <= num_train:
        raise BadInput(f"num_inference_steps must be in [1, {num_train}], got {steps}")
    scheduler.set_timesteps(steps)
    return scheduler


def make_euler(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> EulerTables:
    """Tables of diffusers' EulerDiscreteScheduler after `set_timesteps(num_inference_steps)`."""
    from diffusers import EulerDiscreteScheduler  # imports torch: only when a sampler is built

    scheduler = _configured(EulerDiscreteScheduler, _EULER_OPTIONS, scheduler_config, num_inference_steps)
    n = num_inference_steps
    sigmas = scheduler.sigmas.numpy()
    return EulerTables(
        # Trailing spacing for some n (61, 103, ...) gets one timestep too many from diffusers'
        # arange(T, 0, -T / n), the extra one being -1; keep the n asked for, then the final sigma 0.
        timesteps=scheduler.timesteps.numpy()[:n].astype(np.float32),
        sigmas=np.append(sigmas[:n], sigmas[-1]).astype(np.float32),
        init_noise_sigma=float(scheduler.init_noise_sigma),
        prediction_type=scheduler.config.prediction_type,
    )


def make_ddim(scheduler_config: Mapping[str, Any], num_inference_steps: int) -> DDIMTables:
    """Tables of diffusers' DDIMScheduler after `set_timesteps(num_inference_steps)`, for eta = 0."""
    from diffusers import DDIMScheduler  # imports torch: only when a sampler is built

    scheduler = _configured(DDIMScheduler, _DDIM_OPTIONS, scheduler_config, num_inference_steps)
    cfg = scheduler.config
    timesteps = scheduler.timesteps.numpy()[:num_inference_steps]  # see make_euler for the [:n]
    alphas_cumprod = scheduler.alphas_cumprod.numpy()
    # DDIMScheduler.step always steps back by the stride T // n, whatever the spacing (so with
    # trailing spacing the timestep it moves to is not always the next one in the list).
    prev = timesteps - cfg.num_train_timesteps // scheduler.num_inference_steps
    final = float(scheduler.final_alpha_cumprod)
    return DDIMTables(
        timesteps=timesteps.astype(np.float32),
        alphas_cumprod=alphas_cumprod[timesteps].astype(np.float32),
        alphas_cumprod_prev=np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final).astype(np.float32),
        init_noise_sigma=float(scheduler.init_noise_sigma),
        prediction_type=cfg.prediction_type,
        clip_sample_range=float(cfg.clip_sample_range) if cfg.clip_sample else None,
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
        raise BadInput(f"scheduler {name!r} is not supported; use one of {sorted(_MAKERS)}")
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
