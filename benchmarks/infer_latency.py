"""SDXL generation side by side: xla_infer on torch_xla, the same loop on plain torch (eager and
torch.compile), diffusers' StableDiffusionXLPipeline itself, and our JAX sampler.

Runs the same SDXL folder (default: the tiny random one from flax_train/demo/tiny.py, built in a
temporary folder; ``--unet medium``: a random one whose UNet is train_throughput's medium one),
steps, size, batch and scheduler (Euler) through each runner and reports the warm-up (compile)
time, the steady per-image latency after warm-up, images/s, the compilations after warm-up where
the runner compiles (should be 0) and the images/s ratio against the first.
Not a test: nothing is asserted. Writes JSON to benchmarks/results/ named after the runners.

Runners: ``xla`` (xla_infer on torch_xla), ``cpu`` / ``cuda`` (xla_infer's loop on plain torch),
``cpu-compile`` / ``cuda-compile`` (the same through torch.compile), ``diffusers`` (the diffusers
pipeline on the CPU, or CUDA when present), ``jax`` (flax_train.sampling.Generator on JAX's default
device).

    PJRT_DEVICE=CPU python -m benchmarks.infer_latency --devices xla,cpu,diffusers,jax
    python -m benchmarks.infer_latency --unet medium --devices xla,cpu,cpu-compile,diffusers,jax
    python -m benchmarks.infer_latency --quick     # seconds: checks the script, measures nothing
    PJRT_DEVICE=TPU python -m benchmarks.infer_latency --model /path/to/sdxl --width 1024 --height 1024 \
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


def measure(model: str, runner: str, args: argparse.Namespace) -> dict:
    if runner == "diffusers":
        return measure_diffusers(model, args)
    if runner == "jax":
        return measure_jax(model, args)
    from xla_infer import Pipeline

    device, _, compiled = runner.partition("-")
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(
        model, device=device, dtype=args.dtype, batch_size=args.batch_size, height=args.height, width=args.width,
        steps=args.steps, scheduler="euler", torch_compile=compiled == "compile",
        cache_dir=args.cache_dir if device == "xla" else None, on_recompile="warn",
    )
    load_seconds = time.perf_counter() - start
    pipe.warmup()
    compiles_after_warmup = pipe.compile_count
    timed = _timed_rounds(lambda prompts, first_seed: pipe(prompts, seeds=first_seed), args)
    described = pipe.describe()
    return {
        "device": runner,
        "device_detail": described["device_detail"],
        "num_devices": described["num_devices"],
        "load_seconds": load_seconds,
        "warmup_seconds": pipe.warmup_seconds,
        "xla_compile_seconds": pipe.compile_seconds,
        "compilations_in_warmup": compiles_after_warmup,
        "compilations_after_warmup": pipe.compile_count - compiles_after_warmup,
        **timed,
        "persistent_cache": described["persistent_cache"],
        "persistent_cache_hits": described["persistent_cache_hits"],
    }


def _prompts(repeat: int, args: argparse.Namespace) -> list[str]:
    # Different prompts and seeds every round: the steady state must not depend on them.
    return [f"a red circle number {repeat * args.images + i}" for i in range(args.images)]


def _timed_rounds(generate, args: argparse.Namespace) -> dict:
    """Runs ``generate(prompts, first_seed)`` for each round; the median seconds per image."""
    per_image = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        generate(_prompts(repeat, args), repeat * args.images)
        per_image.append((time.perf_counter() - start) / args.images)
    median = statistics.median(per_image)
    return {"seconds_per_image_median": median, "images_per_second_median": 1 / median,
            "seconds_per_image_runs": per_image}


def measure_diffusers(model: str, args: argparse.Namespace) -> dict:
    """diffusers' own pipeline with the same folder, settings and Euler scheduler, a batch at a time."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - start

    def generate(prompts: list[str], first_seed: int) -> None:
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i: i + args.batch_size]
            generators = [torch.Generator().manual_seed(first_seed + i + k) for k in range(len(batch))]
            pipe(batch, num_inference_steps=args.steps, guidance_scale=5.0, height=args.height, width=args.width,
                 generator=generators, output_type="np")

    start = time.perf_counter()
    generate(_prompts(0, args)[: args.batch_size], 0)
    return {"device": "diffusers", "device_detail": f"StableDiffusionXLPipeline on {device}, eager",
            "num_devices": 1, "load_seconds": load_seconds, "warmup_seconds": time.perf_counter() - start,
            **_timed_rounds(generate, args)}


def measure_jax(model: str, args: argparse.Namespace) -> dict:
    """flax_train's JAX sampler (what validation images and `flax-train sample` use), one jit per shape."""
    import jax
    import jax.numpy as jnp

    from flax_train.sampling import Generator

    start = time.perf_counter()
    generator = Generator(model, scheduler="euler", num_steps=args.steps, resolution=args.width or args.height,
                          dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    load_seconds = time.perf_counter() - start

    def generate(prompts: list[str], first_seed: int) -> None:
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i: i + args.batch_size]
            batch += batch[-1:] * (args.batch_size - len(batch))  # one shape: padded as xla_infer pads
            generator(batch, seed=first_seed + i)

    start = time.perf_counter()
    generate(_prompts(0, args)[: args.batch_size], 0)
    warmup_seconds = time.perf_counter() - start
    compiled = Generator._sample._cache_size()
    timed = _timed_rounds(generate, args)
    device = jax.devices()[0]
    return {"device": "jax", "device_detail": f"{device.device_kind} ({device.platform})", "num_devices": 1,
            "load_seconds": load_seconds, "warmup_seconds": warmup_seconds, "compilations_in_warmup": compiled,
            "compilations_after_warmup": Generator._sample._cache_size() - compiled, **timed}


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
    parser.add_argument("--model", default=None, help="SDXL diffusers folder; default: a random one (see --unet)")
    parser.add_argument("--unet", default="tiny", choices=["tiny", "medium"],
                        help="without --model: the tiny demo folder, or a 256px folder with train_throughput's "
                             "medium UNet (benchmarks/unets.py)")
    parser.add_argument("--devices", default="xla,cpu,diffusers,jax",
                        help="comma-separated runners, from xla, cpu, cuda, cpu-compile, cuda-compile, diffusers, "
                             "jax; the first is the baseline of the ratio")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--images", type=int, default=8, help="images per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 steps, 2 images, one round, runners xla,cpu,diffusers,jax")
    parser.add_argument("--cache-dir", default=None, help="persistent XLA compilation cache (TPU only)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 avoids stalls on a shared host")
    parser.add_argument("--out", type=Path, default=None, help="JSON path; default benchmarks/results/<device>.json")
    args = parser.parse_args()
    if args.quick:
        args.model, args.unet, args.steps, args.images, args.repeats, args.batch_size = None, "tiny", 2, 2, 1, 2
        args.devices = "xla,cpu,diffusers,jax"
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from flax_train.demo.tiny import save_tiny_pipeline

            from benchmarks.unets import MEDIUM_SIZES

            sizes = MEDIUM_SIZES if args.unet == "medium" else {}
            model = str(save_tiny_pipeline(Path(tmp) / f"{args.unet}_sdxl", seed=0, **sizes))
        runs = [measure(model, device, args) for device in devices]

    base = runs[0]["images_per_second_median"]
    for run in runs:
        run["images_per_second_ratio_to_first"] = run["images_per_second_median"] / base
        compile_seconds = run.get("xla_compile_seconds")
        compile_note = "" if compile_seconds is None else f" (XLA compile {compile_seconds:.1f} s)"
        print(
            f"{run['device']:>4} [{run['device_detail']}]: warm-up {run['warmup_seconds']:.1f} s{compile_note}, "
            f"steady {run['seconds_per_image_median'] * 1000:.1f} ms/image, {run['images_per_second_median']:.2f} "
            f"images/s ({run['images_per_second_ratio_to_first']:.2f}x {runs[0]['device']}), "
            f"compilations after warm-up: {run.get('compilations_after_warmup', 'n/a')}"
        )

    import torch

    # e.g. "xla-tpu_vs_cpu": the XLA platform named, then each plain-torch device.
    tag = "_vs_".join(f"xla-{r['device_detail'].split()[0].lower()}" if r["device"] == "xla" else r["device"]
                      for r in runs)
    result = {
        "benchmark": "infer_latency",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model or f"{args.unet} random SDXL (flax_train.demo.tiny.save_tiny_pipeline, seed 0"
                               + (", benchmarks.unets.MEDIUM_SIZES)" if args.unet == "medium" else ")"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "host": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "load_average_1m": os.getloadavg()[0], "python": platform.python_version(),
                 "torch": torch.__version__, "torch_xla": _version("torch_xla"),
                 "diffusers": _version("diffusers")},
        "runs": runs,
        "note": "Steady latency = wall time of a call after warm-up divided by its images (host tokenisation, "
                "transfers and decode included). A loaded host (see load_average_1m) inflates every figure.",
    }
    suffix = "_quick" if args.quick else "_medium" if args.unet == "medium" and not args.model else ""
    out = args.out or RESULTS / f"infer_latency_{tag}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
