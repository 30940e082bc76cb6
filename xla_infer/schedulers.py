"""Sampler arithmetic that runs on the device from tables computed once on the host.

diffusers' schedulers keep a Python step counter, index their sigma lists with it, pick the solver
order with `if`s and look timesteps up with `nonzero()`: on an XLA device every step would then be
a different graph, or a host round trip. Here the host asks the diffusers scheduler (configured
from the model folder) for its timesteps and sigmas once, turns them into per-step coefficient
tables, and the device step reads row `i` of each table with a gather on a device-side step
counter. Every step is then the same graph, for every prompt and seed.

The per-step formulas are diffusers' own (same operations in the same order, on float32), so for
the same model outputs the results agree to float32 rounding; tests/test_xla_schedulers.py checks
each sampler against its diffusers scheduler.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

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

State = dict[str, torch.Tensor]


class UnsupportedScheduler(BadInput):
    """The scheduler name or its configuration has no device implementation here."""


def canonical_name(name: str) -> str:
    """The scheduler's short name ("euler", "euler_a", "ddim", "dpmpp_2m") for any accepted spelling."""
    key = name.strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise UnsupportedScheduler(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return _ALIASES[key]


def diffusers_scheduler(name: str, config: dict[str, Any]):
    """The diffusers scheduler `name` stands for, configured from a model folder's scheduler config.

    This is the reference our device samplers reproduce, and where their host tables come from.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
    from diffusers import EulerDiscreteScheduler

    name = canonical_name(name)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


def _per_step(fn: Callable[[int], tuple[torch.Tensor, ...]], steps: int) -> list[torch.Tensor]:
    # Evaluate on 0-d float32 tensors one step at a time, exactly as diffusers does inside `step`:
    # vectorised log/exp kernels may round differently from the scalar path.
    rows = [fn(i) for i in range(steps)]
    return [torch.stack([row[k].reshape(()).to(torch.float32) for row in rows]) for k in range(len(rows[0]))]


def _at(table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Row `step` of a per-step table, by gather (same graph for every step). `step` has shape (1,)."""
    return table.index_select(0, step)


class DeviceSampler:
    """A sampler whose `step` is one fixed graph: tables on the device, step index a device tensor.

    Build with `make_sampler(name, scheduler_config, steps)`. `timesteps` (host, float32) are the UNet
    timesteps per step; `init_noise_sigma` scales the initial Gaussian latents; samplers with
    `needs_step_noise` take one fresh Gaussian per step and image (drawn on the host from each
    image's own generator, so seeds reproduce diffusers' per-image generator streams).
    """

    name: str = ""
    needs_step_noise: bool = False
    scales_input: bool = True

    def __init__(self, reference, steps: int):
        self.reference = reference
        self.steps = steps
        self.prediction_type = reference.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UnsupportedScheduler(
                f"prediction_type {self.prediction_type!r} is not supported (epsilon or v_prediction)"
            )
        reference.set_timesteps(steps, device="cpu")
        if hasattr(reference, "set_begin_index"):
            reference.set_begin_index(0)
        if len(reference.timesteps) != steps:
            raise UnsupportedScheduler(
                f"{type(reference).__name__} produced {len(reference.timesteps)} timesteps for {steps} steps"
            )
        self.timesteps = reference.timesteps.to(torch.float32).clone()
        init = reference.init_noise_sigma
        self.init_noise_sigma = (init if torch.is_tensor(init) else torch.tensor(init)).to(torch.float32)
        self.tables: dict[str, torch.Tensor] = {"timesteps": self.timesteps}
        self.tables.update(self._build_tables())
        self.tables.update(self._add_noise_tables())

    def _build_tables(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _add_noise_tables(self) -> dict[str, torch.Tensor]:
        # Image-to-image starts from the scheduler's add_noise(sample, noise, t) at its first step.
        # Every add_noise here is linear, a * sample + b * noise, so a and b per step are read off
        # diffusers' own add_noise on ones and zeros (exactly: multiplying by 1 or 0 and adding 0
        # round nothing), after set_begin_index(i) as the img2img pipeline does.
        ref = self.reference
        one, zero = torch.ones(1), torch.zeros(1)

        def row(i):
            if hasattr(ref, "set_begin_index"):
                ref.set_begin_index(i)
            timestep = ref.timesteps[i: i + 1]
            return ref.add_noise(one, zero, timestep), ref.add_noise(zero, one, timestep)

        sample_coef, noise_coef = _per_step(row, self.steps)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(0)
        # Row `steps` (1, 0) is the clean sample: inpainting with a 4-channel UNet blends in the image
        # noised to the next step's level after every step, and the clean image after the last one
        # (1 * x + 0 * noise is x exactly).
        sample_coef = torch.cat([sample_coef, torch.ones(1)])
        noise_coef = torch.cat([noise_coef, torch.zeros(1)])
        return {"add_noise_sample": sample_coef, "add_noise_noise": noise_coef}

    def to(self, device: torch.device | str) -> "DeviceSampler":
        """Move the tables to `device` (once, before any step)."""
        self.tables = {k: v.to(device) for k, v in self.tables.items()}
        return self

    def timestep(self, step: torch.Tensor) -> torch.Tensor:
        """The UNet timestep for `step`, shape (1,)."""
        return _at(self.tables["timesteps"], step)

    def scale_input(self, sample: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """What diffusers' `scale_model_input` does: the sample divided by sqrt(sigma^2 + 1) for Euler."""
        if not self.scales_input:
            return sample
        return sample / _at(self.tables["input_divisor"], step)

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """diffusers' `add_noise` at the timestep of `step`: image-to-image's starting latents."""
        return _at(self.tables["add_noise_sample"], step) * sample + _at(self.tables["add_noise_noise"], step) * noise

    def initial_state(self, latents: torch.Tensor) -> State:
        """Host-side per-batch state (multistep history); empty for one-step samplers."""
        return {}

    def step(
        self, sample: torch.Tensor, model_output: torch.Tensor, step: torch.Tensor, state: State,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One denoising step in float32; returns the next sample and state."""
        raise NotImplementedError


class EulerSampler(DeviceSampler):
    """EulerDiscreteScheduler with s_churn = 0 (diffusers' default and the SDXL pipeline's)."""

    name = "euler"

    def _build_tables(self) -> dict[str, torch.Tensor]:
        sigmas = self.reference.sigmas

        def row(i):
            sigma = sigmas[i]
            sigma_hat = sigma * (0.0 + 1)  # gamma is 0 without churn
            return (
                sigma_hat,
                sigmas[i + 1] - sigma_hat,
                (sigma**2 + 1) ** 0.5,
                -sigma / (sigma**2 + 1) ** 0.5,
                sigma**2 + 1,
            )

        sigma_hat, dt, input_divisor, v_out, v_skip = _per_step(row, self.steps)
        return {"sigma_hat": sigma_hat, "dt": dt, "input_divisor": input_divisor, "v_out": v_out, "v_skip": v_skip}

    def _pred_original(self, sample, model_output, step):
        t = self.tables
        if self.prediction_type == "epsilon":
            return sample - _at(t["sigma_hat"], step) * model_output
        return model_output * _at(t["v_out"], step) + (sample / _at(t["v_skip"], step))

    def step(self, sample, model_output, step, state, noise=None):
        sample = sample.to(torch.float32)
        pred_original = self._pred_original(sample, model_output, step)
        derivative = (sample - pred_original) / _at(self.tables["sigma_hat"], step)
        return sample + derivative * _at(self.tables["dt"], step), state


class EulerAncestralSampler(EulerSampler):
    """EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then fresh noise of size sigma_up."""

    name = "euler_a"
    needs_step_noise = True

    def _build_tables(self) -> dict[str, torch.Tensor]:
        sigmas = self.reference.sigmas

        def row(i):
            sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
            sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            return (
                sigma_from,
                sigma_down - sigma_from,
                sigma_up,
                (sigma_from**2 + 1) ** 0.5,
                -sigma_from / (sigma_from**2 + 1) ** 0.5,
                sigma_from**2 + 1,
            )

        sigma, dt, sigma_up, input_divisor, v_out, v_skip = _per_step(row, self.steps)
        return {
            "sigma_hat": sigma, "dt": dt, "sigma_up": sigma_up,
            "input_divisor": input_divisor, "v_out": v_out, "v_skip": v_skip,
        }

    def step(self, sample, model_output, step, state, noise=None):
        if noise is None:
            raise ValueError("euler_a needs the step's noise")
        sample, state = super().step(sample, model_output, step, state)
        return sample + noise * _at(self.tables["sigma_up"], step), state


class DDIMSampler(DeviceSampler):
    """DDIMScheduler with eta = 0 (the SDXL pipeline's default): deterministic."""

    name = "ddim"
    scales_input = False

    def __init__(self, reference, steps: int):
        if reference.config.thresholding:
            raise UnsupportedScheduler("DDIM with thresholding is not supported")
        super().__init__(reference, steps)
        self.clip_range = float(reference.config.clip_sample_range) if reference.config.clip_sample else None

    def _build_tables(self) -> dict[str, torch.Tensor]:
        ref = self.reference
        stride = ref.config.num_train_timesteps // ref.num_inference_steps
        timesteps = [int(t) for t in ref.timesteps]

        def row(i):
            t = timesteps[i]
            prev_t = t - stride
            alpha_prod_t = ref.alphas_cumprod[t]
            alpha_prod_t_prev = ref.alphas_cumprod[prev_t] if prev_t >= 0 else ref.final_alpha_cumprod
            beta_prod_t = 1 - alpha_prod_t
            # diffusers subtracts std_dev_t**2 = (eta * ...)**2, which is exactly 0 for eta = 0.
            return alpha_prod_t**0.5, beta_prod_t**0.5, alpha_prod_t_prev**0.5, (1 - alpha_prod_t_prev) ** 0.5

        sqrt_alpha, sqrt_beta, sqrt_alpha_prev, direction = _per_step(row, self.steps)
        return {
            "sqrt_alpha": sqrt_alpha, "sqrt_beta": sqrt_beta,
            "sqrt_alpha_prev": sqrt_alpha_prev, "direction": direction,
        }

    def step(self, sample, model_output, step, state, noise=None):
        t = self.tables
        sqrt_alpha, sqrt_beta = _at(t["sqrt_alpha"], step), _at(t["sqrt_beta"], step)
        if self.prediction_type == "epsilon":
            pred_original = (sample - sqrt_beta * model_output) / sqrt_alpha
            pred_epsilon = model_output
        else:
            pred_original = sqrt_alpha * sample - sqrt_beta * model_output
            pred_epsilon = sqrt_alpha * model_output + sqrt_beta * sample
        if self.clip_range is not None:
            pred_original = pred_original.clamp(-self.clip_range, self.clip_range)
        direction = _at(t["direction"], step) * pred_epsilon
        return _at(t["sqrt_alpha_prev"], step) * pred_original + direction, state


class DPMSolverPP2MSampler(DeviceSampler):
    """DPMSolverMultistepScheduler, algorithm dpmsolver++, order 2 ("DPM++ 2M").

    The solver order per step (first order at the first step and, as diffusers decides, at the last)
    is folded into the tables: a first-order step has a zero second-order coefficient, so every
    step runs the same graph. The state carries the previous data prediction.
    """

    name = "dpmpp_2m"
    scales_input = False

    def __init__(self, reference, steps: int):
        cfg = reference.config
        if cfg.thresholding:
            raise UnsupportedScheduler("DPM-Solver++ with thresholding is not supported")
        if cfg.use_flow_sigmas or cfg.variance_type is not None:
            raise UnsupportedScheduler("DPM-Solver++ with flow sigmas or learned variance is not supported")
        if cfg.solver_type not in ("midpoint", "heun"):
            raise UnsupportedScheduler(f"DPM-Solver++ solver_type {cfg.solver_type!r} is not supported")
        super().__init__(reference, steps)

    def _build_tables(self) -> dict[str, torch.Tensor]:
        ref, cfg, steps = self.reference, self.reference.config, self.steps
        sigmas = ref.sigmas

        def alpha_sigma(sigma):
            alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
            return alpha_t, sigma * alpha_t

        def lam(sigma):
            alpha_t, sigma_t = alpha_sigma(sigma)
            return torch.log(alpha_t) - torch.log(sigma_t)

        def order(i):
            lower_order_final = i == steps - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and steps < 15) or cfg.final_sigmas_type == "zero"
            )
            return 1 if i == 0 or lower_order_final else 2

        def row(i):
            alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
            alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
            h = lam(sigmas[i + 1]) - lam(sigmas[i])
            data_coef = alpha_t * (torch.exp(-h) - 1.0)
            zero = torch.zeros(())
            if order(i) == 1:
                inv_r0, d1_coef = zero, zero
            else:
                h_0 = lam(sigmas[i]) - lam(sigmas[i - 1])
                inv_r0 = 1.0 / (h_0 / h)
                if cfg.solver_type == "midpoint":
                    d1_coef = -(0.5 * data_coef)
                else:
                    d1_coef = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
            return alpha_s0, sigma_s0, sigma_t / sigma_s0, data_coef, inv_r0, d1_coef

        alpha_s, sigma_s, sample_coef, data_coef, inv_r0, d1_coef = _per_step(row, steps)
        self.orders = [order(i) for i in range(steps)]
        return {
            "alpha_s": alpha_s, "sigma_s": sigma_s, "sample_coef": sample_coef,
            "data_coef": data_coef, "inv_r0": inv_r0, "d1_coef": d1_coef,
        }

    def initial_state(self, latents: torch.Tensor) -> State:
        # has_prev is 0 until a step has run: an image-to-image call starts at a later step, where the
        # table holds a second-order row, but diffusers' first step there is first order (it has no
        # previous prediction yet). Multiplying by 1 afterwards changes no bit.
        return {
            "prev_data": torch.zeros_like(latents, dtype=torch.float32),
            "has_prev": torch.zeros((latents.shape[0], 1, 1, 1), dtype=torch.float32),
        }

    def step(self, sample, model_output, step, state, noise=None):
        t = self.tables
        alpha_s, sigma_s = _at(t["alpha_s"], step), _at(t["sigma_s"], step)
        if self.prediction_type == "epsilon":
            data = (sample - sigma_s * model_output) / alpha_s
        else:
            data = alpha_s * sample - sigma_s * model_output
        sample = sample.to(torch.float32)
        first_order = _at(t["sample_coef"], step) * sample - _at(t["data_coef"], step) * data
        d1 = _at(t["inv_r0"], step) * (data - state["prev_data"]) * state["has_prev"]
        # 1 computed from the input, not a new constant: under SPMD it then keeps the input's batch
        # sharding (a constant comes out replicated, and the next step would be another graph).
        new_state = {"prev_data": data, "has_prev": state["has_prev"] * 0.0 + 1.0}
        return first_order + _at(t["d1_coef"], step) * d1, new_state


def draw_noise(
    seeds: list[int], latent_shape: tuple[int, int, int], steps: int, step_noise: bool, initial: int = 1,
    start: int = 0,
) -> tuple[torch.Tensor | None, ...]:
    """`initial` Gaussian tensors (B, C, h, w), then, for ancestral samplers, per-step noise (steps, B, C, h, w).

    Each image has its own CPU generator seeded with its seed, drawn in the order diffusers draws
    from a list of generators, so an image depends only on its seed, never on its batch neighbours,
    and matches diffusers given the same seeds. Text-to-image draws the initial latents first
    (initial=1); image-to-image draws the VAE posterior sample, then the noise add_noise adds
    (initial=2). Then one draw per step run: a call starting at step `start` draws for steps
    start..steps-1 only, and the rows before `start` (never read) are zero.
    Returns the `initial` tensors followed by the step noise (None without step noise).
    """
    firsts, segments = draw_streams(seeds, latent_shape, steps, initial, [(start, steps)] if step_noise else [])
    return (*firsts, segments[0] if step_noise else None)


def draw_streams(
    seeds: list[int], latent_shape: tuple[int, int, int], steps: int, initial: int,
    segments: list[tuple[int, int]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """draw_noise's streams in general: per image, `initial` Gaussians, then step noise for each
    (start, stop) range of `segments` in turn, from the image's one generator.

    Base + refiner draws the base's steps, then the refiner's, from the same generator, as when
    diffusers' two pipelines are given the same generator. Returns the `initial` tensors (B, C, h, w)
    and one (steps, B, C, h, w) tensor per segment, zero outside its range.
    """
    shape = (1, *latent_shape)
    firsts: list[list[torch.Tensor]] = [[] for _ in range(initial)]
    noise: list[list[torch.Tensor]] = [[] for _ in segments]
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        for drawn in firsts:
            drawn.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        for (start, stop), drawn in zip(segments, noise):
            run = [torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(start, stop)]
            zeros = [torch.zeros(shape) for _ in range(start)], [torch.zeros(shape) for _ in range(stop, steps)]
            drawn.append(torch.stack(zeros[0] + run + zeros[1]))
    return [torch.cat(drawn) for drawn in firsts], [torch.cat(drawn, dim=1) for drawn in noise]


_SAMPLERS = {cls.name: cls for cls in (EulerSampler, EulerAncestralSampler, DDIMSampler, DPMSolverPP2MSampler)}


def make_sampler(name: str, scheduler_config: dict[str, Any], steps: int) -> DeviceSampler:
    """A device sampler for `name`, configured like the model folder's scheduler, for `steps` steps."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    name = canonical_name(name)
    return _SAMPLERS[name](diffusers_scheduler(name, scheduler_config), steps)
