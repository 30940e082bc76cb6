"""What a compiled row implies, computed in the driver: per-chip totals against the HBM, the
analytic FLOPs of SDXL, a roofline (compute and collectives each at the chip's peak from
sdxl_common.chips) with images/s and MFU, the cost model's throughput; and a full-depth row
extrapolated from compiles of shallower copies of SDXL."""
from __future__ import annotations

from typing import Any

from benchmarks.tpu.scenarios import SDXL_DEPTH, SLICES


# What the cost model's step times, and the images/s and MFU from them, are.
NOTE = "compiler cost-model estimate, not a measurement"

# Forward TFLOP per image of the SDXL UNet (torch FlopCounterMode on the diffusers UNet).
FORWARD_TFLOP_PER_IMAGE = {1024: 6.761, 512: 1.589}

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

# What one shallower compile alone says, not carried into the row extrapolated from several.
OWN_COMPILE_FIELDS = ("compile_s", "host_peak_rss_gib", "host_cpu_s", "host_swapped_out_gib", "error",
                      "optimal_seconds_unpriced")

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
    base = {k: v for k, v in rows[0].items() if k not in LINEAR_FIELDS and k not in OWN_COMPILE_FIELDS}
    method = f"extrapolated from depths {', '.join(str(r['depth']) for r in rows)}"
    out: dict[str, Any] = {**base, "depth": depth, "method": method}
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
