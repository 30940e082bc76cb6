"""Device samplers against diffusers' schedulers, on plain torch, with a stand-in denoiser.

The UNet is replaced by a fixed nonlinear function of (input, timestep) so the test isolates the
sampler arithmetic and runs in well under a second per case; the full-model comparison lives in
tests/test_xla_pipeline.py.
"""
import pytest
import torch

from sdxl_common import sdxl
from sdxl_common.samplers import SCHEDULER_NAMES, UnsupportedScheduler, canonical_name, diffusers_scheduler
from xla_infer.schedulers import draw_noise, make_sampler

SDXL_CONFIG = {**sdxl.SCHEDULER_CONFIG, **sdxl.SCHEDULER_EXTRA_KEYS}
SHAPE = (4, 8, 8)
SEEDS = [3, 11]


def fake_denoiser(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    weight = torch.linspace(-1.0, 1.0, SHAPE[0]).view(1, -1, 1, 1)
    return torch.tanh(0.7 * model_input + weight) * (timestep.float() / 1000.0 + 0.1)


def run_diffusers(name, config, steps):
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    latents = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in generators])
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = fake_denoiser(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(model_output, t, latents, generator=generators, return_dict=False)[0]
    return latents


def run_ours(name, config, steps):
    sampler = make_sampler(name, config, steps)
    latents, noise = draw_noise(SEEDS, SHAPE, steps, sampler.needs_step_noise)
    latents = latents * sampler.init_noise_sigma
    state = sampler.initial_state(latents)
    step = torch.zeros(1, dtype=torch.long)
    for _ in range(steps):
        model_output = fake_denoiser(sampler.scale_input(latents, step), sampler.timestep(step))
        step_noise = None if noise is None else noise.index_select(0, step)[0]
        latents, state = sampler.step(latents, model_output, step, state, step_noise)
        step = step + 1
    return latents


CASES = [(name, {}, steps) for name in SCHEDULER_NAMES for steps in (4, 20)] + [
    ("euler", {"prediction_type": "v_prediction"}, 6),
    ("euler", {"timestep_spacing": "trailing", "use_karras_sigmas": True}, 6),
    ("euler_a", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 6),
    ("ddim", {"prediction_type": "v_prediction", "clip_sample": True, "set_alpha_to_one": True}, 6),
    ("dpmpp_2m", {"prediction_type": "v_prediction", "use_karras_sigmas": True}, 6),
    ("dpmpp_2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False}, 16),
]


@pytest.mark.parametrize("name, overrides, steps", CASES)
def test_sampler_matches_diffusers(name, overrides, steps):
    config = {**SDXL_CONFIG, **overrides}
    expected = run_diffusers(name, config, steps)
    got = run_ours(name, config, steps)
    assert torch.isfinite(got).all()
    # Same float32 operations in the same order: equal up to a few ulps.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_dpm_orders_and_tables_are_static():
    sampler = make_sampler("dpmpp_2m", SDXL_CONFIG, 6)
    assert sampler.orders == [1, 2, 2, 2, 2, 1]  # first step and (final sigma zero) last step are first order
    # A row per step; the add-noise tables have one more, (1, 0), for inpainting's blend after the last step.
    assert all(t.shape == ((7,) if name.startswith("add_noise") else (6,)) for name, t in sampler.tables.items())
    assert sampler.tables["add_noise_sample"][6] == 1 and sampler.tables["add_noise_noise"][6] == 0
    assert (sampler.tables["d1_coef"][[0, 5]] == 0).all() and (sampler.tables["d1_coef"][1:5] != 0).all()


def test_noise_depends_only_on_each_seed():
    alone, alone_noise = draw_noise([7], SHAPE, 3, True)
    batch, batch_noise = draw_noise([1, 7], SHAPE, 3, True)
    assert torch.equal(batch[1:], alone) and torch.equal(batch_noise[:, 1:], alone_noise)
    assert not torch.equal(batch[:1], alone)


def test_names_and_errors():
    assert canonical_name("Euler-A") == "euler_a" and canonical_name("DPMSolverMultistepScheduler") == "dpmpp_2m"
    with pytest.raises(UnsupportedScheduler, match="unknown scheduler 'lms'"):
        canonical_name("lms")
    with pytest.raises(UnsupportedScheduler, match="prediction_type"):
        make_sampler("euler", {**SDXL_CONFIG, "prediction_type": "sample"}, 4)
    with pytest.raises(UnsupportedScheduler, match=r"num_inference_steps must be in \[1, 1000\], got 0"):
        make_sampler("euler", SDXL_CONFIG, 0)
