"""LoRA fine-tuning of the UNet (train.method: lora) on the 8-device fake CPU mesh: the exported file
gives diffusers our UNet, only the factors train, checkpoints hold only them and resume bit-exactly,
and bad LoRA settings are one line.

The same tiny SDXL-shaped pipeline and latent cache as tests/test_train.py (tests/train_support.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from flax_train import checkpoint, config as config_lib, diffusion, export, lora, models, sharding, train
from sdxl_common import errors, lora_files, sdxl
from flax_train.data import prepare
from flax_train.demo import CONFIG as DEMO_CONFIG
from lora_support import make_lora
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
    out = export.export_lora(host(factors), lora_cfg, tmp_path / "export", kohya_unet_config=unet_config)
    assert sorted(p.name for p in Path(out).iterdir()) == sorted([lora.WEIGHT_NAME, export.KOHYA_LORA_NAME])
    metadata = lora.read_metadata(Path(out) / lora.WEIGHT_NAME)
    assert (metadata["r"], metadata["lora_alpha"]) == (3, 5.0)
    kohya = Path(out) / export.KOHYA_LORA_NAME
    keys = list(safetensors.numpy.load_file(kohya))
    assert any(re.fullmatch(r"lora_unet_input_blocks_\d+_1_transformer_blocks_0_attn1_to_q\.lora_down\.weight", k)
               for k in keys)  # the original layout's names
    # Both files read back as the same factors (kohya's needs the model's module names).
    paths = {"unet": lora.module_paths(unet)}
    from_kohya = lora_files.read(kohya, modules=paths, unet_config=unet_config)
    from_diffusers = lora_files.read(out)
    assert from_kohya.keys() == from_diffusers.keys() == {"unet"}
    assert from_kohya["unet"].keys() == from_diffusers["unet"].keys()
    for module, f in from_diffusers["unet"].items():
        g = from_kohya["unet"][module]
        assert f.alpha == g.alpha == 5.0 and np.array_equal(f.down, g.down) and np.array_equal(f.up, g.up), module

    latents, timesteps, context, pooled, time_ids = (torch.from_numpy(x) for x in inputs)

    def diffusers_unet(model: UNet2DConditionModel) -> np.ndarray:
        with torch.no_grad():
            return model(latents, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.numpy()

    for file in (out, kohya):  # diffusers reads kohya's format through its own converter
        pipe = StableDiffusionXLPipeline.from_pretrained(workspace.base)
        pipe.load_lora_weights(file)
        theirs = diffusers_unet(pipe.unet)
        loaded = {name for name, _ in pipe.unet.named_modules() if name.endswith(".lora_A")}
        assert len(loaded) == len(lora.targets(unet, lora_cfg.target_modules))  # every adapter arrived
        scale = np.abs(theirs).max()
        assert np.abs(theirs - base).max() > 0.05 * scale  # the LoRA changes the output a lot ...
        print(f"diffusers + LoRA ({Path(file).name}) vs ours: max abs diff {np.abs(ours - theirs).max():.2e}, "
              f"output scale {scale:.2f}, LoRA effect {np.abs(theirs - base).max():.2f}")
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

    saved_factor_arrays(Path(full_cfg.run_dir))
    resumed = resumed_state(make_config(workspace, workspace.root / "lora-resumed", *LORA), full_cfg, full, monkeypatch)
    assert type(resumed) is train.TrainState  # no frozen weights: a full fine-tune's checkpoint tree


def saved_factor_arrays(run_dir: Path) -> list[str]:
    """The factor arrays of a LoRA checkpoint, checked to be its only arrays besides counters."""
    arrays = saved_arrays(run_dir, STEPS)
    weights = [name for name in arrays if "['lora']" in name]
    assert {name.split("[")[0] for name in weights} == {".params", ".opt_state", ".ema"}
    # Besides the factors, their EMA and AdamW moments: counters and the step's scalars, nothing else.
    others = [name for name in arrays if name not in weights]
    assert all(name in (".step", ".rng", ".skipped") or name.endswith(".count") for name in others), others
    return weights


def resumed_state(cfg, full_cfg, full, monkeypatch):
    """``cfg``'s run stopped at step 2 and resumed to STEPS; checked to equal the uninterrupted
    run ``full`` (losses, and the restored state: factors, optimizer state, EMA, step, RNG key)."""
    monkeypatch.setattr(checkpoint.PreemptionGuard, "stop", lambda self, step: step == 2)
    first = train.train(cfg)
    monkeypatch.undo()
    assert first.stopped_by_preemption and first.step == 2 and first.losses == full.losses[:2]
    second = train.train(cfg)
    assert second.step == STEPS and second.losses == full.losses[2:]
    _, resumed = train.restore_checkpoint(cfg, step=STEPS)
    _, uninterrupted = train.restore_checkpoint(full_cfg, step=STEPS)
    assert_trees_equal(resumed, uninterrupted)
    return resumed


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


# --------------------------------------------------------------------------------------------
# LoRA files made elsewhere: merged to sample, or continued


def peft_lora_file(base: Path, out: Path) -> Path:
    """A LoRA of the UNet and both text encoders made with peft and saved by diffusers, as another
    trainer would: random (not zero) B, alpha != rank, a GEGLU projection and a convolution adapted."""
    make_lora(base, out, seed=0, b_scale=1.0,
              unet=dict(r=3, lora_alpha=5, target_modules=["to_q", "to_v", "ff.net.0.proj", "conv1"]),
              text=dict(r=2, lora_alpha=4, target_modules=["q_proj", "out_proj"]),
              text_2=dict(r=4, lora_alpha=2, target_modules=["k_proj", "fc1"]))
    return out / lora.WEIGHT_NAME


def test_a_peft_lora_merged_for_sampling_equals_diffusers_fused_in_both_formats(workspace, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from flax_train.models import weights
    from flax_train.sampling import Generator

    file = peft_lora_file(workspace.base, tmp_path / "peft")
    read = lora_files.read(file)
    assert {c: {f.rank for f in m.values()} for c, m in read.items()} == {"unet": {3}, "text_encoder": {2},
                                                                         "text_encoder_2": {4}}
    assert {f.alpha for f in read["unet"].values()} == {5.0}  # from diffusers' metadata
    # The same factors in kohya's format, text encoders included (lora_te1_ / lora_te2_).
    kohya = tmp_path / "kohya.safetensors"
    lora_files.write_kohya(read, kohya, models.read_config(workspace.base / "unet"))

    def state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
        # Some transformers versions leave "text_model." out of CLIPTextModel's keys; ours keep it.
        return {k.removeprefix("text_model."): v.numpy().copy() for k, v in model.state_dict().items()}

    def merged(lora_file: Path) -> dict[str, dict[str, np.ndarray]]:
        generator = Generator(workspace.base, loras=[(str(lora_file), 0.7)])
        text_encoders = nnx.merge(*generator._text)
        ours = {"unet": generator.unet, "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1]}
        return {name: {k.removeprefix("text_model."): v for k, v in weights.to_torch_state_dict(model).items()}
                for name, model in ours.items()}

    ours = merged(file)
    pipe = StableDiffusionXLPipeline.from_pretrained(workspace.base, local_files_only=True)
    unmerged = {name: state_dict(getattr(pipe, name)) for name in ours}
    pipe.load_lora_weights(file)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapters
    for name, mine in ours.items():
        theirs = state_dict(getattr(pipe, name))
        assert mine.keys() == theirs.keys()
        changed = {k for k in mine if not np.array_equal(unmerged[name][k], theirs[k])}
        assert changed == {f"{m.removeprefix('text_model.')}.weight" for m in read[name]}, name  # every adapted weight
        for key, value in mine.items():
            np.testing.assert_allclose(value, theirs[key], rtol=1e-6, atol=1e-6, err_msg=f"{name}.{key}")
    # The kohya file merges to the same weights, bit for bit. (diffusers' own kohya converter is
    # checked on the UNet in test_exported_lora_loaded_by_diffusers_is_our_unet_with_lora; for a
    # text encoder adapted in both attention and MLP layers it drops the attention factors.)
    from_kohya = merged(kohya)
    for name in ours:
        assert_arrays_equal(from_kohya[name], ours[name])


def test_training_continues_from_a_lora_file_with_its_rank_and_targets(workspace, lora_run, tmp_path):
    _, result = lora_run
    file = result.export_dir / lora.WEIGHT_NAME  # rank 4, alpha 8, the attention projections
    cfg = make_config(workspace, tmp_path / "continued", *LORA, "lora.rank=2", "lora.alpha=null",
                      "lora.target_modules=[to_q]", f"lora.init_from={result.export_dir}")
    resolved, start = train.lora_init(cfg)
    assert (resolved.lora.rank, resolved.lora.alpha, resolved.lora.target_modules) == (4, 8.0, lora.DEFAULT_TARGETS)
    mesh, rules = sharding.make_mesh(resolved.mesh), sharding.merged_rules(resolved.mesh.rules)
    _, factors, _ = train.build_lora_unet(resolved, mesh, workspace.base, rules, start)
    assert_arrays_equal(lora.torch_state_dict(host(factors)), safetensors.numpy.load_file(file))
    # The same LoRA in kohya's format starts the same.
    kohya = tmp_path / "kohya.safetensors"
    lora_files.write_kohya(lora_files.read(file), kohya, models.read_config(workspace.base / "unet"))
    from_kohya, kohya_start = train.lora_init(config_lib.apply_overrides(cfg, [f"lora.init_from={kohya}"]))
    assert from_kohya.lora == dataclasses.replace(resolved.lora, init_from=str(kohya))
    _, kohya_factors, _ = train.build_lora_unet(from_kohya, mesh, workspace.base, rules, kohya_start)
    assert_trees_equal(host(kohya_factors), host(factors))

    run = train.train(cfg, max_steps=1)
    assert run.step == 1 and np.isfinite(run.losses).all()
    saved = config_lib.load([str(Path(cfg.run_dir) / "config.yaml")], [])
    assert (saved.lora.rank, saved.lora.alpha) == (4, 8.0)
    _, state = train.restore_checkpoint(cfg)  # the original config: resolved again from the file
    assert {tuple(x.shape) for x in jax.tree.leaves(state.params)} == {tuple(x.shape) for x in jax.tree.leaves(factors)}


def test_lora_files_that_do_not_fit_are_one_line(workspace, tmp_path):
    from flax_train.sampling import Generator

    odd = tmp_path / "odd.safetensors"
    safetensors.numpy.save_file({"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": np.ones((2, 5, 3, 3), np.float32),
                                 "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": np.ones((7, 2, 1, 1), np.float32)},
                                str(odd))
    with pytest.raises(lora_files.LoraFileError, match=r"conv1: update of shape \(7, 5, 3, 3\) where this model's weight is"):
        Generator(workspace.base, loras=[(str(odd), 1.0)])
    strange = tmp_path / "strange.safetensors"
    safetensors.numpy.save_file({"model.layer.weight": np.ones((2, 2), np.float32)}, str(strange))
    with pytest.raises(lora_files.LoraFileError, match="'model.layer.weight' is not a diffusers LoRA key"):
        lora_files.read(strange)
    with pytest.raises(lora_files.LoraFileError, match="must be a number"):
        lora_files.parse_spec("style.safetensors:strong")
    assert lora_files.parse_spec("gs://bucket/style") == ("gs://bucket/style", 1.0)
    assert lora_files.parse_spec("gs://bucket/style:0.5") == ("gs://bucket/style", 0.5)
    with pytest.raises(errors.InputNotFound, match="no such LoRA file"):
        lora_files.read(tmp_path / "absent.safetensors")


def test_bfloat16_and_rank_stabilised_lora_files_read_with_peft_scales(tmp_path):
    import torch
    from safetensors.torch import save_file

    down, up = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(5, 4, dtype=torch.bfloat16)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True}
    file = tmp_path / "rslora.safetensors"
    save_file({f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}, str(file),
              metadata={"format": "pt", lora_files.METADATA_KEY: json.dumps(config)})
    factors = lora_files.read(file)["unet"][module]
    np.testing.assert_array_equal(factors.down, down.float().numpy())  # bf16 values, exactly
    # peft's rank-stabilised scale alpha / sqrt(rank) = 8 / 2, not alpha / rank = 2
    expected = 8 / 2 * (up.float() @ down.float()).numpy()
    np.testing.assert_allclose(factors.delta(), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# LoRA of both text encoders too (lora.train_text_encoder)

TEXT_LORA = (*LORA, "lora.train_text_encoder=true")


@pytest.fixture(scope="module")
def text_workspace(tmp_path_factory) -> Workspace:
    """As ``workspace`` with two layers per text encoder: SDXL conditions on the penultimate
    layer's output, which one layer's adapters would not reach (only encoder 2's pooled output)."""
    return make_workspace(tmp_path_factory.mktemp("text-lora"), text_layers=2)


def test_exported_text_encoder_lora_loaded_by_diffusers_is_our_encoders_with_lora(text_workspace, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from flax_train.models import clip

    lora_cfg = config_lib.LoraConfig(rank=3, alpha=5.0, train_text_encoder=True)
    unet_config = models.read_config(text_workspace.base / "unet")
    encoders = {name: models.load(text_workspace.base, subfolder=name) for name in lora.TEXT_ENCODERS}
    model = lora.inject_all(models.load(text_workspace.base, subfolder="unet"), encoders, lora_cfg, seed=0)
    graphdef, factors, frozen = lora.split(model)
    prompts = ["a photo of a cat", "an oil painting of a red boat"]
    ids = sdxl.tokenize(sdxl.load_tokenizers(text_workspace.base), prompts)
    latents, timesteps, context, pooled, time_ids = unet_inputs(unet_config)

    @functools.partial(jax.jit, static_argnums=0)
    def flax_model(graphdef, state):
        parts = lora.components(nnx.merge(graphdef, state))
        embeds = clip.encode_prompts(parts["text_encoder"], parts["text_encoder_2"], *ids)
        return embeds, parts["unet"](latents, timesteps, context, text_embeds=pooled, time_ids=time_ids)

    base = jax.tree.map(np.asarray, flax_model(graphdef, lora.combine(factors, frozen)))  # B = 0: the base models
    noise = np.random.default_rng(1)
    factors = jax.tree.map(lambda v: np.asarray(v) + 0.2 * noise.standard_normal(v.shape).astype(np.float32), factors)
    ours = jax.tree.map(np.asarray, flax_model(graphdef, lora.combine(factors, frozen)))

    out = export.export_lora(host(factors), lora_cfg, tmp_path / "export", kohya_unet_config=unet_config)
    written = safetensors.numpy.load_file(Path(out) / lora.WEIGHT_NAME)
    assert {key.split(".")[0] for key in written} == {"unet", "text_encoder", "text_encoder_2"}
    for component in lora.TEXT_ENCODERS:
        assert lora.read_metadata(Path(out) / lora.WEIGHT_NAME, component) == {
            "r": 3, "lora_alpha": 5.0, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(lora.TEXT_ENCODER_TARGETS)}
    assert lora.read_metadata(Path(out) / lora.WEIGHT_NAME)["target_modules"] == sorted(lora.DEFAULT_TARGETS)
    kohya = Path(out) / export.KOHYA_LORA_NAME
    kohya_keys = set(safetensors.numpy.load_file(kohya))
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.alpha"} <= kohya_keys
    # Both files read back as the same factors, text encoders included.
    paths = {name: lora.module_paths(part) for name, part in lora.components(model).items()}
    from_kohya, from_diffusers = lora_files.read(kohya, modules=paths, unet_config=unet_config), lora_files.read(out)
    assert from_kohya.keys() == from_diffusers.keys() == {"unet", "text_encoder", "text_encoder_2"}
    for component, modules in from_diffusers.items():
        assert modules.keys() == from_kohya[component].keys()
        names = lora_cfg.target_modules if component == "unet" else lora.TEXT_ENCODER_TARGETS
        assert len(modules) == len(lora.targets(lora.components(model)[component], names))
        for module, f in modules.items():
            g = from_kohya[component][module]
            assert f.alpha == g.alpha == 5.0 and np.array_equal(f.down, g.down) and np.array_equal(f.up, g.up)

    (ours_embeds, ours_pooled), ours_unet = ours
    (base_embeds, base_pooled), _ = base
    for file in (out, kohya):  # diffusers reads kohya's format through its own converter
        pipe = StableDiffusionXLPipeline.from_pretrained(text_workspace.base)
        pipe.load_lora_weights(file)
        for name in lora.TEXT_ENCODERS:
            loaded = [n for n, _ in getattr(pipe, name).named_modules() if n.endswith(".lora_A")]
            assert len(loaded) == len(lora.targets(encoders[name], lora.TEXT_ENCODER_TARGETS))  # every adapter arrived
        with torch.no_grad():
            out1 = pipe.text_encoder(torch.from_numpy(ids[0]).long(), output_hidden_states=True)
            out2 = pipe.text_encoder_2(torch.from_numpy(ids[1]).long(), output_hidden_states=True)
            theirs_unet = pipe.unet(*(torch.from_numpy(x) for x in (latents, timesteps, context)),
                                    added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                                       "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
        theirs_embeds = np.concatenate([out1.hidden_states[-2].numpy(), out2.hidden_states[-2].numpy()], axis=-1)
        for what, mine, theirs, untrained in [("prompt_embeds", ours_embeds, theirs_embeds, base_embeds),
                                              ("pooled", ours_pooled, out2.text_embeds.numpy(), base_pooled),
                                              ("unet", ours_unet, theirs_unet, None)]:
            scale = np.abs(theirs).max()
            if untrained is not None:
                assert np.abs(theirs - untrained).max() > 0.05 * scale, what  # the LoRA changes the output a lot ...
            print(f"{Path(file).name} {what}: diffusers + LoRA vs ours: max abs diff "
                  f"{np.abs(mine - theirs).max():.2e}, scale {scale:.2f}")
            assert np.abs(mine - theirs).max() <= 1e-4 * scale, what  # ... and the same way in both


def test_caption_dropout_with_text_encoder_lora_gives_the_unconditional_input(text_workspace):
    """A dropped caption is the model's unconditional input (zeros for SDXL), whatever its ids, and
    no gradient reaches the text encoders through it; a kept one goes through the adapted encoders."""
    cfg = make_config(text_workspace, text_workspace.root / "unused", *TEXT_LORA)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.merged_rules(cfg.mesh.rules)
    base = models.resolve_pipeline(cfg.model.pretrained)
    graphdef, factors, frozen = train.build_lora_unet(cfg, mesh, base, rules)
    # B away from zero, so that the encoders' LoRA changes what they give the UNet.
    factors = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(1), v.shape, v.dtype), factors)
    schedule = diffusion.NoiseSchedule.from_scheduler_config(sdxl.scheduler_config(base))
    cache = prepare.open_cache(cfg, base)
    empty = train.unconditional_inputs(cache, base)
    assert all(not np.any(np.asarray(v)) for v in empty.values())  # SDXL: zeros
    batch = {k: np.stack([cache[i][k] for i in range(2)]) for k in cache[0]}
    assert set(batch) == {"latents", "add_time_ids", "input_ids", "input_ids_2"}
    other = dict(batch, input_ids=batch["input_ids"][::-1], input_ids_2=batch["input_ids_2"][::-1])

    @jax.jit
    def loss_and_grads(p, factors, batch):  # p traced: one compile for both probabilities
        step = dataclasses.replace(train.step_config(cfg, "epsilon"), caption_dropout=p)
        loss = functools.partial(train.diffusion_loss, graphdef=graphdef, schedule=schedule, timestep_weights=None,
                                 empty=empty, cfg=step, frozen=frozen)
        return jax.value_and_grad(loss)(factors, batch, jax.random.PRNGKey(0))

    dropped, grads = loss_and_grads(1.0, factors, batch)
    assert float(dropped) == float(loss_and_grads(1.0, factors, other)[0])
    text_grads = [g for path, g in flat(grads).items() if path[0] in lora.TEXT_ENCODERS]
    assert text_grads and all(not np.any(g) for g in text_grads)
    assert any(np.any(g) for path, g in flat(grads).items() if path[0] == "unet")
    kept, grads = loss_and_grads(0.0, factors, batch)
    assert float(kept) != float(loss_and_grads(0.0, factors, other)[0])
    for name in lora.TEXT_ENCODERS:
        assert any(np.any(g) for path, g in flat(grads).items() if path[0] == name and path[-1] == "b"), name


@pytest.fixture(scope="module")
def text_lora_run(text_workspace):
    """STEPS uninterrupted steps of a LoRA of the UNet and both text encoders, with validation
    images (prompts encoded by the adapted encoders) and export at the end."""
    cfg = make_config(text_workspace, text_workspace.root / "text-lora-full", *TEXT_LORA,
                      "export.at_end=true", "export.kohya_lora=true", "validation.every_steps=4",
                      "validation.num_steps=2")
    return cfg, train.train(cfg)


def test_text_encoder_lora_trains_checkpoints_resumes_and_exports(text_workspace, text_lora_run, monkeypatch, tmp_path):
    full_cfg, full = text_lora_run
    assert full.step == STEPS and all(np.isfinite(full.losses))
    # The cache keeps both tokenizers' ids of each caption; a cache without them is refused, and
    # one with them serves a run that does not need them.
    cache = prepare.open_cache(full_cfg, text_workspace.base)
    tokens = sdxl.tokenize(sdxl.load_tokenizers(text_workspace.base), [cache.caption(i) for i in range(len(cache))])
    for name, expected in zip(("input_ids", "input_ids_2"), tokens):
        np.testing.assert_array_equal(np.stack([cache[i][name] for i in range(len(cache))]), expected)
    source, preprocess = prepare.specs_from_config(full_cfg)
    wanted = prepare.cache_settings(source, preprocess, text_workspace.base, token_ids=True)
    without = make_config(text_workspace, tmp_path / "unused", *LORA, f"data.cache_dir={tmp_path / 'plain'}")
    prepare.open_cache(without, text_workspace.base)  # prepared as for a UNet-only LoRA
    with pytest.raises(prepare.CacheMismatchError, match='token_ids: cache has "<absent>", config has true'):
        prepare.LatentCache(tmp_path / "plain", expected=wanted)
    plain = prepare.LatentCache(cache.cache_dir, expected=dataclasses.replace(wanted, token_ids=False))
    assert set(plain[0]) == {"latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids"}

    # Checkpoints: every component's factors, their AdamW moments and EMA; no frozen weight.
    weights = saved_factor_arrays(Path(full_cfg.run_dir))
    assert {name.split("'")[1] for name in weights if name.startswith(".params")} == {"unet", *lora.TEXT_ENCODERS}
    cfg = make_config(text_workspace, text_workspace.root / "text-lora-resumed", *TEXT_LORA)
    resumed = resumed_state(cfg, full_cfg, full, monkeypatch)
    # The encoders' factors trained (B started at zero), in fp32.
    trained = flat(resumed.params)
    for name in lora.TEXT_ENCODERS:
        assert any(np.any(v) for path, v in trained.items() if path[0] == name and path[-1] == "b"), name
    assert {v.dtype for v in trained.values()} == {np.dtype(np.float32)}

    # Validation sampled; the export is the EMA of every factor under diffusers' keys.
    assert [p.name for p in (Path(full_cfg.run_dir) / "samples").iterdir()] == [f"step_{STEPS:07d}.png"]
    written = safetensors.numpy.load_file(full.export_dir / lora.WEIGHT_NAME)
    assert_arrays_equal(written, lora.torch_state_dict(host(resumed.ema)))
    assert {key.split(".")[0] for key in written} == {"unet", *lora.TEXT_ENCODERS}
    modules = {name: lora.module_paths(models.abstract(models.read_config(text_workspace.base / name)))
               for name in ("unet", *lora.TEXT_ENCODERS)}
    kohya = lora_files.read(full.export_dir / export.KOHYA_LORA_NAME, modules=modules,
                            unet_config=models.read_config(text_workspace.base / "unet"))
    assert set(kohya) == {"unet", *lora.TEXT_ENCODERS}

    # Continued from its export: every component starts from the file; without the switch, only the UNet.
    resolved, start = train.lora_init(make_config(text_workspace, tmp_path / "continued", *TEXT_LORA,
                                                  f"lora.init_from={full.export_dir}"))
    assert set(start) == {"unet", *lora.TEXT_ENCODERS}
    mesh, rules = sharding.make_mesh(resolved.mesh), sharding.merged_rules(resolved.mesh.rules)
    _, factors, _ = train.build_lora_unet(resolved, mesh, text_workspace.base, rules, start)
    assert_arrays_equal(lora.torch_state_dict(host(factors)), written)
    unet_only, start = train.lora_init(make_config(text_workspace, tmp_path / "unet-only", *LORA,
                                                   f"lora.init_from={full.export_dir}"))
    assert set(start) == {"unet"}
    _, factors, _ = train.build_lora_unet(unet_only, mesh, text_workspace.base, rules, start)
    unet_written = {k: v for k, v in written.items() if k.startswith("unet.")}
    assert_arrays_equal(lora.torch_state_dict(host(factors)), unet_written)
    # A file of UNet factors alone, continued with the switch on: the encoders' adapters start afresh.
    safetensors.numpy.save_file(unet_written, str(tmp_path / "unet.safetensors"),
                                metadata=lora.adapter_metadata(resolved.lora))
    with_text, start = train.lora_init(make_config(text_workspace, tmp_path / "with-text", *TEXT_LORA,
                                                   f"lora.init_from={tmp_path / 'unet.safetensors'}"))
    assert set(start) == {"unet"}
    _, factors, _ = train.build_lora_unet(with_text, mesh, text_workspace.base, rules, start)
    _, fresh, _ = train.build_lora_unet(with_text, mesh, text_workspace.base, rules)
    continued, fresh = lora.torch_state_dict(host(factors)), lora.torch_state_dict(host(fresh))
    assert_arrays_equal({k: v for k, v in continued.items() if k.startswith("unet.")}, unet_written)
    assert_arrays_equal({k: v for k, v in continued.items() if not k.startswith("unet.")},
                        {k: v for k, v in fresh.items() if not k.startswith("unet.")})


def test_train_text_encoder_needs_a_lora_run(text_workspace, tmp_path):
    cfg = make_config(text_workspace, tmp_path, "lora.train_text_encoder=true")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(cfg, 8)
    problems = str(error.value).splitlines()[1:]
    assert len(problems) == 1 and "lora.train_text_encoder is set but train.method is full" in problems[0], problems
    with pytest.raises(config_lib.ConfigError, match="--train_text_encoder is 'lora.train_text_encoder' here"):
        config_lib.load([DEMO_CONFIG], ["train_text_encoder=true"])
