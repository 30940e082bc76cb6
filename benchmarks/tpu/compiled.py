"""The figures read from a compiled TPU program: the compiler's memory plan and cost analysis, the
optimized HLO's own counts (``flax_train.hlo_cost``), and the compiler's out-of-memory error."""
from __future__ import annotations

import gzip
import re
from typing import Any

from benchmarks.tpu.paths import HLO_DIR, REPO
from benchmarks.tpu.scenarios import Slice


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


def is_oom(message: str) -> bool:
    """Whether a compile error is the TPU compiler refusing the program for memory."""
    return any(s in message for s in ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory"))


def oom_figures(message: str) -> dict[str, Any]:
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
