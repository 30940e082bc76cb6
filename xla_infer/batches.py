"""What one batch hands the device graphs, on the host, typed by how its latents start, and the
host-side work on a call's texts and sizes that goes into it: tokenising, SDXL's micro-conditioning.

`Pipeline._host_batch` builds one `Batch`; `Pipeline.run_batch` moves its tensors to the device
and runs the graphs its `start` kind calls for. Conditioning rows are interleaved (negative,
positive) per image, as the denoising step's doubled UNet batch reads them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Union

import torch

from xla_infer import checks
from xla_infer.checks import InputError, Size

logger = logging.getLogger("xla_infer")

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner's conditioning, diffusers' defaults


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


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size conditioning for one call: (height, width) pairs and the crop corner (top, left);
    for a model with `requires_aesthetics_score` (the refiner), aesthetic scores instead of target sizes."""

    original_size: Size
    crops_coords_top_left: Size
    target_size: Size
    negative_original_size: Size
    negative_crops_coords_top_left: Size
    negative_target_size: Size
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    def rows(self) -> tuple[list[float], list[float]]:
        """The add_time_ids of a negative row and of a positive row: six, or five with aesthetic scores."""
        if self.aesthetic_score is not None:
            positive = [*self.original_size, *self.crops_coords_top_left, self.aesthetic_score]
            negative = [*self.negative_original_size, *self.negative_crops_coords_top_left,
                        self.negative_aesthetic_score]
            return negative, positive
        positive = [*self.original_size, *self.crops_coords_top_left, *self.target_size]
        negative = [*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size]
        return negative, positive


def micro_conditioning(size: Size, requires_aesthetics_score: bool, original_size=None, crops_coords_top_left=None,
                       target_size=None, negative_original_size=None, negative_crops_coords_top_left=None,
                       negative_target_size=None, image_to_image: bool = False,
                       aesthetic_score: float = AESTHETIC_SCORE,
                       negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE) -> MicroConditioning:
    """The micro-conditioning of a model generating `size` (height, width) from a call's size
    arguments (absent: None), as the diffusers pipeline of the same mode resolves them."""
    original = checks.pair(original_size or size, "original_size")
    crops = checks.pair(crops_coords_top_left or (0, 0), "crops_coords_top_left")
    target = checks.pair(target_size or size, "target_size")
    if requires_aesthetics_score:
        # As StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score (the refiner): the
        # scores take the target sizes' places, and in this branch the negative rows do take
        # negative_crops_coords_top_left.
        negative = (checks.pair(negative_original_size or original, "negative_original_size"),
                    checks.pair(negative_crops_coords_top_left or (0, 0), "negative_crops_coords_top_left"),
                    checks.pair(negative_target_size or target, "negative_target_size"))
        try:
            scores = float(aesthetic_score), float(negative_aesthetic_score)
        except (TypeError, ValueError):
            raise InputError("aesthetic_score and negative_aesthetic_score must be numbers") from None
        return MicroConditioning(original, crops, target, *negative, *scores)
    if image_to_image:
        # As StableDiffusionXLImg2ImgPipeline (without aesthetic score, as for the base model):
        # each negative size defaults to its positive one on its own, and the negative rows take
        # the positive crop corner (its _get_add_time_ids ignores negative_crops_coords_top_left).
        negative = (checks.pair(negative_original_size or original, "negative_original_size"), crops,
                    checks.pair(negative_target_size or target, "negative_target_size"))
    # As StableDiffusionXLPipeline: the negative rows get their own conditioning only when both sizes are given.
    elif negative_original_size is not None and negative_target_size is not None:
        negative = (checks.pair(negative_original_size, "negative_original_size"),
                    checks.pair(negative_crops_coords_top_left or (0, 0), "negative_crops_coords_top_left"),
                    checks.pair(negative_target_size, "negative_target_size"))
    else:
        negative = (original, crops, target)
    return MicroConditioning(original, crops, target, *negative)


def tokenize(tokenizer: Any, tokenizer_2: Any, length: int, texts_1: list[str], texts_2: list[str]):
    """Ids of each text list for its tokeniser, padded/truncated to `length`, and the tokens each text lost.

    Without a first tokenizer (the refiner) its ids are None and its dropped counts the second's.
    """
    ids, dropped = [], []
    for one, texts in ((tokenizer, texts_1), (tokenizer_2, texts_2)):
        if one is None:
            ids.append(None)
            dropped.append(None)
            continue
        ids.append(one(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids)
        full = one(texts, verbose=False).input_ids
        dropped.append([max(0, len(f) - length) for f in full])
    return ids[0], ids[1], dropped[1] if dropped[0] is None else dropped[0], dropped[1]


def warn_truncation(offset: int, length: int, prompts, prompts_2, negatives, negatives_2, dropped) -> None:
    """A warning for each text of prompts `offset`, `offset` + 1, ... that lost tokens beyond
    `length`; `dropped`: the two encoders' lost-token counts per row, rows interleaved (neg, pos)."""
    dropped_1, dropped_2 = dropped
    for i in range(len(prompts)):
        rows = (
            (negatives[i] or "", negatives_2[i], 2 * i, "negative prompt"),
            (prompts[i], prompts_2[i], 2 * i + 1, "prompt"),
        )
        for text_1, text_2, row, kind in rows:
            # One warning when both encoders read the same text, else one per encoder's text.
            if text_1 == text_2:
                texts = ((text_1, max(dropped_1[row], dropped_2[row]), kind),)
            else:
                texts = ((text_1, dropped_1[row], kind), (text_2, dropped_2[row], f"{kind} 2"))
            for text, lost, name in texts:
                if lost > 0:
                    logger.warning(
                        "%s %d is longer than CLIP's %d tokens: the last %d token(s) were dropped (%.60r...)",
                        name, offset + i, length, lost, text,
                    )
