"""SDXL's aspect-ratio buckets: the image sizes it was trained at, and which one an image belongs to.

SDXL was fine-tuned on buckets of about 1024 x 1024 pixels with sides in multiples of 64, each
batch from one bucket, the bucket's size given to the UNet as `target_size` (Podell et al., 2023,
"SDXL", arXiv:2307.01952, section 2.3; the list is its appendix I). Sizes here are (height, width),
the order of the paper's table and of SDXL's micro-conditioning `add_time_ids`.

An image belongs to the bucket whose aspect ratio is nearest its own, compared as log(h / w):
on that scale a portrait and the same picture turned to landscape are equally far from the square,
where comparing h / w itself would put every landscape bucket further apart than its portrait twin.
"""

from __future__ import annotations

import argparse
import math
from typing import Mapping, Sequence

Size = tuple[int, int]  # (height, width) in pixels

# Appendix I of the SDXL paper, in its order (widest first): height x width, about 1024^2 pixels.
SDXL_BUCKETS: tuple[Size, ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)
SDXL_RESOLUTION = 1024  # the side of the list's square bucket


def log_aspect(size: Size) -> float:
    return math.log(size[0] / size[1])


def scaled(buckets: Sequence[Size], resolution: int, multiple: int) -> tuple[Size, ...]:
    """``buckets`` (made for ``SDXL_RESOLUTION``) for training at ``resolution`` (the square
    bucket's side): each side times resolution / 1024, rounded to a multiple of ``multiple`` (what
    the model's downsampling needs, at least the VAE's factor); sizes that round to the same one
    are kept once, in the list's order."""
    if resolution <= 0 or multiple <= 0 or resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a positive multiple of {multiple}")
    factor = resolution / SDXL_RESOLUTION
    out: list[Size] = []
    for h, w in buckets:
        size = (max(multiple, round(h * factor / multiple) * multiple), max(multiple, round(w * factor / multiple) * multiple))
        if size not in out:
            out.append(size)
    return tuple(out)


def nearest(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket of ``buckets`` whose aspect ratio is nearest the image ``size``'s (see the module
    docstring); of two equally near, the one listed first."""
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"an image of {size[0]}x{size[1]} pixels has no aspect ratio")
    target = log_aspect(size)
    return min(buckets, key=lambda bucket: abs(log_aspect(bucket) - target))


def assign(sizes: Mapping[Size, int], candidates: Sequence[Size]) -> dict[Size, int]:
    """Images per bucket of ``candidates`` (in their order) for images of ``sizes`` (size -> how
    many), each in the bucket nearest its aspect ratio."""
    counts = dict.fromkeys(candidates, 0)
    for size, count in sizes.items():
        counts[nearest(size, candidates)] += count
    return counts


def fit(sizes: Mapping[Size, int], candidates: Sequence[Size], max_buckets: int | None = None,
        min_images: int = 1) -> tuple[Size, ...]:
    """The buckets of ``candidates`` to train images of ``sizes`` (size -> how many) with: those
    the images fill, less the rarest while more than ``max_buckets`` are left or the rarest holds
    fewer than ``min_images`` (a global batch: a smaller bucket repeats images within its batch).
    Each bucket is a program to compile, so a few well-filled ones cost less than many thin ones.
    A bucket dropped leaves each of its images to the nearest of those left, as training will
    place them. Of equally rare buckets the one furthest from the square goes first; one bucket
    always remains."""
    if max_buckets is not None and max_buckets < 1:
        raise ValueError(f"max_buckets must be at least 1, got {max_buckets}")
    kept = [bucket for bucket, count in assign(sizes, candidates).items() if count]
    while len(kept) > 1:
        counts = assign(sizes, kept)
        rarest = min(kept, key=lambda b: (counts[b], -abs(log_aspect(b)), b))
        if counts[rarest] >= min_images and (max_buckets is None or len(kept) <= max_buckets):
            break
        kept.remove(rarest)
    return tuple(kept)


def parse_size(text: str) -> Size:
    """(height, width) from "WIDTHxHEIGHT", as users and image tools write a size (1216x832 is
    landscape); the result is in this module's (height, width) order."""
    try:
        w, h = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text!r} is not a size: write it WIDTHxHEIGHT, e.g. 1216x832") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{text!r}: width and height must be positive")
    return h, w


def size_argument(text: str) -> Size:
    """``parse_size`` as argparse's ``type=`` of both command lines' ``--size``: a bad size is a
    usage error that says how to write one."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def size_text(size: Size) -> str:
    """"WIDTHxHEIGHT" of a (height, width) size."""
    return f"{size[1]}x{size[0]}"
