"""``flax-train``: prepare, train, sample, export. A thin layer: it parses, starts the
distributed runtime, and calls the same functions the tests call.

    flax-train train   --config configs/sdxl_base.yaml [key=value ...]
    flax-train prepare --config configs/sdxl_base.yaml data.path=/data/images
    flax-train buckets --config configs/sdxl_base.yaml data.path=/data/images --max-buckets 8
    flax-train sample  --model runs/demo/export --prompt "a red circle on a blue background" --out samples/
    flax-train sample  --model runs/demo/export --prompt "a (red:1.3) circle BREAK a blue background" \
                       --prompt-weighting a1111 --max-text-chunks 2 --out samples/
    flax-train export  --config runs/demo/config.yaml [--out DIR] [--raw]

Every config-driven command accepts ``--config`` several times (later files override earlier
ones) and ``a.b=value`` overrides. Without ``--config`` the schema's defaults apply: the SDXL
base fine-tune (docs/configuration.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

import jax
from etils import epath

from flax_train import compilation, config as config_lib, lora, models, schedulers, sharding, train
from sdxl_common import buckets, errors, lora_files, prompt_weights, storage
from sdxl_common.errors import BadInput, report
from sdxl_common.png import png_bytes
from sdxl_common.prompts import read_prompt_file
from flax_train.data import prepare, survey
from flax_train.data.images import open_source
from flax_train.sampling import Generator



def _config(args: argparse.Namespace):
    return config_lib.load(args.config or [], args.overrides)


def _exported(cfg: config_lib.Config, out: epath.Path) -> str:
    if cfg.train.method == "lora":
        return f"LoRA weights for diffusers' load_lora_weights: {out / lora.WEIGHT_NAME}"
    return f"diffusers pipeline: {out}"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    compilation.use_run_dir(cfg.run_dir)
    result = train.train(cfg, max_steps=args.max_steps)
    if result.stopped_by_preemption:
        saved = f"checkpoint saved in {result.run_dir}" if result.step else "nothing trained yet, nothing to save"
        print(f"stopped at step {result.step} on SIGTERM; {saved}")
    else:
        print(f"trained to step {result.step}; run directory {result.run_dir}")
        if result.export_dir:
            print(_exported(cfg, result.export_dir))
    if result.programs_compiled is not None:
        print(f"start-up {result.startup_seconds:.1f} s; {result.programs_compiled} programs compiled, "
              f"{result.programs_loaded} loaded from the compilation cache in {jax.config.jax_compilation_cache_dir}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = _config(args)
    config_lib.validate(cfg, jax.device_count())
    base = models.pretrained_pipeline(cfg.model)
    start = time.perf_counter()
    cache = prepare.open_cache(cfg, base)
    seconds = time.perf_counter() - start
    print(f"latent cache {prepare.cache_dir(cfg)}: {len(cache)} samples ({seconds:.1f} s)")
    return 0


def cmd_buckets(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if not cfg.data.buckets:  # what SDXL's list at data.resolution would give
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, buckets=("sdxl",)))
    config_lib.validate(cfg)
    min_images = cfg.train.global_batch_size if args.min_images is None else args.min_images
    if min_images < 1 or (args.max_buckets is not None and args.max_buckets < 1):
        raise BadInput("--max-buckets and --min-images must be at least 1")
    source, preprocess = prepare.specs_from_config(cfg)
    candidates = preprocess.buckets
    result = survey.survey(open_source(source), preprocess.max_pixels)
    if not result.images:
        raise BadInput(f"no usable image in {source.path}")
    chosen = buckets.fit(result.sizes, candidates, args.max_buckets, min_images)
    print(survey.report(result, candidates, chosen, min_images))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompt_file(args.prompts)
    if not prompts:
        raise BadInput("give --prompt TEXT (repeatable) or --prompts FILE")
    if args.prompt_weighting is not None:  # every text read before anything loads
        named = [(f"prompt {i}", text) for i, text in enumerate(prompts)]
        prompt_weights.check_syntax(named + [("--negative-prompt", args.negative_prompt or "")], args.prompt_weighting)
    out = storage.writable_folder(args.out)  # before loading anything
    loras = lora_files.parse_specs(args.lora)
    generator = Generator(
        args.model, scheduler=args.scheduler, num_steps=args.steps, resolution=args.resolution, loras=loras,
        max_text_chunks=args.max_text_chunks, prompt_weighting=args.prompt_weighting,
    )
    images = generator(prompts, negative_prompt=args.negative_prompt, seed=args.seed, guidance_scale=args.guidance,
                       size=args.size)
    # Every process generated the same images (the models are not sharded here); one writes them.
    if jax.process_index() == 0:
        write_samples(out, prompts, images, args)
    sharding.sync("sample")
    print(f"wrote {len(images)} images to {out}")
    return 0


def write_samples(out: epath.Path, prompts: list[str], images: list, args: argparse.Namespace) -> None:
    """One PNG per image, each written whole, with the settings that made it as PNG metadata."""
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        parameters = {
            "prompt": prompt,
            "negative_prompt": args.negative_prompt or "",
            "seed": args.seed + i,
            "steps": args.steps,
            "guidance_scale": args.guidance,
            "scheduler": args.scheduler,
            "model": str(args.model),
            "loras": args.lora,
        }
        # The prompts above are as written; how they were read, where it is not CLIP's one chunk as written.
        if args.max_text_chunks > 1:
            parameters["max_text_chunks"] = args.max_text_chunks
        if args.prompt_weighting is not None:
            parameters["prompt_weighting"] = args.prompt_weighting
        storage.atomic_write_bytes(out / f"{i:04d}.png", png_bytes(image, parameters))


def cmd_export(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.raw:
        cfg = config_lib.apply_overrides(cfg, ["export.use_ema=false"])
    out = train.export_from_checkpoint(cfg, out=args.out)
    print(_exported(cfg, out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flax-train", description="Fine-tune SDXL with JAX/Flax on TPU, GPU or CPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", action="append", help="YAML config (repeatable; later files win)")
        p.add_argument("overrides", nargs="*", help="a.b=value overrides")

    p = sub.add_parser("train", help="train (or resume) the UNet")
    config_args(p)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this step (the schedule still uses train.max_steps)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="encode the dataset into the latent cache")
    config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("buckets", help="count the dataset's images per aspect-ratio bucket and propose data.buckets")
    config_args(p)
    p.add_argument("--max-buckets", type=int, default=None, help="keep at most this many (each one compiles a step)")
    p.add_argument("--min-images", type=int, default=None,
                   help="drop buckets with fewer images (default: train.global_batch_size)")
    p.set_defaults(func=cmd_buckets)

    p = sub.add_parser("sample", help="generate images from a diffusers folder")
    p.add_argument("--model", required=True, help="diffusers SDXL folder (e.g. an export) or Hub id")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="default: the model's unconditional input, as diffusers")
    p.add_argument("--prompt-weighting", default=None, choices=prompt_weights.SYNTAXES,
                   help="read the prompts' weighting: a1111 ((text:1.3), (text), [text], BREAK) or compel "
                        "(text+, text-, (text)1.3), each with its tool's weighting (default: prompts as written)")
    p.add_argument("--max-text-chunks", type=int, default=1,
                   help="chunks of 75 tokens each prompt is read in (1: CLIP's 77 tokens; 2 or 3 for 150 / "
                        "225 tokens); longer prompts are cut with a warning")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--scheduler", default="euler", choices=schedulers.SAMPLERS)
    p.add_argument("--resolution", type=int, default=None, help="square images of this side (default: the UNet's)")
    p.add_argument("--size", type=buckets.size_argument, default=None, metavar="WIDTHxHEIGHT",
                   help="any size the VAE's factor divides, e.g. 1216x832 (SDXL's buckets: sdxl_common/buckets.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA file or folder (diffusers or kohya format) merged at SCALE (default 1); repeatable")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "export", help="write a diffusers folder (a LoRA run: its LoRA file) from the newest checkpoint of a run"
    )
    config_args(p)
    p.add_argument("--out", default=None, help="target folder (default: export.dir or <run_dir>/export)")
    p.add_argument("--raw", action="store_true", help="export the raw weights, not the EMA (as export.use_ema=false)")
    p.set_defaults(func=cmd_export)
    return parser


def setup_runtime() -> None:
    """Logging, JAX's multi-process runtime, and the persistent compilation cache (see
    ``flax_train.compilation``): a restarted or resumed job loads its compiled programs instead
    of compiling them again."""
    # force: a library that logged while being imported has already given the root logger a handler.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every step of every save
    logging.getLogger("fsspec").setLevel(logging.WARNING)  # a line for every file opened on gs://
    errors.quiet_library_noise(own=("flax_train", "sdxl_common"))
    sharding.initialize_distributed()
    compilation.use_default()  # `train` moves it into the run directory (flax_train.compilation)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_runtime()
    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - sorted by errors.report: bad input, failed run or bug
        return report(f"flax-train {args.command}", error)


if __name__ == "__main__":
    sys.exit(main())
