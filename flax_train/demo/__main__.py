"""`make demo`: the whole product on a laptop-sized problem, offline, as a user would run it.

1. writes the synthetic captioned dataset (coloured shapes on coloured backgrounds) as an
   imagefolder, with some combinations kept out of training (`synthetic`);
2. builds a small SDXL-architecture diffusers folder offline: tiny CLIP encoders with an offline
   tokenizer, a random UNet, and a VAE trained briefly on the dataset so that latents decode to
   images (`tiny`, `vae`);
3. trains that folder's UNet with the library, exactly as `flax-train train --config
   flax_train/demo/demo.yaml model.pretrained=<folder> data.path=<dataset>` would: latent cache,
   FSDP over 8 devices, EMA, checkpoints, validation images, export to a diffusers folder;
4. generates images from the export with `xla_infer` (its default arguments: no negative prompt)
   for captions seen in training, the validation split and the held-out split, saves them as
   grids, and scores from the pixels the share whose shape, shape colour and background are all
   the ones asked for.

    python -m flax_train.demo --run-dir runs/demo [key=value overrides of flax_train/demo/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The demo's mesh is 8 devices, simulated on a CPU-only machine; set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("PJRT_DEVICE", "CPU")  # xla_infer's torch_xla device, on a machine without TPU

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from flax_train import cli, config as config_lib, sampling, sharding, train  # noqa: E402
from flax_train.demo import CONFIG, synthetic, tiny, vae  # noqa: E402

# The noise schedule: SDXL's betas rescaled to zero terminal SNR, trailing timesteps and
# v-prediction (Lin et al., 2023, arXiv:2305.08891). With SDXL's own schedule the last timestep
# still shows about 7% of the image; on flat-coloured backgrounds that is a clear signal, so the
# UNet reads the colours off its noisy input instead of learning them from the caption, and images
# sampled from pure noise come out in random colours.
SCHEDULER = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0}

GRID_TILE_PIXELS = 128  # each image's side in the saved grids, at least
# The joint score of images drawn at random: 3 shapes x 8 shape colours x 7 other backgrounds.
CHANCE = 1 / (len(synthetic.SHAPES) * len(synthetic.COLOURS) * (len(synthetic.COLOURS) - 1))
SPLITS = ("seen", "validation", "held_out")


def build_pipeline(cfg: config_lib.Config, folder: Path, vae_steps: int = vae.DEFAULT_STEPS) -> None:
    """The tiny SDXL folder the run starts from, with its VAE trained on the run's images."""
    partial = folder.with_name(folder.name + ".partial")
    tiny.save_tiny_pipeline(partial, seed=cfg.train.seed, image_size=cfg.data.resolution, scheduler=SCHEDULER, **tiny.DEMO_SIZES)
    report = vae.train_vae(partial / "vae", vae.training_images(cfg), steps=vae_steps, seed=cfg.train.seed)
    print(f"demo VAE trained: PSNR {report['psnr']:.1f} dB in {report['seconds']:.0f} s")
    partial.rename(folder)


def seen_combinations(cfg: config_lib.Config, limit: int) -> list[synthetic.Combination]:
    """Distinct captions of the training set, in dataset order."""
    by_caption = {c.caption: c for c in synthetic.all_combinations()}
    rows = (json.loads(line) for line in (Path(cfg.data.path) / "metadata.jsonl").read_text().splitlines())
    seen = list(dict.fromkeys(by_caption[row["text"]] for row in rows))
    return seen[:limit]


def evaluate(cfg: config_lib.Config, export_dir: Path, out_dir: Path, *, per_split: int, steps: int, guidance: float) -> dict:
    """Scores images generated from the export by xla_infer, as a user would generate them."""
    from xla_infer import Pipeline  # torch_xla starts here, after JAX has its devices

    held_out = synthetic.held_out_combinations()
    prompts = {
        "seen": seen_combinations(cfg, per_split),
        "validation": synthetic.validation_combinations()[:per_split],
        # Evenly spread over the held-out pairs and backgrounds, not the first pairs only.
        "held_out": held_out[:: max(1, len(held_out) // per_split)][:per_split],
    }
    batch = max(len(p) for p in prompts.values())
    # fp32: CPUs have no fast bf16, and the demo trains in fp32.
    pipe = Pipeline.from_pretrained(export_dir, dtype="fp32", batch_size=batch, steps=steps)
    report = {}
    for name, combos in prompts.items():
        images = pipe([c.caption for c in combos], seeds=1234, guidance_scale=guidance, output_type="np")
        pixels = [np.round(np.asarray(image) * 255).astype(np.uint8) for image in images]
        grid = Image.fromarray(sampling.image_grid(np.stack(pixels), columns=min(8, len(pixels))))
        # Small images are enlarged (nearest neighbour, pixels kept as generated) so the grid is viewable.
        zoom = max(1, GRID_TILE_PIXELS // cfg.data.resolution)
        grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(out_dir / f"demo_{name}.png")
        report[name] = synthetic.score(pixels, combos)
        report[name]["prompts"] = [c.caption for c in combos]
    report["xla_infer_compilations"] = pipe.compile_count
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flax_train.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--num-images", type=int, default=synthetic.NUM_IMAGES, help="size of the synthetic dataset")
    parser.add_argument("--per-split", type=int, default=48, help="images scored per split (validation has 16 at most)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps for the scored images")
    parser.add_argument("--guidance", type=float, default=2.0, help="zero-terminal-SNR models overexpose at high guidance")
    parser.add_argument("--vae-steps", type=int, default=vae.DEFAULT_STEPS, help="training steps of the demo's VAE")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides of flax_train/demo/demo.yaml")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cli.setup_runtime()

    run_dir = Path(args.run_dir)
    folder, data = run_dir / "base", run_dir / "data"
    cfg = config_lib.load([CONFIG], [f"run_dir={run_dir}", f"model.pretrained={folder}", f"data.path={data}", *args.overrides])
    config_lib.validate(cfg, jax.device_count())
    if jax.process_index() == 0:
        synthetic.write_synthetic_dataset(data, args.num_images, image_size=cfg.data.resolution, seed=cfg.train.seed)
        if not (folder / "model_index.json").is_file():
            build_pipeline(cfg, folder, args.vae_steps)
    sharding.sync("demo inputs")

    result = train.train(cfg)
    if result.export_dir is None:
        print("training did not finish (preempted?); run the same command again to resume", file=sys.stderr)
        return 1
    trained = time.perf_counter()
    if jax.process_index() != 0:
        return 0

    report = evaluate(cfg, result.export_dir, run_dir, per_split=args.per_split, steps=args.steps, guidance=args.guidance)
    report["seconds"] = {"train": trained - start, "total": time.perf_counter() - start}
    report["final_loss"] = float(np.mean(result.losses[-20:])) if result.losses else None
    (run_dir / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"demo finished in {report['seconds']['total']:.0f} s; run directory {run_dir}")
    print(f"  diffusers pipeline:  {result.export_dir}")
    print("  sample grids:        " + "  ".join(str(run_dir / f"demo_{name}.png") for name in SPLITS))
    print("  prompt adherence (xla-infer images, no negative prompt; shape, its colour and the background, from pixels):")
    for name in SPLITS:
        r = report[name]
        print(
            f"    {name:10s} joint {r['joint']:6.1%} of {r['count']:2d} images "
            f"(shape {r['shape']:.0%}, shape colour {r['shape_colour']:.0%}, background {r['background']:.0%})"
        )
    print(
        f"  chance: joint {CHANCE:.1%}. The recipe was tuned on the validation split; held-out pairs were never "
        "trained together"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
