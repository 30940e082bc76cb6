"""LoRA fine-tuning of the UNet (train.method: lora) on the 8-device fake CPU mesh: the exported file
gives diffusers our UNet, only the factors train, checkpoints hold only them and resume bit-exactly,
and bad LoRA settings are one line.

The same tiny SDXL-shaped pipeline and latent cache as tests/test_train.py (tests/train_support.py).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from flax_train import config as config_lib, diffusion, export, lora, models, sdxl, sharding, train
from flax_train.data import prepare
from flax_train.demo import CONFIG as DEMO_CONFIG
from train_support import (
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
)

pytestmark = pytest.mark.xdist_group("lora")

# Every run here: LoRA over bf16 frozen weights, with dropout so that its masks are exercised too.
LORA = ("train.method=lora", "model.dtype=bfloat16", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("lora"))


def flat(state: nnx.State) -> dict[tuple, np.ndarray]:
    """path -> numpy value of every array of an nnx.State."""
    return {path: np.asarray(jax.device_get(v.get_value())) for path, v in nnx.to_flat_state(state)}


def unet_inputs(unet_config: dict) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, RESOLUTION // 2, RESOLUTION // 2), dtype=np.float32)
    timesteps = np.array([10, 700], np.int32)
    context = rng.standard_normal((2, 77, unet_config["cross_attention_dim"]), dtype=np.float32)
    pooled_dim = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
    pooled = rng.standard_normal((2, pooled_dim), dtype=np.float32)
    time_ids = np.array([[16, 16, 0, 0, 16, 16], [24, 20, 2, 1, 16, 16]], np.float32)
    return latents, timesteps, context, pooled, time_ids


def test_exported_lora_loaded_by_diffusers_is_our_unet_with_lora(workspace, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    # Every kind of target (Linear, GEGLU projection, convolutions with and without padding), and
    # alpha != rank: diffusers gets the scale alpha / rank from the file's metadata or not at all.
    lora_cfg = config_lib.LoraConfig(rank=3, alpha=5.0, target_modules=lora.SUPPORTED_TARGETS)
    unet_config = models.read_config(workspace.base / "unet")
    inputs = unet_inputs(unet_config)

    @functools.partial(jax.jit, static_argnums=0)
    def flax_unet(graphdef, state):
        latents, timesteps, context, pooled, time_ids = inputs
        return nnx.merge(graphdef, state)(latents, timesteps, context, text_embeds=pooled, time_ids=time_ids)

    plain_graphdef, plain_state = nnx.split(models.load(workspace.base, subfolder="unet"))
    base = np.asarray(flax_unet(plain_graphdef, plain_state))

    unet = lora.inject(models.load(workspace.base, subfolder="unet"), lora_cfg, seed=0)
    graphdef, factors, frozen = lora.split(unet)
    # At initialisation B = 0: the UNet with its LoRA is the base UNet, exactly.
    np.testing.assert_array_equal(np.asarray(flax_unet(graphdef, lora.combine(factors, frozen))), base)
    assert all(not np.any(v) for path, v in flat(factors).items() if path[-1] == "b")

    # Stand-in for training: every factor moved, B away from zero.
    noise = np.random.default_rng(1)
    factors = jax.tree.map(lambda v: np.asarray(v) + 0.2 * noise.standard_normal(v.shape).astype(np.float32), factors)
    ours = np.asarray(flax_unet(graphdef, lora.combine(factors, frozen)))
    out = export.export_lora(host(factors), lora_cfg, tmp_path / "export")
    assert sorted(p.name for p in Path(out).iterdir()) == [lora.WEIGHT_NAME]
    metadata = lora.read_metadata(Path(out) / lora.WEIGHT_NAME)
    assert (metadata["r"], metadata["lora_alpha"]) == (3, 5.0)

    pipe = StableDiffusionXLPipeline.from_pretrained(workspace.base)
    pipe.load_lora_weights(out)
    latents, timesteps, context, pooled, time_ids = (torch.from_numpy(x) for x in inputs)

    def diffusers_unet(model: UNet2DConditionModel) -> np.ndarray:
        with torch.no_grad():
            return model(latents, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.numpy()

    theirs = diffusers_unet(pipe.unet)
    loaded = {name for name, _ in pipe.unet.named_modules() if name.endswith(".lora_A")}
    assert len(loaded) == len(lora.targets(unet, lora_cfg.target_modules))  # every adapter arrived
    scale = np.abs(theirs).max()
    assert np.abs(theirs - base).max() > 0.05 * scale  # the LoRA changes the output a lot ...
    print(f"diffusers + LoRA vs ours: max abs diff {np.abs(ours - theirs).max():.2e}, output scale {scale:.2f}, "
          f"LoRA effect {np.abs(theirs - base).max():.2f}")
    assert np.abs(ours - theirs).max() <= 1e-4 * scale  # ... and the same way in both


# --------------------------------------------------------------------------------------------
# The step, compiled as the trainer compiles it


@pytest.fixture(scope="module")
def lora_step(workspace):
    """The step of a LoRA run (AdamW, EMA, dropout) on a fixed batch, FSDP over 8 devices, with
    remat: dropout masks drawn inside rematerialised blocks, from frozen weights of the step's trace."""
    cfg = make_config(workspace, workspace.root / "unused", *LORA, "model.remat=full")
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.merged_rules(cfg.mesh.rules)
    base = models.resolve_pipeline(cfg.model.pretrained)
    cache = prepare.open_cache(cfg, base)
    scheduler_config = sdxl.scheduler_config(base)
    graphdef, factors, frozen = train.build_lora_unet(cfg, mesh, base, rules)
    tx, lr = train.build_optimizer(cfg)
    state, state_shardings = train.build_state(cfg, factors, tx, mesh, rules, frozen)
    step_fn = train.make_step_fn(cfg, graphdef, tx, lr, diffusion.NoiseSchedule.from_scheduler_config(scheduler_config),
                                 train.unconditional_inputs(cache, base), scheduler_config["prediction_type"])
    batch = {k: np.stack([cache[i % len(cache)][k] for i in range(cfg.train.global_batch_size)]) for k in cache[0]}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    compiled = train.compile_step(step_fn, state, state_shardings, shapes, mesh)[0]  # the executable
    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}

    def run(state):
        new_state, step_metrics = compiled(state, train.global_batch(batch, batch_shardings))
        return new_state, host(step_metrics)

    return cfg, mesh, state, run


def test_only_the_lora_factors_train_over_bf16_frozen_weights(workspace, lora_step):
    cfg, mesh, initial, run = lora_step
    # The frozen UNet: the folder's weights in bf16, sharded like a full fine-tune's.
    reference = nnx.state(models.load(workspace.base, subfolder="unet", param_dtype=jnp.bfloat16), nnx.Param)
    assert_trees_equal(initial.frozen, reference)
    assert {x.dtype for x in jax.tree.leaves(initial.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert any(len(x.sharding.device_set) == 8 and x.sharding.shard_shape(x.shape) != x.shape
               for x in jax.tree.leaves(initial.frozen))
    # The trained state is the factors alone, in fp32: A and B of every attention projection.
    paths = list(flat(initial.params))
    assert paths and all(path[-2:] in (("lora", "a"), ("lora", "b")) for path in paths)
    assert {path[-3] for path in paths} == {"to_q", "to_k", "to_v", 0}  # to_out[0]
    assert {x.dtype for x in jax.tree.leaves(initial.params)} == {jnp.dtype(jnp.float32)}

    before = host(initial)
    state = jax.tree.map(lambda x: x.copy(), initial)
    state, first = run(state)
    after = host(state)
    assert bool(first["finite"]) and int(after.step) == 1
    assert_trees_equal(after.frozen, before.frozen)  # untouched, still bf16
    old, new = flat(before.params), flat(after.params)
    # B starts at zero, where its gradient is not zero.
    assert all(np.any(new[path] != old[path]) for path in old if path[-1] == "b")

    # The same batch, noise and timesteps every step (the step counter held at 0): the loss falls.
    losses = [float(first["loss"])]
    step_zero = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))
    for _ in range(5):
        state, step_metrics = run(state.replace(step=step_zero.copy()))
        losses.append(float(step_metrics["loss"]))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert_trees_equal(host(state.frozen), before.frozen)


# --------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def lora_run(workspace):
    """STEPS uninterrupted LoRA steps, with validation images and export at the end."""
    cfg = make_config(workspace, workspace.root / "lora-full", *LORA, "export.at_end=true",
                      "validation.every_steps=4", "validation.num_steps=2")
    return cfg, train.train(cfg)


def saved_arrays(run_dir: Path, step: int) -> list[str]:
    """The tree paths of every array in a checkpoint: its checksum list names each one."""
    names = json.loads((run_dir / "checkpoints" / str(step) / "checksums" / "metadata").read_text())
    return sorted(set(names) - {"data"})


def test_checkpoints_hold_only_the_factors_and_resume_bit_exactly(workspace, lora_run, monkeypatch):
    full_cfg, full = lora_run
    assert full.step == STEPS and all(np.isfinite(full.losses))

    arrays = saved_arrays(Path(full_cfg.run_dir), STEPS)
    weights = [name for name in arrays if "['lora']" in name]
    assert {name.split("[")[0] for name in weights} == {".params", ".opt_state", ".ema"}
    # Besides the factors, their EMA and AdamW moments: counters and the step's scalars, nothing else.
    others = [name for name in arrays if name not in weights]
    assert all(name in (".step", ".rng", ".skipped") or name.endswith(".count") for name in others), others

    cfg = make_config(workspace, workspace.root / "lora-resumed", *LORA)
    monkeypatch.setattr(train.checkpoint.PreemptionGuard, "stop", lambda self, step: step == 2)
    first = train.train(cfg)
    monkeypatch.undo()
    assert first.stopped_by_preemption and first.step == 2 and first.losses == full.losses[:2]
    second = train.train(cfg)
    assert second.step == STEPS and second.losses == full.losses[2:]
    _, resumed = train.restore_checkpoint(cfg, step=STEPS)
    _, uninterrupted = train.restore_checkpoint(full_cfg, step=STEPS)
    assert type(resumed) is train.TrainState  # no frozen weights: a full fine-tune's checkpoint tree
    assert_trees_equal(resumed, uninterrupted)  # factors, optimizer state, EMA, step, RNG key


def test_a_lora_run_samples_and_exports_its_factors_for_diffusers(workspace, lora_run, tmp_path):
    cfg, result = lora_run
    # Validation samples the UNet with its (EMA) LoRA.
    assert [p.name for p in (Path(cfg.run_dir) / "samples").iterdir()] == [f"step_{STEPS:07d}.png"]
    assert result.export_dir == Path(cfg.run_dir) / "export"
    written = result.export_dir / lora.WEIGHT_NAME
    assert sorted(p.name for p in result.export_dir.iterdir()) == [lora.WEIGHT_NAME]
    # What export writes: the EMA of the factors (EMA is on), under diffusers' keys, in torch layouts.
    _, state = train.restore_checkpoint(cfg)
    assert_arrays_equal(safetensors.numpy.load_file(written), lora.torch_state_dict(host(state.ema)))
    assert lora.read_metadata(written) == {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1, "bias": "none",
                                           "target_modules": sorted(lora.DEFAULT_TARGETS)}
    # `flax-train export` writes the same from the last checkpoint; with export.use_ema false, the
    # raw factors. (Not the same bytes: safetensors writes metadata keys in a random order.)
    again = train.export_from_checkpoint(cfg, out=tmp_path / "again")
    assert_arrays_equal(safetensors.numpy.load_file(again / lora.WEIGHT_NAME), safetensors.numpy.load_file(written))
    assert lora.read_metadata(again / lora.WEIGHT_NAME) == lora.read_metadata(written)
    raw = train.export_from_checkpoint(config_lib.apply_overrides(cfg, ["export.use_ema=false"]), out=tmp_path / "raw")
    assert_arrays_equal(safetensors.numpy.load_file(raw / lora.WEIGHT_NAME), lora.torch_state_dict(host(state.params)))


def assert_arrays_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "setting, message",
    [
        ("lora.rank=0", "lora.rank must be >= 1, got 0"),
        ("lora.alpha=-1", "lora.alpha must be > 0"),
        ("lora.dropout=1", "lora.dropout must be in [0, 1)"),
        ("lora.target_modules=[]", "lora.target_modules is empty"),
        ("lora.target_modules=[to_q, to_q]", "names a module twice"),
        ("model.unet_config=sdxl", "train.method is lora but model.unet_config is set"),
    ],
)
def test_bad_lora_values_are_one_line_each(workspace, tmp_path, setting, message):
    cfg = make_config(workspace, tmp_path, "train.method=lora", setting)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(cfg, 8)
    problems = str(error.value).splitlines()[1:]
    assert len(problems) == 1 and message in problems[0], str(error.value)


def test_lora_keys_from_yaml_and_diffusers_flag_names(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("train:\n  method: lora\nlora:\n  rank: 16\n  target_modules: [to_q, to_v, ff.net.2, conv1]\n")
    cfg = config_lib.load(path, ["lora.alpha=32"])
    assert cfg.train.method == "lora"
    targets = ("to_q", "to_v", "ff.net.2", "conv1")
    assert cfg.lora == config_lib.LoraConfig(rank=16, alpha=32.0, dropout=0.0, target_modules=targets)
    config_lib.save(cfg, tmp_path / "saved.yaml")
    assert config_lib.load(tmp_path / "saved.yaml") == cfg
    with pytest.raises(config_lib.ConfigError, match="diffusers' --rank is 'lora.rank' here"):
        config_lib.load(path, ["rank=8"])
    with pytest.raises(config_lib.ConfigError, match="did you mean 'lora'"):
        config_lib.load(path, ["train.method=lorra"])


def test_a_bad_lora_target_exits_2_with_one_line_from_the_cli(workspace, tmp_path):
    args = overrides(workspace, tmp_path / "run", *LORA, "lora.target_modules=[to_q, to_qq]")
    result = subprocess.run([sys.executable, "-m", "flax_train.cli", "train", "--config", str(DEMO_CONFIG), *args],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if ": error: " in line or "lora." in line]
    assert len(lines) == 2 and lines[0].endswith("error: invalid config:"), result.stderr
    assert "lora.target_modules: unknown module 'to_qq'" in lines[1] and "did you mean 'to_q'?" in lines[1]
    assert not (tmp_path / "run" / "checkpoints").exists()
