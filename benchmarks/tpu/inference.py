"""The JAX sampler (``flax_train.sampling``: guided Euler steps and the VAE decode) compiled for a
TPU slice, data parallel, from abstract weights and inputs that carry their shardings."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from benchmarks.tpu.compiled import compiled_figures, slice_devices
from benchmarks.tpu.scenarios import MESHES, SDXL_DEPTH, SLICES, Scenario, Settings
from benchmarks.unets import unet_architecture


def compile_inference(scenario: Scenario, settings: Settings, unet: str = "sdxl",
                      devices: list[Any] | None = None) -> dict[str, Any]:
    """Compiles the JAX sampler (``flax_train.sampling``: SDXL's UNet over ``settings.inference_steps``
    Euler steps with classifier-free guidance, then the VAE decode) for ``scenario.per_chip_batch``
    images on each chip of the slice, data parallel: bf16 UNet weights and the fp32 VAE (as
    ``flax-train sample`` decodes) replicated. The text encoders, a few milliseconds, are left out.
    ``devices``: instead of the scenario's TPU slice (a test compiles for CPU devices).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_train import config as config_lib, models, sampling, schedulers, sharding
    from sdxl_common import sdxl, single_file
    from flax_train.demo import tiny

    if scenario.mesh != "dp" or scenario.remat != "none":
        raise ValueError("an inference scenario is data parallel without remat: SLICE_dp_none_RESpx_bBATCH")
    spec = SLICES[scenario.slice]
    stand_in, devices = devices is not None, slice_devices(spec) if devices is None else devices
    mesh = sharding.make_mesh(config_lib.MeshConfig(**MESHES["dp"]), devices=devices)
    batch = scenario.per_chip_batch * len(devices)
    steps = settings.inference_steps
    architecture = unet_architecture(unet, scenario.resolution, None)
    if unet == "sdxl":
        vae_config = models.read_config(single_file.SHIPPED["base"] / "vae")
    else:
        vae_config = {"_class_name": "AutoencoderKL",
                      **tiny.tiny_component_configs(vocab_size=1, image_size=scenario.resolution, **tiny.DEMO_SIZES)["vae"]}
    (unet_graph, unet_params) = nnx.split(models.abstract(architecture, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          attention=settings.attention, scan_layers=settings.scan_layers))
    vae_graph, vae_state = nnx.split(models.abstract(vae_config))
    tables = schedulers.make_scheduler("euler", sdxl.SCHEDULER_CONFIG, steps)
    side = scenario.resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    pooled = architecture["projection_class_embeddings_input_dim"] - 6 * architecture["addition_time_embed_dim"]

    def generate(unet_params, vae_state, embeds, pooled, latents):
        time_ids = sampling.make_time_ids((scenario.resolution,) * 2, (0, 0), (scenario.resolution,) * 2, batch)
        # The unconditional input of SDXL without a negative prompt: zeros.
        out = sampling.sample_latents(nnx.merge(unet_graph, unet_params), tables, latents, embeds, pooled, time_ids,
                                      jnp.zeros_like(embeds), jnp.zeros_like(pooled), time_ids, 5.0)
        return sampling.decode_latents(nnx.merge(vae_graph, vae_state), out)

    replicated, split = sharding.replicated(mesh), lambda ndim: sharding.batch_sharding(mesh, ndim)
    shapes = {
        "embeds": ((batch, sdxl.TOKEN_LENGTH, architecture["cross_attention_dim"]), jnp.bfloat16),
        "pooled": ((batch, pooled), jnp.bfloat16),
        "latents": ((batch, vae_config["latent_channels"], side, side), jnp.float32),
    }
    args = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
            for tree in (unet_params, vae_state)]
    args += [jax.ShapeDtypeStruct(shape, dtype, sharding=split(len(shape))) for shape, dtype in shapes.values()]
    result: dict[str, Any] = {
        "scenario": scenario.name, **dataclasses.asdict(scenario), "task": "inference", "unet": unet,
        "depth": SDXL_DEPTH, "scan_layers": settings.scan_layers, "attention": settings.attention,
        "inference_steps": steps, "guidance": True, "topology": spec.topology, "device_kind": devices[0].device_kind,
        "chips": len(devices), "mesh_shape": {"data": len(devices), "fsdp": 1, "tensor": 1}, "global_batch": batch,
        "dtype": "bfloat16 UNet, float32 VAE",
    }  # fmt: skip
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        traced = jax.jit(generate, out_shardings=split(4)).trace(*args)
    executable = traced.lower().compile()
    result.update(status="compiled", compile_s=time.perf_counter() - start)
    return compiled_figures(result, executable, None if stand_in else f"{scenario.name}{settings.suffix()}")
