"""What one batch hands the device graphs, on the host, typed by how its latents start, and the
host-side work on a call's texts and sizes that goes into it: prompts read, tokenised and laid out in
chunks (sdxl_common.prompt_weights), SDXL's micro-conditioning.

`Pipeline._host_batch` builds one `Batch`; `Pipeline.run_batch` moves its tensors to the device
and runs the graphs its `start` kind calls for. Conditioning rows are interleaved (negative,
positive) per image, as the denoising step's doubled UNet batch reads them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from sdxl_common import prompt_weights
from xla_infer import checks
from xla_infer.checks import InputError, Size

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner's conditioning, diffusers' defaults


@dataclass(frozen=True)
class TextInput:
    """One text encoder's input for 2 x batch rows: each row's token ids in the pipeline's chunks;
    with prompt weighting, each token's weight; with compel's, the extra passes for its weights
    below 1 (`prompt_weights.Downweights` of each row, stacked)."""

    ids: torch.Tensor  # (rows, chunks * length) int64
    weights: torch.Tensor | None = None  # (rows, chunks * length) float32
    pass_ids: torch.Tensor | None = None  # (rows, passes * length) int64
    pass_weights: torch.Tensor | None = None  # (rows, passes * length) float32
    pass_mask: torch.Tensor | None = None  # (rows, passes * length) int64
    pass_mix: torch.Tensor | None = None  # (rows, chunks, passes) float32

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TextInput":
        """The same input with ``fn`` applied to each tensor (moving it to the device)."""
        return TextInput(**{field.name: None if getattr(self, field.name) is None else fn(getattr(self, field.name))
                            for field in dataclasses.fields(self)})


@dataclass(frozen=True)
class Conditioning:
    """The text encoders' inputs and SDXL's micro-conditioning for 2 x batch rows."""

    text_1: TextInput | None  # the first text encoder's; None for a model without it (the refiner)
    text_2: TextInput
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


def text_input(tokenizer: Any, texts: list[str], chunks: int, length: int, weighting: str | None) -> TextInput:
    """One text encoder's input for ``texts`` (the rows), as `prompt_weights.text_arrays` lays them out."""
    arrays = prompt_weights.text_arrays(tokenizer, texts, chunks, length, weighting)
    return TextInput(**{name: torch.from_numpy(array) for name, array in arrays.items()})
