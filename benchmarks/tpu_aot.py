"""Ahead-of-time estimates of SDXL on Cloud TPU, training and inference, compiled on a host without a TPU.

libtpu describes a TPU slice (``jax.experimental.topologies``) without any TPU attached, and the
TPU compiler then compiles the trainer's real step (``flax_train.train.train_step``: the SDXL UNet,
AdamW, EMA, bf16 compute over fp32 weights, ``configs/sdxl_base.yaml``) for that slice's mesh, or
with ``--inference STEPS`` the JAX sampler (``flax_train.sampling``: guided Euler steps and the VAE
decode). Nothing is allocated: state and batch are ``jax.ShapeDtypeStruct``s carrying their
shardings. Each scenario reports, per chip:

* memory (arguments, outputs, temporaries) against the chip's HBM, or the compiler's
  out-of-memory error when it does not fit;
* FLOPs, HBM traffic and the bytes received in collectives, counted from the optimized HLO with
  every loop body as often as it runs (``flax_train.hlo_cost``; XLA's ``cost_analysis()`` counts
  a loop body once), beside the analytic FLOPs of SDXL (3 x forward, 4 x with full remat);
* a roofline: compute and collectives each at the chip's peak, the larger of the two (HBM traffic,
  an upper estimate, shown beside it), and from it images/s and MFU; and the TPU compiler's own
  ``optimal_seconds`` where its cost model prices the program. All of these are estimates, not
  measurements.

The TPU compiler's host memory and time grow with the number of layers it compiles: on a 2-core,
23 GiB host the copy of SDXL with 1 transformer layer at the deepest level took 35 min and 15.6 GiB,
with 2 layers 39 min and 18.4 GiB. ``--scan-layers`` (``model.scan_layers``) compiles each stack of
identical transformer layers once: the full-depth step then compiles there in 14-30 min and ~19
GiB. ``--depths 1,2`` instead compiles two shallower copies of SDXL and extrapolates each figure
linearly to 10 layers: right for parameters and FLOPs, which are sums over layers, but not for
peak memory (it said 11.0 GiB where the full-depth compile says 16.6). ``--lora-rank R`` compiles
a LoRA run's step instead of a full fine-tune, e.g. for one chip (``v5e-1``, a Colab runtime).

    .venv/bin/pip install -c constraints.txt 'libtpu==0.0.42.*'     # the project's tpu extra
    .venv/bin/python -m benchmarks.tpu_aot --list
    .venv/bin/python -m benchmarks.tpu_aot --scenario v5e-8_fsdp_full_1024px_b1 --scan-layers --attention splash
    .venv/bin/python -m benchmarks.tpu_aot --scenario v5e-1_fsdp_full_1024px_b1 --scan-layers --lora-rank 16
    .venv/bin/python -m benchmarks.tpu_aot --scenario v5e-4_dp_none_1024px_b1 --scan-layers --inference 20
    .venv/bin/python -m benchmarks.tpu_aot --reanalyse benchmarks/results/tpu_aot_DATE_scan_splash.json
    .venv/bin/python -m benchmarks.tpu_aot --quick                  # seconds, no libtpu: checks the script

Each compile runs in its own subprocess (libtpu allows one user at a time, and a compiler crash
or its host memory then does not carry over). Results go to
``benchmarks/results/tpu_aot_<date><settings>.json`` and ``benchmarks/results/tpu_aot<settings>.md``;
each compiled program's HLO to ``benchmarks/hlo/`` (not versioned), which ``--reanalyse`` reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# Compile for a described TPU slice; never initialise a TPU backend (there is none on this host).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without these libtpu probes GCE metadata for a TPU that is not there and logs warnings.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu takes a host-wide lock meant for a real TPU; compiling for a described slice touches no
# chip, so two compiles (two benchmark runs) may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from benchmarks.unets import unet_architecture  # noqa: E402 (after the environment above)
from sdxl_common import chips  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Each compiled program's optimized HLO (gzip), kept out of git: tpu_aot --reanalyse reads them
# again when the HLO accounting changes, without compiling again.
HLO_DIR = REPO / "benchmarks" / "hlo"
SDXL_CONFIG = REPO / "configs" / "sdxl_base.yaml"

NOTE = "compiler cost-model estimate, not a measurement"


@dataclasses.dataclass(frozen=True)
class Slice:
    """A single-host TPU slice as libtpu names it, or several of them joined over the data-centre
    network (multislice: the mesh's data axis spans them, mesh.slices). Each chip's limits are its
    row of sdxl_common.chips."""

    topology: str  # libtpu topology name of one slice
    host_bounds: tuple[int, int, int]  # chips per host along x, y, z (one host holds the slice)
    chip: str  # key of sdxl_common.chips.CHIPS
    slices: int = 1
    dcn_gb_per_s: float | None = None  # data-centre network bandwidth per chip (Cloud TPU documentation), for slices > 1

    @property
    def limits(self) -> chips.Chip:
        return chips.CHIPS[self.chip]


SLICES: dict[str, Slice] = {
    "v5e-8": Slice("v5e:2x4", (2, 4, 1), "tpu_v5e"),
    "v5e-4": Slice("v5e:2x2", (2, 2, 1), "tpu_v5e"),
    # v5p-8 is 4 chips (8 TensorCores, fused in pairs as megacores): JAX sees 4 devices.
    "v5p-8": Slice("v5p:2x2x1", (2, 2, 1), "tpu_v5p"),
    # Two v5p-8 slices over the data-centre network: 50 Gbit/s per chip (the v5p page's table).
    "2xv5p-8": Slice("v5p:2x2x1", (2, 2, 1), "tpu_v5p", slices=2, dcn_gb_per_s=50 / 8),
    "v6e-8": Slice("v6e:2x4", (2, 4, 1), "tpu_v6e"),
    "v6e-4": Slice("v6e:2x2", (2, 2, 1), "tpu_v6e"),
    # One chip: what a Colab TPU runtime has.
    "v5e-1": Slice("v5e:1x1", (1, 1, 1), "tpu_v5e"),
    "v6e-1": Slice("v6e:1x1", (1, 1, 1), "tpu_v6e"),
}

# Mesh layouts (flax_train.config.MeshConfig fields).
MESHES: dict[str, dict[str, int]] = {
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},  # state sharded over every chip
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},  # state replicated on every chip (the pmap layout)
    "hybrid": {"data": 2, "fsdp": -1, "tensor": 1},  # two replicas, each sharded over half the chips
}
REMATS = ("none", "full", "dots", "dots_no_batch")
# --attention: model.attention, as the results files name it.
ATTENTION_NAMES = {"xla": "XLA", "splash": "splash (Pallas TPU flash)"}

# Forward TFLOP per image of the SDXL UNet (torch FlopCounterMode on the diffusers UNet).
FORWARD_TFLOP_PER_IMAGE = {1024: 6.761, 512: 1.589}

# SDXL's transformer_layers_per_block is [1, 2, 10]; the shallower copies change the last entry.
SDXL_DEPTH = 10

_NAME = re.compile(r"^(?P<slice>[a-z0-9]+-\d+)_(?P<mesh>[a-z]+)_(?P<remat>[a-z_]+?)_(?P<res>\d+)px_b(?P<batch>\d+)$")


@dataclasses.dataclass(frozen=True)
class Scenario:
    slice: str
    mesh: str
    remat: str
    resolution: int
    per_chip_batch: int

    @property
    def name(self) -> str:
        return f"{self.slice}_{self.mesh}_{self.remat}_{self.resolution}px_b{self.per_chip_batch}"

    @classmethod
    def parse(cls, name: str) -> "Scenario":
        m = _NAME.match(name)
        if not m or m["slice"] not in SLICES or m["mesh"] not in MESHES or m["remat"] not in REMATS:
            raise ValueError(
                f"scenario {name!r}: expected SLICE_MESH_REMAT_RESpx_bBATCH with SLICE in {sorted(SLICES)}, "
                f"MESH in {sorted(MESHES)}, REMAT in {list(REMATS)}, e.g. v5e-8_fsdp_full_1024px_b1"
            )
        if int(m["res"]) % 64:
            raise ValueError(f"scenario {name!r}: the resolution must be a multiple of 64 (VAE x UNet downsampling)")
        return cls(m["slice"], m["mesh"], m["remat"], int(m["res"]), int(m["batch"]))


# With --scan-layers --attention splash, the first, third and fourth are the tpu_v5e_8, tpu_v5p_8
# and tpu_v6e_8 presets' layouts (the v6e-8 compile needs more than 23 GiB of host memory: on a
# smaller host, add swap).
DEFAULT_SCENARIOS = (
    "v5e-8_fsdp_dots_1024px_b1",
    "v5e-8_dp_full_1024px_b1",  # pure data parallel: 41 GB of replicated fp32 state cannot fit 16 GiB
    "v5p-8_hybrid_dots_1024px_b4",
    "v6e-8_fsdp_dots_1024px_b3",
    "v5e-8_fsdp_full_1024px_b1",
)


# --------------------------------------------------------------------------------------------
# One compile (runs in a worker subprocess)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a scenario is compiled, beyond its name."""

    scan_layers: bool = False  # model.scan_layers: each stack of transformer layers as one scan
    lora_rank: int | None = None  # a LoRA run's step (train.method: lora) of this rank
    attention: str = "xla"  # model.attention: xla, or splash (the Pallas TPU flash-attention kernel)
    inference_steps: int | None = None  # the sampler (this many Euler steps, guidance, VAE decode)
    # Compile for one CPU device of this host instead of the TPU slice (benchmarks/compile_time.py).
    host_cpu: bool = False

    def suffix(self) -> str:
        """What a results file's name adds for these settings, e.g. ``_scan_splash``."""
        return (("_scan" if self.scan_layers else "") + (f"_lora{self.lora_rank}" if self.lora_rank else "")
                + (f"_{self.attention}" if self.attention != "xla" else "")
                + (f"_infer{self.inference_steps}" if self.inference_steps else ""))

    def flags(self) -> list[str]:
        return (["--attention", self.attention] + (["--scan-layers"] if self.scan_layers else [])
                + (["--lora-rank", str(self.lora_rank)] if self.lora_rank else [])
                + (["--inference", str(self.inference_steps)] if self.inference_steps else [])
                + (["--host-cpu"] if self.host_cpu else []))


def slice_devices(spec: Slice) -> list[Any]:
    """The devices of a described TPU slice (no TPU needed)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        platform="tpu",
        topology_name=spec.topology,
        chip_config_name="default",
        chips_per_host_bounds=spec.host_bounds,
        num_slices=spec.slices,
    ).devices


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

    def abstract_state_of(architecture: dict[str, Any]) -> tuple[Any, Any, Any, int]:
        # With LoRA: the trainable factors, and the UNet's own weights frozen in the compute dtype.
        graphdef, state = train.abstract_state(cfg, architecture, frozen=True)
        shardings = sharding.tree_shardings(state, mesh, rules)
        # Bytes per chip of the state, from the shardings.
        shard_bytes = lambda x, s: int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize  # noqa: E731
        nbytes = sum(jax.tree.leaves(jax.tree.map(shard_bytes, state, shardings)))
        return graphdef, state, shardings, nbytes

    architecture = unet_architecture(unet, scenario.resolution, depth)
    graphdef, abstract_state, state_shardings, state_bytes = abstract_state_of(architecture)
    state = checkpoint.abstract_with_shardings(abstract_state, state_shardings)
    # The model being estimated: a shallower copy stands in for it in the compile.
    target_state_bytes = state_bytes
    if depth is not None:
        target_state_bytes = abstract_state_of(unet_architecture(unet, scenario.resolution, None))[3]

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
            status="oom" if _is_oom(message) else "error",
            compile_s=time.perf_counter() - start,
            error=message[:4000],
            **_oom_figures(message),
        )
        return result
    result.update(status="compiled", compile_s=step.seconds)
    name = None if stand_in else f"{scenario.name}_d{result['depth']}{settings.suffix()}"
    return compiled_figures(result, step.executable, name)


def compiled_figures(result: dict[str, Any], executable: Any, name: str | None) -> dict[str, Any]:
    """The compiler's memory plan and cost analysis, the HLO's own counts; the HLO kept under
    ``name`` in ``HLO_DIR`` (None: a stand-in compile, not kept)."""
    from flax_train import hlo_cost

    result.update(**_memory(executable), **_cost(executable))
    hlo_text = executable.as_text()
    slices = result.get("slices", 1)  # a multislice program is one slice's, with transfers to the others
    result.update(hlo_cost.summary(hlo_cost.analyse(hlo_text, result["chips"] // slices, slices)))
    if name is not None:
        HLO_DIR.mkdir(parents=True, exist_ok=True)
        hlo_path = HLO_DIR / f"{name}.hlo.gz"
        hlo_path.write_bytes(gzip.compress(hlo_text.encode()))
        result["hlo_path"] = str(hlo_path.relative_to(REPO))
    return without_kernel_costs(result) if result["attention"] == "splash" else result


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


def without_kernel_costs(result: dict[str, Any]) -> dict[str, Any]:
    """A splash row's XLA cost-analysis figures, kept under ``*_outside_kernels`` names.

    The splash kernels are Mosaic custom calls, opaque to XLA's cost analysis: its FLOPs, bytes
    and time leave attention out (the attention products are 0.78 of the UNet forward's 6.76
    TFLOP per image at 1024px, 12%; 3% at 512px). The HLO count (``hlo_flops_per_device``) leaves
    the kernels' products out too, so the roofline takes its compute from the analytic FLOPs, which
    include attention. The memory plan includes the kernels' inputs, outputs and residuals.
    """
    result = dict(result)
    for field in ("xla_flops_per_chip", "xla_bytes_accessed_per_chip", "optimal_seconds", "optimal_seconds_unpriced"):
        if field in result:
            result[f"{field}_outside_kernels"] = result.pop(field)
    return result


def _is_oom(message: str) -> bool:
    return any(s in message for s in ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory"))


def _oom_figures(message: str) -> dict[str, Any]:
    """'Used 21.5G of 15.75G hbm' -> the figures, where the compiler's message carries them."""
    m = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? (\w+)", message)
    if not m:
        return {}
    scale = {None: 1 / 1024**3, "K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    return {
        "oom_used_gib": float(m[1]) * scale[m[2]],
        "oom_capacity_gib": float(m[3]) * scale[m[4]],
        "oom_memory_space": m[5],
    }


def _memory(compiled: Any) -> dict[str, float]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 1024**3
    return {
        "argument_gib": m.argument_size_in_bytes / gib,
        "output_gib": m.output_size_in_bytes / gib,
        "alias_gib": m.alias_size_in_bytes / gib,
        "temp_gib": m.temp_size_in_bytes / gib,
        "code_gib": getattr(m, "generated_code_size_in_bytes", 0) / gib,
    }


def _cost(compiled: Any) -> dict[str, float]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return {}
    # Cost analysis of an SPMD executable describes one chip's program, each loop body once.
    keys = {"flops": "xla_flops_per_chip", "bytes accessed": "xla_bytes_accessed_per_chip",
            "optimal_seconds": "optimal_seconds"}
    out = {ours: float(analysis[theirs]) for theirs, ours in keys.items() if theirs in analysis}
    # The cost model answers a negative time when it cannot price part of the program (seen on the
    # tiny UNet's whole step, while each of its ops alone prices fine): that is no estimate at all.
    if out.get("optimal_seconds", 1.0) <= 0:
        out["optimal_seconds_unpriced"] = out.pop("optimal_seconds")
    return out


def run_worker(name: str, unet: str, depth: int | None, out: Path, settings: Settings) -> None:
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # a compile, never a cache hit
    swapped_before = swapped_out_bytes()
    devices = jax.devices("cpu")[:1] if settings.host_cpu else None
    if settings.inference_steps:
        result = compile_inference(Scenario.parse(name), settings, unet, devices)
    else:
        result = compile_scenario(Scenario.parse(name), unet, depth, settings, devices)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["host_peak_rss_gib"] = usage.ru_maxrss / 1024**2
    # On a shared host the wall time depends on the load; the CPU time does not.
    result["host_cpu_s"] = usage.ru_utime + usage.ru_stime
    if swapped_before is not None:
        # The peak RSS leaves out what the kernel swapped out: a compile that needed more memory than
        # the host has shows here (system-wide, so other work's pages count too).
        result["host_swapped_out_gib"] = (swapped_out_bytes() - swapped_before) / 1024**3
    out.write_text(json.dumps(result, indent=2))


def swapped_out_bytes() -> int | None:
    try:
        pages = int(re.search(r"^pswpout (\d+)$", Path("/proc/vmstat").read_text(), re.M)[1])
    except (OSError, TypeError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------
# Derived figures and extrapolation (in the driver)

# Raw per-chip figures that are sums over the UNet's layers, hence linear in the transformer depth.
LINEAR_FIELDS = (
    "unet_params",
    "state_gib_per_chip",
    "argument_gib",
    "output_gib",
    "alias_gib",
    "temp_gib",
    "code_gib",
    "hlo_flops_per_device",
    "hlo_hbm_bytes_per_device",
    "collective_bytes_per_device",
    "xla_flops_per_chip",
    "xla_bytes_accessed_per_chip",
    "optimal_seconds",
)


# What derive() adds (and earlier versions of it added): dropped before deriving again.
DERIVED_FIELDS = {
    "hbm_gib", "total_gib", "fits_hbm", "analytic_model_flops_per_step", "analytic_executed_flops_per_step",
    "hlo_vs_analytic_flops", "peak_tflops_per_chip", "compute_seconds", "hbm_seconds", "ici_seconds", "dcn_seconds",
    "roofline_limited_by", "ici_not_recounted", "roofline_seconds", "roofline_images_per_s", "roofline_mfu", "estimate_note",
    "images_per_s", "images_per_s_per_chip", "mfu",
    "flops_per_step", "compiler_vs_analytic_flops", "hardware_flops_utilisation",
}  # fmt: skip


def derive(row: dict[str, Any]) -> dict[str, Any]:
    """Adds totals, the HBM check, the analytic FLOPs, the roofline and the cost model's throughput."""
    from flax_train import hlo_cost

    spec = SLICES[row["slice"]]
    row = {**{k: v for k, v in row.items() if k not in DERIVED_FIELDS}, "hbm_gib": spec.limits.hbm_gib}
    if "temp_gib" in row:
        row["total_gib"] = row["argument_gib"] + row["output_gib"] + row["temp_gib"] + row["code_gib"] - row["alias_gib"]
        row["fits_hbm"] = row["total_gib"] <= spec.limits.hbm_gib
    forward = FORWARD_TFLOP_PER_IMAGE.get(row["resolution"])
    if row.get("task") == "inference" and forward:
        # Every step runs the UNet on the image and its unconditional twin (guidance).
        model = row["inference_steps"] * 2 * forward * 1e12 * row["global_batch"]
        row["analytic_model_flops_per_step"] = row["analytic_executed_flops_per_step"] = model
    elif row["unet"] == "sdxl" and row.get("depth") == SDXL_DEPTH and forward:
        # Model FLOPs (for MFU) count forward + backward once; full remat runs the forward twice. A
        # LoRA step's backward computes the activations' gradients but not the frozen weights'
        # (the factors' are negligible): 2 x forward, not 3.
        passes = 2 if row.get("train_method", "full") != "full" else 3
        row["analytic_model_flops_per_step"] = passes * forward * 1e12 * row["global_batch"]
        executed = (passes + (row["remat"] == "full")) * forward * 1e12 * row["global_batch"]
        row["analytic_executed_flops_per_step"] = executed
    if "hlo_flops_per_device" in row and "analytic_executed_flops_per_step" in row:
        row["hlo_vs_analytic_flops"] = row["hlo_flops_per_device"] * row["chips"] / row["analytic_executed_flops_per_step"]
    peak = spec.limits.peak_tflops
    row["peak_tflops_per_chip"] = peak
    if "collective_bytes_per_device" in row and "analytic_executed_flops_per_step" in row:
        # Each resource's time alone at its peak: the matrix units on the HLO's FLOPs (on the
        # analytic ones for splash rows: the HLO count cannot see inside a Pallas kernel), the
        # interconnect on the collectives' bytes received per chip (its bidirectional bandwidth is
        # half receiving). The roofline is the larger: both overlapping perfectly. The HBM time
        # of the HLO's traffic is shown beside it, not in it: that count is an upper estimate.
        flops = row["hlo_flops_per_device"]
        if row.get("attention") == "splash":
            flops = row["analytic_executed_flops_per_step"] / row["chips"]
        row["compute_seconds"] = flops / (peak * 1e12)
        row["hbm_seconds"] = row["hlo_hbm_bytes_per_device"] / (spec.limits.hbm_gb_per_s * 1e9)
        terms = {"compute": row["compute_seconds"]}
        if row.get("hlo_accounting", 1) == hlo_cost.ACCOUNTING or not row["collective_bytes_per_device"]:
            row["ici_seconds"] = terms["ici"] = row["collective_bytes_per_device"] / (spec.limits.ici_gb_per_s / 2 * 1e9)
            if spec.slices > 1:  # what crosses between slices, over the data-centre network
                row["dcn_seconds"] = terms["dcn"] = row["dcn_bytes_per_device"] / (spec.dcn_gb_per_s * 1e9)
        else:  # counted by rules that over-counted collectives, and the HLO was not kept to count again
            row["ici_not_recounted"] = True
        row["roofline_limited_by"] = max(terms, key=terms.get)
        row["roofline_seconds"] = max(terms.values())
        row["roofline_images_per_s"] = row["global_batch"] / row["roofline_seconds"]
        row["roofline_mfu"] = row["analytic_model_flops_per_step"] / (row["roofline_seconds"] * peak * 1e12 * row["chips"])
    seconds = row.get("optimal_seconds")
    if seconds:
        row["estimate_note"] = NOTE
        row["images_per_s"] = row["global_batch"] / seconds
        row["images_per_s_per_chip"] = row["images_per_s"] / row["chips"]
        if "analytic_model_flops_per_step" in row:
            row["mfu"] = row["analytic_model_flops_per_step"] / (seconds * peak * 1e12 * row["chips"])
    return row


def extrapolate(rows: list[dict[str, Any]], depth: int = SDXL_DEPTH) -> dict[str, Any]:
    """The scenario at ``depth`` from raw compiles of the same scenario at shallower depths: each
    linear field on the least-squares line through them (with two depths, the line through both)."""
    import numpy as np

    rows = sorted(rows, key=lambda r: r["depth"])
    base = {k: v for k, v in rows[0].items() if k not in LINEAR_FIELDS and k not in ("compile_s", "host_peak_rss_gib", "host_cpu_s", "host_swapped_out_gib", "error", "optimal_seconds_unpriced")}
    out: dict[str, Any] = {**base, "depth": depth, "method": f"extrapolated from depths {', '.join(str(r['depth']) for r in rows)}"}
    out["analog_compile_s"] = [r.get("compile_s") for r in rows]
    out["compile_s"] = sum(r.get("compile_s") or 0.0 for r in rows)
    out["analog_host_peak_rss_gib"] = [r.get("host_peak_rss_gib") for r in rows]
    failed = [r for r in rows if r["status"] != "compiled"]
    if failed:
        # A shallower UNet that does not fit means SDXL does not either.
        first = failed[0]
        out.update(status=first["status"], failed_at_depth=first["depth"], error=first.get("error", ""))
        out.update({k: first[k] for k in ("oom_used_gib", "oom_capacity_gib", "oom_memory_space") if k in first})
        return out
    depths = np.array([r["depth"] for r in rows], dtype=np.float64)
    centred = depths - depths.mean()
    residuals = {}
    for field in LINEAR_FIELDS:
        if not all(field in r for r in rows):
            continue
        values = np.array([r[field] for r in rows], dtype=np.float64)
        # The closed-form least-squares line, not np.polyfit: polyfit solves through LAPACK, whose
        # last bits differ between CPUs, and the figures should not depend on the host.
        mean = values.mean()
        slope = float(np.sum(centred * (values - mean)) / np.sum(centred**2))
        out[field] = float(mean + slope * (depth - depths.mean()))
        if len(rows) > 2:
            fitted = mean + slope * centred
            residuals[field] = float(np.max(np.abs(fitted - values) / np.maximum(np.abs(values), 1e-30)))
    out["unet_params"] = int(round(out["unet_params"]))
    out["status"] = "extrapolated"  # not compiled at this depth: the figures are a linear fit
    if residuals:
        out["fit_max_relative_residual"] = residuals
    return out


# --------------------------------------------------------------------------------------------
# The driver


def run_in_subprocess(name: str, unet: str, depth: int | None, timeout_s: float, settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.tpu_aot", "--worker", name, "--unet", unet,
                   "--worker-out", str(out), *settings.flags()]
        if depth is not None:
            command += ["--worker-depth", str(depth)]
        start = time.perf_counter()
        scenario = dataclasses.asdict(Scenario.parse(name))
        failure = {"scenario": name, **scenario, "unet": unet, "depth": depth, "scan_layers": settings.scan_layers,
                   "attention": settings.attention}
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**failure, "status": "timeout", "compile_s": time.perf_counter() - start}
        if out.exists():
            return json.loads(out.read_text())
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {**failure, "status": "crashed", "returncode": proc.returncode, "error": tail,
                "compile_s": time.perf_counter() - start}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    columns = (
        "scenario", "how", "chips", "global batch", "status", "compile s", "args GiB", "temp GiB",
        "total GiB / HBM", "HLO TFLOP/step", "analytic TFLOP/step", "compute s", "HBM s", "ICI s", "DCN s", "roofline s",
        "roofline img/s", "roofline MFU", "cost-model step s",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        total = "-"
        if "total_gib" in r:
            total = f"{r['total_gib']:.1f} / {r['hbm_gib']:.0f}" + ("" if r["fits_hbm"] else " **over**")
        elif "oom_used_gib" in r:
            total = f"{r['oom_used_gib']:.1f} / {r['oom_capacity_gib']:.1f} (compiler OOM)"
        elif r["status"] == "over_hbm":
            total = f"{r['target_state_gib_per_chip']:.1f} / {r['hbm_gib']:.0f} (state alone)"
        how = "compiled" if r.get("method") is None else r["method"].replace("extrapolated from depths ", "extrap. ")
        if r["status"] in ("over_hbm", "crashed", "timeout"):
            how = "not compiled"
        elif r.get("failed_at_depth") is not None:
            how += f" ({r['status']} at depth {r['failed_at_depth']})"
        hlo = r.get("hlo_flops_per_device")
        hlo_cell = _fmt(hlo * r["chips"] / 1e12 if hlo else None, ".1f")
        if hlo and r.get("attention") == "splash":
            hlo_cell += " (outside kernels)"
        analytic = r.get("analytic_executed_flops_per_step")
        mfu = r.get("roofline_mfu")
        limited = r.get("roofline_limited_by")
        cells = [
            r["scenario"] + (f" (depth {r['depth']})" if r["unet"] == "sdxl" and r.get("depth") not in (None, SDXL_DEPTH) else "")
            + (", scanned layers" if r.get("scan_layers") else "")
            + (f", {r['attention']} attention" if r.get("attention", "xla") != "xla" else "")
            + (f", {r['train_method']}" if r.get("train_method", "full") != "full" else ""),
            how,
            _fmt(r.get("chips"), "d"),
            _fmt(r.get("global_batch"), "d"),
            r["status"],
            _fmt(r.get("compile_s"), ".0f"),
            _fmt(r.get("argument_gib"), ".2f"),
            _fmt(r.get("temp_gib"), ".2f"),
            total,
            hlo_cell,
            _fmt(analytic / 1e12 if analytic else None, ".1f"),
            _fmt(r.get("compute_seconds"), ".3f"),
            _fmt(r.get("hbm_seconds"), ".3f"),
            "not recounted" if r.get("ici_not_recounted") else _fmt(r.get("ici_seconds"), ".3f"),
            _fmt(r.get("dcn_seconds"), ".3f"),
            _fmt(r.get("roofline_seconds"), ".3f") + (f" ({limited})" if limited else ""),
            _fmt(r.get("roofline_images_per_s"), ".2f"),
            "-" if mfu is None else f"{100 * mfu:.0f}%",
            _fmt(r.get("optimal_seconds"), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def host_info() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    memory_gib = None
    if Path("/proc/meminfo").exists():
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        memory_gib = round(kb / 1024**2, 1)
    return {
        "host": "CPU-only (no TPU attached); TPU programs compiled ahead of time by libtpu",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        **{package: version(package) for package in ("jax", "jaxlib", "libtpu", "flax", "optax")},
    }


MARKDOWN_NOTES = """\
## What the columns mean

- **how** / **status**: `compiled` is the full SDXL step compiled as is. `extrap. 1, 2` (status
  `extrapolated`: nothing at full depth was compiled) means the step was
  compiled for two shallower copies of SDXL (the deepest level's 10 transformer layers cut to 1
  and 2, everything else unchanged) and every per-chip figure (parameters, memory, FLOPs, cost-model
  time) was extrapolated linearly to 10 layers. The extrapolated parameter count is checked against
  the real one below.
- **compile s**: wall time of `lower().compile()` on this host (shared and loaded, so slow); for
  extrapolated rows, the sum of the two shallower compiles. A TPU VM's host compiles much faster.
- **args / temp / total GiB**: per chip, from the compiler's `memory_analysis()`; total =
  arguments + outputs + temporaries + code - aliased (the donated state). `oom` is the TPU compiler
  refusing the program for HBM, with its message's used / capacity figures.
- **HLO TFLOP/step**: the matrix products and convolutions of the compiled program, counted from
  its optimized HLO (`flax_train.hlo_cost`) with every loop body (scanned layers) counted as often
  as it runs, x chips. XLA's own `cost_analysis()` counts a loop body once (kept in the JSON as
  `xla_flops_per_chip`). Splash rows: outside the Pallas kernels, whose products it cannot see.
  **analytic**: 6.761 TFLOP forward per image at 1024px, 1.589 at 512px (torch FlopCounterMode on
  the diffusers UNet), x3 for forward + backward, x4 with full rematerialisation (an upper count: the
  backward pass recomputes the resnet and transformer blocks, not the stem, the up- and
  downsampling convolutions and the embeddings); a LoRA step x2 (x3): its backward skips the frozen
  weights' gradients.
- **compute / ICI s**: each resource's time per step alone at its peak, per chip: the HLO's FLOPs
  (splash rows: the analytic FLOPs, which include attention) over the peak bf16 FLOP/s ({peaks}
  TFLOP/s); the bytes each chip receives in the program's collectives (FSDP's
  all-gathers and reduce-scatters, which the TPU compiler runs as collective matmuls of
  collective-permutes) over half the bidirectional interconnect bandwidth ({ici} GB/s per
  chip; Cloud TPU documentation). `not recounted`: the row's collectives were counted by an earlier
  `hlo_cost` that counted each of the TPU compiler's asynchronous collectives once per fusion
  printing it (a start, overlapped pieces and a done) and some hybrid meshes' groups as all the chips;
  that row's HLO was not kept to count again, so its roofline is the compute's time alone.
- **HBM s**: the bytes every unfused instruction of the HLO reads and writes (a fusion its operands
  and result; a scanned layer's slice, not the whole stack) over the HBM bandwidth ({hbm}
  GB/s). An upper estimate: on a TPU it also counts the compiler's copies and slices between memory
  spaces, so it is shown and kept out of the roofline.
- **roofline s**: the larger of compute and ICI, and which one it is: the step if the two overlapped
  perfectly and each ran at its peak. An idealised estimate, not a bound and not a measurement.
  **roofline img/s** = global batch / roofline s; **roofline MFU** = analytic model FLOPs (3 x
  forward; recomputation not counted) / (roofline s x peak x chips).
- **cost-model step s**: the TPU compiler's `optimal_seconds`, a {note}; `-` where the cost model
  could not price the program (it answers a negative time for scanned programs, kept in the JSON as
  `optimal_seconds_unpriced`) or cannot see all of it (splash rows: `*_outside_kernels`).

## Published figures for comparison (not from this project)

- Hugging Face blog "Accelerating SDXL inference with JAX on Cloud TPU v5e" (2023), measured:
  1024x1024, 20 Euler steps with guidance, v5e-4 batch 4 in 2.33 s (1.72 images/s), batch 8 in
  4.99 s; v4-8 batch 4 in 2.16 s; about 3 minutes to compile. MLPerf Inference v4.1, SDXL (20
  steps, guidance, 1024px, bf16): v5e-4 1.75 images/s offline, v6e-4 (preview) 5.44. Compare them
  with the `--inference 20` rows' roofline img/s; a training step (forward, backward, optimizer,
  3-4 forwards' work per image) is not comparable one to one.
- MaxDiffusion trains SDXL on TPU without EMA and without rematerialisation; the scenarios here
  keep EMA (one more fp32 copy of the weights) and fp32 AdamW, as `configs/sdxl_base.yaml` does,
  so their memory is not comparable to MaxDiffusion's.
- torch_xla: compiling SDXL can take about an hour on TPU (torch_xla docs); no published SDXL
  training throughput.
"""


def markdown_notes() -> str:
    """MARKDOWN_NOTES with the chips' figures from sdxl_common.chips (v5e, v5p, v6e, in that order)."""
    rows = {name.removeprefix("tpu_"): chips.CHIPS[name] for name in ("tpu_v5e", "tpu_v5p", "tpu_v6e")}
    return MARKDOWN_NOTES.format(
        note=NOTE,
        peaks=", ".join(f"{chip.peak_tflops:g} {name}" for name, chip in rows.items()),
        ici=", ".join(f"{chip.ici_gb_per_s:g}" for chip in rows.values()),
        hbm=", ".join(f"{chip.hbm_gb_per_s:g}" for chip in rows.values()),
    )


def write_results(rows: list[dict[str, Any]], analogs: list[dict[str, Any]], info: dict[str, Any],
                  command: str | None, suffix: str = "", today: str | None = None) -> list[Path]:
    """The day's results file of these settings, then the table of every day's."""
    return [save_day(rows, analogs, info, command, suffix, today), write_markdown(info, suffix)]


def save_day(rows: list[dict[str, Any]], analogs: list[dict[str, Any]], info: dict[str, Any],
             command: str | None, suffix: str, today: str | None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = today or datetime.date.today().isoformat()
    json_path = RESULTS / f"tpu_aot_{today}{suffix}.json"
    # Runs of the same day and settings share one file: a scenario run again replaces its rows,
    # others are kept, so each scenario can be compiled in a run of its own.
    earlier = json.loads(json_path.read_text()) if json_path.exists() else {}
    before = {r["scenario"]: derive(r) for r in earlier.get("results", [])}
    rows = [later_row(before.get(r["scenario"]), r) for r in rows]
    names = {r["scenario"] for r in rows + analogs}
    rows = [r for name, r in before.items() if name not in names] + rows
    analogs = [derive(r) for r in earlier.get("shallow_compiles", []) if r["scenario"] not in names] + analogs
    commands = [c for c in earlier.get("commands", []) if c != command] + ([command] if command else [])
    payload = {
        "benchmark": "tpu_aot",
        "date": today,
        "commands": commands,
        "estimate_note": NOTE,
        "host": info,
        "results": rows,
        "shallow_compiles": analogs,
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return json_path


def later_row(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """A scenario's row to show: the later run's, unless only the earlier one compiled. A compile
    that ran out of time or memory on a busy day says nothing new about the program."""
    if before is not None and before["status"] == "compiled" and after["status"] in ("timeout", "crashed"):
        return before
    return after


def write_markdown(info: dict[str, Any], suffix: str) -> Path:
    """The table of the runs of these settings from every day, a scenario's latest row winning."""
    by_name: dict[str, dict[str, Any]] = {}
    shallow: dict[str, dict[str, Any]] = {}
    commands, dates, paths = [], [], []
    for date, path in results_files(suffix):
        day = json.loads(path.read_text())
        by_name.update((r["scenario"], later_row(by_name.get(r["scenario"]), derive(r))) for r in day["results"])
        shallow.update((r["scenario"], derive(r)) for r in day.get("shallow_compiles", []))
        commands += [c for c in day.get("commands", []) if c not in commands]
        dates.append(date)
        paths.append(f"`{path.relative_to(REPO)}`")
    rows, analogs = list(by_name.values()), list(shallow.values())
    inference = any(r.get("task") == "inference" for r in rows)
    attention = " and ".join(sorted({ATTENTION_NAMES[r.get("attention", "xla")] for r in rows})) + " attention."
    if inference:
        what = ("The JAX sampler (`flax_train.sampling`, as `flax-train sample` runs it): Euler steps with "
                "classifier-free guidance (the UNet on each image and its unconditional twin, side by side on "
                "one chip), then the VAE decode; bf16 UNet, fp32 VAE, weights replicated on every chip, text "
                "encoders left out; " + attention)
    else:
        what = ("The trainer's own step (`flax_train.train.train_step`) with `configs/sdxl_base.yaml`: AdamW, EMA, "
                "bf16 compute, fp32 weights and optimizer state, " + attention)
    md = [
        f"# SDXL {'inference' if inference else 'training'} on Cloud TPU: ahead-of-time compiler estimates",
        "",
        f"Compiled {', '.join(dates)} on a **CPU-only host** ({info['cpu_count']} cores, {info['memory_gib']} GiB, shared "
        f"with other work; {info['platform']}); no TPU was used. jax {info['jax']}, libtpu {info['libtpu']}, "
        f"flax {info['flax']}. " + what
        + (" Rows marked `scanned layers` run each stack of transformer layers as one scan (`model.scan_layers`)."
           if any(r.get("scan_layers") for r in rows) else "")
        + (" Rows marked `lora rN` train a rank-N LoRA (`train.method: lora`): the UNet's own weights are frozen"
           " in bf16 and only the factors have fp32 copies, AdamW moments and EMA."
           if any(r.get("train_method", "full") != "full" for r in rows) else ""),
        "",
        "Memory is the TPU compiler's plan; the roofline, images/s and MFU are **idealised estimates** from "
        f"the compiled program's counts, and the cost-model step time a **{NOTE}**. None is a measurement.",
        "",
        "```",
        *commands,
        "```",
        "",
        table(rows),
        "",
    ]
    if analogs:
        real = sdxl_param_count()
        checks = sorted({(r["unet_params"], r["method"]) for r in rows if r.get("method") and "unet_params" in r})
        md += [f"SDXL UNet parameters: {real:,}; extrapolated: " + ", ".join(f"{p:,} ({m})" for p, m in checks) + ".", ""]
        md += ["The shallower compiles the extrapolated rows come from:", "", table(analogs), ""]
    failed = [r for r in rows + analogs if r["status"] not in ("compiled", "extrapolated", "oom", "over_hbm")]
    if failed:
        md += ["## Compiles that failed", ""]
        md += [f"- `{r['scenario']}`: {r['status']} - {failure_reason(r)[:300]}" for r in failed]
        md.append("")
    md += [f"Raw figures: {', '.join(paths)}.", "", markdown_notes()]
    md_path = RESULTS / f"tpu_aot{suffix}.md"
    md_path.write_text("\n".join(md))
    return md_path


def quick() -> None:
    """The tiny UNet's scanned training step on an 8-device FSDP mesh and its 2-step sampler on 4,
    compiled for CPU devices in place of the TPU slices: the whole path but the TPU compiler."""
    import jax

    devices = jax.devices()
    if len(devices) < 8:
        sys.exit("--quick needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (the Makefile sets it)")
    rows = [
        compile_scenario(Scenario.parse("v5e-8_fsdp_full_64px_b1"), "tiny", None, Settings(scan_layers=True),
                         devices=devices[:8]),
        compile_inference(Scenario.parse("v5e-4_dp_none_64px_b1"), Settings(inference_steps=2), "tiny",
                          devices=devices[:4]),
    ]
    print(table([derive(r) for r in rows]))
    print("\n--quick: the tiny UNet compiled for this host's CPU devices standing in for the slices; "
          "the figures check the script and estimate nothing")


def failure_reason(row: dict[str, Any]) -> str:
    if row.get("returncode") == -9:  # SIGKILL: on a host without swap, the kernel's out-of-memory killer
        after = f" after {row['compile_s']:.0f} s" if row.get("compile_s") else ""
        return f"the compiler was killed (SIGKILL){after}: this host ran out of memory"
    return str(row.get("error", ""))


def results_files(suffix: str) -> list[tuple[str, Path]]:
    """(date, path) of every results file of these settings, oldest first."""
    pattern = re.compile(rf"tpu_aot_(\d{{4}}-\d{{2}}-\d{{2}}){re.escape(suffix)}\.json")
    return sorted((m[1], p) for p in RESULTS.glob("tpu_aot_*.json") if (m := pattern.fullmatch(p.name)))


def reanalyse(json_path: Path) -> list[Path]:
    """Rows of a results file with their HLO figures counted again from the kept HLO."""
    from flax_train import hlo_cost

    json_path = json_path.resolve()
    payload = json.loads(json_path.read_text())
    m = re.fullmatch(r"tpu_aot_(\d{4}-\d{2}-\d{2})(.*)\.json", json_path.name)
    if not m:
        raise SystemExit(f"{json_path}: not a tpu_aot results file (tpu_aot_DATE[SUFFIX].json)")
    for row in payload["results"] + payload.get("shallow_compiles", []):
        hlo_path = REPO / row.get("hlo_path", "-")
        if hlo_path.is_file():
            row.update(hlo_cost.summary(hlo_cost.analyse(gzip.decompress(hlo_path.read_bytes()).decode(), row["chips"])))
    payload["results"] = [derive(r) for r in payload["results"]]
    payload["shallow_compiles"] = [derive(r) for r in payload.get("shallow_compiles", [])]
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return [json_path, write_markdown(payload["host"], m[2])]


def sdxl_param_count() -> int:
    from flax_train import models
    from sdxl_common import sdxl

    return models.count_params(models.abstract(sdxl.UNET_CONFIG))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", help="a scenario name (repeatable); default: the default list")
    parser.add_argument("--list", action="store_true", help="print the default scenarios and the name grammar")
    parser.add_argument("--unet", choices=("sdxl", "tiny"), default="sdxl", help="tiny: a quick check of the pipeline")
    parser.add_argument(
        "--depths",
        help="comma-separated transformer depths of the deepest level to compile and extrapolate to SDXL's 10 "
        "(e.g. 1,2); default: compile SDXL itself",
    )
    parser.add_argument("--scan-layers", action="store_true",
                        help="model.scan_layers: each stack of transformer layers compiled once, as a scan")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="compile a LoRA run's step of this rank (train.method=lora) instead of a full fine-tune")
    parser.add_argument("--attention", choices=tuple(ATTENTION_NAMES), default="xla",
                        help="model.attention: xla, or splash (the Pallas TPU flash-attention kernel)")
    parser.add_argument("--inference", type=int, metavar="STEPS",
                        help="compile the JAX sampler instead of a training step: STEPS Euler steps with guidance and "
                        "the VAE decode, per_chip_batch images per chip (scenario SLICE_dp_none_RESpx_bBATCH)")
    parser.add_argument("--quick", action="store_true",
                        help="seconds: the tiny UNet's step and sampler compiled for this host's CPU devices standing in "
                        "for the slices; checks the script end to end, estimates nothing, needs no libtpu")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per compile")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    parser.add_argument("--reanalyse", type=Path, metavar="RESULTS_JSON",
                        help="count FLOPs, memory traffic and collectives again from the HLO kept for each row "
                        "(benchmarks/hlo/) and rewrite that results file and its table; compiles nothing")
    parser.add_argument("--host-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings(args.scan_layers, args.lora_rank, args.attention, args.inference, args.host_cpu)

    if args.worker:
        run_worker(args.worker, args.unet, args.worker_depth, args.worker_out, settings)
        return
    if args.quick:
        quick()
        return
    if args.reanalyse:
        for path in reanalyse(args.reanalyse):
            print(f"wrote {path.relative_to(REPO)}")
        return
    if args.list:
        print("SLICE_MESH_REMAT_RESpx_bBATCH with")
        print(f"  SLICE {', '.join(f'{k} ({v.topology})' for k, v in SLICES.items())}")
        print(f"  MESH  {', '.join(f'{k} {v}' for k, v in MESHES.items())}")
        print(f"  REMAT {', '.join(REMATS)}; BATCH per data-parallel rank (per chip)")
        print("default scenarios:\n  " + "\n  ".join(DEFAULT_SCENARIOS))
        return

    names = args.scenario or list(DEFAULT_SCENARIOS)
    for name in names:
        Scenario.parse(name)  # fail on a bad name before compiling anything
    depths = [int(d) for d in args.depths.split(",")] if args.depths else [None]
    if args.depths and (args.unet != "sdxl" or len(set(depths)) < 2):
        parser.error("--depths needs --unet sdxl and at least two different depths")
    info = host_info()
    if info["libtpu"] is None:
        sys.exit("libtpu is not installed: pip install -c constraints.txt 'libtpu==0.0.42.*' (the project's tpu extra)")
    command = " ".join(["python -m benchmarks.tpu_aot", *(sys.argv[1:] if argv is None else argv)])

    rows, analogs = [], []
    for name in names:
        compiled = []
        for depth in depths:
            print(f"compiling {name}" + (f" at depth {depth}" if depth else "") + " ...", flush=True)
            r = run_in_subprocess(name, args.unet, depth, args.timeout, settings)
            shown = derive(r)
            print(
                f"  {r['status']} in {r.get('compile_s', 0):.0f} s"
                + (f"; {shown['total_gib']:.2f} GiB per chip" if "total_gib" in shown else "")
                + (f"; est. {shown['images_per_s']:.2f} img/s" if "images_per_s" in shown else "")
                + (f"; host peak RSS {r['host_peak_rss_gib']:.1f} GiB" if "host_peak_rss_gib" in r else "")
                + (f", {r['host_swapped_out_gib']:.1f} GiB swapped out" if r.get("host_swapped_out_gib") else ""),
                flush=True,
            )
            compiled.append(r)
            if r["status"] != "compiled":
                break  # a deeper copy would fail the same way
        if args.depths:
            analogs += compiled
            rows.append(extrapolate(compiled))
        else:
            rows += compiled
    rows, analogs = [derive(r) for r in rows], [derive(r) for r in analogs]
    print()
    print(table(rows))
    if analogs:
        print("\nshallower compiles:\n" + table(analogs))
    print(f"\nstep times, images/s and MFU: {NOTE}")
    if not args.no_write and args.unet == "sdxl":
        for path in write_results(rows, analogs, info, command, settings.suffix()):
            print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
