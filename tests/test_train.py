"""The trainer on the 8-device fake CPU mesh: the step's arithmetic (updates, meshes, gradient
accumulation, non-finite losses), and whole runs (resume, SIGTERM, validation images, metrics,
export to a diffusers folder that diffusers runs).

Compiling the step dominates the time, so everything uses one small SDXL-shaped pipeline (one
resnet and one transformer layer per level, 16x16 images -> 8x8 latents) and one latent cache of
8 samples (= the global batch, so every batch holds the same samples); whole runs are shared
between tests through module fixtures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors
import safetensors.numpy
from flax import nnx
from PIL import Image

from flax_train import config as config_lib, diffusion, models, pipeline, sharding, tiny, train

pytestmark = pytest.mark.xdist_group("train")

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 16  # the tiny VAE downsamples by 2: 8x8 latents
BATCH = 8  # one sample per device
STEPS = 4


@dataclasses.dataclass(frozen=True)
class Workspace:
    root: Path
    base: Path  # the pretrained pipeline folder every run starts from
    cache: Path  # the latent cache every run shares


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("train")
    base = tiny.save_tiny_pipeline(
        root / "base",
        seed=0,
        image_size=RESOLUTION,
        layers_per_block=1,
        transformer_layers_per_block=(1, 1),
        text_layers=1,
    )
    return Workspace(root, base, root / "cache")


def overrides(ws: Workspace, run_dir: Path, *extra: str) -> list[str]:
    """The demo config made small; the step it compiles is the same for every run of this file
    (constant learning rate: the schedule does not depend on max_steps)."""
    return [
        f"model.pretrained={ws.base}",
        "model.unet_config=null",
        f"data.resolution={RESOLUTION}",
        f"data.synthetic.num_images={BATCH}",
        f"data.cache_dir={ws.cache}",
        f"train.global_batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        "train.warmup_steps=0",
        "train.lr_schedule=constant",
        "train.learning_rate=1e-3",
        "train.ema.decay=0.9",
        "checkpoint.every_steps=2",
        "validation.every_steps=0",
        "export.at_end=false",
        "logging.every_steps=1",
        "logging.tensorboard=false",
        f"run_dir={run_dir}",
        *extra,
    ]


def make_config(ws: Workspace, run_dir: Path, *extra: str) -> config_lib.Config:
    return config_lib.load([config_lib.DEMO_CONFIG], overrides(ws, run_dir, *extra))


def host(tree: Any) -> Any:
    """A numpy copy (the step donates its input state)."""
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def assert_trees_equal(a: Any, b: Any) -> None:
    leaves_a, tree_a = jax.tree.flatten(host(a))
    leaves_b, tree_b = jax.tree.flatten(host(b))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# The step, compiled as the trainer compiles it, on a fixed batch


@dataclasses.dataclass
class CompiledStep:
    compiled: Any
    initial: train.TrainState  # never passed to `compiled`, which donates its state: see fresh()
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    batch: dict[str, np.ndarray]  # the first global_batch_size x grad_accum_steps cache samples

    def __call__(self, state: train.TrainState, batch: dict[str, np.ndarray]) -> tuple[train.TrainState, dict]:
        shardings = {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}
        new_state, step_metrics = self.compiled(state, train.global_batch(batch, shardings))
        return new_state, host(step_metrics)

    def fresh(self) -> train.TrainState:
        """A copy of the initial state, with its shardings."""
        return jax.tree.map(lambda x: x.copy(), self.initial)

    def replicated(self, x: jax.Array) -> jax.Array:
        return jax.device_put(x, sharding.replicated(self.mesh))


def compile_train_step(cfg: config_lib.Config, sgd: bool = False) -> CompiledStep:
    """What `train.train` builds before its loop. ``sgd``: plain SGD with learning rate 1 instead of
    the configured optimizer, so that an update is exactly minus the gradient."""
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.merged_rules(cfg.mesh.rules)
    base = pipeline.pipeline_folder(cfg)
    cache = pipeline.open_cache(cfg, base)
    scheduler_config = pipeline.scheduler_config(base)
    graphdef, params = train.build_unet(cfg, mesh, base, rules)
    if sgd:
        tx, lr = optax.sgd(1.0), optax.constant_schedule(1.0)
    else:
        tx, lr = train.build_optimizer(cfg)
    state, state_shardings = train.build_state(cfg, params, tx, mesh, rules)
    step_fn = functools.partial(
        train.train_step,
        graphdef=graphdef,
        tx=tx,
        lr_schedule=lr,
        schedule=diffusion.NoiseSchedule.from_scheduler_config(scheduler_config),
        timestep_weights=None,
        empty={k: jnp.asarray(v) for k, v in cache.empty_prompt().items()},
        cfg=train.step_config(cfg, cfg.model.prediction_type or scheduler_config["prediction_type"]),
    )
    rows = cfg.train.global_batch_size * cfg.train.grad_accum_steps
    batch = {k: np.stack([cache[i % len(cache)][k] for i in range(rows)]) for k in cache[0]}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    compiled, _ = train.compile_step(step_fn, state, state_shardings, shapes, mesh)
    return CompiledStep(compiled, state, mesh, graphdef, batch)


@pytest.fixture(scope="module")
def adamw_step(workspace) -> CompiledStep:
    """The step of every run in this file (AdamW, EMA, min-SNR, caption dropout), FSDP mesh."""
    return compile_train_step(make_config(workspace, workspace.root / "unused"))


def test_one_step_changes_parameters_and_a_fixed_batch_lowers_the_loss(adamw_step):
    before = host(adamw_step.initial)
    state, first = adamw_step(adamw_step.fresh(), adamw_step.batch)
    after = host(state)

    assert bool(first["finite"]) and int(after.step) == 1 and int(after.skipped) == 0
    assert np.isfinite(first["loss"]) and first["grad_norm"] > 0
    assert first["learning_rate"] == pytest.approx(1e-3)
    # AdamW moves every parameter that has a gradient or a value to decay.
    leaves_before, leaves_after = jax.tree.leaves(before.params), jax.tree.leaves(after.params)
    unchanged = [i for i, (b, a) in enumerate(zip(leaves_before, leaves_after)) if np.array_equal(a, b)]
    assert not unchanged, f"{len(unchanged)} of {len(leaves_before)} parameter arrays did not change"
    # The EMA (decay 0.9) moved a tenth of the way towards the new parameters.
    for e, b, a in zip(jax.tree.leaves(after.ema), leaves_before, leaves_after):
        np.testing.assert_allclose(e, 0.9 * b + 0.1 * a, rtol=1e-6, atol=1e-7)

    # Same samples and, with the step counter held at 0, the same noise, timesteps and caption
    # dropout: one fixed objective, which the optimizer must lower.
    losses = [float(first["loss"])]
    for _ in range(5):
        state, step_metrics = adamw_step(state.replace(step=adamw_step.replicated(jnp.zeros((), jnp.int32))), adamw_step.batch)
        losses.append(float(step_metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses


def test_a_non_finite_loss_never_reaches_the_parameters(adamw_step):
    state, _ = adamw_step(adamw_step.fresh(), adamw_step.batch)  # past step 0, with optimizer moments
    before = host(state)
    poisoned = dict(adamw_step.batch, latents=np.full_like(adamw_step.batch["latents"], np.nan))
    state, step_metrics = adamw_step(state, poisoned)
    after = host(state)

    assert not bool(step_metrics["finite"]) and not np.isfinite(step_metrics["loss"])
    assert int(after.skipped) == int(step_metrics["skipped_steps"]) == 1
    assert int(after.step) == int(before.step) + 1  # the step is counted, so the next one draws new keys
    assert_trees_equal(after.params, before.params)
    assert_trees_equal(after.opt_state, before.opt_state)
    assert_trees_equal(after.ema, before.ema)


# --------------------------------------------------------------------------------------------
# Meshes and gradient accumulation: same arithmetic, different layouts


@pytest.fixture(scope="module")
def sgd_fsdp(workspace) -> CompiledStep:
    return compile_train_step(make_config(workspace, workspace.root / "unused"), sgd=True)


def gradient_of_step(step: CompiledStep, state: train.TrainState, batch: dict[str, np.ndarray]) -> tuple[float, Any]:
    """The loss and gradient of one SGD(lr=1) step: params_before - params_after."""
    before = host(state.params)
    new_state, step_metrics = step(state, batch)
    assert bool(step_metrics["finite"])
    return float(step_metrics["loss"]), jax.tree.map(np.subtract, before, host(new_state.params))


def assert_gradients_close(actual: Any, expected: Any) -> None:
    # fp32 sums in another order (per-device partial gradients, tensor-split matmuls): differences
    # are rounding errors relative to the largest gradient entry, ~1e-7 each.
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "mesh",
    [
        pytest.param(("mesh.data=-1", "mesh.fsdp=1"), id="dp"),
        pytest.param(("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), id="hybrid-dp-fsdp-tp"),
    ],
)
def test_meshes_compute_the_same_step(workspace, sgd_fsdp, mesh):
    step = compile_train_step(make_config(workspace, workspace.root / "unused", *mesh), sgd=True)
    assert dict(step.mesh.shape) != dict(sgd_fsdp.mesh.shape)
    expected_loss, expected = gradient_of_step(sgd_fsdp, sgd_fsdp.fresh(), sgd_fsdp.batch)
    loss, gradient = gradient_of_step(step, step.fresh(), step.batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_gradients_close(gradient, expected)


def test_gradient_accumulation_averages_the_micro_batches(workspace, sgd_fsdp):
    cfg = make_config(workspace, workspace.root / "unused", "train.grad_accum_steps=2")
    accumulating = compile_train_step(cfg, sgd=True)
    # 16 rows, micro-batch i is rows [8i, 8i + 8): the cache's 8 samples, then the same reversed.
    batch = {k: np.concatenate([v[:BATCH], v[:BATCH][::-1]]) for k, v in accumulating.batch.items()}
    rng = host(accumulating.initial.rng)
    loss, gradient = gradient_of_step(accumulating, accumulating.fresh(), batch)

    # Micro-batch i of step s draws its noise from fold_in(fold_in(rng, s), i); a plain step draws
    # from fold_in(state.rng, state.step). So the plain step with rng = fold_in(rng, 0) and step = i
    # sees exactly micro-batch i's randomness.
    micro_losses, micro_gradients = [], []
    for i in range(2):
        state = sgd_fsdp.fresh()
        state = state.replace(
            step=sgd_fsdp.replicated(jnp.int32(i)), rng=sgd_fsdp.replicated(jax.random.fold_in(rng, 0))
        )
        micro_batch = {k: v[i * BATCH : (i + 1) * BATCH] for k, v in batch.items()}
        micro_loss, micro_gradient = gradient_of_step(sgd_fsdp, state, micro_batch)
        micro_losses.append(micro_loss)
        micro_gradients.append(micro_gradient)

    assert micro_losses[0] != micro_losses[1]  # the two halves really differ
    assert loss == pytest.approx(np.mean(micro_losses), rel=1e-5)
    assert_gradients_close(gradient, jax.tree.map(lambda a, b: (a + b) / 2, *micro_gradients))
