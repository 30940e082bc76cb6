"""The training-side diffusion maths against diffusers' schedulers and the reference formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from flax_train import diffusion

SDXL_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULES = [
    SDXL_SCHEDULE,
    dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    dict(SDXL_SCHEDULE, rescale_betas_zero_snr=True),
    dict(num_train_timesteps=500, beta_start=0.001, beta_end=0.02, beta_schedule="scaled_linear"),
]


def _schedule_id(config):
    zero_snr = "-zero_snr" if config.get("rescale_betas_zero_snr") else ""
    return f"{config['beta_schedule']}{zero_snr}-{config['num_train_timesteps']}"


@pytest.mark.parametrize("config", SCHEDULES, ids=_schedule_id)
def test_schedule_matches_diffusers(config):
    ours = diffusion.NoiseSchedule.from_scheduler_config(config)
    ddpm = DDPMScheduler(**config)
    euler = EulerDiscreteScheduler(**config)
    # diffusers computes in float32; ours in float64 then rounded, so agreement is to float32 accuracy
    # (cumulative products over 1000 steps carry about 1e-6 relative rounding).
    if config.get("rescale_betas_zero_snr"):
        # diffusers' rescale recovers betas as 1 - abar[t] / abar[t-1], which in float32 cancels to
        # ~1e-4 relative error; its own rescale function run in float64 is the precise reference.
        plain = DDPMScheduler(**dict(config, rescale_betas_zero_snr=False)).betas.double()
        reference_betas = rescale_zero_terminal_snr(plain).numpy()
    else:
        reference_betas = ddpm.betas.numpy()
        np.testing.assert_allclose(ours.betas, euler.betas.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.betas, reference_betas, rtol=1e-5, atol=1e-7)
    # atol: near zero terminal SNR abar is ~1e-7 and diffusers' float32 value is off by ~1e-11.
    np.testing.assert_allclose(ours.alphas_cumprod, ddpm.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
    assert ours.num_train_timesteps == config["num_train_timesteps"]
    assert ours.betas.dtype == jnp.float32


def test_zero_terminal_snr_reaches_pure_noise():
    ours = diffusion.NoiseSchedule.from_scheduler_config(dict(SDXL_SCHEDULE, rescale_betas_zero_snr=True))
    plain = diffusion.NoiseSchedule.from_scheduler_config(SDXL_SCHEDULE)
    assert float(ours.alphas_cumprod[-1]) == 0.0
    np.testing.assert_allclose(ours.alphas_cumprod[0], plain.alphas_cumprod[0], rtol=1e-6)


def test_schedule_reads_a_released_config_and_trained_betas():
    # A scheduler_config.json as released: nulls mean "default", keys of other schedulers are ignored.
    released = dict(SDXL_SCHEDULE, _class_name="EulerDiscreteScheduler", prediction_type=None, trained_betas=None,
                    steps_offset=1, timestep_spacing="leading", use_karras_sigmas=False)
    ours = diffusion.NoiseSchedule.from_scheduler_config(released)
    plain = diffusion.NoiseSchedule.from_scheduler_config(SDXL_SCHEDULE)
    assert ours.prediction_type == "epsilon"
    np.testing.assert_array_equal(ours.alphas_cumprod, plain.alphas_cumprod)
    trained = diffusion.NoiseSchedule.from_scheduler_config(dict(trained_betas=np.asarray(plain.betas).tolist()))
    np.testing.assert_array_equal(trained.betas, plain.betas)
    np.testing.assert_allclose(trained.alphas_cumprod, plain.alphas_cumprod, rtol=1e-6)


def test_rejects_unknown_schedule_and_prediction_type():
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion.NoiseSchedule.from_scheduler_config(dict(beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="cubic"):
        diffusion.NoiseSchedule.from_scheduler_config(dict(beta_schedule="cubic"))
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.NoiseSchedule.from_scheduler_config(dict(prediction_type="sample"))
    with pytest.raises(ValueError, match="num_train_timesteps|int"):
        diffusion.NoiseSchedule.from_scheduler_config(dict(num_train_timesteps="many"))
    with pytest.raises(ValueError, match="betas must be"):
        diffusion.NoiseSchedule.from_scheduler_config(dict(trained_betas=[0.5, 1.5]))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    return x0, noise, t


@pytest.mark.parametrize("config", [SDXL_SCHEDULE, dict(SDXL_SCHEDULE, rescale_betas_zero_snr=True)])
def test_add_noise_and_velocity_match_ddpm(config, batch):
    x0, noise, t = batch
    schedule = diffusion.NoiseSchedule.from_scheduler_config(config)
    ddpm = DDPMScheduler(**config)
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)

    noisy = jax.jit(diffusion.add_noise)(schedule, x0, noise, t)
    np.testing.assert_allclose(noisy, ddpm.add_noise(tx0, tnoise, tt).numpy(), rtol=1e-5, atol=1e-6)
    v = jax.jit(diffusion.velocity)(schedule, x0, noise, t)
    np.testing.assert_allclose(v, ddpm.get_velocity(tx0, tnoise, tt).numpy(), rtol=1e-5, atol=1e-6)

    np.testing.assert_array_equal(diffusion.target(schedule, "epsilon", x0, noise, t), noise)
    np.testing.assert_array_equal(
        diffusion.target(schedule, "v_prediction", x0, noise, t), diffusion.velocity(schedule, x0, noise, t)
    )
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.target(schedule, "sample", x0, noise, t)


def test_add_noise_keeps_bfloat16(batch):
    x0, noise, t = batch
    schedule = diffusion.NoiseSchedule.from_scheduler_config(SDXL_SCHEDULE)
    out = diffusion.add_noise(schedule, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise, jnp.bfloat16), t)
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("config", [SDXL_SCHEDULE, dict(SDXL_SCHEDULE, rescale_betas_zero_snr=True)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weight_matches_reference_formula(config, prediction_type):
    schedule = diffusion.NoiseSchedule.from_scheduler_config(config)
    gamma = 5.0
    t = np.arange(0, 1000, 7).tolist() + [999]
    weight = jax.jit(diffusion.min_snr_weight, static_argnums=(2, 3))
    ours = np.asarray(weight(schedule, jnp.array(t), gamma, prediction_type))

    # The reference, in float64 numpy from the diffusers scheduler's alphas_cumprod.
    abar = DDPMScheduler(**config).alphas_cumprod.numpy().astype(np.float64)[t]
    snr = abar / (1.0 - abar)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction_type == "epsilon":
            reference = np.minimum(snr, gamma) / snr
        else:
            reference = np.minimum(snr, gamma) / (snr + 1.0)
    finite = np.isfinite(reference)
    np.testing.assert_allclose(ours[finite], reference[finite], rtol=1e-5)
    np.testing.assert_allclose(diffusion.snr(schedule, jnp.array(t)), snr, rtol=1e-5)
    # The formula's only non-finite case is 0/0 at zero terminal SNR (epsilon); its limit is 1.
    assert np.all(ours[~finite] == 1.0)
    assert finite.sum() >= len(t) - 1
    # Weights change where snr crosses gamma: both regimes must be exercised.
    assert (snr > gamma).any() and (snr < gamma).any()


def _reference_bias(n, strategy, multiplier, portion, begin, end):
    # The timestep bias of diffusers' examples/text_to_image/train_text_to_image_sdxl.py (generate_timestep_weights).
    weights = np.ones(n)
    count = int(portion * n)
    if strategy == "earlier":
        weights[:count] *= multiplier
    elif strategy == "later":
        weights[n - count:] *= multiplier
    elif strategy == "range":
        weights[begin:end] *= multiplier
    return weights / weights.sum()


@pytest.mark.parametrize(
    "strategy, multiplier, portion, begin, end",
    [
        ("none", 1.0, 0.25, 0, 1000),
        ("earlier", 3.0, 0.25, 0, 1000),
        ("later", 2.5, 0.4, 0, 1000),
        ("later", 0.5, 1.0, 0, 1000),
        ("range", 4.0, 0.25, 200, 500),
    ],
)
def test_timestep_weights_follow_reference(strategy, multiplier, portion, begin, end):
    weights = diffusion.timestep_weights(1000, strategy, multiplier, portion, begin, end)
    np.testing.assert_allclose(weights, _reference_bias(1000, strategy, multiplier, portion, begin, end), rtol=1e-6)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="sideways"), "strategy"),
        (dict(strategy="later", multiplier=0.0), "multiplier"),
        (dict(strategy="earlier", multiplier=-2.0), "multiplier"),
        (dict(strategy="earlier", multiplier=2.0, portion=0.0), "portion"),
        (dict(strategy="later", multiplier=2.0, portion=1.5), "portion"),
        (dict(strategy="later", multiplier=2.0, portion=0.0001), "portion"),
        (dict(strategy="range", multiplier=2.0, begin=500, end=500), "begin"),
        (dict(strategy="range", multiplier=2.0, begin=-1, end=10), "begin"),
        (dict(strategy="range", multiplier=2.0, begin=10, end=1001), "end"),
    ],
)
def test_timestep_weights_reject_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffusion.timestep_weights(1000, **kwargs)


def test_sample_timesteps_follows_weights():
    weights = diffusion.timestep_weights(1000, "later", multiplier=9.0, portion=0.1)
    t = np.asarray(jax.jit(diffusion.sample_timesteps, static_argnums=1)(jax.random.key(0), 20000, weights))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() < 1000
    # The last 100 timesteps carry 9 * 100 / (900 + 900) = 50% of the mass.
    assert abs((t >= 900).mean() - 0.5) < 0.02

    uniform = np.asarray(diffusion.sample_timesteps(jax.random.key(1), 20000, None, num_train_timesteps=1000))
    assert uniform.min() >= 0 and uniform.max() == 999
    assert abs((uniform >= 900).mean() - 0.1) < 0.01
    with pytest.raises(ValueError, match="num_train_timesteps"):
        diffusion.sample_timesteps(jax.random.key(1), 4, None)


def test_sample_noise_offset_is_per_image_and_channel():
    key = jax.random.key(3)
    shape = (64, 4, 16, 16)
    sample = jax.jit(diffusion.sample_noise, static_argnums=1)  # one compilation: the offset is traced
    plain = sample(key, shape, 0.0)
    offset = sample(key, shape, 0.5)
    shift = np.asarray(offset - plain)
    # The difference is constant over each image-channel plane and 0.5 x a standard normal across them.
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :, :1, :1], shape), atol=1e-6)
    per_plane = shift[:, :, 0, 0].ravel()
    assert abs(per_plane.std() - 0.5) < 0.08 and abs(per_plane.mean()) < 0.1
    assert abs(float(plain.std()) - 1.0) < 0.02
    with pytest.raises(ValueError, match="NCHW"):
        diffusion.sample_noise(key, (4, 16, 16), 0.1)


def test_drop_captions_replaces_whole_rows():
    rng = np.random.default_rng(0)
    b, length, dim, pooled_dim = 512, 7, 6, 5
    embeds = jnp.asarray(rng.standard_normal((b, length, dim)), jnp.float32)
    pooled = jnp.asarray(rng.standard_normal((b, pooled_dim)), jnp.float32)
    empty = jnp.asarray(rng.standard_normal((length, dim)), jnp.float32)
    empty_pooled = jnp.asarray(rng.standard_normal((1, pooled_dim)), jnp.float32)
    drop = jax.jit(diffusion.drop_captions)

    out, out_pooled = drop(jax.random.key(0), embeds, pooled, empty, empty_pooled, 0.3)
    dropped = np.all(np.asarray(out) == np.asarray(empty)[None], axis=(1, 2))
    kept = np.all(np.asarray(out) == np.asarray(embeds), axis=(1, 2))
    assert np.all(dropped ^ kept)  # every row is either untouched or exactly the empty prompt
    # The pooled embedding is dropped for exactly the same rows.
    np.testing.assert_array_equal(np.all(np.asarray(out_pooled) == np.asarray(empty_pooled), axis=1), dropped)
    np.testing.assert_array_equal(np.all(np.asarray(out_pooled) == np.asarray(pooled), axis=1), kept)
    assert 0.22 < dropped.mean() < 0.38

    # A fresh key drops different rows; p = 0 and p = 1 are exact.
    other, _ = drop(jax.random.key(1), embeds, pooled, empty, empty_pooled, 0.3)
    assert not np.array_equal(np.asarray(other), np.asarray(out))
    none, _ = drop(jax.random.key(0), embeds, pooled, empty, empty_pooled, 0.0)
    np.testing.assert_array_equal(none, embeds)
    every, every_pooled = drop(jax.random.key(0), embeds, pooled, empty, empty_pooled, 1.0)
    np.testing.assert_array_equal(every, np.broadcast_to(empty, embeds.shape))
    np.testing.assert_array_equal(every_pooled, np.broadcast_to(empty_pooled, pooled.shape))
