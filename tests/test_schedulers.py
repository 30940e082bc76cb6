"""The JAX samplers (Euler, Euler ancestral, DDIM, DPM-Solver++ 2M) reproduce diffusers'
trajectories step by step, from the tables they share with xla_infer (sdxl_common.samplers)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_train import schedulers
from sdxl_common.samplers import UnsupportedScheduler, diffusers_scheduler

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json, keys as released
# (including the DDIM/PNDM ones the Euler scheduler ignores).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# (scheduler, overrides of the SDXL config, steps)
CASES = [
    ("euler", {}, 8),
    ("euler", {"timestep_spacing": "trailing"}, 7),
    ("euler", {"timestep_spacing": "linspace", "steps_offset": 0}, 6),
    ("euler", {"prediction_type": "v_prediction"}, 6),
    # Sigma schedules other than diffusers' default come with the tables.
    ("euler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 6),
    ("euler", {"prediction_type": "v_prediction", "timestep_type": "continuous"}, 5),
    ("euler_a", {}, 8),
    ("euler_a", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 6),
    ("ddim", {}, 8),
    ("ddim", {"timestep_spacing": "trailing"}, 7),
    ("ddim", {"timestep_spacing": "linspace"}, 6),
    # DDIM's own defaults: clipped x0 and set_alpha_to_one; v-prediction with zero terminal SNR.
    (
        "ddim",
        {"clip_sample": True, "set_alpha_to_one": True, "prediction_type": "v_prediction",
         "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
        5,
    ),
    ("dpmpp_2m", {}, 8),
    ("dpmpp_2m", {"prediction_type": "v_prediction", "use_karras_sigmas": True}, 6),
    ("dpmpp_2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False}, 16),
]
# Zero terminal SNR makes Euler's first sigma 4096, so its first step maps samples of size ~4096 to
# size ~10. diffusers' float32 update (x + derivative * dt) rounds at the scale of its input, ~5e-5
# of the output: its float32 result is itself only good to that. This case is compared with the
# float64 reference only, which it matches to 1e-5.
ZERO_SNR_EULER = (
    "euler",
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    5,
)


def _case_id(case):
    name, overrides, steps = case
    return f"{name}-{steps}-" + "-".join(f"{k}={v}" for k, v in overrides.items())


def _reference_scheduler(name, config, steps, dtype):
    scheduler = diffusers_scheduler(name, config)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:
        # Same algorithm and the same tables, evaluated in float64 arithmetic.
        if name == "ddim":
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
            scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
        else:
            scheduler.sigmas = scheduler.sigmas.double()
    return scheduler


def _fake_model(raw, scaled):
    # A fixed random sequence plus a term in the model input, so that an error in
    # scale_model_input or in an earlier step changes every later output.
    return raw + 0.3 * scaled


def _assert_close(actual, desired):
    # 1e-5 relative, measured against the array's scale so near-zero entries do not dominate.
    desired = np.asarray(desired, dtype=np.float64)
    scale = np.abs(desired).max()
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), desired, rtol=1e-5, atol=1e-5 * scale)


def _check_trajectory(case, dtype):
    name, overrides, steps = case
    config = dict(SDXL_SCHEDULER_CONFIG, **overrides)
    reference = _reference_scheduler(name, config, steps, dtype)
    tables = schedulers.make_scheduler(name, config, steps)

    np.testing.assert_array_equal(tables.timesteps, reference.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(tables.init_noise_sigma, float(reference.init_noise_sigma), rtol=1e-5)

    rng = np.random.default_rng(0)
    initial = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    raw_outputs = rng.standard_normal((steps,) + initial.shape).astype(np.float32)
    # Ancestral sampling's step noise: what diffusers draws from its generator, given to ours.
    step_noise = torch.randn((steps,) + initial.shape, generator=torch.Generator().manual_seed(1)).numpy()

    scale = jax.jit(functools.partial(schedulers.scale_model_input, tables))
    step = jax.jit(functools.partial(schedulers.step, tables))
    ours = jnp.asarray(initial) * tables.init_noise_sigma
    state = schedulers.initial_state(tables, ours)
    theirs = torch.from_numpy(initial).to(dtype) * reference.init_noise_sigma
    generator = torch.Generator().manual_seed(1)
    for i, t in enumerate(reference.timesteps):
        their_input = reference.scale_model_input(theirs, t)
        our_input = scale(jnp.int32(i), ours)
        _assert_close(our_input, their_input.numpy())
        their_output = _fake_model(torch.from_numpy(raw_outputs[i]).to(dtype), their_input)
        theirs = reference.step(their_output, t, theirs, generator=generator).prev_sample
        noise = step_noise[i] if tables.needs_step_noise else None
        ours, state = step(jnp.int32(i), _fake_model(raw_outputs[i], our_input), ours, state, noise)
        assert theirs.dtype == dtype and ours.dtype == jnp.float32
        _assert_close(ours, theirs.numpy())

    # The same loop as one fori_loop over a traced step index, as the sampler runs it.
    raw_outputs_j, step_noise_j = jnp.asarray(raw_outputs), jnp.asarray(step_noise)

    def body(i, carry):
        sample, state = carry
        model_output = _fake_model(raw_outputs_j[i], schedulers.scale_model_input(tables, i, sample))
        return schedulers.step(tables, i, model_output, sample, state, step_noise_j[i])

    def loop(x):
        x = x * tables.init_noise_sigma
        return jax.lax.fori_loop(0, steps, body, (x, schedulers.initial_state(tables, x)))[0]

    _assert_close(jax.jit(loop)(initial), theirs.numpy())
    # Make sure the comparison is not between two near-zero arrays.
    assert float(np.abs(theirs.numpy()).mean()) > 0.1


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_trajectory_matches_diffusers_float32(case):
    _check_trajectory(case, torch.float32)


# Ancestral noise drawn in float64 is other numbers than in float32: that sampler is compared in float32.
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "euler_a"] + [ZERO_SNR_EULER], ids=_case_id)
def test_trajectory_matches_diffusers_in_float64(case):
    _check_trajectory(case, torch.float64)


def test_tables_are_float32_and_sized():
    assert schedulers.SAMPLERS == ("euler", "euler_a", "ddim", "dpmpp_2m")
    for name in schedulers.SAMPLERS:
        tables = schedulers.make_scheduler(name, SDXL_SCHEDULER_CONFIG, 30)
        assert tables.timesteps.shape == (30,) and tables.timesteps.dtype == np.float32
        for key, table in tables.coefficients.items():
            # the add-noise tables have a row more: the clean sample, after the last step
            assert table.dtype == np.float32 and table.shape == ((31,) if key.startswith("add_noise") else (30,))
    euler = schedulers.make_scheduler("EulerDiscreteScheduler", SDXL_SCHEDULER_CONFIG, 30)
    assert euler.coefficients["sigma_to"][-1] == 0.0
    ddim = schedulers.make_scheduler("DDIMScheduler", SDXL_SCHEDULER_CONFIG, 30)
    # set_alpha_to_one=False: the last step lands on abar_0, not 1.
    assert ddim.coefficients["sqrt_alpha_prev"][-1] < 1.0 and ddim.clip_range is None


def test_trailing_spacing_has_exactly_n_steps_where_arange_overshoots():
    # np.arange(1000, 0, -1000 / 61) has 62 entries; the schedule must still have 61 steps.
    tables = schedulers.make_scheduler("euler", dict(SDXL_SCHEDULER_CONFIG, timestep_spacing="trailing"), 61)
    assert tables.timesteps.shape == (61,)
    assert tables.timesteps[0] == 999 and tables.timesteps.min() >= 0
    assert np.all(np.diff(tables.timesteps) < 0)


# Configs (overrides of the SDXL one) and step counts whose tables must be diffusers' own numbers.
TABLE_CONFIGS = [
    {},
    {"steps_offset": 0},
    {"timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace", "steps_offset": 0},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    {"beta_schedule": "squaredcos_cap_v2", "clip_sample": True, "set_alpha_to_one": True, "clip_sample_range": 2.0},
]
TABLE_STEPS = [1, 7, 30, 61, 103, 500, 999]


@pytest.mark.parametrize("name", ["euler", "ddim"])
@pytest.mark.parametrize("overrides", TABLE_CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "sdxl")
def test_tables_are_what_diffusers_reports(name, overrides):
    config = dict(SDXL_SCHEDULER_CONFIG, **overrides)
    for steps in TABLE_STEPS:
        reference = diffusers_scheduler(name, config)
        reference.set_timesteps(steps)
        tables = schedulers.make_scheduler(name, config, steps)
        # Trailing spacing gets one timestep too many (-1) from diffusers for some n (61, 103).
        timesteps = reference.timesteps.numpy()
        assert len(timesteps) == steps or (len(timesteps) == steps + 1 and timesteps[-1] == -1)
        timesteps = timesteps[:steps]
        np.testing.assert_array_equal(tables.timesteps, timesteps.astype(np.float32))
        assert tables.init_noise_sigma == float(reference.init_noise_sigma)
        assert tables.prediction_type == reference.config.prediction_type
        if name == "euler":
            sigmas = reference.sigmas.numpy()
            np.testing.assert_array_equal(tables.coefficients["sigma_hat"], sigmas[:steps])
            np.testing.assert_array_equal(tables.coefficients["sigma_to"], np.append(sigmas[1:steps], 0.0))
            continue
        abar = reference.alphas_cumprod.numpy()
        np.testing.assert_allclose(tables.coefficients["sqrt_alpha"] ** 2, abar[timesteps.astype(int)], rtol=1e-6)
        # DDIMScheduler.step moves to t - T // n, or to final_alpha_cumprod below 0.
        prev = [t - reference.config.num_train_timesteps // steps for t in timesteps]
        final = float(reference.final_alpha_cumprod)
        expected_prev = [abar[p] if p >= 0 else final for p in prev]
        np.testing.assert_allclose(tables.coefficients["sqrt_alpha_prev"] ** 2, expected_prev, rtol=1e-6)
        expected_clip = reference.config.clip_sample_range if reference.config.clip_sample else None
        assert tables.clip_range == expected_clip


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("heun", {}, "unknown scheduler 'heun'"),
        ("euler", {"timestep_spacing": "uniform"}, "uniform"),
        ("euler", {"prediction_type": "sample"}, "prediction_type"),
        ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"timestep_spacing": "uniform"}, "uniform"),
        ("ddim", {"beta_schedule": "sigmoid"}, "sigmoid"),
        ("dpmpp_2m", {"variance_type": "learned_range"}, "learned variance"),
    ],
)
def test_unsupported_options_raise(name, overrides, message):
    with pytest.raises(UnsupportedScheduler, match=message):
        schedulers.make_scheduler(name, dict(SDXL_SCHEDULER_CONFIG, **overrides), 10)


def test_step_count_is_checked():
    with pytest.raises(UnsupportedScheduler, match="num_inference_steps"):
        schedulers.make_scheduler("ddim", SDXL_SCHEDULER_CONFIG, 1001)
    with pytest.raises(UnsupportedScheduler, match="num_inference_steps"):
        schedulers.make_scheduler("euler", SDXL_SCHEDULER_CONFIG, 0)
