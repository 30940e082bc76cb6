"""What one batch hands the device graphs, on the host, typed by how its latents start.

`Pipeline._host_batch` builds one `Batch`; `Pipeline._run_batch` moves its tensors to the device
and runs the graphs its `start` kind calls for. Conditioning rows are interleaved (negative,
positive) per image, as the denoising step's doubled UNet batch reads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Conditioning:
    """The text encoders' inputs and SDXL's micro-conditioning for 2 x batch rows."""

    ids_1: torch.Tensor | None  # first tokenizer's ids; None for a model without that encoder (the refiner)
    ids_2: torch.Tensor
    keep: torch.Tensor  # per row: 0 where SDXL zeroes the negative embedding instead of encoding ""
    time_ids: torch.Tensor
    guidance: torch.Tensor  # (batch, 1, 1, 1)

    @property
    def batch_size(self) -> int:
        return len(self.guidance)


@dataclass(frozen=True)
class FromNoise:
    """Text-to-image: the seeds' initial latents, already scaled by the sampler's init_noise_sigma."""

    latents: torch.Tensor


@dataclass(frozen=True)
class FromImage:
    """Image-to-image: the image is encoded, its posterior sampled and noised to the start step."""

    pixels: torch.Tensor
    posterior_noise: torch.Tensor
    added_noise: torch.Tensor


@dataclass(frozen=True)
class Inpaint:
    """Inpainting: as FromImage, with the mask and the masked image's posterior noise; `full`:
    strength 1 (a 9-channel UNet then starts from pure noise)."""

    pixels: torch.Tensor
    mask: torch.Tensor
    posterior_noise: torch.Tensor
    added_noise: torch.Tensor
    masked_noise: torch.Tensor
    full: torch.Tensor


@dataclass(frozen=True)
class Continued:
    """The refiner after the base: it continues from the base's latents, on the device."""


Start = Union[FromNoise, FromImage, Inpaint, Continued]


@dataclass(frozen=True)
class Batch:
    """One batch: steps [first_step, stop) run on latents that start as `start` says, with the
    step noise of ancestral samplers (steps, batch, C, h, w) or None; `refiner`: the batch the
    refiner continues with after `stop`."""

    conditioning: Conditioning
    start: Start
    first_step: int
    stop: int
    noise: torch.Tensor | None = None
    refiner: "Batch | None" = None
