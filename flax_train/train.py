"""The SDXL UNet trainer, top to bottom in pipeline order:

mesh -> latent cache and loader -> UNet (sharded) and optimizer -> resume -> compiled step -> loop
(metrics one step late, checkpoints, validation images, preemption) -> export.

The step is one ``jax.jit`` with explicit in/out shardings and donated state, compiled ahead of
time so that shape, sharding and memory problems surface before step 1.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from flax_train import (
    checkpoint,
    config as config_lib,
    diffusion,
    export,
    flops as flops_lib,
    hlo_cost,
    lora,
    metrics,
    models,
    optim,
    sampling,
    sharding,
)
from sdxl_common import lora_files, sdxl, storage
from flax_train.data import prepare
from flax_train.models import clip, weights

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: nnx.State  # what is trained, param_dtype (fp32 by default): the UNet, or its LoRA factors
    opt_state: Any
    ema: nnx.State | None  # exponential moving average of params (None when EMA is off)
    rng: jax.Array  # raw uint32 PRNG key; per-step keys are folded in from the step number
    skipped: jax.Array  # int32 scalar: updates skipped for a non-finite loss or gradient


@flax.struct.dataclass
class LoraTrainState(TrainState):
    """A LoRA run's state: ``params`` are the LoRA factors, and ``frozen`` the UNet's own weights
    (with ``lora.train_text_encoder`` also both text encoders') in the compute dtype, never
    updated. They travel with the state through the compiled step (an input, not a constant
    compiled into it) but are no part of a checkpoint, which holds the plain TrainState
    (``trainable``): they come from model.pretrained again. A subclass rather than a field of
    TrainState, so that a full fine-tune's checkpoints keep their tree (and older ones still
    restore)."""

    frozen: nnx.State


def _train_state_fields(state: TrainState) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}


def trainable(state: TrainState) -> TrainState:
    """What a checkpoint holds: the state without any frozen weights."""
    return TrainState(**_train_state_fields(state))


def with_frozen(state: TrainState, frozen: nnx.State | None) -> TrainState:
    """``state`` with LoRA's frozen weights beside it (as it is for ``frozen=None``)."""
    return state if frozen is None else LoraTrainState(**_train_state_fields(state), frozen=frozen)


def frozen_of(state: TrainState) -> nnx.State | None:
    return state.frozen if isinstance(state, LoraTrainState) else None


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


# --------------------------------------------------------------------------------------------
# Loss and step


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
    if frozen is None:
        return _unet_loss(nnx.merge(graphdef, params), batch, key, schedule, timestep_weights, empty, cfg)
    # LoRA: the factors beside the frozen weights (no gradient: only ``params`` is differentiated).
    parts = lora.components(nnx.merge(graphdef, lora.combine(params, frozen)))
    # The dropout masks' key is folded in rather than split off with the keys in _unet_loss, so
    # that everything else draws what a full fine-tune draws.
    with lora.dropout(jax.random.fold_in(key, LORA_DROPOUT_STREAM)):
        if "text_encoder" in parts:
            # Encoded here, through the adapted encoders; caption dropout then replaces the result
            # as it replaces cached embeddings.
            embeds = clip.encode_prompts(parts["text_encoder"], parts["text_encoder_2"], batch["input_ids"],
                                         batch["input_ids_2"])
            batch = dict(batch, **dict(zip(("prompt_embeds", "pooled_prompt_embeds"), embeds)))
        return _unet_loss(parts["unet"], batch, key, schedule, timestep_weights, empty, cfg)


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
    noisy = diffusion.add_noise(schedule, latents, noise, t)
    prompt_embeds, pooled = diffusion.drop_captions(
        k_drop,
        batch["prompt_embeds"],
        batch["pooled_prompt_embeds"],
        empty["prompt_embeds"],
        empty["pooled_prompt_embeds"],
        cfg.caption_dropout,
    )
    pred = unet(noisy, t, prompt_embeds, text_embeds=pooled, time_ids=batch["add_time_ids"]).astype(jnp.float32)
    target = diffusion.target(schedule, cfg.prediction_type, latents, noise, t)
    per_example = jnp.mean(jnp.square(pred - target), axis=tuple(range(1, pred.ndim)))
    if cfg.snr_gamma:
        per_example = per_example * diffusion.min_snr_weight(schedule, t, cfg.snr_gamma, cfg.prediction_type)
    return per_example.mean()


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


# --------------------------------------------------------------------------------------------
# State creation (abstract first, then shardings, then sharded creation)


def unet_options(cfg: config_lib.Config) -> dict[str, Any]:
    return dict(
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        attention=cfg.model.attention,
        remat=cfg.model.remat,
        scan_layers=cfg.model.scan_layers,
    )


def unet_architecture(cfg: config_lib.Config, base: Path) -> dict[str, Any]:
    """The pipeline folder's UNet config, or ``model.unet_config``'s for a new UNet."""
    spec = cfg.model.unet_config
    if spec is None:
        return models.read_config(models.resolve_folder(base, "unet"))
    if spec == "sdxl":
        return dict(sdxl.UNET_CONFIG)
    return {"_class_name": "UNet2DConditionModel", **models.thaw_config(spec)}


def build_unet(
    cfg: config_lib.Config, mesh: jax.sharding.Mesh, base: Path, rules: dict[str, Any]
) -> tuple[nnx.GraphDef, nnx.State]:
    """The UNet's graph and parameters, each parameter created directly in its sharding.

    The UNet is loaded from the pipeline folder's ``unet/`` (fine-tuning), or initialised with
    random weights of ``model.unet_config``'s architecture.
    """
    if cfg.model.unet_config is None:
        place = functools.partial(sharding.variable_sharding, mesh=mesh, rules=rules)
        unet = models.load(base, subfolder="unet", sharding_fn=place, **unet_options(cfg))
        return nnx.split(unet, nnx.Param)
    return init_unet(cfg, unet_architecture(cfg, base), mesh, rules)


def init_unet(
    cfg: config_lib.Config, architecture: dict[str, Any], mesh: jax.sharding.Mesh, rules: dict[str, Any]
) -> tuple[nnx.GraphDef, nnx.State]:
    """A UNet of ``architecture`` with random weights drawn from ``train.seed``, placed sharded.

    The weights are drawn op by op on the host's CPU, and each device receives only its shard.
    Compiled as one program instead, the initialisers of SDXL's 1,680 arrays each become a kernel
    of their own, and compiling them dominates: a fifth-width SDXL took 248 s to initialise that way
    on a 2-core host, and takes 18 s op by op, optimizer state included (the phase times that
    ``benchmarks/train_throughput.py --unet medium`` prints). Every process draws the same weights
    from the same seed.
    """
    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU out: the first accelerator draws them
        host = jax.local_devices()[0]
    with jax.default_device(host):
        graphdef, params = nnx.split(models.create(architecture, seed=cfg.train.seed, **unet_options(cfg)), nnx.Param)
    shardings = sharding.tree_shardings(params, mesh, rules)
    return graphdef, jax.tree.map(lambda x, s: weights.place(np.asarray(x), s), params, shardings)


def frozen_unet_options(cfg: config_lib.Config) -> dict[str, Any]:
    """LoRA's UNet: the base weights stored in the compute dtype (2 bytes a weight in bf16: they
    get no gradient, optimizer state or EMA, so nothing needs them in fp32), the factors in
    ``model.param_dtype``."""
    return dict(unet_options(cfg), param_dtype=jnp.dtype(cfg.model.dtype))


def frozen_text_options(cfg: config_lib.Config) -> dict[str, Any]:
    """The text encoders of ``lora.train_text_encoder``: frozen like the UNet (``frozen_unet_options``)."""
    dtype = jnp.dtype(cfg.model.dtype)
    return dict(dtype=dtype, param_dtype=dtype, attention=cfg.model.attention, remat=cfg.model.remat)


def text_encoder_configs(cfg: config_lib.Config, base: Path) -> dict[str, dict[str, Any]]:
    """With ``lora.train_text_encoder``: name -> config of both text encoders; else none."""
    if not cfg.lora.train_text_encoder:
        return {}
    return {name: models.read_config(base / name) for name in lora.TEXT_ENCODERS}


def lora_unet(cfg: config_lib.Config, architecture: dict[str, Any],
              text_configs: dict[str, dict[str, Any]] | None = None) -> nnx.Module:
    """An abstract UNet of ``architecture`` (shapes only), with ``text_configs`` (see
    ``text_encoder_configs``) in an ``nnx.Dict`` with the text encoders, with concrete LoRA factors
    drawn from ``train.seed``: called under ``jax.jit`` it creates the factors alone, under
    ``nnx.eval_shape`` it is the whole model's shape."""
    unet = models.abstract(architecture, **frozen_unet_options(cfg))
    encoders = {name: models.abstract(config, **frozen_text_options(cfg))
                for name, config in (text_configs or {}).items()}
    return lora.inject_all(unet, encoders, cfg.lora, seed=cfg.train.seed, param_dtype=jnp.dtype(cfg.model.param_dtype))


def lora_init(cfg: config_lib.Config) -> tuple[config_lib.Config, lora_files.LoraWeights | None]:
    """With ``lora.init_from``: the config with that file's rank, alpha and targets, and the file's
    factors to start from (component -> module -> factors: the UNet's, and with
    ``lora.train_text_encoder`` the text encoders' it holds); else ``cfg`` unchanged and None."""
    source = cfg.lora.init_from
    if cfg.train.method != "lora" or not source:
        return cfg, None
    base = models.pretrained_pipeline(cfg.model)
    architecture = unet_architecture(cfg, base)
    paths = {name: lora.module_paths(models.abstract(models.read_config(base / name)))
             for name in lora.TEXT_ENCODERS if (base / name).is_dir()}
    paths["unet"] = lora.module_paths(models.abstract(architecture))
    read = lora_files.read(source, modules=paths, unet_config=architecture)
    text = {name: read[name] for name in lora.TEXT_ENCODERS if name in read}
    if text and not cfg.lora.train_text_encoder:
        log.warning("lora.init_from %s: its text-encoder factors are left out (lora.train_text_encoder is off)", source)
        text = {}
    elif cfg.lora.train_text_encoder and set(text) != set(lora.TEXT_ENCODERS):
        log.info("lora.init_from %s: no factors for %s, whose adapters start afresh", source,
                 " and ".join(sorted(set(lora.TEXT_ENCODERS) - set(text))))
    start = {"unet": read.get("unet", {}), **text}
    resolved = lora.config_from_file(cfg.lora, start["unet"], source, text)
    if resolved != cfg.lora:
        log.info("lora.init_from %s: rank %d, alpha %s, target modules %s (the file's, not the lora section's)",
                 source, resolved.rank, resolved.alpha, list(resolved.target_modules))
    return dataclasses.replace(cfg, lora=resolved), start


def build_lora_unet(
    cfg: config_lib.Config, mesh: jax.sharding.Mesh, base: Path, rules: dict[str, Any],
    start: lora_files.LoraWeights | None = None,
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The graph of the pretrained UNet with LoRA adapters (with ``lora.train_text_encoder``: of
    the UNet and both text encoders, see ``lora.inject_all``), its LoRA factors (``start``'s values
    when given, see ``lora_init``) and its frozen weights, each created directly in its sharding
    (the frozen ones by the FSDP rules of a full fine-tune)."""
    place = functools.partial(sharding.variable_sharding, mesh=mesh, rules=rules)
    unet = models.load(base, subfolder="unet", sharding_fn=place, **frozen_unet_options(cfg))
    text_configs = text_encoder_configs(cfg, base)
    encoders = {name: models.load(base, subfolder=name, sharding_fn=place, **frozen_text_options(cfg))
                for name in text_configs}
    _, frozen = nnx.split(nnx.Dict(unet=unet, **encoders) if encoders else unet, nnx.Param)
    architecture = unet_architecture(cfg, base)
    graphdef, abstract_factors, _ = lora.split(nnx.eval_shape(lambda: lora_unet(cfg, architecture, text_configs)))

    @functools.partial(jax.jit, out_shardings=sharding.tree_shardings(abstract_factors, mesh, rules))
    def init():
        return lora.split(lora_unet(cfg, architecture, text_configs))[1]

    factors = init()
    if start is not None:
        factors = lora.factors_from_file(factors, start, cfg.lora.init_from)
    return graphdef, factors, frozen


def build_optimizer(cfg: config_lib.Config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    t = cfg.train
    lr = optim.learning_rate_schedule(
        t.learning_rate, kind=t.lr_schedule, warmup_steps=t.warmup_steps, total_steps=t.max_steps
    )
    tx = optim.make_optimizer(
        t.optimizer,
        lr,
        b1=t.betas[0],
        b2=t.betas[1],
        eps=t.eps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
    )
    return tx, lr


def initial_state_fn(cfg: config_lib.Config, tx: optax.GradientTransformation) -> Callable[[nnx.State], TrainState]:
    def init(params: nnx.State) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema=jax.tree.map(jnp.copy, params) if cfg.train.ema.enabled else None,
            rng=jax.random.PRNGKey(cfg.train.seed),
            skipped=jnp.zeros((), jnp.int32),
        )

    return init


def build_state(
    cfg: config_lib.Config,
    params: nnx.State,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules: dict[str, Any],
    frozen: nnx.State | None = None,
) -> tuple[TrainState, Any]:
    """The initial TrainState, sharded; and the sharding tree of the state for jit and restore.
    ``frozen``: LoRA's frozen UNet weights, kept as they are (already sharded)."""
    init = initial_state_fn(cfg, tx)
    state_shardings = sharding.tree_shardings(jax.eval_shape(init, params), mesh, rules)
    param_shardings = sharding.tree_shardings(params, mesh, rules)
    state = jax.jit(init, in_shardings=(param_shardings,), out_shardings=state_shardings)(params)
    if frozen is not None:
        state = with_frozen(state, frozen)
        state_shardings = with_frozen(state_shardings, sharding.tree_shardings(frozen, mesh, rules))
    return state, state_shardings


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
    batch_shardings = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch_shapes.items()
    }
    start = time.perf_counter()
    # The mesh as the ambient one while tracing: kernels that must run per device (splash
    # attention's shard_map, models.layers._per_device) read it from there.
    with jax.set_mesh(mesh):
        traced = jitted.trace(abstract_state, abstract_batch)
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    return CompiledStep(compiled, seconds, hardware_flops(compiled, mesh.size))


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
    shapes = {**batch_spec(architecture, 1, 1)[0], **batch_shapes}
    return 3 * flops_lib.unet_forward_flops(models.abstract(architecture, **options), shapes)


# --------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainResult:
    run_dir: epath.Path
    step: int
    losses: list[float]
    export_dir: epath.Path | None
    stopped_by_preemption: bool


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


def batch_spec(architecture: dict[str, Any], batch: int, latent_size: int) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, jax.Array]]:
    """The shapes of a training batch for a UNet architecture (what the latent cache yields), and
    zero unconditional inputs: for benchmarks and ahead-of-time compiles, which have no cache."""
    text_dim = architecture["cross_attention_dim"]
    # The text_time embedding's input is the pooled text embedding + 6 time ids x addition_time_embed_dim.
    pooled_dim = architecture["projection_class_embeddings_input_dim"] - 6 * architecture["addition_time_embed_dim"]
    shapes = {
        "latents": jax.ShapeDtypeStruct((batch, architecture["in_channels"], latent_size, latent_size), jnp.float32),
        "prompt_embeds": jax.ShapeDtypeStruct((batch, sdxl.TOKEN_LENGTH, text_dim), jnp.float32),
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


def train(cfg: config_lib.Config, *, max_steps: int | None = None) -> TrainResult:
    """Runs (or resumes) the training described by ``cfg``; ``max_steps`` stops early (tests).

    SIGTERM from here on (start-up and compilation included) stops the run with a checkpoint and
    a normal return: see ``checkpoint.PreemptionGuard``.
    """
    with checkpoint.PreemptionGuard(cfg.checkpoint.sigterm_grace_s) as guard:
        return _train(cfg, max_steps, guard)


def _train(cfg: config_lib.Config, max_steps: int | None, guard: checkpoint.PreemptionGuard) -> TrainResult:
    config_lib.validate(cfg, jax.device_count())
    cfg, lora_start = lora_init(cfg)
    run_dir = storage.writable_folder(cfg.run_dir)
    if jax.process_index() == 0:
        config_lib.save(cfg, run_dir / "config.yaml")

    # 1. Mesh.
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.merged_rules(cfg.mesh.rules)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # 2. Pipeline folder, latent cache and loader.
    base = models.pretrained_pipeline(cfg.model)
    cache = prepare.open_cache(cfg, base)
    scheduler_config = sdxl.scheduler_config(base)
    schedule = diffusion.NoiseSchedule.from_scheduler_config(scheduler_config)
    prediction_type = cfg.model.prediction_type or scheduler_config.get("prediction_type", "epsilon")
    loader = prepare.make_loader(cfg, cache)
    empty = unconditional_inputs(cache, base)

    # 3. UNet and optimizer, created sharded.
    frozen = None
    if cfg.train.method == "lora":
        graphdef, params, frozen = build_lora_unet(cfg, mesh, base, rules, lora_start)
    else:
        graphdef, params = build_unet(cfg, mesh, base, rules)
    tx, lr = build_optimizer(cfg)
    state, state_shardings = build_state(cfg, params, tx, mesh, rules, frozen)
    del params, frozen
    trained = lora.components(nnx.merge(graphdef, unet_state(state, state.params)))
    log.info("UNet: %s parameters", f"{models.count_params(trained.pop('unet')):,}")
    for name, encoder in trained.items():  # lora.train_text_encoder
        log.info("%s: %s parameters", name, f"{models.count_params(encoder):,}")
    if frozen_of(state) is not None:
        log.info("LoRA: %s trainable parameters (the rest frozen in %s)", f"{lora.trainable_count(state.params):,}",
                 cfg.model.dtype)

    # 4. Resume: the newest checkpoint in the run directory, if any.
    ckpt = checkpoint.Checkpointer(
        checkpoint_dir(cfg),
        keep=cfg.checkpoint.keep,
        every_steps=cfg.checkpoint.every_steps,
        use_async=cfg.checkpoint.async_save,
    )
    if cfg.checkpoint.resume and ckpt.latest_step() is not None:
        saved = jax.eval_shape(lambda: trainable(state))  # without LoRA's frozen weights
        abstract = checkpoint.abstract_with_shardings(saved, trainable(state_shardings))
        restored, data_state = ckpt.restore(abstract)
        state = with_frozen(restored, frozen_of(state))
        if data_state:
            loader.set_state(data_state)
        log.info("resumed from the checkpoint of step %d in %s", int(state.step), ckpt.manager.directory)

    # 5. The step, compiled ahead of time.
    step_fn = make_step_fn(cfg, graphdef, tx, lr, schedule, empty, prediction_type)
    first = next(loader)
    local_rows = cfg.train.global_batch_size * cfg.train.grad_accum_steps // jax.process_count()
    batch_shapes = {
        k: jax.ShapeDtypeStruct((cfg.train.global_batch_size * cfg.train.grad_accum_steps, *v.shape[1:]), v.dtype)
        for k, v in first.items()
    }
    assert all(v.shape[0] == local_rows for v in first.values()), "loader batch does not match the config"
    compiled, compile_s, hardware_flops = compile_step(step_fn, state, state_shardings, batch_shapes, mesh)
    sharding.sync("step compiled")  # the first step's collectives would not wait long for a slow compile
    images_per_step = cfg.train.global_batch_size * cfg.train.grad_accum_steps
    model_flops = model_flops_per_image(cfg, base, batch_shapes) * images_per_step
    log.info("step compiled in %.1f s; %s", compile_s, metrics.memory_summary(compiled))
    chip = cfg.logging.chip or metrics.detect_chip()
    peak = cfg.logging.peak_tflops or metrics.CHIP_PEAK_TFLOPS.get(chip or "", None)
    batch_shardings = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}

    # 6. The loop.
    start_step = int(state.step)
    writer = metrics.MetricsWriter(
        run_dir, start_step=start_step, tensorboard=cfg.logging.tensorboard, jsonl=cfg.logging.jsonl
    )
    if writer.redone:
        log.warning("steps %d-%d of an earlier run were not in a checkpoint: redoing them", start_step + 1, writer.redone[-1])
    validator = sampling.Validator(cfg, base, run_dir, writer) if cfg.validation.every_steps else None
    end_step = cfg.train.max_steps if max_steps is None else min(cfg.train.max_steps, max_steps)
    losses: list[float] = []
    pending: tuple[int, dict, float, float] | None = None
    preempted = False
    bar = tqdm(total=end_step, initial=start_step, desc="train", disable=jax.process_index() != 0, unit="step")
    last_time = time.perf_counter()
    batch = first
    # Input stalls: each step's time (from the previous step's dispatch to its own) includes the wait
    # for its batch; the steps since the last logged row add up both. A share of waiting near 0
    # means the chips set the pace; a large one, the input.
    input_wait = window_seconds = window_wait = 0.0

    def report(step: int, values: dict[str, Any], seconds: float, waited: float) -> None:
        nonlocal window_seconds, window_wait
        window_seconds, window_wait = window_seconds + seconds, window_wait + waited
        values = jax.device_get(values)
        if not bool(values["finite"]):
            if cfg.train.nan_policy == "stop":
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step}; the update was not applied and no "
                    "checkpoint holds it. Lower the learning rate or set train.nan_policy=skip."
                )
            log.warning(
                "step %d: non-finite loss or gradient; update skipped (%d skipped so far)",
                step,
                int(values["skipped_steps"]),
            )
        losses.append(float(values["loss"]))
        if step % cfg.logging.every_steps == 0 or step == end_step:
            scalars = {k: float(v) for k, v in values.items() if k != "finite"}
            scalars.update(metrics.throughput(seconds, images_per_step, hardware_flops, model_flops, peak))
            scalars["input_stall"] = window_wait / max(window_seconds, 1e-9)
            window_seconds = window_wait = 0.0
            writer.scalars(step, scalars)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_s']:.1f}",
                            input_stall=f"{scalars['input_stall']:.0%}")

    step = start_step
    if guard.requested.is_set():
        log.warning("SIGTERM before the first step: stopping at step %d (nothing new to save)", step)
        preempted = True
    try:
        while step < end_step and not preempted:
            state, step_metrics = compiled(state, global_batch(batch, batch_shardings))
            step += 1
            ckpt.check()
            # Metrics of the previous step leave the device now that this one is queued.
            if pending is not None:
                report(*pending)
            now = time.perf_counter()
            pending = (step, step_metrics, now - last_time, input_wait)
            last_time, input_wait = now, 0.0
            bar.update(1)
            saved = ckpt.due(step) or step == end_step
            if saved:
                report(*pending)
                pending = None
                ckpt.save(step, trainable(state), loader.get_state(), force=step == end_step)
                writer.flush()
            if validator and (step % cfg.validation.every_steps == 0 or step == end_step):
                averaged = state.ema if state.ema is not None else state.params
                validator.run(step, *validation_models(graphdef, unet_state(state, averaged)))
            if guard.stop(step):
                if pending is not None:
                    report(*pending)
                    pending = None
                if not saved:  # orbax refuses a second save of the same step
                    ckpt.save(step, trainable(state), loader.get_state(), force=True)
                preempted = True
                break
            if step < end_step:
                waited = time.perf_counter()
                batch = next(loader)
                input_wait = time.perf_counter() - waited
        if pending is not None:
            report(*pending)
    finally:
        # Also on a non-finite loss with nan_policy=stop: finish pending saves, release the files.
        bar.close()
        loader.close()  # no more reads ahead
        ckpt.close()
        writer.close()

    export_dir = None
    if cfg.export.at_end and not preempted and step >= cfg.train.max_steps:
        export_dir = export.export_run(cfg, graphdef, export_params(cfg, state))
    return TrainResult(run_dir, step, losses, export_dir, preempted)


def unet_state(state: TrainState, params: nnx.State) -> nnx.State:
    """The whole UNet's state (with ``lora.train_text_encoder``: also the text encoders') for
    ``nnx.merge(graphdef, ...)``: ``params`` (the state's params or EMA), with the frozen weights
    beside them for LoRA."""
    frozen = frozen_of(state)
    return params if frozen is None else lora.combine(params, frozen)


def validation_models(graphdef: nnx.GraphDef, whole: nnx.State) -> tuple[nnx.GraphDef, nnx.State, tuple | None]:
    """What ``sampling.Validator.run`` takes from the trained model (``graphdef`` with the state
    ``unet_state`` gives): the UNet's graph and state, and for ``lora.train_text_encoder`` the
    adapted text encoders' (graph, state), which encode the prompts (else None: the base encoders)."""
    if "text_encoder" not in whole:  # the UNet's own state: its top-level names are its layers'
        return graphdef, whole, None
    parts = lora.components(nnx.merge(graphdef, whole))
    return *nnx.split(parts["unet"]), nnx.split(nnx.List([parts["text_encoder"], parts["text_encoder_2"]]))


def checkpoint_dir(cfg: config_lib.Config) -> epath.Path:
    return storage.path(cfg.checkpoint.dir or storage.path(cfg.run_dir) / "checkpoints")


def restore_checkpoint(cfg: config_lib.Config, *, step: int | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """The UNet graph and the TrainState saved at ``step`` (default: the newest) in ``cfg``'s run,
    restored onto the config's mesh. A run without a checkpoint is refused before anything is built.
    For LoRA the state holds the factors only (a plain TrainState)."""
    cfg, _ = lora_init(cfg)  # the rank and targets of a continued LoRA, which its checkpoints have
    ckpt = checkpoint.Checkpointer(checkpoint_dir(cfg), use_async=False, read_only=True)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
        rules = sharding.merged_rules(cfg.mesh.rules)
        base = models.pretrained_pipeline(cfg.model)
        architecture = unet_architecture(cfg, base)
        if cfg.train.method == "lora":  # the checkpoint holds the factors only; the graph has the frozen rest
            text_configs = text_encoder_configs(cfg, base)
            abstract_model = nnx.eval_shape(lambda: lora_unet(cfg, architecture, text_configs))
            graphdef, abstract_params, _ = lora.split(abstract_model)
        else:
            graphdef, abstract_params = nnx.split(models.abstract(architecture, **unet_options(cfg)), nnx.Param)
        tx, _ = build_optimizer(cfg)
        abstract_state = jax.eval_shape(initial_state_fn(cfg, tx), abstract_params)
        shardings = sharding.tree_shardings(abstract_state, mesh, rules)
        state, _ = ckpt.restore(checkpoint.abstract_with_shardings(abstract_state, shardings), step)
    finally:
        ckpt.close()
    return graphdef, state


def export_params(cfg: config_lib.Config, state: TrainState) -> nnx.State:
    """The weights an export writes: the EMA when ``export.use_ema`` says so (null: when EMA is on)."""
    use_ema = cfg.export.use_ema if cfg.export.use_ema is not None else cfg.train.ema.enabled
    return state.ema if (use_ema and state.ema is not None) else state.params


def export_from_checkpoint(cfg: config_lib.Config, *, out: storage.PathLike | None = None) -> epath.Path:
    """Writes a diffusers folder from the newest checkpoint of ``cfg.run_dir``, as ``export.*`` says."""
    if out is not None:
        cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dir=str(out)))
    storage.writable_folder(export.export_dir(cfg))
    graphdef, state = restore_checkpoint(cfg)  # which looks for a checkpoint before building anything
    return export.export_run(cfg, graphdef, export_params(cfg, state))
