"""The samplers both halves offer, and every number their steps need, computed once on the host.

diffusers' schedulers keep a Python step counter, index their sigma lists with it, pick the solver
order with `if`s and look timesteps up with `nonzero()`: compiled, every step would be a different
program. Here the diffusers scheduler (configured from the model folder) is asked once for its
timesteps and sigmas, and they are turned into per-step coefficient tables. A device step (torch
in `xla_infer.schedulers`, JAX in `flax_train.schedulers`) reads row i of each table, so every step
is the same program for every prompt and seed.

The coefficients are diffusers' own expressions, evaluated as diffusers evaluates them inside
`step` (on 0-d float32 tensors, one step at a time), so the device steps agree with diffusers to
float32 rounding; tests/test_xla_schedulers.py and tests/test_schedulers.py check each sampler.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from sdxl_common.errors import BadInput

SCHEDULER_NAMES = ("euler", "euler_a", "ddim", "dpmpp_2m")

# Accepted spellings, so users can also name the diffusers class they know.
_ALIASES = {
    "euler": "euler",
    "eulerdiscretescheduler": "euler",
    "euler_a": "euler_a",
    "euler_ancestral": "euler_a",
    "eulerancestraldiscretescheduler": "euler_a",
    "ddim": "ddim",
    "ddimscheduler": "ddim",
    "dpmpp_2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpmsolver++": "dpmpp_2m",
    "dpmsolvermultistepscheduler": "dpmpp_2m",
}


class UnsupportedScheduler(BadInput):
    """The scheduler name or its configuration has no device implementation here."""


def canonical_name(name: str) -> str:
    """The scheduler's short name ("euler", "euler_a", "ddim", "dpmpp_2m") for any accepted spelling."""
    key = name.strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise UnsupportedScheduler(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return _ALIASES[key]


def diffusers_scheduler(name: str, config: Mapping[str, Any]):
    """The diffusers scheduler `name` stands for, configured from a model folder's scheduler config.

    This is the reference the device samplers reproduce, and where their tables come from.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
    from diffusers import EulerDiscreteScheduler

    name = canonical_name(name)
    # A JSON null means "unset": let the class default apply instead of storing None.
    config = {k: v for k, v in config.items() if v is not None}
    try:
        if name == "euler":
            return EulerDiscreteScheduler.from_config(config)
        if name == "euler_a":
            return EulerAncestralDiscreteScheduler.from_config(config)
        if name == "ddim":
            return DDIMScheduler.from_config(config)
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    except (NotImplementedError, ValueError, ImportError) as e:  # unknown beta_schedule, no scipy, ...
        raise UnsupportedScheduler(f"scheduler config not accepted by diffusers ({name}): {e}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerTables:
    """Everything a device step of sampler `name` reads, as float32 numpy arrays.

    `timesteps` (n,) are what the UNet is told at each step; `coefficients` hold one row per step
    (the `add_noise_*` ones n + 1, see `_add_noise_rows`); `orders` is the solver order of each
    step for multistep samplers (folded into the coefficients). `reference` is the configured
    diffusers scheduler the tables were read from.
    """

    name: str
    prediction_type: str
    init_noise_sigma: float
    timesteps: np.ndarray
    coefficients: dict[str, np.ndarray]
    reference: Any
    clip_range: float | None = None  # DDIM: clip the predicted clean sample to +-clip_range
    orders: tuple[int, ...] = ()

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def needs_step_noise(self) -> bool:
        """Ancestral sampling adds one fresh Gaussian per step and image."""
        return self.name == "euler_a"

    @property
    def scales_input(self) -> bool:
        """The Euler samplers divide the UNet input by sqrt(sigma^2 + 1)."""
        return self.name in ("euler", "euler_a")


def make_tables(name: str, scheduler_config: Mapping[str, Any], steps: int) -> SamplerTables:
    """The tables of sampler `name` (any spelling `canonical_name` accepts) for `steps` steps."""
    name = canonical_name(name)
    reference = diffusers_scheduler(name, scheduler_config)
    cfg = reference.config
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise UnsupportedScheduler(f"prediction_type {cfg.prediction_type!r} is not supported (epsilon or v_prediction)")
    if cfg.get("thresholding"):
        raise UnsupportedScheduler(f"{name} with thresholding is not supported")
    if name == "dpmpp_2m":
        if cfg.use_flow_sigmas or cfg.variance_type is not None:
            raise UnsupportedScheduler("DPM-Solver++ with flow sigmas or learned variance is not supported")
        if cfg.solver_type not in ("midpoint", "heun"):
            raise UnsupportedScheduler(f"DPM-Solver++ solver_type {cfg.solver_type!r} is not supported")
    steps = int(steps)
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise UnsupportedScheduler(f"num_inference_steps must be in [1, {cfg.num_train_timesteps}], got {steps}")
    try:
        reference.set_timesteps(steps, device="cpu")
    except ValueError as e:  # an unknown timestep_spacing, ...
        raise UnsupportedScheduler(f"scheduler config not accepted by diffusers ({name}): {e}") from None
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(0)
    timesteps = reference.timesteps.cpu()
    # Trailing spacing for some n (61, 103, ...) gets one timestep too many from diffusers'
    # arange(T, 0, -T / n), the extra one being -1: keep the n steps asked for.
    if len(timesteps) not in (steps, steps + 1):
        raise UnsupportedScheduler(f"{type(reference).__name__} produced {len(timesteps)} timesteps for {steps} steps")
    import torch

    sigmas = getattr(reference, "sigmas", None)
    if sigmas is not None:  # the last sigma is where the final step lands (0, or sigma_min)
        sigmas = torch.cat([sigmas[:steps], sigmas[-1:]])
    rows = _ROWS[name](reference, steps, timesteps[:steps], sigmas)
    init = reference.init_noise_sigma
    clip = float(cfg.clip_sample_range) if name == "ddim" and cfg.clip_sample else None
    return SamplerTables(
        name=name,
        prediction_type=cfg.prediction_type,
        init_noise_sigma=float(init),
        timesteps=timesteps[:steps].to(torch.float32).numpy(),
        coefficients={**rows, **_add_noise_rows(reference, steps)},
        reference=reference,
        clip_range=clip,
        orders=tuple(_dpm_orders(cfg, steps)) if name == "dpmpp_2m" else (),
    )


def _per_step(fn: Callable[[int], dict[str, Any]], steps: int) -> dict[str, np.ndarray]:
    # Evaluate on 0-d float32 tensors one step at a time, exactly as diffusers does inside `step`:
    # vectorised log/exp kernels may round differently from the scalar path.
    import torch

    rows = [fn(i) for i in range(steps)]
    return {k: torch.stack([row[k].reshape(()).to(torch.float32) for row in rows]).numpy() for k in rows[0]}


def _euler_rows(reference, steps, timesteps, sigmas) -> dict[str, np.ndarray]:
    # EulerDiscreteScheduler with s_churn = 0 (diffusers' default and the SDXL pipeline's).
    def row(i):
        sigma = sigmas[i]
        sigma_hat = sigma * (0.0 + 1)  # gamma is 0 without churn
        return {
            "sigma_hat": sigma_hat,
            "sigma_to": sigmas[i + 1],
            "dt": sigmas[i + 1] - sigma_hat,
            "input_divisor": (sigma**2 + 1) ** 0.5,
            "v_out": -sigma / (sigma**2 + 1) ** 0.5,
            "v_skip": sigma**2 + 1,
        }

    return _per_step(row, steps)


def _euler_ancestral_rows(reference, steps, timesteps, sigmas) -> dict[str, np.ndarray]:
    # An Euler step to sigma_down, then fresh noise of size sigma_up.
    def row(i):
        sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        return {
            "sigma_hat": sigma_from,
            "sigma_to": sigma_down,
            "dt": sigma_down - sigma_from,
            "sigma_up": sigma_up,
            "input_divisor": (sigma_from**2 + 1) ** 0.5,
            "v_out": -sigma_from / (sigma_from**2 + 1) ** 0.5,
            "v_skip": sigma_from**2 + 1,
        }

    return _per_step(row, steps)


def _ddim_rows(reference, steps, timesteps, sigmas) -> dict[str, np.ndarray]:
    # DDIMScheduler with eta = 0 (the SDXL pipeline's default): deterministic. Its step always moves
    # back by the stride T // n, whatever the spacing (so with trailing spacing the timestep it
    # moves to is not always the next one in the list).
    stride = reference.config.num_train_timesteps // reference.num_inference_steps

    def row(i):
        t = int(timesteps[i])
        prev_t = t - stride
        alpha_prod_t = reference.alphas_cumprod[t]
        alpha_prod_t_prev = reference.alphas_cumprod[prev_t] if prev_t >= 0 else reference.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        # diffusers subtracts std_dev_t**2 = (eta * ...)**2, which is exactly 0 for eta = 0.
        return {
            "sqrt_alpha": alpha_prod_t**0.5,
            "sqrt_beta": beta_prod_t**0.5,
            "sqrt_alpha_prev": alpha_prod_t_prev**0.5,
            "direction": (1 - alpha_prod_t_prev) ** 0.5,
        }

    return _per_step(row, steps)


def _dpm_orders(cfg, steps: int) -> list[int]:
    def order(i):
        lower_order_final = i == steps - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and steps < 15) or cfg.final_sigmas_type == "zero"
        )
        return 1 if i == 0 or lower_order_final else 2

    return [order(i) for i in range(steps)]


def _dpmpp_2m_rows(reference, steps, timesteps, sigmas) -> dict[str, np.ndarray]:
    # DPMSolverMultistepScheduler, algorithm dpmsolver++, order 2 ("DPM++ 2M"). A first-order step
    # (the first and, as diffusers decides, the last) has a zero second-order coefficient, so every
    # step is the same program; the device step carries the previous data prediction.
    import torch

    cfg = reference.config
    orders = _dpm_orders(cfg, steps)

    def alpha_sigma(sigma):
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    def lam(sigma):
        alpha_t, sigma_t = alpha_sigma(sigma)
        return torch.log(alpha_t) - torch.log(sigma_t)

    def row(i):
        alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        h = lam(sigmas[i + 1]) - lam(sigmas[i])
        data_coef = alpha_t * (torch.exp(-h) - 1.0)
        zero = torch.zeros(())
        if orders[i] == 1:
            inv_r0, d1_coef = zero, zero
        else:
            h_0 = lam(sigmas[i]) - lam(sigmas[i - 1])
            inv_r0 = 1.0 / (h_0 / h)
            if cfg.solver_type == "midpoint":
                d1_coef = -(0.5 * data_coef)
            else:
                d1_coef = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        return {"alpha_s": alpha_s0, "sigma_s": sigma_s0, "sample_coef": sigma_t / sigma_s0,
                "data_coef": data_coef, "inv_r0": inv_r0, "d1_coef": d1_coef}

    return _per_step(row, steps)


_ROWS = {"euler": _euler_rows, "euler_a": _euler_ancestral_rows, "ddim": _ddim_rows, "dpmpp_2m": _dpmpp_2m_rows}


def _add_noise_rows(reference, steps: int) -> dict[str, np.ndarray]:
    # Image-to-image starts from the scheduler's add_noise(sample, noise, t) at its first step.
    # Every add_noise here is linear, a * sample + b * noise, so a and b per step are read off
    # diffusers' own add_noise on ones and zeros (exactly: multiplying by 1 or 0 and adding 0
    # round nothing), after set_begin_index(i) as the img2img pipeline does.
    import torch

    one, zero = torch.ones(1), torch.zeros(1)

    def row(i):
        if hasattr(reference, "set_begin_index"):
            reference.set_begin_index(i)
        timestep = reference.timesteps[i: i + 1]
        return {"add_noise_sample": reference.add_noise(one, zero, timestep),
                "add_noise_noise": reference.add_noise(zero, one, timestep)}

    rows = _per_step(row, steps)
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(0)
    # Row `steps` (1, 0) is the clean sample: inpainting with a 4-channel UNet blends in the image
    # noised to the next step's level after every step, and the clean image after the last one
    # (1 * x + 0 * noise is x exactly).
    return {"add_noise_sample": np.append(rows["add_noise_sample"], np.float32(1)),
            "add_noise_noise": np.append(rows["add_noise_noise"], np.float32(0))}
