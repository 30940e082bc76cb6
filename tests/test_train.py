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
import json
import re
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

from flax_train import config as config_lib, diffusion, hlo_cost, models, sharding, train
from sdxl_common import sdxl
from flax_train.data import prepare
from flax_train.data.cache import LatentCache, RecordLayout
from flax_train.demo import CONFIG as DEMO_CONFIG
from train_support import (
    BATCH,
    REPO,
    RESOLUTION,
    STEPS,
    Workspace,
    assert_trees_equal,
    cli_env,
    host,
    make_config,
    make_workspace,
    overrides,
    run_cli,
)

pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("train"))

# --------------------------------------------------------------------------------------------
# The step, compiled as the trainer compiles it, on a fixed batch


@dataclasses.dataclass
class CompiledStep:
    compiled: Any
    initial: train.TrainState  # never passed to `compiled`, which donates its state: see fresh()
    mesh: jax.sharding.Mesh
    batch: dict[str, np.ndarray]  # the first global_batch_size x grad_accum_steps cache samples
    hardware_flops: float  # per device and step (train.CompiledStep)

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
    base = models.resolve_pipeline(cfg.model.pretrained)
    cache = prepare.open_cache(cfg, base)
    scheduler_config = sdxl.scheduler_config(base)
    graphdef, params = train.build_unet(cfg, mesh, base, rules)
    if sgd:
        tx, lr = optax.sgd(1.0), optax.constant_schedule(1.0)
    else:
        tx, lr = train.build_optimizer(cfg)
    state, state_shardings = train.build_state(cfg, params, tx, mesh, rules)
    step_fn = train.make_step_fn(
        cfg,
        graphdef,
        tx,
        lr,
        diffusion.NoiseSchedule.from_scheduler_config(scheduler_config),
        train.unconditional_inputs(cache, base),
        cfg.model.prediction_type or scheduler_config["prediction_type"],
    )
    rows = cfg.train.global_batch_size * cfg.train.grad_accum_steps
    batch = {k: np.stack([cache[i % len(cache)][k] for i in range(rows)]) for k in cache[0]}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    compiled = train.compile_step(step_fn, state, state_shardings, shapes, mesh)
    return CompiledStep(compiled.executable, state, mesh, batch, compiled.hardware_flops)


@pytest.fixture(scope="module")
def adamw_step(workspace) -> CompiledStep:
    """The step of every run in this file (AdamW, EMA, min-SNR, caption dropout), FSDP mesh."""
    return compile_train_step(make_config(workspace, workspace.root / "unused"))


def test_where_the_unet_starts(workspace, tmp_path):
    # The pretrained folder's UNet, unless model.unet_config asks for a new one.
    folder_unet = models.read_config(workspace.base / "unet")
    assert train.unet_architecture(make_config(workspace, tmp_path), workspace.base) == folder_unet
    assert train.unet_architecture(make_config(workspace, tmp_path, "model.unet_config=sdxl"), workspace.base) == sdxl.UNET_CONFIG
    inline = train.unet_architecture(make_config(workspace, tmp_path, "model.unet_config={block_out_channels: [32, 64]}"), workspace.base)
    assert inline == {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64]}

    # Loaded weights are the folder's, already in their FSDP shardings.
    cfg = make_config(workspace, tmp_path)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.merged_rules(cfg.mesh.rules)
    _, params = train.build_unet(cfg, mesh, workspace.base, rules)
    reference = nnx.state(models.load(workspace.base, subfolder="unet"), nnx.Param)
    assert_trees_equal(params, reference)
    assert any(len(x.sharding.device_set) == 8 and x.sharding.shard_shape(x.shape) != x.shape for x in jax.tree.leaves(params))

    # A new UNet (model.unet_config): the seed's weights, drawn on the host, placed in the same shardings.
    _, fresh = train.init_unet(cfg, folder_unet, mesh, rules)
    assert_trees_equal(fresh, nnx.state(models.create(folder_unet, seed=cfg.train.seed, **train.unet_options(cfg)), nnx.Param))
    assert [x.sharding for x in jax.tree.leaves(fresh)] == [x.sharding for x in jax.tree.leaves(params)]


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
    step_zero = adamw_step.replicated(jnp.zeros((), jnp.int32))
    for _ in range(5):
        state, step_metrics = adamw_step(state.replace(step=step_zero.copy()), adamw_step.batch)
        losses.append(float(step_metrics["loss"]))
    assert losses[-1] < 0.6 * losses[0], losses
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
        # The splash kernel (Pallas interpret mode on CPU) in a shard_map on every mesh axis.
        pytest.param(("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.attention=splash"), id="hybrid-splash"),
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
    # 16 rows: the cache's 8 samples, then the same reversed. Micro-batch i is rows i, i + 2, ...
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
        micro_batch = {k: v[i::2] for k, v in batch.items()}
        micro_loss, micro_gradient = gradient_of_step(sgd_fsdp, state, micro_batch)
        micro_losses.append(micro_loss)
        micro_gradients.append(micro_gradient)

    assert micro_losses[0] != micro_losses[1]  # the two halves really differ
    assert loss == pytest.approx(np.mean(micro_losses), rel=1e-5)
    assert_gradients_close(gradient, jax.tree.map(lambda a, b: (a + b) / 2, *micro_gradients))
    # Two micro-batches execute twice the FLOPs of one (XLA alone counts the scan's body once);
    # only the SGD update, outside the loop, is not repeated.
    assert accumulating.hardware_flops == pytest.approx(2 * sgd_fsdp.hardware_flops, rel=0.01)


def test_a_programs_hardware_flops_are_counted_once_and_kept_beside_the_compilation_cache(monkeypatch, tmp_path, request):
    def scanned(x):  # a loop: XLA's own cost analysis would count its body once
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=5)[0]

    # Records in a folder of their own: a program loaded from JAX's persistent cache has another
    # fingerprint than the same program compiled afresh, so the suite's shared folder, warm from an
    # earlier run, can hold a second record of it.
    shared = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    request.addfinalizer(lambda: jax.config.update("jax_compilation_cache_dir", shared))
    compiled = jax.jit(scanned).lower(jnp.ones((24, 24))).compile()
    counted = train.hardware_flops(compiled, 1)
    assert counted == hlo_cost.analyse(compiled.as_text(), 1).flops >= 5 * 2 * 24**3
    (record,) = (tmp_path / "hardware_flops").glob(f"*-1-v{hlo_cost.ACCOUNTING}.json")
    assert json.loads(record.read_text())["flops"] == counted
    # The same program again (a restarted run): the record answers, the text is not read.
    monkeypatch.setattr(hlo_cost, "analyse", lambda *a: pytest.fail("counted again"))
    assert train.hardware_flops(jax.jit(scanned).lower(jnp.ones((24, 24))).compile(), 1) == counted
    # A damaged record is counted again.
    monkeypatch.undo()
    record.write_text("{")
    assert train.hardware_flops(compiled, 1) == counted and json.loads(record.read_text())["flops"] == counted


# --------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def full_run(workspace) -> tuple[config_lib.Config, train.TrainResult]:
    """STEPS uninterrupted steps with validation images and export at the end."""
    cfg = make_config(
        workspace,
        workspace.root / "full",
        "validation.every_steps=4",
        "validation.num_steps=2",
        "export.at_end=true",
        "logging.tensorboard=true",
        "logging.peak_tflops=1.0",  # a CPU has no peak in the table: given, utilisation is logged
    )
    return cfg, train.train(cfg)


def test_a_run_logs_metrics_and_writes_validation_grids(full_run):
    cfg, result = full_run
    run_dir = Path(cfg.run_dir)
    assert result.step == STEPS and not result.stopped_by_preemption
    assert len(result.losses) == STEPS and all(np.isfinite(result.losses))
    assert config_lib.load(run_dir / "config.yaml") == cfg  # the resolved config is kept with the run

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in ("loss", "learning_rate", "grad_norm", "images_per_s"):
            assert np.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["learning_rate"] == pytest.approx(1e-3)
        assert row["skipped_steps"] == 0
        # Per device against the given peak of 1 TFLOP/s.
        assert row["mfu"] > 0 and row["mfu"] == pytest.approx(row["model_tflops_per_device"])
        assert row["hfu"] > 0 and row["hfu"] == pytest.approx(row["tflops_per_device"])
        assert 0 <= row["input_stall"] < 0.5  # a local cache of a few samples keeps up
    assert [row["loss"] for row in rows] == result.losses
    assert list((run_dir / "tensorboard").iterdir())

    grids = sorted((run_dir / "samples").iterdir())
    assert [p.name for p in grids] == [f"step_{STEPS:07d}.png"]
    with Image.open(grids[0]) as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
        # The demo's two validation prompts side by side.
        assert grid.size == (2 * RESOLUTION, RESOLUTION)
        pixels = np.asarray(grid)
    assert pixels.std() > 0


def test_export_loads_in_diffusers_and_matches_the_trained_unet(workspace, full_run):
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    cfg, result = full_run
    assert result.export_dir == Path(cfg.run_dir) / "export"
    pipe = StableDiffusionXLPipeline.from_pretrained(result.export_dir)

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, RESOLUTION // 2, RESOLUTION // 2), dtype=np.float32)
    timesteps = np.array([10, 700], np.int32)
    context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim), dtype=np.float32)
    unet_config = pipe.unet.config
    pooled_dim = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    pooled = rng.standard_normal((2, pooled_dim), dtype=np.float32)
    time_ids = np.array([[16, 16, 0, 0, 16, 16], [24, 20, 2, 1, 16, 16]], np.float32)

    def diffusers_unet(unet: UNet2DConditionModel) -> np.ndarray:
        with torch.no_grad():
            return unet(
                torch.from_numpy(latents),
                torch.from_numpy(timesteps),
                encoder_hidden_states=torch.from_numpy(context),
                added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)},
            ).sample.numpy()

    # Our UNet with the trained weights (the EMA, which export writes), straight from the checkpoint.
    graphdef, state = train.restore_checkpoint(cfg, step=STEPS)

    @jax.jit
    def flax_unet(params):
        return nnx.merge(graphdef, params)(latents, timesteps, context, text_embeds=pooled, time_ids=time_ids)

    ours = np.asarray(flax_unet(state.ema))
    theirs = diffusers_unet(pipe.unet)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    # ... and those weights are not the ones training started from.
    untrained = diffusers_unet(UNet2DConditionModel.from_pretrained(workspace.base / "unet"))
    assert np.abs(theirs - untrained).max() > 1e-3

    images = pipe(
        prompt="a red circle on a blue background",
        num_inference_steps=2,
        height=RESOLUTION,
        width=RESOLUTION,
        output_type="np",
    ).images
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()

    # `flax-train export` writes the same UNet from the last checkpoint; with export.use_ema false
    # (`--raw`), the raw weights instead of the EMA.
    again = train.export_from_checkpoint(cfg, out=workspace.root / "export-again")
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (again / weights).read_bytes() == (result.export_dir / weights).read_bytes()
    raw_cfg = config_lib.apply_overrides(cfg, ["export.use_ema=false"])
    raw = train.export_from_checkpoint(raw_cfg, out=workspace.root / "export-raw")
    _, state = train.restore_checkpoint(cfg)
    raw_unet = models.load(raw, subfolder="unet")
    for ours, restored in zip(jax.tree.leaves(host(nnx.state(raw_unet, nnx.Param))), jax.tree.leaves(host(state.params))):
        np.testing.assert_array_equal(ours, restored)
    assert (raw / weights).read_bytes() != (again / weights).read_bytes()


def poisoned_cache(source: Path, target: Path) -> Path:
    """A copy of a latent cache whose latents are all NaN (a corrupt shard, say)."""
    shutil.copytree(source, target)
    for shard in (target / "shards").glob("*.safetensors"):
        with safetensors.safe_open(str(shard), framework="np") as f:
            metadata = f.metadata()
        arrays = safetensors.numpy.load_file(str(shard))
        field = RecordLayout.from_json(json.loads(metadata["record"])).fields["latents"]
        latents = arrays["records"][:, field.offset:field.offset + field.nbytes].view(field.dtype)
        latents[...] = np.nan
        safetensors.numpy.save_file(arrays, str(shard), metadata=metadata)
    return target


def test_input_stalls_show_the_share_of_time_spent_waiting_for_data(workspace, full_run, monkeypatch):
    """A store that takes 2.5 s per batch (slow storage, stood in for by a sleep; one reader thread)
    sets the pace of a step that takes a fraction of that once the two batches read ahead during
    compilation are used: the logged share says so."""
    read_batch = LatentCache.read_batch

    def slow(self, indices):
        time.sleep(2.5)
        return read_batch(self, indices)

    monkeypatch.setattr(LatentCache, "read_batch", slow)
    # the fewest readers: one thread, two batches read ahead
    cfg = make_config(workspace, workspace.root / "slow-input", "data.reads_in_flight=1", "checkpoint.every_steps=0",
                      "train.max_steps=6")
    train.train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 7))
    # From step 4 on, each step waits for a read begun only a step earlier. Over steps 4-6 (the other
    # pytest worker can slow a single step's compute to seconds on a 2-core machine), more than half the time went
    # to waiting (a local cache stays under half: see the metrics test above).
    waited = sum(row["input_stall"] * row["step_time_s"] for row in rows[3:])
    assert waited > 0.5 * sum(row["step_time_s"] for row in rows[3:]), [(row["input_stall"], row["step_time_s"]) for row in rows]


def test_nan_policy_skip_counts_and_stop_raises(workspace, full_run):
    nan_cache = poisoned_cache(workspace.cache, workspace.root / "nan-cache")

    cfg = make_config(workspace, workspace.root / "nan-skip", f"data.cache_dir={nan_cache}", "train.nan_policy=skip")
    result = train.train(cfg, max_steps=2)
    assert result.step == 2 and not any(np.isfinite(result.losses))
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped_steps"] for row in rows] == [1, 2]
    _, state = train.restore_checkpoint(cfg, step=2)
    assert int(state.step) == 2 and int(state.skipped) == 2
    start = nnx.state(models.load(workspace.base, subfolder="unet"), nnx.Param)
    assert_trees_equal(state.params, start)
    assert_trees_equal(state.ema, start)

    cfg = make_config(workspace, workspace.root / "nan-stop", f"data.cache_dir={nan_cache}", "train.nan_policy=stop")
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 1"):
        train.train(cfg)
    checkpoints = Path(cfg.run_dir) / "checkpoints"
    assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())


def test_sigterm_twice_saves_a_checkpoint_exits_0_and_the_rerun_resumes(workspace, full_run):
    run_dir = workspace.root / "preempted"
    extra = ("train.max_steps=100000", "checkpoint.every_steps=0")
    env = cli_env()
    log_path, out_path = workspace.root / "preempted.log", workspace.root / "preempted.out"
    with open(log_path, "w") as log, open(out_path, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "flax_train.cli", "train", "--config", str(DEMO_CONFIG), *overrides(workspace, run_dir, *extra)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=log,
        )
        try:
            metrics_file = run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 900
            while not (metrics_file.exists() and metrics_file.read_text().strip()):
                assert child.poll() is None, f"exited early ({child.returncode}):\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no step logged in time"
                time.sleep(0.5)
            child.send_signal(signal.SIGTERM)
            # Again while the checkpoint is being written (orbax's temporary folder): nothing changes.
            checkpoints = run_dir / "checkpoints"
            while not (checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())):
                assert child.poll() is None, "exited before the checkpoint write was seen"
                time.sleep(0.02)
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=300)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0, log_path.read_text()[-3000:]
    stdout = out_path.read_text()
    assert "on SIGTERM" in stdout, stdout
    assert "SIGTERM again: already stopping" in log_path.read_text()
    stopped = int(stdout.split("stopped at step ")[1].split()[0])
    assert stopped >= 2  # the metrics of step 1 are written once step 2 is under way
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [stopped]

    rerun = train.train(make_config(workspace, run_dir, *extra), max_steps=stopped + 1)
    assert rerun.step == stopped + 1 and len(rerun.losses) == 1  # one new step: it resumed


def test_a_resumed_run_compiles_nothing_its_programs_wait_in_its_run_directory(workspace, full_run, tmp_path):
    """With no cache chosen by the user, `flax-train train` keeps its compiled programs in
    run_dir/compilation_cache, beside its checkpoints: the resumed start (as on a fresh VM given
    the same run directory) loads every program it needs and compiles none."""
    run_dir = tmp_path / "run"
    chosen = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "SDXL_TPU_COMPILATION_CACHE")
    env = {key: value for key, value in cli_env().items() if key not in chosen}
    args = ["train", "--config", str(DEMO_CONFIG), *overrides(workspace, run_dir)]
    starts = []
    for out in (run_cli(*args, "--max-steps", "2", env=env), run_cli(*args, env=env)):
        found = re.search(r"start-up ([\d.]+) s; (\d+) programs compiled, (\d+) loaded from the compilation cache "
                          r"in (\S+)", out)
        assert found and found[4] == str(run_dir / "compilation_cache"), out
        starts.append((float(found[1]), int(found[2]), int(found[3])))
    (_, compiled, _), (_, again, loaded) = starts
    assert compiled > 0 and again == 0 and loaded > 0, starts
    print("start-up seconds, programs compiled, programs loaded: first run", starts[0], "resumed", starts[1])
