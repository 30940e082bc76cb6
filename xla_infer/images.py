"""Images on the host: the input images and masks checked and converted to the arrays the graphs
take, and the decoded pixels brought back and turned into PIL images."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from xla_infer import checks
from xla_infer.checks import InputError, SizeError


def per_image(value: Any, n: int, what: str, convert: Callable[[Any], np.ndarray]) -> list[np.ndarray]:
    """One array per prompt from one value for all of them or a list of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(f"{len(value)} {what} for {n} prompts")
        return [convert(one) for one in value]
    return [convert(value)] * n


def image_array(image: Any, height: int, width: int, factor: int) -> np.ndarray:
    """An input image as the (H, W, 3) uint8 array that the graph takes, checked to be the
    pipeline's `height` x `width` (a multiple of the VAE `factor`)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        array = image
    else:
        raise InputError(f"image must be a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")
    image_height, image_width = array.shape[:2]
    if image_height % factor or image_width % factor:
        raise SizeError(f"the image is {image_width}x{image_height} pixels, not a multiple of the VAE factor {factor}")
    if (image_height, image_width) != (height, width):
        raise SizeError(
            f"the image is {image_width}x{image_height} pixels but the pipeline generates {width}x{height} "
            "(the size its graphs are compiled for)"
        )
    return array


def mask_array(mask: Any, height: int, width: int, blur: float | None = None) -> np.ndarray:
    """An inpainting mask as the (H, W) float32 array of 0 and 1 (1: repaint) that the graph takes.

    As diffusers' mask processor: grayscale ("L"), scaled to [0, 1] (uint8 / 255), binarised at
    0.5. `blur` first applies PIL's GaussianBlur(blur) to the 8-bit mask, as VaeImageProcessor.blur.
    """
    from PIL import Image, ImageFilter

    if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.dtype == np.uint8:
        mask = Image.fromarray(mask)  # mode "L"
    if isinstance(mask, Image.Image):
        mask = mask.convert("L")
        if blur is not None:
            mask = mask.filter(ImageFilter.GaussianBlur(checks.blur_radius(blur)))
        values = np.asarray(mask).astype(np.float32) / 255.0
    elif isinstance(mask, np.ndarray) and mask.ndim == 2 and np.issubdtype(mask.dtype, np.floating):
        if blur is not None:
            raise InputError("mask_blur blurs an 8-bit mask: give a PIL image or a uint8 array")
        values = mask.astype(np.float32)
    else:
        shape = getattr(mask, "shape", None)
        raise InputError(f"mask_image must be a PIL image or an (H, W) uint8 or float array, got "
                         f"{type(mask).__name__}{'' if shape is None else f' {shape} {mask.dtype}'}")
    mask_height, mask_width = values.shape
    if (mask_height, mask_width) != (height, width):
        raise SizeError(f"the mask is {mask_width}x{mask_height} pixels but the pipeline generates "
                        f"{width}x{height} (the image's size)")
    return (values >= 0.5).astype(np.float32)


def fetch(images: torch.Tensor, real: int) -> np.ndarray:
    """The first `real` images of a batch (B, 3, H, W) on the device, as (real, H, W, 3) host pixels."""
    return images.cpu()[:real].permute(0, 2, 3, 1).numpy()


def to_pil(pixels: np.ndarray, info: dict[str, Any]):
    """(H, W, 3) pixels in [0, 1] as a PIL image carrying `info` (the settings that made it)."""
    from PIL import Image

    image = Image.fromarray((pixels * 255).round().astype("uint8"))
    image.info.update(info)
    return image
