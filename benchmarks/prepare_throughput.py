"""Latent-cache preparation throughput for the demo model, in images per second.

Builds the demo's tiny SDXL folder and synthetic dataset in a temporary folder, runs
`prepare_cache` over every device, and prints the throughput line `flax-train prepare` prints
(encoding loop only: compilation and model loading are excluded). Not a test: nothing is asserted.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m benchmarks.prepare_throughput --num-images 256 --out benchmarks/results/prepare_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="global; default one image per device")
    parser.add_argument("--workers", type=int, default=8, help="decoding threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import jax

    from flax_train.data.prepare import prepare_cache
    from flax_train.data.images import PreprocessSpec, SourceSpec
    from flax_train.demo.tiny import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_pipeline(Path(tmp) / "model", image_size=args.resolution)
        source = SourceSpec("synthetic", str(Path(tmp) / "data"), num_images=args.num_images, image_size=args.resolution)
        start = time.perf_counter()
        report = prepare_cache(
            Path(tmp) / "cache",
            model,
            source,
            PreprocessSpec(resolution=args.resolution),
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=False,
        )
        total = time.perf_counter() - start
    devices = jax.devices()
    line = (
        f"prepare throughput: {report.images_per_second:.1f} images/s on {len(devices)} x {devices[0].device_kind} "
        f"({args.num_images} images at {args.resolution}px; {total:.1f} s in all, with model loading and compilation)"
    )
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "benchmark": "prepare_throughput",
            "images_per_second": round(report.images_per_second, 2),
            "encoding_seconds": round(report.seconds, 3),
            "total_seconds": round(total, 3),
            "num_images": args.num_images,
            "resolution": args.resolution,
            "devices": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
            "host": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}",
            "model": "demo tiny SDXL pipeline (flax_train.tiny.save_tiny_pipeline)",
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
