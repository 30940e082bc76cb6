"""xla-infer: generate SDXL images from compiled-once graphs.

    xla-infer --model runs/demo/export --prompt "a red circle" --steps 30 --out images/
    xla-infer --model DIR --prompts prompts.txt --batch-size 8 --device xla --cache-dir ~/.cache/xla --out images/

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
from typing import Sequence

from flax_train import storage
from flax_train.errors import BadInput, report
from xla_infer.schedulers import SCHEDULER_NAMES

EXIT_BAD_INPUT = 2


class _BadInput(BadInput):
    pass


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xla-infer", description="SDXL text-to-image with graphs compiled once (PyTorch/XLA or plain torch)."
    )
    parser.add_argument("--model", required=True, help="SDXL diffusers folder, Hub id or gs:// folder")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit of --model")
    parser.add_argument("--variant", default=None, help='weights of that precision, e.g. "fp16" (*.fp16.safetensors)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", type=Path, help="UTF-8 text file, one prompt per line (blank lines skipped)")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    parser.add_argument("--num-images", type=_positive_int, default=1, help="images per --prompt (seeds S, S+1, ...)")
    parser.add_argument("--steps", type=_positive_int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: none)")
    parser.add_argument("--width", type=_positive_int, default=None, help="default: the model's native size")
    parser.add_argument("--height", type=_positive_int, default=None)
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


def read_prompt_file(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 file; errors name the file and line."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _BadInput(f"cannot read prompt file {path}: {err.strerror or err}") from None
    prompts = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _BadInput(
                f"prompt file {path}, line {number}: not valid UTF-8 (byte {err.start + 1} of the line)"
            ) from None
        line = line.rstrip("\r").strip()
        if line:
            prompts.append(line.lstrip("\ufeff"))
    if not prompts:
        raise _BadInput(f"prompt file {path} is empty (no non-blank lines)")
    return prompts


def _png_bytes(image) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in image.info.items():
        # iTXt chunks hold UTF-8, so non-ASCII prompts survive; numbers and pairs are written as JSON.
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
    info.add_itxt("parameters", json.dumps(image.info, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def run(args: argparse.Namespace) -> dict:
    """Generate as the command line asks; returns the manifest it writes."""
    from xla_infer.pipeline import Pipeline

    if args.prompts is not None:
        prompts = read_prompt_file(args.prompts)
    else:
        if not args.prompt.strip():
            raise _BadInput("--prompt is empty")
        prompts = [args.prompt] * args.num_images
    out = storage.writable_folder(args.out)  # before loading and compiling for minutes

    load_start = time.perf_counter()
    pipe = Pipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, height=args.height,
        width=args.width, steps=args.steps, scheduler=args.scheduler, torch_compile=args.torch_compile,
        cache_dir=args.cache_dir, on_recompile="warn",  # report a recompilation, keep the images
        revision=args.revision, variant=args.variant,
    )
    load_seconds = time.perf_counter() - load_start
    print(f"loaded {args.model} on {args.device} in {load_seconds:.1f} s; compiling (warm-up)...", file=sys.stderr)
    pipe.warmup()
    compiles_after_warmup = pipe.compile_count
    images = pipe(prompts, negative_prompts=args.negative_prompt, seeds=args.seed, guidance_scale=args.guidance,
                  progress=True)

    # Each file is written whole (see flax_train.storage): a killed run leaves no truncated PNG.
    entries = []
    for i, image in enumerate(images):
        name = f"{i:05d}.png"
        storage.atomic_write_bytes(out / name, _png_bytes(image))
        entries.append({"file": name, **image.info})
    timing = {
        "load_seconds": load_seconds,
        "warmup_seconds": pipe.warmup_seconds,
        "xla_compile_seconds": pipe.compile_seconds,
        "generate_seconds": pipe.last_call["seconds"],
        "seconds_per_image": pipe.last_call["seconds_per_image"],
        "images_per_second": pipe.last_call["images_per_second"],
        "compilations_after_warmup": pipe.compile_count - compiles_after_warmup,
    }
    manifest = {"pipeline": pipe.describe(), "timing": timing, "images": entries}
    storage.atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())

    compile_note = "" if pipe.compile_seconds is None else f" (XLA compile {pipe.compile_seconds:.1f} s)"
    print(f"warm-up{compile_note}: {pipe.warmup_seconds:.1f} s", file=sys.stderr)
    print(
        f"{len(images)} images in {timing['generate_seconds']:.2f} s: {timing['seconds_per_image']:.3f} s/image "
        f"steady, {timing['images_per_second']:.2f} images/s; compilations after warm-up: "
        f"{timing['compilations_after_warmup']}; "
        f"persistent cache: {pipe.cache_status}",
        file=sys.stderr,
    )
    print(f"wrote {len(images)} PNGs and manifest.json to {args.out}", file=sys.stderr)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 from argparse
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
