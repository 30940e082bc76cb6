"""The embedded default (`make demo`): the whole product on a laptop-sized problem, offline.

1. writes the built-in synthetic captioned dataset (coloured shapes on coloured backgrounds);
2. builds a small SDXL-architecture pipeline offline (tiny CLIP encoders with an offline
   tokenizer, and a small VAE trained briefly on the dataset so that latents decode to images);
3. prepares the latent cache, trains the UNet from scratch on an 8-device mesh with FSDP,
   checkpoints, and exports a diffusers folder;
4. generates images from the exported folder for captions seen in training and for held-out
   colour/shape combinations, and writes them as grid PNGs;
5. scores prompt adherence from the pixels: the share of images whose shape colour and
   background colour are the ones the prompt asked for.

    python -m flax_train.demo --run-dir runs/demo [key=value overrides of configs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# The demo's mesh is 8 devices; on a CPU-only machine they are simulated. Set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

GRID_TILE_PIXELS = 128  # each image's side in the saved grids, at least
SEEN_TARGET = 0.8  # share of images for seen captions with both colours right


def adherence(images: list[np.ndarray], combinations: list) -> dict[str, float]:
    """Share of images whose measured (shape colour, background) match their prompt's."""
    from flax_train.data import synthetic

    both = shape = background = 0
    for image, combo in zip(images, combinations):
        found_shape, found_background = synthetic.classify(image)
        shape += found_shape == combo.shape_colour
        background += found_background == combo.background
        both += found_shape == combo.shape_colour and found_background == combo.background
    n = max(len(images), 1)
    return {"both": both / n, "shape_colour": shape / n, "background": background / n, "count": len(images)}


def seen_combinations(cache, limit: int) -> list:
    """Distinct captions of the training set (in cache order), parsed back into combinations."""
    from flax_train.data import synthetic

    by_caption = {c.caption: c for c in synthetic.all_combinations()}
    seen = []
    for i in range(len(cache)):
        combo = by_caption.get(cache.caption(i))
        if combo is not None and combo not in seen:
            seen.append(combo)
        if len(seen) == limit:
            break
    return seen


def evaluate(cfg, export_dir: Path, cache, out_dir: Path, *, per_split: int, steps: int, guidance: float) -> dict:
    from PIL import Image

    from flax_train.data import synthetic
    from flax_train.generate import Generator
    from flax_train.pipeline import image_grid

    generator = Generator(export_dir, scheduler="euler", num_steps=steps, resolution=cfg.data.resolution)
    splits = {
        "seen": seen_combinations(cache, per_split),
        "held_out": synthetic.held_out_combinations()[:per_split],
    }
    report = {}
    for name, combos in splits.items():
        images = generator([c.caption for c in combos], seed=1234, guidance_scale=guidance)
        arrays = [np.asarray(image) for image in images]
        grid = Image.fromarray(image_grid(np.stack(arrays), columns=min(8, len(arrays))))
        # Small images are enlarged (nearest neighbour, pixels kept as generated) so the grid is viewable.
        zoom = max(1, GRID_TILE_PIXELS // cfg.data.resolution)
        grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(out_dir / f"demo_{name}.png")
        report[name] = adherence(arrays, combos)
        report[name]["prompts"] = [c.caption for c in combos]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flax_train.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--per-split", type=int, default=48, help="images generated for seen captions, and for held-out ones (24 at most)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps for the evaluation images")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides of configs/demo.yaml")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from flax_train import cli, config as config_lib, pipeline, train

    cli.setup_runtime()
    cfg = config_lib.load([config_lib.DEMO_CONFIG], [f"run_dir={args.run_dir}", *args.overrides])
    result = train.train(cfg)
    if result.export_dir is None:
        print("training did not finish (preempted?); run the same command again to resume", file=sys.stderr)
        return 1
    trained = time.perf_counter()

    base = pipeline.pipeline_folder(cfg)
    cache = pipeline.open_cache(cfg, base, prepare_if_missing=False)
    run_dir = Path(cfg.run_dir)
    report = evaluate(cfg, result.export_dir, cache, run_dir, per_split=args.per_split, steps=args.steps, guidance=args.guidance)
    report["seconds"] = {"train": trained - start, "total": time.perf_counter() - start}
    report["final_loss"] = float(np.mean(result.losses[-20:])) if result.losses else None
    (run_dir / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"demo finished in {report['seconds']['total']:.0f} s; run directory {run_dir}")
    print(f"  diffusers pipeline:  {result.export_dir}")
    print(f"  sample grids:        {run_dir / 'demo_seen.png'}  {run_dir / 'demo_held_out.png'}")
    print("  prompt adherence (shape colour and background colour both as asked, measured from pixels):")
    for name in ("seen", "held_out"):
        r = report[name]
        print(
            f"    {name:9s} {r['both']:6.1%} of {r['count']} images "
            f"(shape colour {r['shape_colour']:.0%}, background {r['background']:.0%})"
        )
    met = report["seen"]["both"] >= SEEN_TARGET
    print(f"  target for seen captions: {SEEN_TARGET:.0%} ({'met' if met else 'NOT met'}); held-out combinations have no target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
