"""Training-step throughput of the real compiled train step, on several meshes side by side.

For each mesh layout (pure data parallel, FSDP, hybrid) and remat policy it compiles the trainer's
own step (`flax_train.train.train_step`, ahead of time, as `flax-train train` does), runs warm-up
steps, times steady steps, and reports images/s, TFLOP/s per device (counted from the compiled
step's HLO), MFU (model FLOPs: 3 x the UNet's forward) and HFU (the compiled step's FLOPs) where the chip's
peak is known (see flax_train/flops.py), and each layout's speed relative to the first. Batches are
random arrays of the cache's shapes, so no dataset or VAE is involved. Not a test: nothing is
asserted. On a CPU host the 8 devices are simulated and the figures only compare layouts.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m benchmarks.train_throughput
    python -m benchmarks.train_throughput --unet sdxl --resolution 1024 --batch 8 --dtype bfloat16 \
        --remat full --layouts fsdp                  # on an accelerator host
    python -m benchmarks.train_throughput --quick    # seconds: checks the script, measures nothing
    python -m benchmarks.train_throughput --wandb    # also the step with its metrics logged, W&B off and on

Beside our step it times, in the same run and on the same host, the step diffusers'
train_text_to_image_sdxl.py runs: the same UNet config as diffusers' UNet2DConditionModel in
PyTorch (eager), the same batch, resolution and precision (fp32 weights; bf16 through autocast
when --dtype bfloat16, as --mixed_precision bf16 does), noise-prediction MSE, AdamW, gradient
checkpointing when --remat is not none; with --diffusers eager,compile, also with the UNet under
torch.compile. It reports the images/s of each and ours / diffusers.

With --wandb it also times our step with its metrics logged at every step as the trainer logs them
(``flax_train.metrics.MetricsWriter``, each step's metrics fetched and written once the next step
is queued): to metrics.jsonl and TensorBoard, and to those and Weights & Biases in offline mode
(nothing leaves the host, but W&B's service process runs beside the step as it does online), in
alternating rounds; it reports the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from benchmarks.unets import unet_architecture  # noqa: E402 (after the environment above)

START = time.perf_counter()


def progress(message: str) -> None:
    """A line with the seconds since start as each phase begins: a run cut short shows where its time went."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)

LAYOUTS = {
    "data_parallel": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "hybrid": {"data": 2, "fsdp": -1, "tensor": 1},
}


def run_layout(cfg, layout: str, args) -> dict:
    import jax
    import numpy as np

    from flax_train import config as config_lib, diffusion, flops, metrics, models, sharding, train
    from sdxl_common import sdxl

    cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(**LAYOUTS[layout]))
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.merged_rules(cfg.mesh.rules)
    architecture = unet_architecture(args.unet, cfg.data.resolution)
    progress(f"ours, {layout}: initialising the UNet and the optimizer state")
    graphdef, params = train.init_unet(cfg, architecture, mesh, rules)
    tx, lr = train.build_optimizer(cfg)
    state, state_shardings = train.build_state(cfg, params, tx, mesh, rules)

    batch = args.batch
    shapes, empty = train.batch_spec(architecture, batch, cfg.data.resolution // args.vae_factor, cfg.data.max_text_chunks)
    rng = np.random.default_rng(0)
    host_batch = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in shapes.items()}
    host_batch["add_time_ids"][:] = [cfg.data.resolution] * 2 + [0, 0] + [cfg.data.resolution] * 2
    schedule = diffusion.NoiseSchedule.from_scheduler_config(sdxl.SCHEDULER_CONFIG)
    step_fn = train.make_step_fn(cfg, graphdef, tx, lr, schedule, empty, "epsilon")
    progress(f"ours, {layout}: compiling the step")
    compiled, compile_s, hardware_flops = train.compile_step(step_fn, state, state_shardings, shapes, mesh)
    progress(f"ours, {layout}: compiled in {compile_s:.1f} s; warm-up and timed steps")
    shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host_batch.items()}
    device_batch = train.global_batch(host_batch, shardings)
    for _ in range(args.warmup):
        state, out = compiled(state, device_batch)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, out = compiled(state, device_batch)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / args.steps
    logged = time_logged_steps(compiled, state, device_batch, layout, args) if args.wandb else []
    abstract_unet = models.abstract(architecture, attention="xla")
    model_flops = 3 * flops.unet_forward_flops(abstract_unet, shapes) * batch
    chip = metrics.detect_chip()
    peak = metrics.CHIP_PEAK_TFLOPS.get(chip or "", None)
    return {
        "layout": layout,
        "mesh": dict(mesh.shape),
        "remat": cfg.model.remat,
        "compile_s": round(compile_s, 2),
        "memory": metrics.memory_summary(compiled),
        **{k: round(v, 5) for k, v in metrics.throughput(seconds, batch, hardware_flops, model_flops, peak).items()},
        **({"logged": logged} if logged else {}),
    }


LOGGING_ROUNDS = 5  # of each set of sinks, alternating, so that a slow spell of the host hits both


def time_logged_steps(compiled, state, device_batch, layout: str, args) -> list[dict]:
    """Seconds per step (the median of LOGGING_ROUNDS rounds of ``args.steps`` steps) with the step's
    metrics logged, without and with W&B (offline), and the milliseconds a step spends in the
    writer's call (the time logging holds up the loop; the rest of any difference is the host's
    cores shared with W&B's process). ``state`` is donated to the steps."""
    import statistics
    import tempfile

    import jax

    from flax_train import config as config_lib, metrics

    def logged_round(writer: metrics.MetricsWriter) -> tuple[float, float]:
        """Seconds per step, and of them in the writer's call."""
        nonlocal state
        start, writing = time.perf_counter(), 0.0

        def log(step: int, out: dict) -> None:
            nonlocal writing
            values = {k: v for k, v in jax.device_get(out).items() if k != "finite"}
            called = time.perf_counter()
            writer.scalars(step, values)
            writing += time.perf_counter() - called

        previous = None
        for step in range(1, args.steps + 1):
            state, out = compiled(state, device_batch)
            if previous is not None:  # the previous step's metrics, once this one is queued
                log(step - 1, previous)
            previous = out
        log(args.steps, previous)  # waits for the last step
        return (time.perf_counter() - start) / args.steps, writing / args.steps

    sinks = {"jsonl, tensorboard": None,
             "jsonl, tensorboard, wandb (offline)": config_lib.WandbConfig(project="train-throughput", mode="offline")}
    progress(f"ours, {layout}: steps with their metrics logged, W&B off and on")
    with tempfile.TemporaryDirectory() as folder:
        writers = {name: metrics.MetricsWriter(Path(folder) / str(number), wandb=wandb,
                                               run_config={k: str(v) for k, v in vars(args).items()})
                   for number, (name, wandb) in enumerate(sinks.items())}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sinks}
        try:
            for _ in range(LOGGING_ROUNDS):
                for name, writer in writers.items():
                    times[name].append(logged_round(writer))
        finally:
            for writer in writers.values():
                writer.close()
    rows = []
    for name, rounds in times.items():
        step_s = statistics.median(step for step, _ in rounds)
        rows.append({"sinks": name, "step_time_s": round(step_s, 5), "images_per_s": round(args.batch / step_s, 5),
                     "writer_ms_per_step": round(1000 * statistics.median(writing for _, writing in rounds), 3),
                     "rounds_step_time_s": [round(step, 5) for step, _ in rounds]})
    return rows


def run_diffusers(architecture: dict, args, torch_mode: str = "eager") -> dict:
    """The diffusers training script's UNet step in PyTorch on the CPU (or the default CUDA device);
    ``torch_mode`` compile: the UNet wrapped in ``torch.compile`` (compiled during the warm-up steps)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    warmup_s, seconds = time_diffusers_step(architecture, args, torch_mode, device)
    if device == "cuda":
        torch.cuda.empty_cache()  # the UNet and its optimizer went with that call: their memory goes back
    return {"layout": f"diffusers torch {torch_mode} ({device})", "torch": torch_mode, "mesh": {"devices": 1}, "remat": args.remat,
            "compile_s": round(warmup_s, 2), "step_time_s": round(seconds, 5),
            "images_per_s": round(args.batch / seconds, 5)}


def time_diffusers_step(architecture: dict, args, torch_mode: str, device: str) -> tuple[float, float]:
    """Seconds of the warm-up steps together, and of one timed step."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    from flax_train import train

    progress(f"diffusers torch {torch_mode}: building the UNet on {device}")
    with torch.device(device):  # weights initialised where they run: SDXL's 2.6B on a CPU take a while
        unet = UNet2DConditionModel(**{k: v for k, v in architecture.items() if not k.startswith("_")}).train()
    if args.remat != "none":
        unet.enable_gradient_checkpointing()
    model = torch.compile(unet) if torch_mode == "compile" else unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    shapes, _ = train.batch_spec(architecture, args.batch, args.resolution // args.vae_factor)
    generator = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(v.shape, generator=generator).to(device) for k, v in shapes.items()}
    inputs["add_time_ids"] = torch.full((args.batch, 6), float(args.resolution), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step() -> None:
        noise = torch.randn_like(inputs["latents"])
        timesteps = torch.randint(0, 1000, (args.batch,), device=device)
        with autocast:
            pred = model(inputs["latents"] + noise, timesteps, inputs["prompt_embeds"], added_cond_kwargs={
                "text_embeds": inputs["pooled_prompt_embeds"], "time_ids": inputs["add_time_ids"]}).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    progress(f"diffusers torch {torch_mode}: warm-up steps{' (compiling)' if torch_mode == 'compile' else ''}")
    warmup_s = timed(args.warmup)
    return warmup_s, timed(args.steps) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", default="tiny", choices=["tiny", "medium", "sdxl"],
                        help="medium: SDXL's layout at a fifth of its width (see benchmarks/unets.py)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--vae-factor", type=int, default=None, help="pixels per latent (default: 8 for sdxl, the demo VAE's for tiny)")
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--scan-layers", action="store_true", help="model.scan_layers for our step (compiles faster)")
    parser.add_argument("--layouts", default="data_parallel,fsdp,hybrid")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--diffusers", default="eager",
                        help="which diffusers PyTorch steps to time: eager, compile (the UNet under torch.compile), "
                             "both as eager,compile, or none")
    parser.add_argument("--wandb", action="store_true",
                        help="also time our step with its metrics logged at every step, without and with W&B (offline)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny UNet at 32px, batch 8, one layout, 1 warm-up and 2 steps: checks the script runs")
    args = parser.parse_args()
    torch_modes = args.diffusers.split(",")
    if not set(torch_modes) <= {"eager", "compile", "none"}:
        parser.error(f"--diffusers takes eager, compile or none, comma-separated; got {args.diffusers!r}")
    if args.quick:
        args.unet, args.resolution, args.batch, args.layouts, args.warmup, args.steps = "tiny", 32, 8, "fsdp", 1, 2

    import jax

    from flax_train import config as config_lib
    from sdxl_common import sdxl
    from flax_train.demo import CONFIG as DEMO_CONFIG, tiny

    if args.vae_factor is None:
        args.vae_factor = 8 if args.unet != "tiny" else sdxl.vae_scale_factor({"block_out_channels": tiny.DEMO_SIZES["vae_channels"]})
    cfg = config_lib.load(
        [DEMO_CONFIG],
        [
            f"model.dtype={args.dtype}",
            f"model.remat={args.remat}",
            f"model.attention={args.attention}",
            f"model.scan_layers={str(args.scan_layers).lower()}",
            f"data.resolution={args.resolution}",
            f"train.global_batch_size={args.batch}",
        ],
    )
    results = []

    def measured(row: dict) -> dict:  # printed at once: a run cut short still leaves the rows it finished
        results.append(row)
        print("measured", json.dumps(row), flush=True)
        return row

    # Eager diffusers first: the quickest, and on a GPU it hands its memory back before JAX takes
    # what our step needs. torch.compile, the slowest to warm up, last.
    architecture = unet_architecture(args.unet, args.resolution)
    if "eager" in torch_modes:
        measured(run_diffusers(architecture, args, "eager"))
    ours_rows = [measured(run_layout(cfg, layout, args)) for layout in args.layouts.split(",")]
    if "compile" in torch_modes:
        measured(run_diffusers(architecture, args, "compile"))
    ours = max(r["images_per_s"] for r in ours_rows)
    base = ours_rows[0]["images_per_s"]
    for r in results:
        r["speed_vs_first"] = round(r["images_per_s"] / base, 3)
    device = jax.devices()[0]
    header = f"train step throughput, {args.unet} UNet at {args.resolution}px, global batch {args.batch}, {args.dtype}, on {len(jax.devices())} x {device.device_kind}"
    print(header)
    print(f"{'layout':14s} {'mesh':28s} {'compile s':>9s} {'step s':>8s} {'img/s':>8s} {'TFLOP/s/dev':>11s} "
          f"{'MFU':>6s} {'HFU':>6s} {'vs first':>8s}")
    for r in sorted(results, key=lambda r: "torch" in r):  # ours first: "vs first" is ours' first layout
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        mfu, hfu = (f"{r[k]:.1%}" if k in r else "-" for k in ("mfu", "hfu"))
        print(
            f"{r['layout']:14s} {mesh:28s} {r['compile_s']:9.1f} {r['step_time_s']:8.3f} {r['images_per_s']:8.2f} "
            f"{r.get('tflops_per_device', float('nan')):11.4f} {mfu:>6s} {hfu:>6s} {r['speed_vs_first']:8.2f}"
        )
    # ours (best layout) / each diffusers step: eager, and torch.compile where it ran
    ratios = {r["torch"]: round(ours / r["images_per_s"], 3) for r in results if "torch" in r}
    for kind, ratio in ratios.items():
        print(f"ours (best layout) / diffusers {kind}: {ratio:.2f}x images/s")
    wandb_ratios = {}  # layout -> step time with W&B / without
    for r in ours_rows:
        for row in r.get("logged", []):
            print(f"{r['layout']}, metrics logged to {row['sinks']}: {row['step_time_s']:.4f} s a step, "
                  f"{row['writer_ms_per_step']:.2f} ms of it in the writer")
        if "logged" in r:
            without, with_wandb = r["logged"]
            wandb_ratios[r["layout"]] = round(with_wandb["step_time_s"] / without["step_time_s"], 3)
            print(f"{r['layout']}: step time with W&B / without: {wandb_ratios[r['layout']]:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    remat = "" if args.remat == "none" else f"_remat-{args.remat}"
    attention = "" if args.attention == "auto" else f"_attn-{args.attention}"
    name = (f"train_throughput_{args.unet}_{device.platform}{remat}{attention}{'_quick' if args.quick else ''}"
            f"{'_wandb' if args.wandb else ''}.json")
    (args.out / name).write_text(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "date": datetime.date.today().isoformat(),
                "device": f"{len(jax.devices())} x {device.device_kind} ({device.platform})",
                "host": platform.platform(),
                "cpu_count": os.cpu_count(),
                "settings": {k: str(v) for k, v in vars(args).items()},
                "results": results,
                "ours_vs_diffusers_images_per_s": ratios.get("eager"),
                "ours_vs_diffusers_compile_images_per_s": ratios.get("compile"),
                **({"step_time_with_wandb_vs_without": wandb_ratios} if wandb_ratios else {}),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
