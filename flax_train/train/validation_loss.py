"""The validation loss (``validation.loss_every_steps``): the trained parameters' loss on the
samples ``data.validation_split`` holds out of training.

Every evaluation gives each held-out sample the same noise and timestep, drawn from a fixed key
and the sample's cache index (never from the run's seed), so the number moves only when the
weights do: curves of runs with other seeds, and of a resumed run, are comparable. The loss is the
training step's (prediction type, min-SNR weighting, noise offset) without caption dropout, LoRA
dropout or timestep bias (timesteps uniform, so runs with other biases compare), and no gradient:
one forward program per bucket shape, compiled ahead of time and sharded like the step.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_train import config as config_lib, diffusion, sharding
from flax_train.data import cache as cache_lib
from flax_train.train.state import TrainState, frozen_of
from flax_train.train.step import StepConfig, compile_ahead, global_batch, model_loss, per_example_loss
from sdxl_common.errors import BadInput

log = logging.getLogger(__name__)

NOISE_SEED = 0x7A11  # any constant: the key of the held-out samples' noise and timesteps
SAMPLE_INDEX = "sample_index"  # the batch's extra array: each row's cache index
TIMESTEP_RANGES = 4  # val_loss_t<lo>_<hi> for this many equal ranges of the schedule's timesteps


def fixed_noise_and_timesteps(sample_index: jax.Array, latent_shape: tuple[int, ...], num_train_timesteps: int,
                              noise_offset: float) -> tuple[jax.Array, jax.Array]:
    """The noise [B, *latent_shape] and timesteps [B] of the held-out samples ``sample_index``
    [B]: each a function of the sample's index alone."""
    def draw(index: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_noise, k_time = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(NOISE_SEED), index))
        noise = diffusion.sample_noise(k_noise, (1, *latent_shape), noise_offset)[0]
        return noise, jax.random.randint(k_time, (), 0, num_train_timesteps, dtype=jnp.int32)

    return jax.vmap(draw)(sample_index)


def validation_losses(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    schedule: diffusion.NoiseSchedule,
    cfg: StepConfig,
) -> tuple[jax.Array, jax.Array]:
    """Each held-out sample's loss under ``state.params`` (the trained weights, not the EMA), and
    its timestep."""
    latents = batch["latents"].astype(jnp.float32)
    noise, t = fixed_noise_and_timesteps(batch[SAMPLE_INDEX], latents.shape[1:], schedule.num_train_timesteps,
                                         cfg.noise_offset)

    def loss(unet: nnx.Module, conditioned: dict[str, jax.Array]) -> jax.Array:
        return per_example_loss(unet, conditioned, latents, noise, t, schedule, cfg)

    return model_loss(graphdef, state.params, frozen_of(state), batch, loss), t


def summary(losses: np.ndarray, timesteps: np.ndarray, num_train_timesteps: int) -> dict[str, float]:
    """``val_loss`` (the mean over the samples) and ``val_loss_t<lo>_<hi>`` (over those of each
    timestep range holding any)."""
    out = {"val_loss": float(np.mean(losses))}
    edges = [num_train_timesteps * i // TIMESTEP_RANGES for i in range(TIMESTEP_RANGES + 1)]
    for lo, hi in zip(edges, edges[1:]):
        inside = (timesteps >= lo) & (timesteps < hi)
        if inside.any():
            out[f"val_loss_t{lo}_{hi}"] = float(np.mean(losses[inside]))
    return out


class ValidationLoss:
    """The held-out batches and their compiled forward programs; called with the training state,
    returns the scalars to log."""

    def __init__(self, cfg: config_lib.Config, cache: cache_lib.LatentCache, graphdef: nnx.GraphDef,
                 schedule: diffusion.NoiseSchedule, step_cfg: StepConfig, state: TrainState, state_shardings: Any,
                 mesh: jax.sharding.Mesh, shapes: list[dict[str, jax.ShapeDtypeStruct]]):
        """``shapes``: a global batch of global_batch_size rows of each bucket (``loop.batch_shapes``)."""
        rows, share = cfg.train.global_batch_size, cfg.data.validation_split
        self.batches = cache_lib.validation_batches(cache.buckets, share, rows)
        if not self.batches:
            held = sum(len(cache_lib.held_out(len(b), share)) for b in cache.buckets)
            raise BadInput(f"data.validation_split={share} holds out {held} samples: no full validation batch of "
                           f"{rows} (train.global_batch_size; with buckets, per bucket)")
        self.cache, self.num_train_timesteps = cache, schedule.num_train_timesteps
        process, processes = jax.process_index(), jax.process_count()
        self.rows = slice(process * rows // processes, (process + 1) * rows // processes)
        fn = lambda state, batch: validation_losses(state, batch, graphdef=graphdef, schedule=schedule, cfg=step_cfg)
        evaluated = {b.layout.fields["latents"].shape for b in cache.buckets if len(cache_lib.held_out(len(b), share)) >= rows}
        self.programs: dict[tuple, Any] = {}
        for bucket_shapes in shapes:
            if bucket_shapes["latents"].shape[1:] in evaluated:
                with_index = {**bucket_shapes, SAMPLE_INDEX: jax.ShapeDtypeStruct((rows,), jnp.int32)}
                self.programs[bucket_shapes["latents"].shape[1:]] = compile_ahead(
                    fn, state, state_shardings, with_index, mesh, out_shardings=sharding.replicated(mesh),
                    donate_state=False)
        self.mesh = mesh
        log.info("validation loss compiled: %d held-out samples in %d batches of %d", len(self.batches) * rows,
                 len(self.batches), rows)

    def __call__(self, state: TrainState) -> dict[str, float]:
        local = [b[self.rows] for b in self.batches]
        threads = min(cache_lib.MAX_READER_THREADS, len(local))
        losses, timesteps = [], []
        with cache_lib.Loader(self.cache.read_batch, local, threads=threads, read_ahead=threads,
                              num_batches=len(local)) as batches:
            for indices, batch in zip(local, batches):
                batch[SAMPLE_INDEX] = indices.astype(np.int32)
                program = self.programs[batch["latents"].shape[1:]]
                shardings = {k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}
                loss, t = jax.device_get(program(state, global_batch(batch, shardings)))
                losses.append(loss)
                timesteps.append(t)
        return summary(np.concatenate(losses), np.concatenate(timesteps), self.num_train_timesteps)
