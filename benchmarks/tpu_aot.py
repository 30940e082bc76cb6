"""Ahead-of-time estimates of SDXL on Cloud TPU, training and inference, compiled on a host without a TPU.

The command line of ``benchmarks/tpu/`` (and, with ``--worker``, of each compile's process). What
it compiles, what it reports and the commands: docs/tpu_estimates.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.tpu.inference import compile_inference
from benchmarks.tpu.paths import REPO
from benchmarks.tpu.results import reanalyse, table, write_results
from benchmarks.tpu.roofline import NOTE, derive, extrapolate
from benchmarks.tpu.scenarios import ATTENTION_NAMES, DEFAULT_SCENARIOS, MESHES, REMATS, SLICES, Scenario, Settings
from benchmarks.tpu.training import compile_scenario
from benchmarks.tpu.worker import host_info, run_in_subprocess, run_worker


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
