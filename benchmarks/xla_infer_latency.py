"""xla_infer generation on torch_xla and on plain torch, side by side: compile time, steady latency.

Runs the same SDXL folder (default: the tiny random one from flax_train/tiny.py, built in a
temporary folder) with the same settings through `xla_infer.Pipeline` on each requested device, and
reports the warm-up (compile) time, the steady per-image latency after warm-up, images/s, the
compilations after warm-up (should be 0) and the images/s ratio against the first device.
Not a test: nothing is asserted. Writes JSON to benchmarks/results/ named after the XLA device.

    PJRT_DEVICE=CPU python -m benchmarks.xla_infer_latency --devices xla,cpu
    PJRT_DEVICE=TPU python -m benchmarks.xla_infer_latency --model /path/to/sdxl --width 1024 --height 1024 \\
        --steps 20 --batch-size 4 --dtype bf16 --devices xla --cache-dir ~/.cache/xla_infer
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PJRT_DEVICE", "CPU")

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model: str, device: str, args: argparse.Namespace) -> dict:
    from xla_infer import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(
        model, device=device, dtype=args.dtype, batch_size=args.batch_size, height=args.height, width=args.width,
        steps=args.steps, scheduler=args.scheduler, torch_compile=args.torch_compile and device != "xla",
        cache_dir=args.cache_dir if device == "xla" else None, on_recompile="warn",
    )
    load_seconds = time.perf_counter() - start
    pipe.warmup()
    compiles_after_warmup = pipe.compile_count
    per_image, per_second = [], []
    for repeat in range(args.repeats):
        # Different prompts and seeds every round: the steady state must not depend on them.
        prompts = [f"a red circle number {repeat * args.images + i}" for i in range(args.images)]
        pipe(prompts, seeds=repeat * args.images)
        per_image.append(pipe.last_call["seconds_per_image"])
        per_second.append(pipe.last_call["images_per_second"])
    described = pipe.describe()
    return {
        "device": device,
        "device_detail": described["device_detail"],
        "num_devices": described["num_devices"],
        "load_seconds": load_seconds,
        "warmup_seconds": pipe.warmup_seconds,
        "xla_compile_seconds": pipe.compile_seconds,
        "compilations_in_warmup": compiles_after_warmup,
        "compilations_after_warmup": pipe.compile_count - compiles_after_warmup,
        "seconds_per_image_median": statistics.median(per_image),
        "images_per_second_median": statistics.median(per_second),
        "seconds_per_image_runs": per_image,
        "persistent_cache": described["persistent_cache"],
        "persistent_cache_hits": described["persistent_cache_hits"],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SDXL diffusers folder; default: a tiny random one")
    parser.add_argument("--devices", default="xla,cpu",
                        help="comma-separated, from xla, cpu, cuda; the first is the baseline of the ratio")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--images", type=int, default=8, help="images per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--torch-compile", action="store_true", help="plain-torch devices use torch.compile")
    parser.add_argument("--cache-dir", default=None, help="persistent XLA compilation cache (TPU only)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 avoids stalls on a shared host")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; default benchmarks/results/<device>.json")
    args = parser.parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from flax_train.demo.tiny import save_tiny_pipeline

            model = str(save_tiny_pipeline(Path(tmp) / "tiny_sdxl", seed=0))
        runs = [measure(model, device, args) for device in devices]

    base = runs[0]["images_per_second_median"]
    for run in runs:
        run["images_per_second_ratio_to_first"] = run["images_per_second_median"] / base
        compile_seconds = run["xla_compile_seconds"]
        compile_note = "" if compile_seconds is None else f" (XLA compile {compile_seconds:.1f} s)"
        print(
            f"{run['device']:>4} [{run['device_detail']}]: warm-up {run['warmup_seconds']:.1f} s{compile_note}, "
            f"steady {run['seconds_per_image_median'] * 1000:.1f} ms/image, {run['images_per_second_median']:.2f} "
            f"images/s ({run['images_per_second_ratio_to_first']:.2f}x {runs[0]['device']}), "
            f"compilations after warm-up: {run['compilations_after_warmup']}"
        )

    import torch

    # e.g. "xla-tpu_vs_cpu": the XLA platform named, then each plain-torch device.
    tag = "_vs_".join(f"xla-{r['device_detail'].split()[0].lower()}" if r["device"] == "xla" else r["device"]
                      for r in runs)
    result = {
        "benchmark": "xla_infer_latency",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model or "tiny random SDXL (flax_train.tiny.save_tiny_pipeline, seed 0)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "host": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_average_1m": os.getloadavg()[0], "python": platform.python_version(),
                 "torch": torch.__version__, "torch_xla": _version("torch_xla"),
                 "diffusers": _version("diffusers")},
        "runs": runs,
        "note": "Steady latency = wall time of a call after warm-up divided by its images (host tokenisation, "
                "transfers and decode included). A loaded host (see load_average_1m) inflates every figure.",
    }
    out = args.out or RESULTS / f"xla_infer_latency_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
