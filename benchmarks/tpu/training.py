"""The trainer's real step (``flax_train.train.train_step``: the SDXL UNet, AdamW, EMA, bf16 compute
over fp32 weights, ``configs/sdxl_base.yaml``) compiled for a TPU slice's mesh, from abstract state
and batch that carry their shardings."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from benchmarks.tpu.compiled import compiled_figures, is_oom, oom_figures, slice_devices
from benchmarks.tpu.paths import SDXL_CONFIG
from benchmarks.tpu.scenarios import MESHES, SLICES, Scenario, Settings
from benchmarks.unets import unet_architecture


def abstract_training_state(cfg: Any, architecture: dict[str, Any], mesh: Any, rules: Any) -> tuple[Any, Any, Any, int]:
    """The trainer's state for the UNet ``architecture`` under ``cfg``, as shapes (nothing allocated,
    ``train.abstract_state``; with LoRA the frozen weights beside the factors, as the step takes
    them): the graph definition, the abstract state, its shardings on ``mesh`` by ``rules``, and its
    bytes per chip."""
    import jax
    import numpy as np

    from flax_train import sharding, train

    graphdef, state = train.abstract_state(cfg, architecture, frozen=True)
    shardings = sharding.tree_shardings(state, mesh, rules)
    # Bytes per chip of the state, from the shardings.
    shard_bytes = lambda x, s: int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize  # noqa: E731
    nbytes = sum(jax.tree.leaves(jax.tree.map(shard_bytes, state, shardings)))
    return graphdef, state, shardings, nbytes


def compile_scenario(scenario: Scenario, unet: str = "sdxl", depth: int | None = None,
                     settings: Settings = Settings(), devices: list[Any] | None = None) -> dict[str, Any]:
    """Compiles the training step of ``scenario`` for its TPU slice; returns the compiler's raw figures.

    ``depth`` replaces the number of transformer layers of the UNet's deepest level (SDXL: 10).
    ``devices``: instead of the scenario's TPU slice (``--quick`` compiles for CPU devices).
    """
    scan_layers, lora_rank, attention = settings.scan_layers, settings.lora_rank, settings.attention
    import jax
    import numpy as np

    from flax_train import checkpoint, config as config_lib, diffusion, sharding, train
    from sdxl_common import sdxl

    spec = SLICES[scenario.slice]
    stand_in, devices = devices is not None, slice_devices(spec) if devices is None else devices
    chips = len(devices)
    mesh_shape = sharding.resolve_mesh_shape(config_lib.MeshConfig(**MESHES[scenario.mesh], slices=spec.slices), chips)
    global_batch = scenario.per_chip_batch * mesh_shape["data"] * mesh_shape["fsdp"]
    cfg = config_lib.load(
        SDXL_CONFIG,
        [
            *(f"mesh.{axis}={size}" for axis, size in MESHES[scenario.mesh].items()),
            f"mesh.slices={spec.slices}",
            f"model.remat={scenario.remat}",
            f"model.attention={attention}",
            f"data.resolution={scenario.resolution}",
            f"train.global_batch_size={global_batch}",
            f"model.scan_layers={str(scan_layers).lower()}",
            *(["train.method=lora", f"lora.rank={lora_rank}"] if lora_rank else []),
        ],
    )
    config_lib.validate(cfg, chips)

    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    rules = sharding.merged_rules(cfg.mesh.rules)
    tx, lr = train.build_optimizer(cfg)

    architecture = unet_architecture(unet, scenario.resolution, depth)
    graphdef, abstract_state, state_shardings, state_bytes = abstract_training_state(cfg, architecture, mesh, rules)
    state = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
    # The model being estimated: a shallower copy stands in for it in the compile.
    target_state_bytes = state_bytes
    if depth is not None:
        full_depth = unet_architecture(unet, scenario.resolution, None)
        target_state_bytes = abstract_training_state(cfg, full_depth, mesh, rules)[3]

    batch_shapes, empty = train.batch_spec(architecture, global_batch, scenario.resolution // 8)
    schedule = diffusion.NoiseSchedule.from_scheduler_config(sdxl.SCHEDULER_CONFIG)
    step_fn = train.make_step_fn(cfg, graphdef, tx, lr, schedule, empty, "epsilon")

    result: dict[str, Any] = {
        "scenario": scenario.name,
        **dataclasses.asdict(scenario),
        "unet": unet,
        "depth": architecture["transformer_layers_per_block"][-1],
        "scan_layers": scan_layers,
        "attention": attention,
        "train_method": f"lora r{lora_rank}" if lora_rank else "full",
        "unet_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params)),
        "topology": spec.topology if spec.slices == 1 else f"{spec.slices} x {spec.topology}",
        "slices": spec.slices,
        "device_kind": devices[0].device_kind,
        "chips": chips,
        "mesh_shape": mesh_shape,
        "global_batch": global_batch,
        "ema": cfg.train.ema.enabled,
        "optimizer": cfg.train.optimizer,
        "dtype": cfg.model.dtype,
        "param_dtype": cfg.model.param_dtype,
    }
    # No compile is needed to see that a layout (say, fp32 state replicated on 16 GiB chips)
    # cannot fit: the state alone, per chip, exceeds the HBM.
    result["state_gib_per_chip"] = state_bytes / 1024**3
    result["target_state_gib_per_chip"] = target_state_bytes / 1024**3
    if not stand_in and target_state_bytes / 1024**3 > spec.limits.hbm_gib:
        result.update(status="over_hbm", compile_s=0.0, error="the training state alone exceeds the chip's HBM")
        return result

    start = time.perf_counter()
    try:
        step = train.compile_step(step_fn, state, state_shardings, batch_shapes, mesh)
    except Exception as e:  # the TPU compiler reports out-of-memory as an error
        message = str(e)
        result.update(
            status="oom" if is_oom(message) else "error",
            compile_s=time.perf_counter() - start,
            error=message[:4000],
            **oom_figures(message),
        )
        return result
    result.update(status="compiled", compile_s=step.seconds)
    name = None if stand_in else f"{scenario.name}_d{result['depth']}{settings.suffix()}"
    return compiled_figures(result, step.executable, name)
