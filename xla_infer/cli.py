"""xla-infer: generate SDXL images from compiled-once graphs.

    xla-infer --model runs/demo/export --prompt "a red circle" --steps 30 --out images/
    xla-infer --model DIR --prompts prompts.txt --batch-size 8 --device xla --cache-dir ~/.cache/xla --out images/
    xla-infer --model DIR --prompt "a watercolour" --image photo.png --strength 0.6 --out images/
    xla-infer --model DIR --prompt "a red hat" --image photo.png --mask mask.png --out images/
    xla-infer --model BASE --refiner REFINER --prompt "a lighthouse" --high-noise-frac 0.8 --out images/
    xla-infer --model DIR --lora style.safetensors:0.7 --lora gs://bucket/subject --prompt "a cat" --out images/
    xla-infer --model DIR --prompt "a (red:1.3) hat BREAK a garden" --prompt-weighting a1111 --max-text-chunks 2 \
        --out images/

Writes one PNG per image (generation parameters in PNG text chunks), manifest.json, and prints the
compile (warm-up) time, the steady per-image latency and images/s. Bad input exits with code 2 and a
one-line message.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from sdxl_common import buckets, lora_files, prompt_weights, storage
from sdxl_common.png import png_bytes
from sdxl_common.prompts import read_sized_prompt_file
from sdxl_common.errors import BadInput, report
from xla_infer.schedulers import SCHEDULER_NAMES

EXIT_BAD_INPUT = 2


class _BadInput(BadInput):
    pass


def _number(kind: type, what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: ``kind(text)``, refused with "must be <what>" unless ``ok(value)``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                             f"that is {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _number(int, "positive", lambda v: v > 0)
_positive_float = _number(float, "positive", lambda v: v > 0)
_fraction = _number(float, "in (0, 1)", lambda v: 0 < v < 1)
_strength = _number(float, "in (0, 1]", lambda v: 0 < v <= 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xla-infer",
        description="SDXL text-to-image, image-to-image, inpainting and base + refiner with graphs compiled once "
                    "(PyTorch/XLA or plain torch).",
    )
    parser.add_argument("--model", required=True,
                        help="SDXL diffusers folder, Hub id or gs:// folder, or a single-file .safetensors checkpoint")
    parser.add_argument("--config", default=None,
                        help="with a single-file --model: the diffusers folder or Hub id whose configs, tokenizers "
                             "and scheduler go with it (default: the shipped SDXL base or refiner configs)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    parser.add_argument("--variant", default=None, help='weights of that precision, e.g. "fp16" (*.fp16.safetensors)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="UTF-8 text file, local or gs://, one prompt per line (blank lines skipped); "
                                           "a line may name its size first, as 'WIDTHxHEIGHT: prompt' (then every line "
                                           "does, and each size's graphs are compiled once)")
    parser.add_argument("--prompt-2", default=None,
                        help="prompt of the second text encoder for every image (default: the first prompt)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    parser.add_argument("--negative-prompt-2", default=None,
                        help="negative prompt of the second text encoder (default: --negative-prompt)")
    parser.add_argument("--prompt-weighting", default=None, choices=prompt_weights.SYNTAXES,
                        help="read the prompts' weighting: a1111 ((text:1.3), (text), [text], BREAK) or compel "
                             "(text+, text-, (text)1.3), each with its tool's weighting (default: prompts as written)")
    parser.add_argument("--max-text-chunks", type=_positive_int, default=1,
                        help="chunks of 75 tokens each prompt is read in (1: CLIP's 77 tokens; 2 or 3 for 150 / "
                             "225 tokens); longer prompts are cut with a warning")
    parser.add_argument("--image", default=None,
                        help="image-to-image: start every image from this picture (its size is the output size)")
    parser.add_argument("--strength", type=_strength, default=None,
                        help="with --image: how much to change it, in (0, 1]; runs that share of --steps "
                             "(default 0.3, 0.9999 with --mask, as diffusers)")
    parser.add_argument("--mask", default=None,
                        help="with --image: inpaint where this mask (the image's size) is white; black is kept")
    parser.add_argument("--mask-blur", type=_positive_float, default=None,
                        help="with --mask: Gaussian blur radius applied to the mask first (diffusers' blur_factor)")
    parser.add_argument("--refiner", default=None,
                        help="SDXL refiner folder or Hub id: text-to-image runs the base, then the refiner")
    parser.add_argument("--high-noise-frac", type=_fraction, default=None,
                        help="with --refiner: the share of the noise the base removes before the refiner "
                             "takes over, in (0, 1) (default 0.8)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="merge this LoRA (.safetensors file or folder holding pytorch_lora_weights.safetensors, "
                             "local or gs://) into the base model at SCALE (default 1); repeatable")
    parser.add_argument("--num-images", type=_positive_int, default=1, help="images per --prompt (seeds S, S+1, ...)")
    parser.add_argument("--steps", type=_positive_int, default=30)
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (<= 1: none; default 5, 7.5 with --mask, as diffusers)")
    parser.add_argument("--width", type=_positive_int, default=None, help="default: the model's native size")
    parser.add_argument("--height", type=_positive_int, default=None)
    parser.add_argument("--size", type=buckets.size_argument, action="append", default=[], metavar="WIDTHxHEIGHT",
                        help="generate every prompt at this size (repeatable: each size's graphs are compiled "
                             "once, at warm-up), e.g. --size 1216x832 --size 832x1216; SDXL's sizes: "
                             "sdxl_common/buckets.py")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per compiled batch (default: one per device)")
    parser.add_argument("--seed", type=int, default=0, help="image i gets seed S+i")
    parser.add_argument("--scheduler", default=None,
                        help=f"one of {', '.join(SCHEDULER_NAMES)} (default: the model folder's)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--device", default="xla", choices=("xla", "cpu", "cuda"))
    parser.add_argument("--torch-compile", action="store_true", help="cpu/cuda: run the graphs through torch.compile")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="persistent XLA compilation cache (TPU; torch_xla cannot reload it on CPU)")
    parser.add_argument("--out", required=True, help="output folder (or gs:// URL) for PNGs and manifest.json")
    return parser


def read_image(location: str, flag: str = "--image", mode: str = "RGB"):
    """The --image (or --mask) picture as a PIL image of `mode`; an unreadable file is the user's error."""
    from PIL import Image

    try:
        data = storage.path(location).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return image.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # missing, not an image, truncated
        raise _BadInput(f"cannot read {flag} {location}: {err}") from None


def _check_syntax(prompts: list[str], args: argparse.Namespace) -> None:
    """Every text's weighting syntax, before the model loads: one line naming the first bad one."""
    named = [(f"prompt {i}", text) for i, text in enumerate(prompts)]
    named += [(flag, text) for flag, text in (("--prompt-2", args.prompt_2), ("--negative-prompt", args.negative_prompt),
                                              ("--negative-prompt-2", args.negative_prompt_2)) if text]
    prompt_weights.check_syntax(named, args.prompt_weighting)


def run(args: argparse.Namespace) -> dict:
    """Generate as the command line asks; returns the manifest it writes."""
    from xla_infer.checks import SizeError, first_step
    from xla_infer.pipeline import DEFAULT_HIGH_NOISE_FRAC, DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, Pipeline

    if args.prompts is not None:
        prompts, named = map(list, zip(*read_sized_prompt_file(args.prompts)))
    else:
        if not args.prompt.strip():
            raise _BadInput("--prompt is empty")
        prompts, named = [args.prompt] * args.num_images, [None] * args.num_images
    sized = named[0] is not None  # the prompt file names a size for each prompt
    if sized and args.size:
        raise _BadInput(f"{args.prompts} names a size for each prompt: --size would add others")
    sizes = list(dict.fromkeys(named)) if sized else args.size
    height, width, init_image, mask = args.height, args.width, None, None
    for flag, value, needs, given in (("--strength", args.strength, "--image", args.image),
                                      ("--mask", args.mask, "--image", args.image),
                                      ("--mask-blur", args.mask_blur, "--mask", args.mask),
                                      ("--high-noise-frac", args.high_noise_frac, "--refiner", args.refiner)):
        if value is not None and given is None:
            raise _BadInput(f"{flag} needs {needs}")
    if args.refiner is not None and args.image is not None:
        raise _BadInput("--refiner is for text-to-image: it cannot be combined with --image")
    if sizes and (args.image is not None or args.width or args.height):
        what = f"{args.prompts} naming sizes" if sized else "--size"
        raise _BadInput(f"{what} is for text-to-image, instead of --width/--height (an --image sets its own size)")
    if args.image is not None:
        # Every check of the image comes before loading and compiling: the pipeline is built for its size.
        init_image = read_image(args.image)
        given = (args.width or init_image.width, args.height or init_image.height)
        if given != init_image.size:
            raise _BadInput(f"--image {args.image} is {init_image.width}x{init_image.height} pixels, but "
                            f"--width/--height ask for {given[0]}x{given[1]}")
        width, height = init_image.size
        if args.mask is not None:
            mask = read_image(args.mask, "--mask", "L")  # grayscale, as diffusers' mask processor reads it
            if mask.size != init_image.size:
                raise _BadInput(f"--mask {args.mask} is {mask.width}x{mask.height} pixels, but --image {args.image} "
                                f"is {init_image.width}x{init_image.height}")
        default = DEFAULT_STRENGTH if mask is None else DEFAULT_INPAINT_STRENGTH
        first_step(args.steps, default if args.strength is None else args.strength)  # refuses 0 steps run
    if args.prompt_weighting is not None:
        _check_syntax(prompts, args)
    loras = lora_files.parse_specs(args.lora)
    out = storage.writable_folder(args.out)  # before loading and compiling for minutes

    load_start = time.perf_counter()
    try:
        pipe = Pipeline.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, height=height,
            width=width, sizes=sizes or None, steps=args.steps, scheduler=args.scheduler, torch_compile=args.torch_compile,
            cache_dir=args.cache_dir, on_recompile="warn",  # report a recompilation, keep the images
            revision=args.revision, variant=args.variant, refiner=args.refiner, loras=loras, config=args.config,
            max_text_chunks=args.max_text_chunks, prompt_weighting=args.prompt_weighting,
        )
    except SizeError as err:
        if init_image is None:
            raise
        raise _BadInput(f"--image {args.image} is {init_image.width}x{init_image.height} pixels: {err}") from None
    load_seconds = time.perf_counter() - load_start
    print(f"loaded {args.model} on {args.device} in {load_seconds:.1f} s; compiling (warm-up)...", file=sys.stderr)
    if args.refiner is not None:
        pipe.switch_steps(args.high_noise_frac or DEFAULT_HIGH_NOISE_FRAC)  # a switch running no step: before compiling
    pipe.warmup(image=init_image is not None and mask is None, mask=mask is not None, refiner=args.refiner is not None,
                sizes=pipe.sizes)
    compiles_after_warmup = pipe.compile_count
    if sizes:
        print(f"compiled for {', '.join(map(buckets.size_text, pipe.sizes))}", file=sys.stderr)
    entries = []
    # Which prompts go at which size: each its own (a file naming sizes), else all at each --size.
    everyone = list(range(len(prompts)))
    if sized:
        groups = {size: [i for i, s in enumerate(named) if s == size] for size in pipe.sizes}
    else:
        groups = {size: everyone for size in (pipe.sizes if sizes else [None])}
    suffix = ""  # with several sizes, each file name says its size

    def write(i: int, image) -> None:
        # Each batch's files as soon as it is done, each written whole (see sdxl_common.storage): a
        # killed run keeps the images it finished and leaves no truncated PNG.
        name = f"{i:05d}{suffix}.png"
        if args.image is not None:
            image.info["image"] = args.image
        if args.mask is not None:
            image.info["mask"] = args.mask
        storage.atomic_write_bytes(out / name, png_bytes(image, image.info))
        entries.append({"file": name, **image.info})

    generate_seconds = 0.0
    for size, indices in groups.items():
        suffix = f"_{buckets.size_text(size)}" if len(groups) > 1 else ""
        # Image i of the prompts has seed S+i and file number i, whatever size it is drawn at.
        pipe([prompts[i] for i in indices], negative_prompts=args.negative_prompt,
             seeds=[args.seed + i for i in indices], guidance_scale=args.guidance,
             prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2, image=init_image,
             strength=args.strength, mask_image=mask, mask_blur=args.mask_blur, denoising_end=args.high_noise_frac,
             progress=True, on_image=lambda j, image, indices=indices: write(indices[j], image), size=size)
        generate_seconds += pipe.last_call["seconds"]
    timing = {
        "load_seconds": load_seconds,
        "warmup_seconds": pipe.warmup_seconds,
        "xla_compile_seconds": pipe.compile_seconds,
        "generate_seconds": generate_seconds,
        "seconds_per_image": generate_seconds / len(entries),
        "images_per_second": len(entries) / generate_seconds,
        "compilations_after_warmup": pipe.compile_count - compiles_after_warmup,
    }
    manifest = {"pipeline": pipe.describe(), "timing": timing, "images": entries}
    storage.atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())

    compile_note = "" if pipe.compile_seconds is None else f" (XLA compile {pipe.compile_seconds:.1f} s)"
    print(f"warm-up{compile_note}: {pipe.warmup_seconds:.1f} s", file=sys.stderr)
    print(
        f"{len(entries)} images in {timing['generate_seconds']:.2f} s: {timing['seconds_per_image']:.3f} s/image "
        f"steady, {timing['images_per_second']:.2f} images/s; compilations after warm-up: "
        f"{timing['compilations_after_warmup']}; "
        f"persistent cache: {pipe.cache_status}",
        file=sys.stderr,
    )
    print(f"wrote {len(entries)} PNGs and manifest.json to {args.out}", file=sys.stderr)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 from argparse
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fsspec").setLevel(logging.WARNING)  # a line for every file opened on gs://
    try:
        run(args)
    except KeyboardInterrupt:
        print("xla-infer: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted by errors.report: bad input, failed run or bug
        return report("xla-infer", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
