"""What xla_infer checks of its input before it loads or compiles anything: each check refuses
bad input in one line that names the value (an `InputError`, which the command line prints
without a traceback)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sdxl_common import buckets, prompt_weights
from sdxl_common.errors import BadInput

Size = tuple[int, int]

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
}


class InputError(BadInput):
    """Bad user input: a missing model folder or component, an impossible size, a bad prompt list..."""


class SizeError(InputError):
    """A height or width the pipeline cannot generate (the CLI names the input image it came from)."""


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """torch dtype from "bf16" / "fp32" / "fp16" (or a torch.dtype)."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise InputError(f"unsupported dtype {value}; use bf16, fp32 or fp16")
        return value
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise InputError(f"unknown dtype {value!r}; use bf16 or fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def absent_components(index: dict[str, Any]) -> set[str]:
    """Components model_index.json declares absent ([null, null]): the refiner's first text encoder and tokenizer."""
    return {name for name in ("text_encoder", "tokenizer")
            if isinstance(index.get(name), list) and index[name] and index[name][0] is None}


def check_local_folder(folder: Path, absent: set[str] = frozenset()) -> None:
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist (or is not a folder)")
    needed = [name for name in COMPONENTS if name not in absent]
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        raise InputError(
            f"model folder {folder} is not a complete SDXL diffusers folder: missing {', '.join(missing)} "
            f"(needs {', '.join(needed)})"
        )
    for name, config in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                         ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json")):
        if name not in absent and not (folder / name / config).is_file():
            raise InputError(f"model folder {folder}: {name}/{config} is missing")


def first_step(steps: int, strength: float) -> int:
    """The first of `steps` steps that image-to-image runs for `strength`, as diffusers' img2img
    `get_timesteps` (without denoising_start): the last int(steps * strength) steps run."""
    # 0 passes here, to be refused below with the number of steps it would need.
    strength = number(strength, "strength", "in (0, 1]", lambda v: 0.0 <= v <= 1.0)
    # The samplers here are all of order 1 (one UNet call per step): no `* scheduler.order`.
    init_steps = min(int(steps * strength), steps)
    start = max(steps - init_steps, 0)
    if start == steps:  # diffusers would fail on the empty schedule
        raise InputError(f"strength {strength} of {steps} steps runs no denoising step; use at least {1 / steps:.4g}")
    return start


def number(value: Any, name: str, allowed: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float, refused in one line naming ``name`` and the ``allowed`` range unless ``ok``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not ok(number):
        raise InputError(f"{name} must be {allowed}, got {repr(value) if number is None else number}")
    return number


def check_fraction(value: Any) -> float:
    # diffusers ignores values outside (0, 1); refusing says so.
    return number(value, "the high-noise fraction (denoising_end)", "in (0, 1)", lambda v: 0.0 < v < 1.0)


def blur_radius(value: Any) -> float:
    return number(value, "mask_blur", "a positive number", lambda v: v > 0)


def lora_pair(item: Any) -> tuple[Any, Any]:
    try:
        location, scale = item
    except (TypeError, ValueError):
        raise InputError(f"a LoRA is a path or a (path, scale) pair, got {item!r}") from None
    return location, scale


def pair(value: Any, name: str) -> Size:
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a pair of integers, got {value!r}") from None


def check_sdxl_shapes(unet, text_encoder, text_encoder_2, time_ids: int = 6) -> None:
    cfg = unet.config
    if cfg.addition_embed_type != "text_time":
        raise InputError(f"the UNet is not SDXL-style (addition_embed_type={cfg.addition_embed_type!r})")
    hidden = (0 if text_encoder is None else text_encoder.config.hidden_size) + text_encoder_2.config.hidden_size
    if cfg.cross_attention_dim != hidden:
        raise InputError(f"UNet cross_attention_dim {cfg.cross_attention_dim} != text hidden sizes summed {hidden}")
    expected = unet.add_embedding.linear_1.in_features
    passed = cfg.addition_time_embed_dim * time_ids + text_encoder_2.config.projection_dim
    if expected != passed:
        hint = " (requires_aesthetics_score in model_index.json decides 5 or 6 time ids)"
        raise InputError(f"UNet expects {expected} added-embedding inputs, the text encoder and {time_ids} "
                         f"time ids give {passed}{hint}")
    if text_encoder is not None and \
            text_encoder.config.max_position_embeddings != text_encoder_2.config.max_position_embeddings:
        raise InputError("the two text encoders disagree on the token length")


def per_prompt(values, n: int, what: str) -> list:
    """One value per prompt from a single value (or None) for all, or a list of n."""
    if values is None or isinstance(values, str):
        return [values] * n
    values = list(values)
    if len(values) != n:
        raise InputError(f"{len(values)} {what} for {n} prompts")
    return values


def second_texts(values, firsts: list[str], what: str) -> list[str]:
    """The second text encoder's text per prompt, as diffusers' `prompt_2 = prompt_2 or prompt`.

    A single string (or None) falls back to the first text when empty; a list is kept as given
    (diffusers keeps "" entries of a list), except that entries of None fall back too.
    """
    if values is None or isinstance(values, str):
        return [values or first for first in firsts]
    values = per_prompt(values, len(firsts), what)
    if not all(v is None or isinstance(v, str) for v in values):
        raise InputError(f"{what} must be strings")
    return [first if v is None else v for v, first in zip(values, firsts)]


def prompt_texts(prompts, negative_prompts, prompt_2, negative_prompt_2) -> tuple[list, list, list, list]:
    """(prompts, negatives, second prompts, second negatives), one of each per prompt; a negative
    of None stays None (SDXL's zeroed negative conditioning). As diffusers: `prompt_2 or prompt`,
    `negative_prompt_2 or (negative_prompt or "")`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("no prompts given")
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be strings")
    negatives = per_prompt(negative_prompts, len(prompts), "negative prompts")
    prompts_2 = second_texts(prompt_2, prompts, "prompt_2")
    negatives_2 = second_texts(negative_prompt_2, [neg or "" for neg in negatives], "negative_prompt_2")
    return prompts, negatives, prompts_2, negatives_2


def seed_list(seeds: int | Sequence[int] | None, n: int, draw: Callable[[], int]) -> list[int]:
    """One seed per prompt: as given, or s, s+1, ... from an int s, or from ``draw()`` when absent."""
    if seeds is None or isinstance(seeds, int):
        first = draw() if seeds is None else seeds
        return [first + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise InputError(f"{len(seeds)} seeds for {n} prompts")
    return seeds


def check_steps(steps: Any) -> int:
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    return steps


def text_chunks(value: Any) -> int:
    """``max_text_chunks``: a positive number of 77-token chunks."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"max_text_chunks must be a positive integer, got {value!r}")
    return value


def prompt_weighting(value: Any) -> str | None:
    """``prompt_weighting``: None (prompts as written) or one of the weighting syntaxes."""
    if value is not None and value not in prompt_weights.SYNTAXES:
        raise InputError(f"prompt_weighting must be None or one of {', '.join(prompt_weights.SYNTAXES)}, got {value!r}")
    return value


def check_size(name: str, value: int, factor: int) -> None:
    """A height or width must be a positive multiple of the VAE's downsampling factor."""
    if value <= 0 or value % factor:
        raise SizeError(f"{name} {value} is not a positive multiple of the VAE factor {factor}")


def image_sizes(sizes: Sequence[Size] | str | None, height: int | None, width: int | None, native: int,
                factor: int) -> tuple[Size, ...]:
    """The (height, width) sizes a pipeline serves, its default first: `height` x `width` when
    either is given (the other the UNet's `native` side), else the first of `sizes`, else the
    native square; then the rest of `sizes` ("sdxl": SDXL's 40 aspect-ratio buckets,
    sdxl_common/buckets.py). Each side a multiple of the VAE's `factor`."""
    if isinstance(sizes, str):
        if sizes != "sdxl":
            raise InputError(f"sizes must be a list of (height, width) or 'sdxl', got {sizes!r}")
        sizes = buckets.SDXL_BUCKETS
    listed = [(int(h), int(w)) for h, w in (sizes or ())]
    given = height is not None or width is not None
    default = (int(height or native), int(width or native)) if given or not listed else listed[0]
    out = tuple(dict.fromkeys([default, *listed]))
    for h, w in out:
        check_size("height", h, factor)
        check_size("width", w, factor)
    return out
