"""The samplers' steps in JAX: Euler, Euler ancestral, DDIM (eta = 0) and DPM-Solver++ 2M.

`make_scheduler(name, scheduler_config, steps)` reads every number a step needs once on the host
(`sdxl_common.samplers`, shared with xla_infer); `scale_model_input` and `step` are pure functions
of a (possibly traced) step index i that only index those tables, so the denoising loop runs
inside `jax.lax.fori_loop`. They cover epsilon and v-prediction models.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, get_args

import jax
import jax.numpy as jnp

from sdxl_common import samplers
from sdxl_common.samplers import SamplerTables

Sampler = Literal["euler", "euler_a", "ddim", "dpmpp_2m"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
assert SAMPLERS == samplers.SCHEDULER_NAMES
State = dict[str, jax.Array]


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int) -> SamplerTables:
    """Host-side tables for `name` (a name of SAMPLERS, or the diffusers class name) and a step count.

    `scheduler_config` is a diffusers scheduler config dict (e.g. `scheduler/scheduler_config.json`
    of an SDXL folder); keys it leaves out take the chosen scheduler's diffusers defaults.
    """
    return samplers.make_tables(name, scheduler_config, num_inference_steps)


def _at(tables: SamplerTables, key: str, i: int | jax.Array) -> jax.Array:
    # jnp indexing accepts a traced index (numpy's would not).
    return jnp.asarray(tables.coefficients[key], dtype=jnp.float32)[i]


def initial_state(tables: SamplerTables, latents: jax.Array) -> State:
    """What a step carries to the next: DPM-Solver++ 2M's previous prediction of the clean sample."""
    return {"prev_data": jnp.zeros(latents.shape, jnp.float32)} if tables.name == "dpmpp_2m" else {}


def scale_model_input(tables: SamplerTables, i: int | jax.Array, sample: jax.Array) -> jax.Array:
    """The UNet input at step i: the Euler samplers divide by sqrt(sigma^2 + 1), the others pass it."""
    if tables.scales_input:
        return (sample / _at(tables, "input_divisor", i)).astype(sample.dtype)
    return sample


def step(tables: SamplerTables, i: int | jax.Array, model_output: jax.Array, sample: jax.Array,
         state: State, noise: jax.Array | None = None) -> tuple[jax.Array, State]:
    """One denoising step from step i's sample to the next one, computed in float32; returns the
    next sample and state. `noise`: the step's standard Gaussian, for euler_a only."""
    model_output = model_output.astype(jnp.float32)
    x = sample.astype(jnp.float32)
    if tables.name in ("euler", "euler_a"):
        prev = _euler_step(tables, i, model_output, x)
        if tables.needs_step_noise:
            if noise is None:
                raise ValueError("euler_a needs the step's noise")
            prev = prev + noise.astype(jnp.float32) * _at(tables, "sigma_up", i)
    elif tables.name == "ddim":
        prev = _ddim_step(tables, i, model_output, x)
    else:
        prev, state = _dpmpp_2m_step(tables, i, model_output, x, state)
    return prev.astype(sample.dtype), state


def _euler_step(tables: SamplerTables, i: int | jax.Array, model_output: jax.Array, x: jax.Array) -> jax.Array:
    # x_to = x + (x - x0_hat) / sigma * (sigma_to - sigma), with x0_hat eliminated algebraically:
    # going through x0_hat would subtract two numbers of size sigma * |noise| to get a small one,
    # which loses float32 digits when sigma is large (4096 at zero terminal SNR). sigma_to is the
    # next sigma (Euler) or sigma_down (ancestral, which then adds noise of size sigma_up).
    sigma = _at(tables, "sigma_hat", i)
    sigma_to = _at(tables, "sigma_to", i)
    if tables.prediction_type == "epsilon":
        # x0_hat = x - sigma * eps, so the derivative is eps itself.
        return x + (sigma_to - sigma) * model_output
    # v_prediction, with x in the sigma (variance-exploding) parameterisation:
    # x0_hat = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1).
    x_coef = (1.0 + sigma * sigma_to) / (sigma**2 + 1.0)
    v_coef = (sigma_to - sigma) / jnp.sqrt(sigma**2 + 1.0)
    return x_coef * x + v_coef * model_output


def _ddim_step(tables: SamplerTables, i: int | jax.Array, model_output: jax.Array, x: jax.Array) -> jax.Array:
    # x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat
    sqrt_alpha, sqrt_beta = _at(tables, "sqrt_alpha", i), _at(tables, "sqrt_beta", i)
    if tables.prediction_type == "epsilon":
        x0 = (x - sqrt_beta * model_output) / sqrt_alpha
        eps = model_output
    else:  # v_prediction
        x0 = sqrt_alpha * x - sqrt_beta * model_output
        eps = sqrt_alpha * model_output + sqrt_beta * x
    if tables.clip_range is not None:
        x0 = jnp.clip(x0, -tables.clip_range, tables.clip_range)
    return _at(tables, "sqrt_alpha_prev", i) * x0 + _at(tables, "direction", i) * eps


def _dpmpp_2m_step(tables: SamplerTables, i: int | jax.Array, model_output: jax.Array, x: jax.Array,
                   state: State) -> tuple[jax.Array, State]:
    # The first-order update from the data prediction, plus the second-order correction from its
    # change since the previous step (zero coefficients at first-order steps).
    alpha_s, sigma_s = _at(tables, "alpha_s", i), _at(tables, "sigma_s", i)
    if tables.prediction_type == "epsilon":
        data = (x - sigma_s * model_output) / alpha_s
    else:
        data = alpha_s * x - sigma_s * model_output
    first_order = _at(tables, "sample_coef", i) * x - _at(tables, "data_coef", i) * data
    d1 = _at(tables, "inv_r0", i) * (data - state["prev_data"])
    return first_order + _at(tables, "d1_coef", i) * d1, {"prev_data": data}
