"""Decoding and SDXL preprocessing of one sample, recording its micro-conditioning.

SDXL conditions on `add_time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
The numbers are computed here, from the very crop that produced the pixels, and are cached with
the latent: they can never disagree with it (the diffusers SDXL script caches latents but redraws
random crops afterwards).

Every random choice of a sample (which caption of a list, the crop, the flip) comes from a
generator seeded by (seed, sample index, purpose): independent of batch size, device count,
process count, and of whether a prepare was interrupted and resumed.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from flax_train.data.sources import RawSample

# Purposes of the per-sample generators; adding one never changes the draws of another.
_CAPTION_STREAM, _CROP_STREAM, _FLIP_STREAM = 0, 1, 2


class SkippedSample(Exception):
    """A sample that cannot be used; `reason` is a short category for the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become training pixels; stored in the cache manifest."""

    resolution: int = 1024
    center_crop: bool = True  # False: random crop
    random_flip: bool = False
    max_pixels: int = 89_478_485  # larger images are skipped before their pixels are decoded (PIL's limit)
    seed: int = 0

    def __post_init__(self):
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


@dataclass(frozen=True)
class PreparedSample:
    index: int
    key: str
    pixels: np.ndarray  # uint8 [resolution, resolution, 3]
    time_ids: np.ndarray  # int32 [6]: orig_h, orig_w, crop_top, crop_left, target_h, target_w
    caption: str


def sample_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def decode_image(image: str | os.PathLike | bytes, max_pixels: int) -> Image.Image:
    """An RGB image, upright per its EXIF orientation; raises SkippedSample when unusable.

    The size is checked from the header, before any pixel is decoded, so a huge or hostile file
    costs no memory.
    """
    try:
        handle = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    except Image.DecompressionBombError as e:
        raise SkippedSample("image too large", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:  # includes UnidentifiedImageError, missing files
        raise SkippedSample("unreadable image", str(e)) from None
    with handle:
        width, height = handle.size
        if width * height > max_pixels:
            raise SkippedSample("image too large", f"{width}x{height} is over {max_pixels} pixels")
        if width == 0 or height == 0:
            raise SkippedSample("unreadable image", f"empty image {width}x{height}")
        try:
            handle.load()
            upright = ImageOps.exif_transpose(handle)
        except Image.DecompressionBombError as e:
            raise SkippedSample("image too large", str(e)) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            reason = "truncated image" if "truncated" in str(e).lower() else "unreadable image"
            raise SkippedSample(reason, str(e)) from None
        return _to_rgb(upright)


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colours: show them over white, as a viewer would.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def pick_caption(caption: str | Sequence[str] | None, seed: int, index: int) -> str:
    """The caption text; one of a list, chosen with the run's seed. Raises SkippedSample if empty."""
    if isinstance(caption, str):
        candidates = [caption.strip()]
    elif isinstance(caption, Sequence):
        candidates = [c.strip() for c in caption if isinstance(c, str)]
    else:
        candidates = []
    candidates = [c for c in candidates if c]
    if not candidates:
        raise SkippedSample("empty caption")
    if len(candidates) == 1:
        return candidates[0]
    return candidates[int(sample_rng(seed, index, _CAPTION_STREAM).integers(len(candidates)))]


def resize_and_crop(image: Image.Image, spec: PreprocessSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 [r, r, 3], time_ids int32 [6]) for one decoded image.

    The short side is resized to the resolution, then a square is cropped (centre or random) and
    optionally mirrored. The recorded corner is where the crop sits in the picture the model sees:
    after a flip, the left edge of the crop is measured from the mirrored side.
    """
    orig_w, orig_h = image.size
    res = spec.resolution
    if orig_w <= orig_h:
        new_w, new_h = res, max(res, round(orig_h * res / orig_w))
    else:
        new_w, new_h = max(res, round(orig_w * res / orig_h)), res
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)

    if spec.center_crop:
        top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
    else:
        rng = sample_rng(spec.seed, index, _CROP_STREAM)
        top, left = int(rng.integers(new_h - res + 1)), int(rng.integers(new_w - res + 1))
    image = image.crop((left, top, left + res, top + res))

    if spec.random_flip and sample_rng(spec.seed, index, _FLIP_STREAM).random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = new_w - left - res
    time_ids = np.array([orig_h, orig_w, top, left, res, res], dtype=np.int32)
    return np.asarray(image, dtype=np.uint8), time_ids


def prepare_sample(raw: RawSample, index: int, spec: PreprocessSpec) -> PreparedSample:
    """Caption, decode, resize, crop, flip one source sample; raises SkippedSample if unusable."""
    caption = pick_caption(raw.caption, spec.seed, index)
    image = decode_image(raw.image, spec.max_pixels)
    pixels, time_ids = resize_and_crop(image, spec, index)
    return PreparedSample(index=index, key=raw.key, pixels=pixels, time_ids=time_ids, caption=caption)
