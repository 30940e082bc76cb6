"""Ahead-of-time estimates of SDXL UNet training on Cloud TPU, compiled on a CPU-only host.

libtpu describes a TPU slice (``jax.experimental.topologies``) without any TPU attached, and the
TPU compiler then compiles the trainer's real step (``flax_train.train.train_step``: the 2.6B
SDXL UNet, AdamW, EMA, bf16 compute over fp32 weights) for that slice's mesh. Nothing is
allocated: the state and batch are ``jax.ShapeDtypeStruct``s with their shardings attached. Each
scenario reports what the compiler says about the step:

* per-chip memory (arguments, outputs, temporaries) against the chip's HBM, or the compiler's
  out-of-memory error when it does not fit;
* FLOPs per step (``cost_analysis()``, per chip, times the number of chips) against the analytic
  figure for SDXL (3 x forward, 4 x with full rematerialisation);
* ``optimal_seconds``, the TPU compiler's cost-model estimate of one step, and from it images/s
  and MFU. These are compiler cost-model estimates, not measurements.

Needs the project's ``tpu`` extra (libtpu), no TPU:

    .venv/bin/pip install -c constraints.txt 'libtpu==0.0.42.*'
    .venv/bin/python -m benchmarks.tpu_aot                   # the default scenarios, ~10-15 min on 2 cores
    .venv/bin/python -m benchmarks.tpu_aot --list            # scenario names and the grammar
    .venv/bin/python -m benchmarks.tpu_aot --scenario v5e-8_fsdp_full_512px_b1 --no-write

Each scenario compiles in its own subprocess, so a compiler crash or the host memory of one
compile does not carry over to the next. Results go to ``benchmarks/results/tpu_aot_<date>.json``
and ``benchmarks/results/tpu_aot.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SDXL_CONFIG = REPO / "configs" / "sdxl_base.yaml"

NOTE = "compiler cost-model estimate, not a measurement"


@dataclasses.dataclass(frozen=True)
class Slice:
    """A single-host TPU slice as libtpu names it."""

    topology: str  # libtpu topology name
    host_bounds: tuple[int, int, int]  # chips per host along x, y, z (one host holds the slice)
    chip: str  # key of flax_train.config.CHIP_PEAK_TFLOPS
    hbm_gib: float  # HBM per chip (REFERENCE.md)


SLICES: dict[str, Slice] = {
    "v5e-8": Slice("v5e:2x4", (2, 4, 1), "tpu_v5e", 16.0),
    # v5p-8 is 4 chips (8 TensorCores, fused in pairs as megacores): JAX sees 4 devices.
    "v5p-8": Slice("v5p:2x2x1", (2, 2, 1), "tpu_v5p", 95.0),
    "v6e-8": Slice("v6e:2x4", (2, 4, 1), "tpu_v6e", 32.0),
}

# Mesh layouts (flax_train.config.MeshConfig fields).
MESHES: dict[str, dict[str, int]] = {
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},  # state sharded over every chip
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},  # state replicated on every chip (the pmap layout)
    "hybrid": {"data": 2, "fsdp": -1, "tensor": 1},  # two replicas, each sharded over half the chips
}
REMATS = ("none", "full", "dots", "dots_no_batch")

# Forward TFLOP per image of the SDXL UNet (torch FlopCounterMode, REFERENCE.md).
FORWARD_TFLOP_PER_IMAGE = {1024: 6.761, 512: 1.589}

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
        if int(m["res"]) % 8:
            raise ValueError(f"scenario {name!r}: the resolution must be a multiple of 8 (the VAE's factor)")
        return cls(m["slice"], m["mesh"], m["remat"], int(m["res"]), int(m["batch"]))


# Kept to what compiles in about 10-15 minutes on a loaded 2-core host (about a minute or two each).
DEFAULT_SCENARIOS = (
    "v5e-8_fsdp_full_1024px_b1",  # the tpu_v5e_8 preset
    "v5e-8_dp_full_1024px_b1",  # pure data parallel: the replicated fp32 state cannot fit 16 GiB
    "v5e-8_fsdp_dots_1024px_b1",
    "v5e-8_fsdp_full_1024px_b2",
    "v5e-8_fsdp_full_512px_b2",
    "v5p-8_hybrid_dots_1024px_b4",  # the tpu_v5p_8 preset
    "v6e-8_fsdp_full_1024px_b2",  # the tpu_v6e_8 preset
)


# --------------------------------------------------------------------------------------------
# One scenario (runs in a worker subprocess)


def compile_scenario(scenario: Scenario, unet: str = "sdxl", program: str = "step") -> dict[str, Any]:
    """Compiles the training step of ``scenario`` for its TPU slice; returns the compiler's figures.

    ``program="grad"`` compiles the step's forward and backward pass only (see ``compile_gradient``).
    """
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import topologies

    from flax_train import checkpoint, config as config_lib, diffusion, models, pipeline, sharding, tiny, train

    spec = SLICES[scenario.slice]
    devices = topologies.get_topology_desc(
        platform="tpu",
        topology_name=spec.topology,
        chip_config_name="default",
        chips_per_host_bounds=spec.host_bounds,
        num_slices=1,
    ).devices
    chips = len(devices)
    mesh_overrides = [f"mesh.{axis}={size}" for axis, size in MESHES[scenario.mesh].items()]
    mesh_shape = config_lib.resolve_mesh_shape(config_lib.MeshConfig(**MESHES[scenario.mesh]), chips)
    global_batch = scenario.per_chip_batch * mesh_shape["data"] * mesh_shape["fsdp"]
    cfg = config_lib.load(
        SDXL_CONFIG,
        [
            *mesh_overrides,
            f"model.remat={scenario.remat}",
            "model.attention=xla",
            f"data.resolution={scenario.resolution}",
            f"train.global_batch_size={global_batch}",
        ],
    )
    config_lib.validate(cfg, chips)

    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    rules = sharding.merged_rules(cfg.mesh.rules)
    architecture = pipeline.unet_config(unet, scenario.resolution)
    graphdef, abstract_params = nnx.split(models.abstract(architecture, **train.unet_options(cfg)), nnx.Param)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    tx, lr = train.build_optimizer(cfg)
    abstract_state = jax.eval_shape(train.initial_state_fn(cfg, tx), abstract_params)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, rules)
    state = checkpoint.abstract_with_shardings(abstract_state, state_shardings)

    # The trainer reads these from the latent cache; numpy arrays become constants of the step,
    # exactly as the cached empty-prompt embeddings do.
    empty = {
        "prompt_embeds": np.zeros((77, architecture["cross_attention_dim"]), np.float32),
        "pooled_prompt_embeds": np.zeros((_pooled_dim(architecture),), np.float32),
    }
    latent = scenario.resolution // 8
    batch_shapes = {
        "latents": jax.ShapeDtypeStruct((global_batch, 4, latent, latent), np.float32),
        "prompt_embeds": jax.ShapeDtypeStruct((global_batch, 77, empty["prompt_embeds"].shape[1]), np.float32),
        "pooled_prompt_embeds": jax.ShapeDtypeStruct((global_batch, empty["pooled_prompt_embeds"].shape[0]), np.float32),
        "add_time_ids": jax.ShapeDtypeStruct((global_batch, 6), np.int32),
    }
    schedule = diffusion.NoiseSchedule.from_scheduler_config(tiny.SDXL_SCHEDULER_CONFIG)
    step_fn = functools.partial(
        train.train_step,
        graphdef=graphdef,
        tx=tx,
        lr_schedule=lr,
        schedule=schedule,
        timestep_weights=None,
        empty=empty,
        cfg=train.step_config(cfg, "epsilon"),
    )

    result: dict[str, Any] = {
        "scenario": scenario.name,
        **dataclasses.asdict(scenario),
        "unet": unet,
        "program": program,
        "unet_params": num_params,
        "topology": spec.topology,
        "device_kind": devices[0].device_kind,
        "chips": chips,
        "mesh_shape": mesh_shape,
        "global_batch": global_batch,
        "ema": cfg.train.ema.enabled,
        "optimizer": cfg.train.optimizer,
        "dtype": cfg.model.dtype,
        "param_dtype": cfg.model.param_dtype,
        "hbm_gib": spec.hbm_gib,
    }
    start = time.perf_counter()
    try:
        if program == "step":
            compiled, compile_s = train.compile_step(step_fn, state, state_shardings, batch_shapes, mesh)
        else:
            loss_fn = functools.partial(
                train.diffusion_loss,
                **{k: step_fn.keywords[k] for k in ("graphdef", "schedule", "timestep_weights", "empty", "cfg")},
            )
            compiled, compile_s = compile_gradient(loss_fn, state, state_shardings, batch_shapes, mesh)
            result["update_bytes_per_chip"] = _update_bytes_per_chip(abstract_state, state_shardings)
    except Exception as e:  # the TPU compiler reports out-of-memory as an error
        message = str(e)
        result.update(
            status="oom" if _is_oom(message) else "error",
            compile_s=time.perf_counter() - start,
            error=message[:4000],
            **_oom_figures(message),
        )
        return result
    result.update(status="compiled", compile_s=compile_s, **_memory(compiled, spec.hbm_gib), **_cost(compiled, chips))
    result.update(_estimates(result, config_lib.CHIP_PEAK_TFLOPS[spec.chip]))
    return result


def compile_gradient(
    loss_fn: Any, state: Any, state_shardings: Any, batch_shapes: dict[str, Any], mesh: Any
) -> tuple[Any, float]:
    """The training step without its optimizer update: loss and gradients, as ``train_step`` computes them.

    The whole state stays an argument (``keep_unused``), so the memory analysis still counts the
    optimizer moments and the EMA that live through the step. Two thirds of the full step's HLO is
    the per-parameter update (clipping, AdamW, the finite check, EMA: ~60 ops for each of SDXL's
    1,681 weights); the TPU compiler's host memory grows with that count, so this program compiles
    on hosts where the full step does not.
    """
    import jax

    from flax_train import sharding

    batch_shardings = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}

    def gradient(state, batch):
        key = jax.random.fold_in(state.rng, state.step)  # as train_step draws it
        return jax.value_and_grad(loss_fn)(state.params, batch, key)

    jitted = jax.jit(
        gradient,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(sharding.replicated(mesh), state_shardings.params),
        keep_unused=True,
    )
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in batch_shapes.items()
    }
    start = time.perf_counter()
    compiled = jitted.lower(state, abstract_batch).compile()
    return compiled, time.perf_counter() - start


def _update_bytes_per_chip(abstract_state: Any, state_shardings: Any) -> int:
    """HBM traffic of the optimizer update per chip: it reads the gradients and every
    parameter-shaped array of the state (weights, moments, EMA) and writes the latter back."""
    import jax
    import numpy as np

    def shard_bytes(x, s) -> int:
        return int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize

    sizes = jax.tree.leaves(jax.tree.map(shard_bytes, abstract_state, state_shardings))
    grads = sum(jax.tree.leaves(jax.tree.map(shard_bytes, abstract_state.params, state_shardings.params)))
    return 2 * sum(sizes) + grads


def _pooled_dim(architecture: dict[str, Any]) -> int:
    # text_time embedding input = pooled text + 6 time ids x addition_time_embed_dim.
    return architecture["projection_class_embeddings_input_dim"] - 6 * architecture["addition_time_embed_dim"]


def _is_oom(message: str) -> bool:
    return any(s in message for s in ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory", "exceeds"))


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


def _memory(compiled: Any, hbm_gib: float) -> dict[str, Any]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    gib = 1024**3
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    total += getattr(m, "generated_code_size_in_bytes", 0)
    return {
        "argument_gib": m.argument_size_in_bytes / gib,
        "output_gib": m.output_size_in_bytes / gib,
        "alias_gib": m.alias_size_in_bytes / gib,
        "temp_gib": m.temp_size_in_bytes / gib,
        "code_gib": getattr(m, "generated_code_size_in_bytes", 0) / gib,
        "total_gib": total / gib,
        "fits_hbm": total / gib <= hbm_gib,
    }


def _cost(compiled: Any, chips: int) -> dict[str, Any]:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return {}
    out: dict[str, Any] = {}
    if "flops" in analysis:
        # Cost analysis of an SPMD executable describes one chip's program.
        out["flops_per_chip"] = float(analysis["flops"])
        out["flops_per_step"] = float(analysis["flops"]) * chips
    if "bytes accessed" in analysis:
        out["bytes_accessed_per_chip"] = float(analysis["bytes accessed"])
    if "optimal_seconds" in analysis:
        out["optimal_seconds"] = float(analysis["optimal_seconds"])
    return out


def _estimates(result: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"peak_tflops_per_chip": peak_tflops}
    forward = FORWARD_TFLOP_PER_IMAGE.get(result["resolution"]) if result["unet"] == "sdxl" else None
    if forward:
        # Model FLOPs (for MFU) count forward + backward once; full remat runs the forward twice.
        out["analytic_model_flops_per_step"] = 3 * forward * 1e12 * result["global_batch"]
        recompute = 4 if result["remat"] == "full" else 3
        out["analytic_executed_flops_per_step"] = recompute * forward * 1e12 * result["global_batch"]
        if "flops_per_step" in result:
            out["compiler_vs_analytic_executed"] = result["flops_per_step"] / out["analytic_executed_flops_per_step"]
    seconds = result.get("optimal_seconds")
    if seconds and seconds > 0:
        out["estimate_note"] = NOTE
        out["images_per_s"] = result["global_batch"] / seconds
        out["images_per_s_per_chip"] = out["images_per_s"] / result["chips"]
        if peak_tflops and "analytic_model_flops_per_step" in out:
            out["mfu"] = out["analytic_model_flops_per_step"] / (seconds * peak_tflops * 1e12 * result["chips"])
        if peak_tflops and "flops_per_chip" in result:
            out["hardware_flops_utilisation"] = result["flops_per_chip"] / (seconds * peak_tflops * 1e12)
    return out


def run_worker(name: str, unet: str, program: str, out: Path) -> None:
    result = compile_scenario(Scenario.parse(name), unet, program)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["host_peak_rss_gib"] = usage.ru_maxrss / 1024**2
    # On a shared host the wall time depends on the load; the CPU time of the whole worker does not.
    result["host_cpu_s"] = usage.ru_utime + usage.ru_stime
    out.write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------------
# The driver


def run_in_subprocess(name: str, unet: str, program: str, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.tpu_aot", "--worker", name, "--unet", unet, "--program", program]
        command += ["--worker-out", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"scenario": name, "status": "timeout", "compile_s": time.perf_counter() - start}
        if out.exists():
            return json.loads(out.read_text())
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"scenario": name, "status": "crashed", "returncode": proc.returncode, "error": tail}


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | chips | global batch | status | compile s | args GiB | temp GiB | total GiB / HBM | "
        "compiler TFLOP/step | analytic TFLOP/step | est. step s | est. img/s | est. MFU |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        status = r["status"]
        total = None
        if status == "compiled":
            total = f"{r['total_gib']:.1f} / {r['hbm_gib']:.0f}" + ("" if r["fits_hbm"] else " (over)")
        elif "oom_used_gib" in r:
            total = f"{r['oom_used_gib']:.1f} / {r['oom_capacity_gib']:.1f} (compiler OOM)"
        flops = r.get("flops_per_step")
        analytic = r.get("analytic_executed_flops_per_step")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["scenario"],
                    _fmt(r.get("chips"), "d"),
                    _fmt(r.get("global_batch"), "d"),
                    status,
                    _fmt(r.get("compile_s"), ".0f"),
                    _fmt(r.get("argument_gib"), ".2f"),
                    _fmt(r.get("temp_gib"), ".2f"),
                    total or "-",
                    _fmt(flops / 1e12 if flops else None, ".1f"),
                    _fmt(analytic / 1e12 if analytic else None, ".1f"),
                    _fmt(r.get("optimal_seconds"), ".3f"),
                    _fmt(r.get("images_per_s"), ".2f"),
                    _fmt(r.get("mfu") * 100 if r.get("mfu") is not None else None, ".0f", "-") + ("%" if r.get("mfu") else ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def host_info() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "host": "CPU-only (no TPU attached); TPU programs compiled ahead of time by libtpu",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": version("jax"),
        "jaxlib": version("jaxlib"),
        "libtpu": version("libtpu"),
        "flax": version("flax"),
        "optax": version("optax"),
    }


MARKDOWN_NOTES = """\
## What the columns mean

- **compile s**: wall time of `lower().compile()` on this host (CPU-only, 2 shared cores, AOT for
  the TPU slice); on a TPU VM's host CPU it is faster.
- **args / temp / total GiB**: per chip, from the compiler's `memory_analysis()`; total =
  arguments + outputs + temporaries + code - aliased (the donated state). A status of `oom` is the
  TPU compiler refusing the program for HBM; its message's "used / capacity" figures are shown.
- **compiler TFLOP/step**: `cost_analysis()["flops"]` x chips. **analytic**: 6.761 TFLOP forward per
  image at 1024px, 1.589 at 512px (torch FlopCounterMode on the diffusers UNet), x3 for forward +
  backward, x4 with full rematerialisation (the forward runs again in the backward pass).
- **est. step s**: the compiler's `optimal_seconds` - {note}. **est. img/s** = global batch /
  est. step s. **est. MFU** = analytic model FLOPs (3 x forward, no recompute counted) /
  (est. step s x peak bf16 FLOP/s x chips), with peaks of 197 (v5e), 459 (v5p), 918 (v6e) TFLOP/s.
  Real steps are slower than the cost model's figure (input feeding, host overhead, imperfect
  overlap of collectives); treat these as an upper bound until measured on a TPU.

## Published figures for comparison (not from this project)

- Hugging Face blog "Accelerating SDXL inference with JAX on Cloud TPU v5e" (2023): **inference**,
  not training - 1024x1024, 20 Euler steps: v5e-4 batch 4 in 2.33 s, batch 8 in 4.99 s; v4-8
  batch 4 in 2.16 s; about 3 min to compile. 20 steps x batch 4 with classifier-free guidance is
  160 UNet forwards in 2.33 s on 4 chips, about 69 forwards/s: a training step (3-4 forwards' work
  per image) cannot be compared one to one.
- MaxDiffusion trains SDXL on TPU without EMA, without rematerialisation, without LoRA; the
  scenarios here keep EMA (one more fp32 copy of the weights) and AdamW in fp32, as the
  `configs/sdxl_base.yaml` recipe does, so their memory is not comparable to MaxDiffusion's.
- torch_xla: compiling SDXL can take about an hour on TPU (torch_xla docs); no published SDXL
  training throughput.
"""


def write_results(results: list[dict[str, Any]], info: dict[str, Any], command: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    json_path = RESULTS / f"tpu_aot_{today}.json"
    json_path.write_text(
        json.dumps(
            {"benchmark": "tpu_aot", "date": today, "command": command, "estimate_note": NOTE, "host": info, "results": results},
            indent=2,
        )
        + "\n"
    )
    md = [
        "# SDXL training on Cloud TPU: ahead-of-time compiler estimates",
        "",
        f"Compiled {today} on a **CPU-only host** ({info['cpu_count']} cores, {info['platform']}); no TPU was used.",
        f"jax {info['jax']}, libtpu {info['libtpu']}, flax {info['flax']}. Full SDXL UNet "
        f"({results[0].get('unet_params', 0):,} parameters) with `configs/sdxl_base.yaml`: AdamW, EMA, bf16 compute, "
        "fp32 weights and optimizer state, XLA attention.",
        "",
        f"Step times, images/s and MFU are the TPU **{NOTE}**.",
        "",
        "```",
        command,
        "```",
        "",
        table(results),
        "",
        f"Raw figures: `{json_path.relative_to(REPO)}`.",
        "",
        MARKDOWN_NOTES.format(note=NOTE),
    ]
    failed = [r for r in results if r["status"] not in ("compiled", "oom")]
    if failed:
        md += ["## Scenarios that did not compile", ""]
        md += [f"- `{r['scenario']}`: {r['status']} - {str(r.get('error', ''))[:300]}" for r in failed]
        md.append("")
    md_path = RESULTS / "tpu_aot.md"
    md_path.write_text("\n".join(md))
    return json_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", help="a scenario name (repeatable); default: the default list")
    parser.add_argument("--list", action="store_true", help="print the default scenarios and the name grammar")
    parser.add_argument("--unet", choices=("sdxl", "tiny"), default="sdxl", help="tiny: a quick check of the pipeline")
    parser.add_argument(
        "--program",
        choices=("step", "grad"),
        default="step",
        help="step: the whole train step; grad: its forward and backward only, for hosts with less than ~24 GB",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per scenario")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(args.worker, args.unet, args.program, args.worker_out)
        return
    if args.list:
        print("SLICE_MESH_REMAT_RESpx_bBATCH with")
        print(f"  SLICE {', '.join(f'{k} ({v.topology})' for k, v in SLICES.items())}")
        print(f"  MESH  {', '.join(f'{k} {v}' for k, v in MESHES.items())}")
        print(f"  REMAT {', '.join(REMATS)}; BATCH per chip (per data-parallel rank)")
        print("default scenarios:\n  " + "\n  ".join(DEFAULT_SCENARIOS))
        return

    names = args.scenario or list(DEFAULT_SCENARIOS)
    for name in names:
        Scenario.parse(name)  # fail on a bad name before compiling anything
    command = "python -m benchmarks.tpu_aot " + " ".join(sys.argv[1:] if argv is None else argv)
    info = host_info()
    if info["libtpu"] is None:
        sys.exit("libtpu is not installed: pip install -c constraints.txt 'libtpu==0.0.42.*' (the project's tpu extra)")

    results = []
    for name in names:
        print(f"compiling {name} ...", flush=True)
        r = run_in_subprocess(name, args.unet, args.program, args.timeout)
        results.append(r)
        print(
            f"  {r['status']} in {r.get('compile_s', 0):.0f} s"
            + (f"; {r['total_gib']:.2f} GiB per chip" if "total_gib" in r else "")
            + (f"; est. {r['images_per_s']:.2f} img/s" if "images_per_s" in r else "")
            + (f"; host RSS {r['host_peak_rss_gib']:.1f} GiB" if "host_peak_rss_gib" in r else ""),
            flush=True,
        )
    print()
    print(table(results))
    print(f"\nstep times, images/s and MFU: {NOTE}")
    if not args.no_write and args.unet == "sdxl":
        for path in write_results(results, info, command.strip()):
            print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
