"""The validation loss (data.validation_split, validation.loss_every_steps): which samples are held
out and that training never reads them, the config checks, and on the tiny workspace two runs (one
uninterrupted, one resumed from its middle checkpoint) whose logged val_loss is checked against the
UNet evaluated directly on the checkpointed weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_train import config as config_lib, diffusion, models, train
from flax_train.data import cache as cache_lib, prepare
from flax_train.demo import synthetic
from flax_train.train import validation_loss
from sdxl_common import sdxl
from sdxl_common.errors import BadInput
from train_support import BATCH, RESOLUTION, Workspace, make_config, make_workspace

pytestmark = pytest.mark.xdist_group("train")

SAMPLES = 2 * BATCH  # half held out: one validation batch, one training batch
SPLIT = 0.5


# --------------------------------------------------------------------------------------------
# Which samples are held out


def training_batches(num_samples: int, batch: int, split: float, process_count: int, steps: int) -> list[np.ndarray]:
    """The global batches of the first ``steps`` steps, each process's rows put together."""
    streams = [cache_lib.batch_indices(num_samples, batch // process_count, 7, p, process_count, split)
               for p in range(process_count)]
    return [np.concatenate([s[step] for s in streams]) for step in range(steps)]


def test_held_out_samples_are_fixed_and_never_trained_on():
    held = cache_lib.held_out(100, 0.1)
    assert held.tolist() == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95]  # evenly spaced, whatever the seed
    assert cache_lib.held_out(100, 0.29).size == 29
    assert cache_lib.held_out(100, 0.0).size == 0 and cache_lib.training_samples(100, 0.0) is None
    one = training_batches(100, 8, 0.1, 1, 40)  # 3 epochs of the 90 samples left
    assert not np.isin(np.concatenate(one), held).any()
    assert set(np.concatenate(one[:11]).tolist()) <= set(range(100)) - set(held.tolist())
    assert len(set(np.concatenate(one[:11]).tolist())) == 88  # an epoch: 11 batches of distinct samples
    # Two processes read the same global batches between them.
    np.testing.assert_array_equal(np.stack(one), np.stack(training_batches(100, 8, 0.1, 2, 40)))


def test_no_split_leaves_the_training_order_as_it_was():
    for p, count in ((0, 1), (1, 2)):
        before = (grain.MapDataset.range(50).shuffle(seed=7).repeat().batch(4 // count, drop_remainder=True))[p::count]
        now = cache_lib.batch_indices(50, 4 // count, 7, p, count)
        for step in range(30):
            np.testing.assert_array_equal(now[step], before[step])


def fake_buckets(*counts: int) -> list[cache_lib.CacheBucket]:
    """Buckets of ``counts`` samples (what the index streams read of a bucket: its size and first index)."""
    firsts = np.cumsum((0,) + counts)
    return [cache_lib.CacheBucket(f"{i}", (8, 8), None, int(first), np.array([0, n]), np.zeros(1, np.int64),
                                  np.zeros(1, np.int64)) for i, (first, n) in enumerate(zip(firsts, counts))]


def test_buckets_hold_out_their_own_share():
    buckets = fake_buckets(40, 25, 70)
    held = np.concatenate([b.first + cache_lib.held_out(len(b), 0.2) for b in buckets])
    assert len(held) == 8 + 5 + 14
    one = cache_lib.BucketBatches(buckets, 4, 3, 0, 1, 0.2)
    halves = [cache_lib.BucketBatches(buckets, 4, 3, p, 2, 0.2) for p in (0, 1)]
    for step in range(60):
        batch = one[step]
        assert not np.isin(batch, held).any()
        np.testing.assert_array_equal(batch, np.concatenate([h[step] for h in halves]))
    # Whole batches of 4 per bucket, in bucket order: each bucket's held-out samples short of a batch left out.
    batches = cache_lib.validation_batches(buckets, 0.2, 4)
    assert [len(b) for b in batches] == [4] * (2 + 1 + 3)
    whole = [b.first + cache_lib.held_out(len(b), 0.2)[:n] for b, n in zip(buckets, (8, 4, 12))]
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(whole))
    # No split: the streams of before.
    unsplit, plain = cache_lib.BucketBatches(buckets, 4, 3, 0, 1), cache_lib.BucketBatches(buckets, 4, 3, 0, 1, 0.0)
    for step in range(30):
        np.testing.assert_array_equal(unsplit[step], plain[step])


def test_config_errors_are_one_line(tmp_path):
    def problems(*overrides: str) -> list[str]:
        cfg = config_lib.load([], ["model.pretrained=x", "data.path=x", *overrides])
        with pytest.raises(config_lib.ConfigError) as error:
            config_lib.validate(cfg)
        return str(error.value).splitlines()[1:]

    assert problems("validation.loss_every_steps=5") == [
        "  validation.loss_every_steps=5 needs held-out samples; set data.validation_split (e.g. 0.05) or "
        "validation.loss_every_steps: 0"]
    assert problems("data.validation_split=1.0") == ["  data.validation_split must be in [0, 1), got 1.0"]
    assert problems("validation.loss_every_steps=-1") == [
        "  validation.loss_every_steps must be >= 0 (0: off), got -1"]


# --------------------------------------------------------------------------------------------
# Two runs on the tiny workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    ws = make_workspace(tmp_path_factory.mktemp("valloss"))
    synthetic.write_synthetic_dataset(ws.root / "larger", SAMPLES, image_size=RESOLUTION, seed=1)
    return ws


def config(ws: Workspace, run_dir: Path) -> config_lib.Config:
    return make_config(ws, run_dir, f"data.path={ws.root / 'larger'}", f"data.cache_dir={ws.root / 'larger_cache'}",
                       f"data.validation_split={SPLIT}", "validation.loss_every_steps=2", "checkpoint.every_steps=2")


def rows(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            out[row["step"]] = row
    return out


@pytest.fixture(scope="module")
def runs(workspace) -> tuple[Path, Path]:
    """A 4-step run (checkpoints and val_loss at steps 2 and 4), and a copy of it resumed from
    step 2 (its step-4 checkpoint removed), which redoes steps 3 and 4."""
    first = workspace.root / "run"
    train.train(config(workspace, first))
    resumed = workspace.root / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    train.train(config(workspace, resumed))
    return first, resumed


def test_val_loss_is_logged_at_its_steps(runs):
    logged = rows(runs[0])
    assert sorted(logged) == [2, 4]
    ranges = {f"val_loss_t{lo}_{lo + 250}" for lo in (0, 250, 500, 750)}
    for row in logged.values():
        assert np.isfinite(row["val_loss"])
        assert {k for k in row if k.startswith("val_loss_t")} <= ranges
    # The training rows are there as before, each step once.
    steps = [json.loads(line)["step"] for line in (runs[0] / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


def independent_val_loss(cfg: config_lib.Config, step: int) -> dict[str, float]:
    """The UNet of the checkpoint of ``step`` evaluated directly on the held-out samples."""
    graphdef, state = train.restore_checkpoint(cfg, step=step)
    base = models.pretrained_pipeline(cfg.model)
    cache = prepare.open_cache(cfg, base)
    scheduler_config = sdxl.scheduler_config(base)
    schedule = diffusion.NoiseSchedule.from_scheduler_config(scheduler_config)
    prediction_type = cfg.model.prediction_type or scheduler_config["prediction_type"]
    held = cache_lib.held_out(len(cache), SPLIT)
    assert len(held) == BATCH
    batch = {k: jnp.asarray(v) for k, v in cache.read_batch(held).items()}
    latents = batch["latents"].astype(jnp.float32)
    noise, t = validation_loss.fixed_noise_and_timesteps(jnp.asarray(held, jnp.int32), latents.shape[1:],
                                                         schedule.num_train_timesteps, cfg.train.noise_offset)
    params = jax.device_get(state.params)

    @jax.jit
    def losses(params):
        unet = nnx.merge(graphdef, params)
        alpha = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
        sigma = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        pred = unet(alpha * latents + sigma * noise, t, batch["prompt_embeds"],
                    text_embeds=batch["pooled_prompt_embeds"], time_ids=batch["add_time_ids"])
        target = noise if prediction_type == "epsilon" else alpha * noise - sigma * latents
        per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
        if cfg.train.snr_gamma:
            per_example *= diffusion.min_snr_weight(schedule, t, cfg.train.snr_gamma, prediction_type)
        return per_example

    per_example, t = np.asarray(losses(params)), np.asarray(t)
    out = {"val_loss": float(per_example.mean())}
    for lo in (0, 250, 500, 750):
        inside = (t >= lo) & (t < lo + 250)
        if inside.any():
            out[f"val_loss_t{lo}_{lo + 250}"] = float(per_example[inside].mean())
    return out


def test_val_loss_is_the_unets_loss_on_the_held_out_samples(runs, workspace):
    assert config(workspace, runs[0]).model.dtype == "float32"
    logged = rows(runs[0])
    for step in (2, 4):
        expected = independent_val_loss(config(workspace, runs[0]), step)
        got = {k: v for k, v in logged[step].items() if k.startswith("val_loss")}
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), (step, key)
    assert logged[2]["val_loss"] != logged[4]["val_loss"]  # the weights changed, and with them the loss


def test_a_resumed_run_logs_the_val_loss_of_the_uninterrupted_one(runs):
    first, resumed = rows(runs[0]), rows(runs[1])
    assert sorted(resumed) == [2, 4]  # step 2's row kept from before the resume, step 4's redone
    assert resumed[4] == first[4]


def test_a_split_too_small_for_a_batch_is_refused_at_start(runs, workspace, tmp_path):
    cfg = make_config(workspace, tmp_path / "run", f"data.path={workspace.root / 'larger'}",
                      f"data.cache_dir={workspace.root / 'larger_cache'}", "data.validation_split=0.25",
                      "validation.loss_every_steps=2")
    with pytest.raises(BadInput, match=r"^data.validation_split=0.25 holds out 4 samples: no full validation batch "
                                       r"of 8 \(train.global_batch_size; with buckets, per bucket\)$"):
        train.train(cfg)
