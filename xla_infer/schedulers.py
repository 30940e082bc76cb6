"""The samplers' steps in torch, for XLA devices: one fixed graph per step.

`sdxl_common.samplers` (shared with the JAX trainer) reads every number a step needs once on the
host; here those tables go to the device, and each step reads row `i` of each table with a gather
on a device-side step counter. Every step is then the same graph, for every prompt and seed. The
per-step formulas are diffusers' own (same operations in the same order, on float32), so for the
same model outputs the results agree to float32 rounding; tests/test_xla_schedulers.py checks
each sampler against its diffusers scheduler.
"""
from __future__ import annotations

from typing import Any

import torch

from sdxl_common.samplers import SCHEDULER_NAMES, SamplerTables, UnsupportedScheduler, canonical_name, make_tables

__all__ = ["SCHEDULER_NAMES", "UnsupportedScheduler", "canonical_name", "make_sampler", "draw_noise", "draw_streams"]

State = dict[str, torch.Tensor]


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

    def __init__(self, tables: SamplerTables):
        self.host_tables = tables
        self.name = tables.name
        self.steps = tables.steps
        self.prediction_type = tables.prediction_type
        self.needs_step_noise = tables.needs_step_noise
        self.scales_input = tables.scales_input
        self.reference = tables.reference
        self.timesteps = torch.from_numpy(tables.timesteps)
        self.init_noise_sigma = torch.tensor(tables.init_noise_sigma, dtype=torch.float32)
        self.tables: dict[str, torch.Tensor] = {"timesteps": self.timesteps}
        self.tables.update({k: torch.from_numpy(v) for k, v in tables.coefficients.items()})

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

    def step(self, sample, model_output, step, state, noise=None):
        if noise is None:
            raise ValueError("euler_a needs the step's noise")
        sample, state = super().step(sample, model_output, step, state)
        return sample + noise * _at(self.tables["sigma_up"], step), state


class DDIMSampler(DeviceSampler):
    """DDIMScheduler with eta = 0 (the SDXL pipeline's default): deterministic."""

    name = "ddim"

    def step(self, sample, model_output, step, state, noise=None):
        t = self.tables
        sqrt_alpha, sqrt_beta = _at(t["sqrt_alpha"], step), _at(t["sqrt_beta"], step)
        if self.prediction_type == "epsilon":
            pred_original = (sample - sqrt_beta * model_output) / sqrt_alpha
            pred_epsilon = model_output
        else:
            pred_original = sqrt_alpha * sample - sqrt_beta * model_output
            pred_epsilon = sqrt_alpha * model_output + sqrt_beta * sample
        clip_range = self.host_tables.clip_range
        if clip_range is not None:
            pred_original = pred_original.clamp(-clip_range, clip_range)
        direction = _at(t["direction"], step) * pred_epsilon
        return _at(t["sqrt_alpha_prev"], step) * pred_original + direction, state


class DPMSolverPP2MSampler(DeviceSampler):
    """DPMSolverMultistepScheduler, algorithm dpmsolver++, order 2 ("DPM++ 2M").

    The solver order per step (first order at the first step and, as diffusers decides, at the last)
    is folded into the tables: a first-order step has a zero second-order coefficient, so every
    step runs the same graph. The state carries the previous data prediction.
    """

    name = "dpmpp_2m"

    def __init__(self, tables: SamplerTables):
        super().__init__(tables)
        self.orders = list(tables.orders)

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
    tables = make_tables(name, scheduler_config, steps)
    return _SAMPLERS[tables.name](tables)
