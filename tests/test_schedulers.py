"""The JAX Euler / DDIM schedulers reproduce diffusers' trajectories step by step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from flax_train import schedulers

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
REFERENCE_CLASSES = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}

# (scheduler, overrides of the SDXL config, steps)
CASES = [
    ("euler", {}, 8),
    ("euler", {"timestep_spacing": "trailing"}, 7),
    ("euler", {"timestep_spacing": "linspace", "steps_offset": 0}, 6),
    ("euler", {"prediction_type": "v_prediction"}, 6),
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
    scheduler = REFERENCE_CLASSES[name].from_config(config)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:
        # Same algorithm and the same tables, evaluated in float64 arithmetic.
        if name == "euler":
            scheduler.sigmas = scheduler.sigmas.double()
        else:
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
            scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
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
    if name == "euler":
        _assert_close(tables.sigmas, reference.sigmas.numpy())

    rng = np.random.default_rng(0)
    initial = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    raw_outputs = rng.standard_normal((steps,) + initial.shape).astype(np.float32)

    scale = jax.jit(schedulers.scale_model_input)
    step = jax.jit(schedulers.step)
    ours = jnp.asarray(initial) * tables.init_noise_sigma
    theirs = torch.from_numpy(initial).to(dtype) * reference.init_noise_sigma
    for i, t in enumerate(reference.timesteps):
        their_input = reference.scale_model_input(theirs, t)
        our_input = scale(tables, jnp.int32(i), ours)
        _assert_close(our_input, their_input.numpy())
        their_output = _fake_model(torch.from_numpy(raw_outputs[i]).to(dtype), their_input)
        theirs = reference.step(their_output, t, theirs).prev_sample
        ours = step(tables, jnp.int32(i), _fake_model(raw_outputs[i], our_input), ours)
        assert theirs.dtype == dtype and ours.dtype == jnp.float32
        _assert_close(ours, theirs.numpy())

    # The same loop as one fori_loop over a traced step index, as the sampler runs it.
    raw_outputs_j = jnp.asarray(raw_outputs)

    def body(i, sample):
        model_output = _fake_model(raw_outputs_j[i], schedulers.scale_model_input(tables, i, sample))
        return schedulers.step(tables, i, model_output, sample)

    looped = jax.jit(lambda x: jax.lax.fori_loop(0, steps, body, x * tables.init_noise_sigma))(initial)
    _assert_close(looped, theirs.numpy())
    # Make sure the comparison is not between two near-zero arrays.
    assert float(np.abs(theirs.numpy()).mean()) > 0.1


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_trajectory_matches_diffusers_float32(case):
    _check_trajectory(case, torch.float32)


@pytest.mark.parametrize("case", CASES + [ZERO_SNR_EULER], ids=_case_id)
def test_trajectory_matches_diffusers_in_float64(case):
    _check_trajectory(case, torch.float64)


def test_tables_are_float32_and_sized():
    tables = schedulers.make_scheduler("euler", SDXL_SCHEDULER_CONFIG, 30)
    assert tables.timesteps.shape == (30,) and tables.sigmas.shape == (31,)
    assert tables.sigmas.dtype == np.float32 and tables.sigmas[-1] == 0.0
    ddim = schedulers.make_scheduler("DDIMScheduler", SDXL_SCHEDULER_CONFIG, 30)
    assert ddim.alphas_cumprod.shape == ddim.alphas_cumprod_prev.shape == (30,)
    # set_alpha_to_one=False: the last step lands on abar_0, not 1.
    assert ddim.alphas_cumprod_prev[-1] < 1.0 and ddim.clip_sample_range is None
    assert schedulers.SAMPLERS == ("euler", "ddim")
    for name in schedulers.SAMPLERS:
        assert schedulers.make_scheduler(name, SDXL_SCHEDULER_CONFIG, 4).timesteps.shape == (4,)


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
        reference = REFERENCE_CLASSES[name].from_config(config)
        reference.set_timesteps(steps)
        tables = schedulers.make_scheduler(name, config, steps)
        # Trailing spacing gets one timestep too many (-1) from diffusers for some n (61, 103).
        timesteps = reference.timesteps.numpy()
        assert len(timesteps) == steps or (len(timesteps) == steps + 1 and timesteps[-1] == -1)
        timesteps = timesteps[:steps]
        np.testing.assert_array_equal(tables.timesteps, timesteps.astype(np.float32))
        assert tables.timesteps.dtype == np.float32
        assert tables.init_noise_sigma == float(reference.init_noise_sigma)
        assert tables.prediction_type == reference.config.prediction_type
        if name == "euler":
            sigmas = reference.sigmas.numpy()
            np.testing.assert_array_equal(tables.sigmas, np.append(sigmas[:steps], 0.0).astype(np.float32))
            continue
        abar = reference.alphas_cumprod.numpy()
        np.testing.assert_array_equal(tables.alphas_cumprod, abar[timesteps])
        # DDIMScheduler.step moves to t - T // n, or to final_alpha_cumprod below 0.
        prev = [t - reference.config.num_train_timesteps // steps for t in timesteps]
        final = float(reference.final_alpha_cumprod)
        np.testing.assert_array_equal(tables.alphas_cumprod_prev, [abar[p] if p >= 0 else final for p in prev])
        expected_clip = reference.config.clip_sample_range if reference.config.clip_sample else None
        assert tables.clip_sample_range == expected_clip


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("heun", {}, "scheduler"),
        ("euler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
        ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("euler", {"timestep_type": "continuous"}, "timestep_type"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("euler", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ("euler", {"timestep_spacing": "uniform"}, "timestep_spacing"),
        ("euler", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"timestep_spacing": "uniform"}, "timestep_spacing"),
        ("ddim", {"beta_schedule": "sigmoid"}, "sigmoid"),
    ],
)
def test_unsupported_options_raise(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        schedulers.make_scheduler(name, dict(SDXL_SCHEDULER_CONFIG, **overrides), 10)


def test_step_count_is_checked():
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.make_scheduler("ddim", SDXL_SCHEDULER_CONFIG, 1001)
    with pytest.raises(ValueError, match="num_inference_steps"):
        schedulers.make_scheduler("euler", SDXL_SCHEDULER_CONFIG, 0)
