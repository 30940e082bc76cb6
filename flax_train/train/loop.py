"""A training run, top to bottom in pipeline order:

mesh -> latent cache and loader -> UNet (sharded) and optimizer -> resume -> compiled step (and
validation loss) -> loop (metrics one step late, checkpoints, validation loss and images,
preemption) -> export.

The step is one ``jax.jit`` with explicit in/out shardings and donated state, compiled ahead of
time so that shape, sharding and memory problems surface before step 1.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from flax_train import (checkpoint, compilation, config as config_lib, diffusion, export, lora, metrics, models,
                        sampling, sharding, wandb_sink)
from sdxl_common import buckets, sdxl, storage
from flax_train.data import prepare
from flax_train.train.model import build_lora_unet, build_unet, lora_init
from flax_train.train.restore import checkpoint_dir, export_params
from flax_train.train.state import TrainState, build_optimizer, build_state, frozen_of, trainable, with_frozen
from flax_train.train.step import (compile_step, global_batch, make_step_fn, model_flops_per_image, step_config,
                                   unconditional_inputs)
from flax_train.train.validation_loss import ValidationLoss

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BucketShapes:
    size: tuple[int, int]  # (height, width) of the bucket's images
    shapes: dict[str, jax.ShapeDtypeStruct]  # of a global training batch


@dataclasses.dataclass(frozen=True)
class BucketProgram:
    """The compiled step of one bucket, and its FLOPs per step (for the metrics)."""

    size: tuple[int, int]
    executable: Any
    hardware_flops: float | None
    model_flops: float


def batch_shapes(cache: Any, rows: int) -> list[BucketShapes]:
    """The global batch shapes of each bucket of ``cache`` holding samples (one in a cache without
    buckets), from the records' layouts: what the step is compiled for."""
    def shapes(layout: Any) -> dict[str, jax.ShapeDtypeStruct]:
        return {name: jax.ShapeDtypeStruct((rows, *layout.fields[name].shape), layout.fields[name].dtype)
                for name in cache.arrays}

    return [BucketShapes(b.size, shapes(b.layout)) for b in cache.buckets if len(b)]


@dataclasses.dataclass
class TrainResult:
    run_dir: epath.Path
    step: int
    losses: list[float]
    export_dir: epath.Path | None
    stopped_by_preemption: bool
    startup_seconds: float = 0.0  # from the call to the first step
    # XLA compilations of the run, and how many of them the persistent cache served (None: no cache)
    programs_compiled: int | None = None
    programs_loaded: int | None = None


def train(cfg: config_lib.Config, *, max_steps: int | None = None) -> TrainResult:
    """Runs (or resumes) the training described by ``cfg``; ``max_steps`` stops early (tests).

    SIGTERM from here on (start-up and compilation included) stops the run with a checkpoint and
    a normal return: see ``checkpoint.PreemptionGuard``.
    """
    started, compiles = time.perf_counter(), compilation.CompileCount()
    try:
        with checkpoint.PreemptionGuard(cfg.checkpoint.sigterm_grace_s) as guard:
            result = _train(cfg, max_steps, guard, started)
    finally:
        compiles.close()
    if jax.config.jax_compilation_cache_dir:
        result.programs_compiled, result.programs_loaded = compiles.compiled, compiles.hits
    return result


def _train(cfg: config_lib.Config, max_steps: int | None, guard: checkpoint.PreemptionGuard,
           started: float) -> TrainResult:
    config_lib.validate(cfg, jax.device_count())
    if cfg.logging.wandb is not None:  # a missing package is told now, not after minutes of compiling
        wandb_sink.import_wandb()
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

    # 5. The step, compiled ahead of time: once per bucket (image size) of the cache, all before step 1.
    step_fn = make_step_fn(cfg, graphdef, tx, lr, schedule, empty, prediction_type)
    validation_loss = None  # built first: it refuses a split too small for a batch before the slow compiles
    if cfg.validation.loss_every_steps:
        validation_loss = ValidationLoss(cfg, cache, graphdef, schedule, step_config(cfg, prediction_type), state,
                                         state_shardings, mesh,
                                         [b.shapes for b in batch_shapes(cache, cfg.train.global_batch_size)])
    first = next(loader)
    images_per_step = cfg.train.global_batch_size * cfg.train.grad_accum_steps
    shapes = batch_shapes(cache, images_per_step)
    local_rows = images_per_step // jax.process_count()
    assert all(v.shape[0] == local_rows for v in first.values()), "loader batch does not match the config"
    programs: dict[tuple, BucketProgram] = {}
    for number, bucket in enumerate(shapes, 1):
        compiled, compile_s, hardware_flops = compile_step(step_fn, state, state_shardings, bucket.shapes, mesh)
        model_flops = model_flops_per_image(cfg, base, bucket.shapes) * images_per_step
        programs[bucket.shapes["latents"].shape[1:]] = BucketProgram(bucket.size, compiled, hardware_flops, model_flops)
        where = f" for {buckets.size_text(bucket.size)} images ({number} of {len(shapes)})" if len(shapes) > 1 else ""
        log.info("step compiled in %.1f s%s; %s", compile_s, where, metrics.memory_summary(compiled))
    sharding.sync("step compiled")  # the first step's collectives would not wait long for a slow compile
    startup_seconds = time.perf_counter() - started
    chip = cfg.logging.chip or metrics.detect_chip()
    peak = cfg.logging.peak_tflops or metrics.CHIP_PEAK_TFLOPS.get(chip or "", None)
    batch_shardings = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in shapes[0].shapes.items()}

    # 6. The loop.
    start_step = int(state.step)
    writer = metrics.MetricsWriter(
        run_dir, start_step=start_step, tensorboard=cfg.logging.tensorboard, jsonl=cfg.logging.jsonl,
        wandb=cfg.logging.wandb, run_config=config_lib.to_dict(cfg),  # the config.yaml written above
    )
    if writer.redone:
        log.warning("steps %d-%d of an earlier run were not in a checkpoint: redoing them", start_step + 1, writer.redone[-1])
    validator = sampling.Validator(cfg, base, run_dir, writer) if cfg.validation.every_steps else None
    end_step = cfg.train.max_steps if max_steps is None else min(cfg.train.max_steps, max_steps)
    losses: list[float] = []
    pending: tuple[int, dict, float, float, BucketProgram] | None = None
    preempted = False
    bar = tqdm(total=end_step, initial=start_step, desc="train", disable=jax.process_index() != 0, unit="step")
    last_time = time.perf_counter()
    batch = first
    # Input stalls: each step's time (from the previous step's dispatch to its own) includes the wait
    # for its batch; the steps since the last logged row add up both. A share of waiting near 0
    # means the chips set the pace; a large one, the input.
    input_wait = window_seconds = window_wait = 0.0

    def report(step: int, values: dict[str, Any], seconds: float, waited: float, program: BucketProgram) -> None:
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
            scalars.update(metrics.throughput(seconds, images_per_step, program.hardware_flops, program.model_flops,
                                              peak))
            if len(programs) > 1:  # the bucket of the row's step
                scalars.update(image_height=program.size[0], image_width=program.size[1])
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
            program = programs[batch["latents"].shape[1:]]
            state, step_metrics = program.executable(state, global_batch(batch, batch_shardings))
            step += 1
            ckpt.check()
            # Metrics of the previous step leave the device now that this one is queued.
            if pending is not None:
                report(*pending)
            now = time.perf_counter()
            pending = (step, step_metrics, now - last_time, input_wait, program)
            last_time, input_wait = now, 0.0
            bar.update(1)
            saved = ckpt.due(step) or step == end_step
            if saved:
                report(*pending)
                pending = None
                ckpt.save(step, trainable(state), loader.get_state(), force=step == end_step)
                writer.flush()
            if validation_loss and (step % cfg.validation.loss_every_steps == 0 or step == end_step):
                if pending is not None:  # the step's own row first
                    report(*pending)
                    pending = None
                writer.scalars(step, validation_loss(state))
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
    return TrainResult(run_dir, step, losses, export_dir, preempted, startup_seconds)


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
