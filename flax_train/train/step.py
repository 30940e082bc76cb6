"""The training step: the diffusion loss, one optimizer update with EMA and the non-finite guard,
and its ahead-of-time compile with explicit shardings and donated state."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_train import config as config_lib, diffusion, flops as flops_lib, hlo_cost, lora, models, sharding
from sdxl_common import sdxl, storage
from flax_train import prompt_encoding
from flax_train.train.model import unet_architecture, unet_options
from flax_train.train.state import TrainState, frozen_of


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static part of the step: everything it needs that is not an array."""

    prediction_type: str
    snr_gamma: float | None
    noise_offset: float
    caption_dropout: float
    grad_accum_steps: int
    ema_decay: float
    ema_start_step: int
    ema_every: int


LORA_DROPOUT_STREAM = 0x10A  # any constant: the stream of LoRA dropout masks under the step key


def diffusion_loss(
    params: nnx.State,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    schedule: diffusion.NoiseSchedule,
    timestep_weights: jax.Array | None,
    empty: dict[str, jax.Array],
    cfg: StepConfig,
    frozen: nnx.State | None = None,
) -> jax.Array:
    """The step's loss of the UNet ``graphdef`` with ``params`` (and, for LoRA, ``frozen``) on ``batch``.
    With ``lora.train_text_encoder`` the graph also holds both text encoders, and the batch the
    captions' token ids in place of their embeddings."""
    def loss(unet: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
        return _unet_loss(unet, batch, key, schedule, timestep_weights, empty, cfg)

    if frozen is None:
        return model_loss(graphdef, params, frozen, batch, loss)
    # The dropout masks' key is folded in rather than split off with the keys in _unet_loss, so
    # that everything else draws what a full fine-tune draws.
    with lora.dropout(jax.random.fold_in(key, LORA_DROPOUT_STREAM)):
        return model_loss(graphdef, params, frozen, batch, loss)


def model_loss(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State | None,
    batch: dict[str, jax.Array],
    loss: Callable[[nnx.Module, dict[str, jax.Array]], jax.Array],
) -> jax.Array:
    """``loss(unet, batch)`` of the UNet ``graphdef`` with ``params`` (and, for LoRA, ``frozen``):
    what the training step and the validation loss share."""
    if frozen is None:
        return loss(nnx.merge(graphdef, params), batch)
    # LoRA: the factors beside the frozen weights (no gradient: only ``params`` is differentiated).
    parts = lora.components(nnx.merge(graphdef, lora.combine(params, frozen)))
    if "text_encoder" in parts:
        # Encoded here, through the adapted encoders, as prepare encodes cached captions (in
        # data.max_text_chunks chunks of 77 ids); the step's caption dropout then replaces the
        # result as it replaces cached embeddings.
        embeds = prompt_encoding.encode_text(
            parts["text_encoder"], parts["text_encoder_2"], {"ids": batch["input_ids"]},
            {"ids": batch["input_ids_2"]}, chunks=batch["input_ids"].shape[1] // sdxl.TOKEN_LENGTH, weighting=None)
        batch = dict(batch, **dict(zip(("prompt_embeds", "pooled_prompt_embeds"), embeds)))
    return loss(parts["unet"], batch)


def _unet_loss(
    unet: nnx.Module,
    batch: dict[str, jax.Array],
    key: jax.Array,
    schedule: diffusion.NoiseSchedule,
    timestep_weights: jax.Array | None,
    empty: dict[str, jax.Array],
    cfg: StepConfig,
) -> jax.Array:
    latents = batch["latents"].astype(jnp.float32)
    k_noise, k_time, k_drop = jax.random.split(key, 3)
    noise = diffusion.sample_noise(k_noise, latents.shape, cfg.noise_offset)
    t = diffusion.sample_timesteps(k_time, latents.shape[0], timestep_weights, schedule.num_train_timesteps)
    prompt_embeds, pooled = diffusion.drop_captions(
        k_drop,
        batch["prompt_embeds"],
        batch["pooled_prompt_embeds"],
        empty["prompt_embeds"],
        empty["pooled_prompt_embeds"],
        cfg.caption_dropout,
    )
    conditioned = dict(batch, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)
    return per_example_loss(unet, conditioned, latents, noise, t, schedule, cfg).mean()


def per_example_loss(
    unet: nnx.Module,
    batch: dict[str, jax.Array],
    latents: jax.Array,
    noise: jax.Array,
    t: jax.Array,
    schedule: diffusion.NoiseSchedule,
    cfg: StepConfig,
) -> jax.Array:
    """Each example's loss of the UNet on ``latents`` (float32) noised with ``noise`` to the
    timesteps ``t``, conditioned on ``batch``'s embeddings: the prediction's squared error,
    min-SNR weighted when the config says so."""
    noisy = diffusion.add_noise(schedule, latents, noise, t)
    pred = unet(noisy, t, batch["prompt_embeds"], text_embeds=batch["pooled_prompt_embeds"],
                time_ids=batch["add_time_ids"]).astype(jnp.float32)
    target = diffusion.target(schedule, cfg.prediction_type, latents, noise, t)
    per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
    if cfg.snr_gamma:
        per_example = per_example * diffusion.min_snr_weight(schedule, t, cfg.snr_gamma, cfg.prediction_type)
    return per_example


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    schedule: diffusion.NoiseSchedule,
    timestep_weights: jax.Array | None,
    empty: dict[str, jax.Array],
    cfg: StepConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(state.rng, state.step)
    loss_fn = functools.partial(
        diffusion_loss, graphdef=graphdef, schedule=schedule, timestep_weights=timestep_weights, empty=empty, cfg=cfg,
        frozen=frozen_of(state),
    )
    grad_fn = jax.value_and_grad(loss_fn)

    if cfg.grad_accum_steps == 1:
        loss, grads = grad_fn(state.params, batch, key)
    else:
        # Micro-batches run one after another inside the step: one optimizer update, fixed shapes.
        # Micro-batch i is rows i, i + n, i + 2n, ... (n = grad_accum_steps): each device already
        # holds its share of every micro-batch. Contiguous blocks of rows would live on a few
        # devices only, and XLA would gather the whole batch onto every device to rebalance them.
        micro = jax.tree.map(lambda x: x.reshape(-1, cfg.grad_accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, inputs):
            loss_sum, grad_sum = carry
            index, micro_batch = inputs
            loss, grads = grad_fn(state.params, micro_batch, jax.random.fold_in(key, index))
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss_sum, grad_sum), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(cfg.grad_accum_steps), micro)
        )
        loss = loss_sum / cfg.grad_accum_steps
        grads = jax.tree.map(lambda g: g / cfg.grad_accum_steps, grad_sum)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # A non-finite loss or gradient never reaches the parameters (so no checkpoint is poisoned);
    # the host decides from the metrics whether to carry on or stop.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_if_finite(params, state.params)
    opt_state = keep_if_finite(opt_state, state.opt_state)

    ema = state.ema
    if ema is not None:
        due = finite & (state.step >= cfg.ema_start_step) & (state.step % cfg.ema_every == 0)
        decay = jnp.where(due, cfg.ema_decay, 1.0)
        # Before start_step the average simply follows the parameters.
        decay = jnp.where(state.step < cfg.ema_start_step, 0.0, decay)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)

    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema=ema,
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    step_metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": lr_schedule(state.step),
        "finite": finite,
        "skipped_steps": new_state.skipped,
    }
    return new_state, step_metrics


def step_config(cfg: config_lib.Config, prediction_type: str) -> StepConfig:
    t = cfg.train
    return StepConfig(
        prediction_type=prediction_type,
        snr_gamma=t.snr_gamma,
        noise_offset=t.noise_offset,
        caption_dropout=t.caption_dropout,
        grad_accum_steps=t.grad_accum_steps,
        ema_decay=t.ema.decay,
        ema_start_step=t.ema.start_step,
        ema_every=t.ema.every,
    )


def make_step_fn(
    cfg: config_lib.Config,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr: optax.Schedule,
    schedule: diffusion.NoiseSchedule,
    empty: dict[str, jax.Array],
    prediction_type: str,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step`` with everything but the state and the batch bound from the config."""
    weights = None
    if cfg.train.timestep_bias.strategy != "none":
        b = cfg.train.timestep_bias
        weights = jnp.asarray(
            diffusion.timestep_weights(schedule.num_train_timesteps, b.strategy, b.multiplier, b.portion, b.begin, b.end)
        )
    return functools.partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        lr_schedule=lr,
        schedule=schedule,
        timestep_weights=weights,
        empty=empty,
        cfg=step_config(cfg, prediction_type),
    )


def batch_spec(architecture: dict[str, Any], batch: int, latent_size: int,
               text_chunks: int = 1) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, jax.Array]]:
    """The shapes of a training batch for a UNet architecture (what the latent cache yields), and
    zero unconditional inputs: for benchmarks and ahead-of-time compiles, which have no cache.
    ``text_chunks``: the captions' chunks of 77 tokens (data.max_text_chunks)."""
    text_dim = architecture["cross_attention_dim"]
    # The text_time embedding's input is the pooled text embedding + 6 time ids x addition_time_embed_dim.
    pooled_dim = architecture["projection_class_embeddings_input_dim"] - 6 * architecture["addition_time_embed_dim"]
    shapes = {
        "latents": jax.ShapeDtypeStruct((batch, architecture["in_channels"], latent_size, latent_size), jnp.float32),
        "prompt_embeds": jax.ShapeDtypeStruct((batch, text_chunks * sdxl.TOKEN_LENGTH, text_dim), jnp.float32),
        "pooled_prompt_embeds": jax.ShapeDtypeStruct((batch, pooled_dim), jnp.float32),
        "add_time_ids": jax.ShapeDtypeStruct((batch, 6), jnp.int32),
    }
    empty = {k: jnp.zeros(shapes[k].shape[1:], jnp.float32) for k in ("prompt_embeds", "pooled_prompt_embeds")}
    return shapes, empty


def unconditional_inputs(cache: Any, base: Path) -> dict[str, jax.Array]:
    """What caption dropout trains the unconditional branch on: the input every sampler feeds when
    there is no negative prompt (zeros for SDXL, see ``sdxl.force_zeros_for_empty_prompt``; else
    the encoded empty prompt, which the cache holds)."""
    empty = {k: jnp.asarray(v) for k, v in cache.empty_prompt().items()}
    if sdxl.force_zeros_for_empty_prompt(base):
        empty = jax.tree.map(jnp.zeros_like, empty)
    return empty


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
    """Each process contributes its local rows; together they form the global, sharded batch."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


class CompiledStep(NamedTuple):
    executable: Any  # called as executable(state, batch) -> (state, metrics)
    seconds: float  # lowering and compiling
    hardware_flops: float | None  # per device and step, loops counted as often as they run


def compile_step(
    step_fn: Callable,
    state: TrainState,
    state_shardings: Any,
    batch_shapes: dict[str, jax.ShapeDtypeStruct],
    mesh: jax.sharding.Mesh,
) -> CompiledStep:
    """Traces, lowers and compiles the step ahead of time (see ``CompiledStep``)."""
    start = time.perf_counter()
    compiled = compile_ahead(step_fn, state, state_shardings, batch_shapes, mesh,
                             out_shardings=(state_shardings, sharding.replicated(mesh)), donate_state=True)
    seconds = time.perf_counter() - start
    return CompiledStep(compiled, seconds, hardware_flops(compiled, mesh.size))


def compile_ahead(
    fn: Callable,
    state: TrainState,
    state_shardings: Any,
    batch_shapes: dict[str, jax.ShapeDtypeStruct],
    mesh: jax.sharding.Mesh,
    *,
    out_shardings: Any,
    donate_state: bool,
) -> Any:
    """``fn(state, batch)`` traced, lowered and compiled ahead of time, the state sharded as
    ``state_shardings`` and the batch along the mesh's batch axes."""
    batch_shardings = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=out_shardings,
        donate_argnums=(0,) if donate_state else (),
    )
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch_shapes.items()
    }
    # The mesh as the ambient one while tracing: kernels that must run per device (splash
    # attention's shard_map, models.layers._per_device) read it from there.
    with jax.set_mesh(mesh):
        traced = jitted.trace(abstract_state, abstract_batch)
    return traced.lower().compile()


def hardware_flops(compiled: Any, devices: int) -> float | None:
    """The program's FLOPs per device, counted from its text by ``hlo_cost``: XLA's own cost
    analysis counts a loop body (scanned layers, gradient accumulation's micro-batches) once.

    Full SDXL's program text is about 60 MB and counting it takes half a minute, so the count is
    kept beside JAX's persistent compilation cache, named by the executable's fingerprint. A
    program loaded from that cache has another fingerprint than the same program compiled afresh,
    so the first restart (after a preemption, say) counts once more; later restarts get the count
    back at once.
    """
    record = None
    cache = jax.config.jax_compilation_cache_dir
    try:
        fingerprint = compiled.runtime_executable().fingerprint
    except Exception:  # a backend without fingerprints: count every time
        fingerprint = None
    if cache and fingerprint:
        name = hashlib.sha256(str(fingerprint).encode()).hexdigest()[:32]
        record = storage.path(cache) / "hardware_flops" / f"{name}-{devices}-v{hlo_cost.ACCOUNTING}.json"
        try:
            return json.loads(record.read_text())["flops"]
        except (OSError, ValueError, KeyError):
            pass
    flops = hlo_cost.analyse(compiled.as_text(), devices).flops or None
    if record is not None:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"flops": flops}))
        except OSError:  # a cache folder this process cannot write: it counts again next time
            pass
    return flops


def model_flops_per_image(cfg: config_lib.Config, base: Path, batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> float:
    """3 x the UNet's forward FLOPs for one image: the numerator of MFU (see ``flax_train.flops``).
    (With ``lora.train_text_encoder`` the batch holds token ids, not the embeddings the UNet's
    count needs, and the text encoders' share, a few percent of SDXL's, is not counted.)"""
    options = {**unet_options(cfg), "attention": "xla", "remat": "none"}
    architecture = unet_architecture(cfg, base)
    shapes = {**batch_spec(architecture, 1, 1, cfg.data.max_text_chunks)[0], **batch_shapes}
    return 3 * flops_lib.unet_forward_flops(models.abstract(architecture, **options), shapes)
