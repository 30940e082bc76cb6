"""Compile time of the trainer's step for this host's CPU, with ``model.scan_layers`` and without.

Each variant is compiled in a fresh process (no compilation cache, nothing warm) for one CPU
device: the trainer's own step (``configs/sdxl_base.yaml``: AdamW, EMA, bf16 compute, remat full)
on SDXL's UNet, one image, traced, lowered and compiled ahead of time as ``flax-train train``
does. It prints, side by side, the wall and CPU seconds of each compile, the host's peak memory
and the FLOPs the compiled step executes (a scan runs the same layers: the tiny UNet's counts are
equal, SDXL's within 0.3%, what XLA simplifies differently in one long program), and the ratio;
it writes JSON under ``benchmarks/results/``. For TPU compile times from this host see
``benchmarks/tpu_aot.py``.

    python -m benchmarks.compile_time                # SDXL at 1024x1024: tens of minutes on 2 cores
    python -m benchmarks.compile_time --quick        # the tiny UNet at 64px: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from benchmarks.tpu.paths import RESULTS
from benchmarks.tpu.scenarios import Settings
from benchmarks.tpu.worker import host_info, run_in_subprocess

VARIANTS = {"unrolled": False, "scanned": True}


def run_variant(name: str, unet: str, resolution: int, timeout_s: float) -> dict:
    """One compile in a fresh ``tpu_aot`` worker, for one CPU device of this host."""
    # The scenario's slice only names the chip; the program is compiled for the CPU device.
    scenario = f"v5e-1_fsdp_full_{resolution}px_b1"
    row = run_in_subprocess(scenario, unet, None, timeout_s, Settings(scan_layers=VARIANTS[name], host_cpu=True))
    # host_cpu_s is the whole worker's (imports and tracing too): on a shared host the wall time
    # depends on the load, the CPU time does not.
    kept = ("status", "compile_s", "host_cpu_s", "host_peak_rss_gib", "unet_params", "error")
    return {"variant": name, **{k: row[k] for k in kept if k in row}, "hlo_flops": row.get("hlo_flops_per_device")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: unrolled, scanned")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
    parser.add_argument("--quick", action="store_true", help="the tiny UNet at 64px: seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.unet, args.resolution = "tiny", 64
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")

    rows = []
    for name in names:
        print(f"compiling the {args.unet} step at {args.resolution}px, {name} ...", flush=True)
        rows.append(run_variant(name, args.unet, args.resolution, args.timeout))
        row = rows[-1]
        print(f"  {row['status']}: {row['compile_s']:.1f} s wall"
              + (f", {row['host_cpu_s']:.1f} s CPU, peak {row['host_peak_rss_gib']:.1f} GiB" if "host_cpu_s" in row else "")
              + (f", {row['hlo_flops'] / 1e12:.3f} TFLOP per step" if row.get("hlo_flops") else ""), flush=True)
    report = {
        "benchmark": "compile_time",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.compile_time", *(sys.argv[1:] if argv is None else argv)]),
        "device": "cpu (1 device)",
        "host": {k: v for k, v in host_info().items() if k not in ("host", "libtpu")},
        "unet": args.unet,
        "resolution": args.resolution,
        "step": "configs/sdxl_base.yaml: AdamW, EMA, bf16 compute, remat full, 1 image",
        "results": rows,
    }
    by_name = {r["variant"]: r for r in rows}
    if all(by_name.get(n, {}).get("status") == "compiled" for n in VARIANTS):
        ratio = by_name["unrolled"]["compile_s"] / by_name["scanned"]["compile_s"]
        report["unrolled_vs_scanned_compile_s"] = ratio
        print(f"unrolled / scanned compile time: {ratio:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile_time_{args.unet}_{args.resolution}px_cpu{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
