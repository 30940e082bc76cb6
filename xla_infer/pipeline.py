"""Fixed-shape SDXL generation on an XLA device, and on plain torch for comparison.

The diffusers / transformers torch modules do the network work; `Pipeline` owns the loop around
them. PyTorch/XLA reuses a compiled graph only for the same operations on the same shapes and
constants, and diffusers' pipelines change those with the step (a Python step counter, `nonzero()`)
and the prompt (its length, an absent negative prompt); the loop here is built so that an XLA device
compiles three graphs once (four with image-to-image) and reuses them for every later call of the
same batch size and image size (the graph bodies are in xla_infer/graphs.py):

- text encode: both tokenisers always lay a prompt out in the pipeline's `max_text_chunks` chunks
  of 77 tokens (padded with empty chunks, or cut), prompt weights enter as per-token data, and the
  negative prompt is always encoded (empty string when absent, zeroed by a per-row mask where SDXL's
  `force_zeros_for_empty_prompt` asks for zeros), so prompts never change the graph;
- denoise step: one UNet call on the doubled batch (negative and positive rows interleaved, so
  data-parallel sharding keeps each image's pair on one chip), guidance scale a device tensor, the
  sampler arithmetic read from device tables with a device step counter (xla_infer.schedulers):
  the same graph at every step, with nothing read back to the host;
- decode: the VAE in the dtype its config calls for, scaled to [0, 1] on the device;
- image encode (image-to-image only, compiled on its first use): the VAE encoder, its posterior
  sampled with host-drawn noise, and the scheduler's add_noise at the start step. The strength
  only moves the device step counter's starting value: the step graph is the same;
- inpainting (compiled on its first use): the VAE encode of the image (and, for a 9-channel
  inpainting UNet, of the masked image) with the mask brought to latent size; with a 4-channel UNet
  a small blend graph after each step puts back the image outside the mask, as diffusers does;
- base + refiner: a second set of graphs for the refiner model, on the same device; the switch
  point is the number of base steps run and the refiner's first step, both host loop bounds.

Everything that varies between calls (token ids and weights, masks, micro-conditioning, guidance,
seeds' noise) enters as device data, never as a constant baked into a graph. A compile counter
(torch_xla's CompileTime metric) guards the promise: after warm-up, a new compilation raises
`RecompilationError` (or warns, with on_recompile="warn").

This file is the orchestration; the rest of xla_infer is its parts: runtime.py (device, SPMD,
compilation cache, graph wrapper, compile counter), graphs.py (the graph bodies), schedulers.py
(the samplers on the device), batches.py (one batch's host inputs: tokens, micro-conditioning),
images.py (input images and masks, output PIL images), lora.py (LoRA merging) and checks.py
(input checks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

# These import neither JAX nor the trainer.
from sdxl_common import buckets, model_source, prompt_weights, sdxl, storage
from sdxl_common.errors import RunFailure, UserError
from xla_infer import checks, graphs
from xla_infer.batches import (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, Batch, Conditioning, Continued, FromImage,
                               FromNoise, Inpaint, MicroConditioning, TextInput, micro_conditioning,
                               text_input)
from xla_infer.checks import InputError, Size
from xla_infer.images import fetch, image_array, mask_array, per_image, to_pil
from xla_infer.lora import MergedLoras
from xla_infer.runtime import DEVICES, Runtime
from xla_infer.schedulers import UnsupportedScheduler, canonical_name, draw_streams, make_sampler

logger = logging.getLogger("xla_infer")

DEFAULT_STRENGTH = 0.3  # image-to-image, as diffusers' StableDiffusionXLImg2ImgPipeline
DEFAULT_INPAINT_STRENGTH = 0.9999  # as StableDiffusionXLInpaintPipeline (it skips the first step)
DEFAULT_GUIDANCE, DEFAULT_INPAINT_GUIDANCE = 5.0, 7.5  # as diffusers' SDXL pipelines
DEFAULT_HIGH_NOISE_FRAC = 0.8  # base + refiner: the fraction the base denoises (diffusers' SDXL docs)


class RecompilationError(RuntimeError):
    """An XLA compilation happened after warm-up, where the fixed-shape design promises none."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What one call asks for, checked (``Pipeline._job``): its images and masks for image-to-image
    and inpainting, the step its denoising starts from, and the base + refiner switch."""

    images: list[np.ndarray] | None = None  # image-to-image and inpainting: one per prompt
    masks: list[np.ndarray] | None = None  # inpainting: one per prompt
    mask_blur: float | None = None
    strength: float | None = None
    start: int = 0  # the first of the steps that runs
    full: bool = False  # strength 1: from pure noise, as diffusers' is_strength_max
    switch: tuple[int, int] | None = None  # base + refiner: base steps run, the refiner's first step
    refiner_fraction: float | None = None
    aesthetic_scores: tuple[float, float] = (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE)

    @property
    def modes(self) -> dict[str, bool]:
        """The graphs beyond text-to-image's that the job needs (``Pipeline.warmup``'s arguments)."""
        return dict(image=self.images is not None and self.masks is None, mask=self.masks is not None,
                    refiner=self.switch is not None)

    def steps_run(self, steps: int) -> int:
        return steps - self.start if self.switch is None else self.switch[0] + steps - self.switch[1]

    def parameters(self, steps: int, refiner: str | None) -> dict[str, Any]:
        """What an image's PNG records of the mode, beside the settings every image has."""
        params: dict[str, Any] = {}
        if self.images is not None:
            params.update(strength=self.strength, denoising_steps=steps - self.start)
        if self.masks is not None:
            params.update(inpainting=True, mask_blur=self.mask_blur)
        if self.switch is not None:
            params.update(refiner=refiner, high_noise_frac=self.refiner_fraction, base_steps=self.switch[0],
                          refiner_steps=steps - self.switch[1], aesthetic_score=self.aesthetic_scores[0],
                          negative_aesthetic_score=self.aesthetic_scores[1])
        return params


class Pipeline:
    """SDXL text-to-image, image-to-image, inpainting and base + refiner with graphs compiled once
    per (batch size, image size, steps, scheduler); one pipeline may serve several image sizes.

    Build with `Pipeline.from_pretrained(folder_or_hub_id, device="xla", ...)`, then call it with
    prompts; the first call (or `warmup()`) compiles.
    """

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module | None,
        text_encoder_2: torch.nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler_config: dict[str, Any],
        force_zeros_for_empty_prompt: bool = True,
        requires_aesthetics_score: bool = False,
        refiner: "Pipeline | None" = None,
        device: str = "xla",
        dtype: str | torch.dtype = "bf16",
        vae_dtype: str | torch.dtype | None = None,
        batch_size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        sizes: Sequence[Size] | str | None = None,
        steps: int = 30,
        scheduler: str | None = None,
        torch_compile: bool = False,
        data_parallel: bool | None = None,
        cache_dir: str | Path | None = None,
        on_recompile: str = "raise",
        model_name: str = "",
        loras: Sequence[tuple[str | Path, float]] | None = None,
        max_text_chunks: int = 1,
        prompt_weighting: str | None = None,
    ):
        if device not in DEVICES:
            raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        if on_recompile not in ("raise", "warn"):
            raise InputError("on_recompile must be 'raise' or 'warn'")
        self.device_kind = device
        self.model_name = model_name
        self.dtype = checks.parse_dtype(dtype)
        self.vae_scale_factor = sdxl.vae_scale_factor(vae.config)
        self.vae_dtype = checks.parse_dtype(vae_dtype) if vae_dtype is not None else _vae_dtype_for(self.dtype, vae.config)
        # Every image size this pipeline serves, (height, width); the first is a call's default.
        self.sizes = checks.image_sizes(sizes, height, width, unet.config.sample_size * self.vae_scale_factor,
                                        self.vae_scale_factor)
        self.height, self.width = self.sizes[0]
        self.steps = checks.check_steps(steps)
        self.text_length = int(text_encoder_2.config.max_position_embeddings)
        self.text_chunks = checks.text_chunks(max_text_chunks)
        self.prompt_weighting = checks.prompt_weighting(prompt_weighting)
        # The refiner's layout: no first text encoder, aesthetic scores in the time ids.
        if (text_encoder is None) != (tokenizer is None):
            raise InputError("a model without its first text encoder must have no first tokenizer either")
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        checks.check_sdxl_shapes(unet, text_encoder, text_encoder_2, 5 if self.requires_aesthetics_score else 6)
        self.inpainting_unet = unet.config.in_channels == 9  # latents + mask + masked-image latents
        latent_channels = int(getattr(vae.config, "latent_channels", 4))
        if unet.config.in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise InputError(f"the UNet takes {unet.config.in_channels} input channels: neither the VAE's "
                             f"{latent_channels} latent channels nor an inpainting UNet's {2 * latent_channels + 1}")

        scheduler_name = scheduler or scheduler_config.get("_class_name", "euler")
        try:
            self.scheduler_name = canonical_name(scheduler_name)
            self.sampler = make_sampler(self.scheduler_name, scheduler_config, steps)
        except UnsupportedScheduler as err:
            raise InputError(str(err)) from None

        self.runtime = Runtime(device, cache_dir=cache_dir, data_parallel=data_parallel, torch_compile=torch_compile)
        self.device, self.mesh, self.num_devices = self.runtime.device, self.runtime.mesh, self.runtime.num_devices
        self.batch_size = int(batch_size or self.num_devices)
        if self.batch_size <= 0:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        if self.batch_size % self.num_devices:
            raise InputError(
                f"batch size {self.batch_size} must be a multiple of the {self.num_devices} devices it is sharded over"
            )

        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.unet = _prepare_module(unet, self.device, self.dtype)
        self.text_encoder = None if text_encoder is None else _prepare_module(text_encoder, self.device, self.dtype)
        self.text_encoder_2 = _prepare_module(text_encoder_2, self.device, self.dtype)
        self.vae = _prepare_module(vae, self.device, self.vae_dtype)
        self.sampler.to(self.device)
        self.latent_shape = (latent_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)
        if refiner is not None:
            if self.inpainting_unet or self.requires_aesthetics_score:
                raise InputError("a refiner follows a base text-to-image model, not an inpainting model or a refiner")
            settings = ("device_kind", "batch_size", "sizes", "steps", "latent_shape")
            differing = [name for name in settings if getattr(refiner, name) != getattr(self, name)]
            if differing:
                raise InputError(f"the refiner's {', '.join(differing)} differ from the base model's")
        self.refiner = refiner

        self.on_recompile = on_recompile
        self.torch_compile = torch_compile
        # The graph bodies (xla_infer/graphs.py) with this model's modules and settings bound; the
        # text encoder's serves every size, the others are bound per size (`_bind_graphs`).
        self._encode_text = partial(graphs.encode_text, self.text_encoder, self.text_encoder_2,
                                    chunks=self.text_chunks, weighting=self.prompt_weighting,
                                    empty_ids=self._empty_ids() if self.prompt_weighting == "compel" else (None, None))
        self._encode_graph = self.runtime.graph(self._encode_text, "sdxl_text_encode")
        self._graphs: dict[Size, dict[str, Callable]] = {}
        self._bind_graphs(self.sizes[0])
        # Process-wide: the refiner's compilations count here too (building either compiles nothing).
        self._compiles_at_start = self.runtime.compilations()
        # The parts of `warmup` run so far: "generation" (text encode, denoising step, decode: the
        # first warm-up), then "image", "mask" and "refiner" on their modes' first use.
        self._warmed: dict[Size, set[str]] = {size: set() for size in self.sizes}  # the graphs compiled, per size
        self.warmup_seconds: float | None = None
        self.compile_seconds: float | None = None
        self.last_call: dict[str, float] = {}
        self.merged_loras = MergedLoras(
            {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}, self.runtime)
        if loras:
            self.set_loras(loras)

    def _empty_ids(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each tokenizer's empty prompt, (1, length) on the device, which compel's weights blend from."""
        def empty(tokenizer):
            ids = prompt_weights.chunk([], tokenizer, 1, self.text_length).ids
            return self.runtime.to_device(torch.from_numpy(ids), batch_dim=None)

        return None if self.tokenizer is None else empty(self.tokenizer), empty(self.tokenizer_2)

    def _bind_graphs(self, size: Size) -> None:
        """Makes the denoise-step, decode and encode graphs those of ``size``, built at its first use:
        torch_xla lets each wrapped function trace one graph, so every size has wrappers of its own."""
        if size not in self._graphs:
            graph = self.runtime.graph
            suffix = "" if size == self.sizes[0] else f"_{buckets.size_text(size)}"
            latent_size = (size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)
            init_sigma = self.sampler.init_noise_sigma.reshape(1).to(self.device)
            self._graphs[size] = {
                "_step_graph": graph(partial(graphs.denoise_step, self.unet, self.sampler, self.dtype),
                                     "sdxl_denoise_step" + suffix),
                "_decode_graph": graph(partial(graphs.decode, self.vae, self.vae_dtype), "sdxl_vae_decode" + suffix),
                "_image_graph": graph(partial(graphs.encode_image, self.vae, self.vae_dtype, self.sampler),
                                      "sdxl_vae_encode" + suffix),
                "_inpaint_graph": graph(partial(graphs.encode_inpaint, self.vae, self.vae_dtype, self.sampler, init_sigma,
                                                latent_size, self.inpainting_unet), "sdxl_vae_encode_inpaint" + suffix),
                "_blend_graph": graph(partial(graphs.blend, self.sampler), "sdxl_inpaint_blend" + suffix),
            }
        for name, fn in self._graphs[size].items():
            setattr(self, name, fn)

    @property
    def warmed_up(self) -> set[str]:
        """The warm-up parts run at the current size: "generation", "image", "mask", "refiner"."""
        return self._warmed[(self.height, self.width)]

    @contextlib.contextmanager
    def at_size(self, size: Size | None):
        """The pipeline (and its refiner) at ``size``, one of ``sizes`` (None: the default), for
        what runs inside; each size has its own compiled graphs."""
        size = self.sizes[0] if size is None else (int(size[0]), int(size[1]))
        if size not in self.sizes:
            raise InputError(f"{buckets.size_text(size)} is not one of this pipeline's sizes "
                             f"({', '.join(map(buckets.size_text, self.sizes))}): load it with sizes=[...] to add it")
        saved = (self.height, self.width, self.latent_shape)
        self.height, self.width = size
        self.latent_shape = (saved[2][0], size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)
        self._bind_graphs(size)
        try:
            with self.refiner.at_size(size) if self.refiner is not None else contextlib.nullcontext():
                yield self
        finally:
            self.height, self.width, self.latent_shape = saved
            self._bind_graphs(saved[:2])

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: str = "xla",
        dtype: str | torch.dtype = "bf16",
        batch_size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        sizes: Sequence[Size] | str | None = None,
        steps: int = 30,
        scheduler: str | None = None,
        vae_dtype: str | torch.dtype | None = None,
        torch_compile: bool = False,
        data_parallel: bool | None = None,
        cache_dir: str | Path | None = None,
        on_recompile: str = "raise",
        variant: str | None = None,
        revision: str | None = None,
        refiner: str | Path | None = None,
        loras: Sequence[tuple[str | Path, float]] | None = None,
        config: str | Path | None = None,
        max_text_chunks: int = 1,
        prompt_weighting: str | None = None,
    ) -> "Pipeline":
        """Load an SDXL diffusers folder, Hub id or gs:// folder and prepare it on `device`.

        `model` may also be a single-file checkpoint (a path or URL ending in .safetensors, such as
        sd_xl_base_1.0.safetensors), converted once into a cached diffusers folder with the configs
        of the pipeline `config` (folder or Hub id), or else the shipped SDXL base or refiner ones.

        A Hub id or URL is fetched as the trainer fetches it (sdxl_common.model_source): the files
        the pipeline loads, at `revision` (Hub branch, tag or commit), with the `variant` ("fp16")
        weights. Weights are read from .safetensors only. `scheduler` is one of euler, euler_a,
        ddim, dpmpp_2m (default: the folder's own scheduler), configured from the folder's
        scheduler config.

        `refiner` (a refiner folder or Hub id, e.g. stabilityai/stable-diffusion-xl-refiner-1.0) is
        loaded with the same settings and kept on the device next to the base: text-to-image calls
        then run the base for the high-noise steps and the refiner for the rest. A folder whose
        model_index.json declares no first text encoder (the refiner's layout) loads without one.

        `loras`: (LoRA file or folder, scale) pairs merged into the base model's weights (see
        `set_loras`); the refiner is left as it is.

        `max_text_chunks`: the chunks of 75 tokens each prompt is laid out in (1: CLIP's 77 tokens;
        2 or 3 for 150 / 225), the same for every prompt and negative prompt: shorter ones are
        padded with empty chunks, longer ones cut with a warning. `prompt_weighting`: None (prompts
        as written), "a1111" or "compel" (each tool's syntax and weighting, see
        sdxl_common.prompt_weights). Neither changes a graph from one prompt to the next.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        torch_dtype = checks.parse_dtype(dtype)
        checks.check_steps(steps)
        checks.text_chunks(max_text_chunks)
        checks.prompt_weighting(prompt_weighting)
        if scheduler is not None:
            try:
                canonical_name(scheduler)
            except UnsupportedScheduler as err:
                raise InputError(str(err)) from None
        try:
            folder = model_source.local_folder(model, revision=revision, variant=variant, config=config)
        except (UserError, RunFailure):  # already say which model and what went wrong
            raise
        except (OSError, ValueError) as err:
            raise InputError(f"could not fetch the model {model}: {err}") from None
        index = storage.read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
        absent = checks.absent_components(index)
        checks.check_local_folder(folder, absent)
        source = str(folder)
        # A Hub id or URL names the model better than the cache folder it was fetched to.
        fetched = storage.is_remote(model) or model_source.is_hub_id(model) or str(model).endswith(".safetensors")

        def load(what: str, fn, **kwargs):
            try:
                return fn(source, subfolder=what, **kwargs)
            except (OSError, ValueError) as err:
                raise InputError(f"could not load {what} from {source}: {err}") from None

        scheduler_config = _read_scheduler_config(source)
        vae_config = load("vae", AutoencoderKL.load_config)
        factor = sdxl.vae_scale_factor(vae_config)
        # Fail before loading any weights (the native size is not known yet: the factor stands in).
        checks.image_sizes(sizes, height, width, factor, factor)
        vae_torch_dtype = checks.parse_dtype(vae_dtype) if vae_dtype is not None else _vae_dtype_for(torch_dtype, vae_config)
        weights = dict(use_safetensors=True, variant=variant)
        unet = load("unet", UNet2DConditionModel.from_pretrained, torch_dtype=torch_dtype, **weights)
        sizes = checks.image_sizes(sizes, height, width, unet.config.sample_size * factor, factor)
        refiner_pipe = None
        if refiner is not None:
            # The same settings and sizes (the base UNet's by default), so both run on one latent shape.
            refiner_pipe = cls.from_pretrained(
                refiner, device=device, dtype=torch_dtype, batch_size=batch_size, height=sizes[0][0],
                width=sizes[0][1], sizes=sizes, steps=steps, scheduler=scheduler, vae_dtype=vae_dtype,
                torch_compile=torch_compile, data_parallel=data_parallel, on_recompile=on_recompile, variant=variant,
                max_text_chunks=max_text_chunks, prompt_weighting=prompt_weighting,
            )
        return cls(
            unet=unet,
            vae=load("vae", AutoencoderKL.from_pretrained, torch_dtype=vae_torch_dtype, **weights),
            text_encoder=None if "text_encoder" in absent else load(
                "text_encoder", CLIPTextModel.from_pretrained, dtype=torch_dtype, **weights),
            text_encoder_2=load("text_encoder_2", CLIPTextModelWithProjection.from_pretrained, dtype=torch_dtype,
                                **weights),
            tokenizer=None if "tokenizer" in absent else load("tokenizer", CLIPTokenizer.from_pretrained),
            tokenizer_2=load("tokenizer_2", CLIPTokenizer.from_pretrained),
            scheduler_config=scheduler_config,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
            requires_aesthetics_score=index.get("requires_aesthetics_score", False),
            refiner=refiner_pipe,
            device=device, dtype=torch_dtype, vae_dtype=vae_torch_dtype, batch_size=batch_size,
            height=height, width=width, sizes=sizes, steps=steps, scheduler=scheduler, torch_compile=torch_compile,
            data_parallel=data_parallel, cache_dir=cache_dir, on_recompile=on_recompile,
            model_name=str(model) if fetched else source, loras=loras, max_text_chunks=max_text_chunks,
            prompt_weighting=prompt_weighting,
        )

    # ------------------------------------------------------------------ LoRA

    def set_loras(self, loras: Sequence[tuple[str | Path, float] | str | Path]) -> None:
        """Merge these LoRAs into the base model's weights, in place of those merged before.

        `loras`: (file or folder, scale) pairs, or bare paths (scale 1); a folder holds
        pytorch_lora_weights.safetensors; local or gs://. Formats: those `sdxl_common.lora_files`
        reads (diffusers / peft keys, alpha from the metadata or `.alpha` tensors; kohya keys). Each
        targeted Linear / Conv2d weight becomes ``base + sum_i scale_i * alpha_i / rank_i * up_i @
        down_i``, computed on the device outside the generation graphs, which then read the new
        weights as the same device inputs: nothing recompiles. The base weight of every module a
        LoRA touched is kept on the device, so `set_loras([])` gives back the loaded weights
        exactly. The refiner is not changed. Every file is read and checked against the model
        before any weight changes; a key the model has no Linear / Conv2d of that shape for is an
        InputError naming it.
        """
        self.merged_loras.set(loras)

    @property
    def loras(self) -> list[tuple[str, float]]:
        """The LoRAs merged into the weights, with their scales."""
        return self.merged_loras.loras

    @property
    def lora_compile_count(self) -> int:
        """Compilations of the merges' own small graphs (set_loras), not counted in compile_count."""
        return self.merged_loras.compile_count

    # ------------------------------------------------------------------ compile accounting

    @property
    def compile_count(self) -> int:
        """Compilations in this process since the pipeline was built (XLA graphs, or torch.compile graphs)."""
        return self.runtime.compilations() - self._compiles_at_start - self.lora_compile_count

    @property
    def cache_status(self) -> str:
        """What became of the persistent compilation cache asked for (see Runtime)."""
        return self.runtime.cache_status

    @property
    def persistent_cache_hits(self) -> int:
        return self.runtime.persistent_cache_hits

    def _guard(self, compiles_before: int, what: str) -> None:
        new = self.compile_count - compiles_before
        if new <= 0:
            return
        message = (
            f"{new} unexpected compilation(s) during {what} after warm-up: some input changed a graph "
            f"(pipeline batch size {self.batch_size}, {self.width}x{self.height}, {self.steps} steps)"
        )
        if self.on_recompile == "raise":
            raise RecompilationError(message)
        logger.warning(message)

    # ------------------------------------------------------------------ host-side preparation

    def host_conditioning(self, prompts, prompts_2, negatives, negatives_2, guidance_scale,
                          micro: MicroConditioning) -> Conditioning:
        """One batch's conditioning for this model, rows interleaved (neg, pos). A base pipeline asks
        its refiner for the refiner's own."""
        texts_1, texts_2, keep = [], [], []
        for prompt, prompt_2, negative, negative_2 in zip(prompts, prompts_2, negatives, negatives_2):
            texts_1 += [negative or "", prompt]
            texts_2 += [negative_2, prompt_2]
            zero_negative = negative is None and self.force_zeros_for_empty_prompt
            keep += [0.0 if zero_negative else 1.0, 1.0]
        text_1, text_2 = self._text_inputs(texts_1, texts_2)
        negative_row, positive_row = micro.rows()
        time_ids = torch.tensor([negative_row, positive_row] * len(prompts), dtype=self.dtype)
        # guidance <= 1 means no guidance in diffusers (the positive prediction alone); scale 1 gives that.
        scale = guidance_scale if guidance_scale > 1 else 1.0
        guidance = torch.full((len(prompts), 1, 1, 1), float(scale), dtype=torch.float32)
        return Conditioning(text_1, text_2, torch.tensor(keep), time_ids, guidance)

    def _text_inputs(self, texts_1: list[str], texts_2: list[str]) -> tuple[TextInput | None, TextInput]:
        """Each encoder's input for these rows, laid out and weighted as the pipeline is set up."""
        layout = (self.text_chunks, self.text_length, self.prompt_weighting)
        return (None if self.tokenizer is None else text_input(self.tokenizer, texts_1, *layout),
                text_input(self.tokenizer_2, texts_2, *layout))

    def text_embeddings(self, texts: Sequence[str], texts_2: Sequence[str] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each text's (prompt_embeds (n, max_text_chunks * 77, dims), pooled_prompt_embeds (n, dims))
        as this pipeline hands them to the UNet, chunked and weighted as it is set up: diffusers'
        encode_prompt for a positive prompt. ``texts_2``: the second encoder's (default: ``texts``).
        For inspection and tests: it runs the text-encode graph's body outside its compiled graph
        (on an XLA device, compiling graphs of its own that count in `compile_count`)."""
        texts = list(texts)
        text_1, text_2 = self._text_inputs(texts, texts if texts_2 is None else list(texts_2))
        move = self.runtime.to_device
        embeds, pooled = self._encode_text(None if text_1 is None else text_1.map(move), text_2.map(move),
                                           move(torch.ones(len(texts))))
        return embeds.cpu(), pooled.cpu()

    def _host_batch(self, prompts, prompts_2, negatives, negatives_2, seeds, guidance_scale,
                    micro: MicroConditioning, images: list[np.ndarray] | None = None, start: int = 0,
                    masks: list[np.ndarray] | None = None, full: bool = False, refiner=None):
        """The host side of one batch of exactly `batch_size` rows (see xla_infer.batches).

        `prompts_2` / `negatives_2` are the texts of the second text encoder, already resolved;
        `negatives` entries of None mark SDXL's zeroed negatives. With `images`, the batch starts
        from them at step `start` (image-to-image), and with `masks` too it inpaints (`full`:
        strength 1). `refiner` = (stop, refiner_start, refiner_micro): the base runs steps
        [0, stop), the refiner [refiner_start, steps).
        """
        conditioning = self.host_conditioning(prompts, prompts_2, negatives, negatives_2, guidance_scale, micro)
        step_noise = self.sampler.needs_step_noise
        stop, refiner_batch = self.steps, None
        segments = [(start, self.steps)] if step_noise else []
        if masks is not None:
            # Each generator's draws in diffusers' order: the image's posterior sample (not drawn when a
            # 9-channel UNet starts from pure noise), the noise, the masked image's posterior sample
            # (drawn even for a 4-channel UNet, which never reads it), then one per step run.
            skip_image = self.inpainting_unet and full
            firsts, noise = draw_streams(seeds, self.latent_shape, self.steps, 2 if skip_image else 3, segments)
            if skip_image:
                firsts.insert(0, torch.zeros_like(firsts[0]))
            source = Inpaint(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))[:, None],
                             firsts[0], firsts[1], firsts[2], torch.tensor([bool(full)]))
        elif images is not None:
            firsts, noise = draw_streams(seeds, self.latent_shape, self.steps, 2, segments)
            source = FromImage(torch.from_numpy(np.stack(images)), firsts[0], firsts[1])
        elif refiner is None:
            firsts, noise = draw_streams(seeds, self.latent_shape, self.steps, 1, segments)
            source = FromNoise(firsts[0] * self.sampler.init_noise_sigma)
        else:
            stop, refiner_start, refiner_micro = refiner
            segments = [(0, stop)] if step_noise else []
            refiner_noise = self.refiner.sampler.needs_step_noise
            if refiner_noise:  # the refiner's step noise comes next from the same generators
                segments.append((refiner_start, self.steps))
            firsts, noise = draw_streams(seeds, self.latent_shape, self.steps, 1, segments)
            source = FromNoise(firsts[0] * self.sampler.init_noise_sigma)
            # diffusers' encode_prompt zips [prompt, prompt_2] with the refiner's single tokenizer, so
            # its (second) encoder reads the first prompt and negative prompt; prompt_2 is not used.
            refiner_conditioning = self.refiner.host_conditioning(
                prompts, prompts, negatives, [negative or "" for negative in negatives], guidance_scale,
                refiner_micro)
            refiner_batch = Batch(refiner_conditioning, Continued(), refiner_start, self.steps,
                                  noise.pop() if refiner_noise else None)
        return Batch(conditioning, source, start, stop, noise[0] if step_noise else None, refiner_batch)

    def switch_steps(self, fraction: float) -> tuple[int, int]:
        """Base + refiner: the steps the base runs (diffusers' denoising_end) and the refiner's first
        step (its denoising_start), from each model's own timesteps."""
        def cutoff(sampler) -> int:
            train_steps = sampler.reference.config.num_train_timesteps
            return int(round(train_steps - fraction * train_steps))

        stop = int((self.sampler.timesteps >= cutoff(self.sampler)).sum())
        refiner_sampler = self.refiner.sampler
        refiner_start = self.steps - int((refiner_sampler.timesteps < cutoff(refiner_sampler)).sum())
        if stop == 0 or refiner_start >= self.steps:
            model = "base" if stop == 0 else "refiner"
            raise InputError(f"a high-noise fraction of {fraction} leaves the {model} no step of {self.steps}")
        return stop, refiner_start

    # ------------------------------------------------------------------ generation

    def run_batch(self, batch: Batch, progress=None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Dispatch one batch; returns the device tensor of images (B, 3, H, W) in [0, 1].

        `latents`: the device latents a `Continued` batch starts from (the refiner after the base).
        """
        cond, start = batch.conditioning, batch.start
        move = self.runtime.to_device
        text_1 = None if cond.text_1 is None else cond.text_1.map(move)
        embeds, pooled = self._encode_graph(text_1, cond.text_2.map(move), move(cond.keep))
        time_ids = self.runtime.to_device(cond.time_ids)
        guidance = self.runtime.to_device(cond.guidance)
        noise = None if batch.noise is None else self.runtime.to_device(batch.noise, batch_dim=1)
        # The first and last steps are loop bounds and a device counter: image-to-image and inpainting
        # start the counter later, base + refiner stops the base early and starts the refiner late,
        # each on the same step graph, so no strength or switch point compiles anything.
        step = self.runtime.to_device(torch.tensor([batch.first_step], dtype=torch.long), batch_dim=None)
        inpaint = blend = None
        if isinstance(start, Inpaint):
            added_noise = self.runtime.to_device(start.added_noise)
            outputs = self._inpaint_graph(
                self.runtime.to_device(start.pixels), self.runtime.to_device(start.mask), self.runtime.to_device(start.posterior_noise),
                added_noise, self.runtime.to_device(start.masked_noise), step, self.runtime.to_device(start.full, batch_dim=None),
            )
            latents = outputs[0]
            if self.inpainting_unet:
                inpaint = outputs[1]
            else:
                blend = (outputs[2], outputs[1], added_noise)  # mask, image latents, their noise
        elif isinstance(start, FromImage):
            latents = self._image_graph(self.runtime.to_device(start.pixels), self.runtime.to_device(start.posterior_noise),
                                        self.runtime.to_device(start.added_noise), step)
        elif isinstance(start, FromNoise):
            latents = self.runtime.to_device(start.latents)
        elif latents is None:
            raise ValueError("a continued batch needs the latents it continues from")
        template = torch.zeros((cond.batch_size, *self.latent_shape))
        state = {k: self.runtime.to_device(v) for k, v in self.sampler.initial_state(template).items()}
        for _ in range(batch.stop - batch.first_step):
            latents, step, state = self._step_graph(latents, step, state, noise, embeds, pooled, time_ids, guidance,
                                                    inpaint)
            if blend is not None:
                latents = self._blend_graph(latents, step, *blend)
            if progress is not None:
                progress.update(1)
        if batch.refiner is not None:  # hand the latents over on the device, as diffusers' output_type="latent"
            return self.refiner.run_batch(batch.refiner, progress, latents=latents)
        return self._decode_graph(latents)

    def warmup(self, image: bool = False, mask: bool = False, refiner: bool = False,
               sizes: Sequence[Size] | None = None) -> float:
        """Compile the text-encode, denoise-step and decode graphs (one full batch); with `image` the
        image-to-image encode graph too, with `mask` the inpainting graphs, with `refiner` the
        refiner's (when the pipeline has one); at each of `sizes` (default: the default size; a
        call at another size compiles its graphs first). Returns the seconds this call took.

        A 9-channel inpainting UNet only inpaints: its first warm-up compiles the inpainting graphs.
        Graphs already compiled are not run again; `warmup_seconds` and `compile_seconds` add up
        every warm-up of the pipeline.
        """
        start, compile_start = time.perf_counter(), self.runtime.compile_seconds()
        for size in sizes or [None]:
            with self.at_size(size):
                self._warm_graphs(image, mask, refiner)
        seconds = time.perf_counter() - start
        self.warmup_seconds = (self.warmup_seconds or 0.0) + seconds
        if compile_start is not None:
            self.compile_seconds = (self.compile_seconds or 0.0) + self.runtime.compile_seconds() - compile_start
        logger.info("warm-up: %.1f s, %d compilation(s)", self.warmup_seconds, self.compile_count)
        return seconds

    def _warm_graphs(self, image: bool, mask: bool, refiner: bool) -> None:
        micro = micro_conditioning((self.height, self.width), self.requires_aesthetics_score)
        n = self.batch_size
        texts = ([""] * n, [""] * n, [None] * n, [""] * n, list(range(n)), 5.0, micro)
        blank = [np.zeros((self.height, self.width, 3), dtype=np.uint8)] * n
        blank_masks = [np.zeros((self.height, self.width), dtype=np.float32)] * n
        # Each later mode runs one step from the last step: only its own graphs are new.
        if "generation" not in self.warmed_up:
            if self.inpainting_unet:
                inpaint = self._host_batch(*texts, images=blank, masks=blank_masks, start=self.steps - 1)
                self.run_batch(inpaint).cpu()
                self.warmed_up.add("mask")
            else:
                self.run_batch(self._host_batch(*texts)).cpu()
            self.warmed_up.add("generation")
        if image and "image" not in self.warmed_up and not self.inpainting_unet:  # (that UNet only inpaints)
            self.run_batch(self._host_batch(*texts, images=blank, start=self.steps - 1)).cpu()
            self.warmed_up.add("image")
        if mask and "mask" not in self.warmed_up:
            self.run_batch(self._host_batch(*texts, images=blank, masks=blank_masks, start=self.steps - 1)).cpu()
            self.warmed_up.add("mask")
        if refiner and self.refiner is not None and "refiner" not in self.warmed_up:
            refiner_micro = micro_conditioning((self.refiner.height, self.refiner.width),
                                               self.refiner.requires_aesthetics_score, image_to_image=True)
            switch = (1, self.steps - 1, refiner_micro)  # one base step, then the refiner's last
            self.run_batch(self._host_batch(*texts, refiner=switch)).cpu()
            self.warmed_up.add("refiner")

    def __call__(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str | None] | None = None,
        seeds: int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        output_type: str = "pil",
        progress: bool = False,
        prompt_2: str | Sequence[str | None] | None = None,
        negative_prompt_2: str | Sequence[str | None] | None = None,
        image: Any = None,
        strength: float | None = None,
        on_image: Callable[[int, Any], None] | None = None,
        mask_image: Any = None,
        mask_blur: float | None = None,
        denoising_end: float | None = None,
        aesthetic_score: float = AESTHETIC_SCORE,
        negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
        size: Size | None = None,
    ):
        """Generate one image per prompt; returns PIL images (or an (N, H, W, 3) float array for "np").

        `seeds`: one per prompt, or an int s giving s, s+1, ...; absent, random seeds are drawn and
        recorded in each image's `info`. `guidance_scale` defaults to 5 (7.5 when inpainting, as
        diffusers). Prompts are run in batches of the pipeline's batch size,
        the last one padded. `negative_prompts` entries that are None give SDXL's zeroed negative
        conditioning; strings are encoded. The size arguments are SDXL's micro-conditioning, as in
        diffusers' StableDiffusionXLPipeline.

        `prompt_2` / `negative_prompt_2` go to the second text encoder (a string for every image, or
        one per image); as in diffusers, an absent one, an empty string, or a list entry of None
        gives it the first encoder's text. `image` (a PIL image or an (H, W, 3) uint8 array of the
        pipeline's size, or one per prompt) makes it image-to-image, as
        StableDiffusionXLImg2ImgPipeline: `strength` (default 0.3, as diffusers) in (0, 1] sets how
        many of the steps run, from the last; the micro-conditioning then follows that pipeline.

        `mask_image` too (a PIL image or an (H, W) uint8 or float array, one for all prompts or one
        per prompt; white = repaint) makes it inpainting, as StableDiffusionXLInpaintPipeline: the
        mask is binarised at 0.5 (after a Gaussian blur of radius `mask_blur`, as diffusers'
        VaeImageProcessor.blur, if given), `strength` defaults to 0.9999, and a 9-channel
        inpainting UNet or a 4-channel UNet with latent blending after each step is used as loaded.

        With a refiner, text-to-image runs the base for the `denoising_end` fraction of the noise
        (default 0.8) and the refiner from there (its denoising_start), with `aesthetic_score` /
        `negative_aesthetic_score` in the refiner's conditioning (as for a refiner's own image-to-image).

        `on_image(i, pil_image)` is called for each image as soon as its batch is back on the host,
        in order (the CLI writes each file then, so a long job killed midway keeps what it made).

        `size` (height, width): one of the pipeline's `sizes` (default: the first); a size's graphs are
        compiled at its first call unless `warmup(sizes=...)` compiled them.
        """
        with self.at_size(size):  # one of `sizes`: its own graphs, compiled at its first use
            prompts, negatives, prompts_2, negatives_2 = checks.prompt_texts(prompts, negative_prompts, prompt_2,
                                                                             negative_prompt_2)
            n = len(prompts)
            seed_list = checks.seed_list(seeds, n, lambda: secrets.randbelow(2**31))
            if output_type not in ("pil", "np"):
                raise InputError("output_type must be 'pil' or 'np'")
            job = self._job(n, image, mask_image, strength, mask_blur, denoising_end, aesthetic_score,
                            negative_aesthetic_score)
            if guidance_scale is None:  # diffusers' defaults: 7.5 for its inpainting pipeline, 5 for the others
                guidance_scale = DEFAULT_INPAINT_GUIDANCE if job.masks is not None else DEFAULT_GUIDANCE
            sizes = (original_size, crops_coords_top_left, target_size, negative_original_size,
                     negative_crops_coords_top_left, negative_target_size)
            scores = dict(aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
            micro = micro_conditioning((self.height, self.width), self.requires_aesthetics_score, *sizes,
                                       image_to_image=job.images is not None, **scores)
            refiner = None
            if job.switch is not None:
                # The refiner's micro-conditioning is StableDiffusionXLImg2ImgPipeline's for the same sizes.
                refiner_micro = micro_conditioning((self.refiner.height, self.refiner.width),
                                                   self.refiner.requires_aesthetics_score, *sizes, image_to_image=True,
                                                   **scores)
                refiner = (*job.switch, refiner_micro)
            # Every text read before anything compiles or runs: bad syntax fails the call at once.
            dropped = prompt_weights.check_texts((self.tokenizer, self.tokenizer_2), self.text_chunks, self.text_length,
                                                 self.prompt_weighting, prompts, prompts_2, negatives, negatives_2,
                                                 logger=logger, error=InputError)
            if not {"generation", *(mode for mode, used in job.modes.items() if used)} <= self.warmed_up:
                self.warmup(**job.modes)

            start_time, compiles_before = time.perf_counter(), self.compile_count
            b = self.batch_size
            batches = math.ceil(n / b)
            bar = _progress_bar(batches * job.steps_run(self.steps)) if progress else None
            arrays: list[np.ndarray] = []
            pending = None

            def pil_image(i: int, pixels: np.ndarray):
                params = self._parameters(prompts[i], prompts_2[i], negatives[i], negatives_2[i], seed_list[i],
                                          guidance_scale, micro, dropped[i])
                params.update(job.parameters(self.steps, self.refiner.model_name if self.refiner is not None else None))
                return to_pil(pixels, params)

            def finished(batch: np.ndarray) -> None:
                first = sum(len(a) for a in arrays)
                arrays.append(batch)
                if on_image is not None:
                    for i, pixels in enumerate(batch, start=first):
                        on_image(i, pil_image(i, pixels))
            for k in range(batches):
                rows = slice(k * b, (k + 1) * b)
                real = len(prompts[rows])
                pad = b - real
                batch = self._host_batch(
                    prompts[rows] + [""] * pad, prompts_2[rows] + [""] * pad, negatives[rows] + [None] * pad,
                    negatives_2[rows] + [""] * pad, seed_list[rows] + [0] * pad, float(guidance_scale), micro,
                    images=None if job.images is None else job.images[rows] + [np.zeros_like(job.images[0])] * pad,
                    start=job.start, full=job.full, refiner=refiner,
                    masks=None if job.masks is None else job.masks[rows] + [np.zeros_like(job.masks[0])] * pad,
                )
                batch_images = self.run_batch(batch, bar)
                # Fetch the previous batch only now, so the device works on this one meanwhile.
                if pending is not None:
                    finished(fetch(*pending))
                pending = (batch_images, real)
            finished(fetch(*pending))
            if bar is not None:
                bar.close()
            seconds = time.perf_counter() - start_time
            self.last_call = {"images": n, "batches": batches, "seconds": seconds, "seconds_per_image": seconds / n,
                              "images_per_second": n / seconds}
            self._guard(compiles_before, "generation")

            pixels = np.concatenate(arrays)
            if output_type == "np":
                return pixels
            return [pil_image(i, pixels[i]) for i in range(n)]

    def _job(self, n: int, image, mask_image, strength, mask_blur, denoising_end, aesthetic_score: float,
             negative_aesthetic_score: float) -> Job:
        """The mode a call asks for (text-to-image, base + refiner, image-to-image, inpainting), its
        inputs checked against this pipeline's model and size."""
        scores = (aesthetic_score, negative_aesthetic_score)
        if image is None:
            if strength is not None:
                raise InputError("strength is for image-to-image and inpainting: give an image too")
            if mask_image is not None or mask_blur is not None:
                raise InputError("mask_image and mask_blur are for inpainting: give an image too")
            if self.inpainting_unet:
                raise InputError("this model's UNet is an inpainting UNet (9 input channels): "
                                 "give image and mask_image")
            if self.requires_aesthetics_score:  # diffusers has no text-to-image with aesthetic scores
                raise InputError("this is a refiner model (requires_aesthetics_score): load it as refiner= of a base")
            if self.refiner is None:
                if denoising_end is not None:
                    raise InputError("denoising_end hands the latents over to a refiner: load the pipeline with refiner=")
                return Job(aesthetic_scores=scores)
            fraction = checks.check_fraction(DEFAULT_HIGH_NOISE_FRAC if denoising_end is None else denoising_end)
            return Job(switch=self.switch_steps(fraction), refiner_fraction=fraction, aesthetic_scores=scores)
        if denoising_end is not None:
            raise InputError("denoising_end (base + refiner) is for text-to-image, not with an image")
        images = per_image(image, n, "images", lambda one: image_array(one, self.height, self.width, self.vae_scale_factor))
        masks = None
        if mask_image is None:
            if self.inpainting_unet:
                raise InputError("this model's UNet is an inpainting UNet (9 input channels): give a mask_image")
            if mask_blur is not None:
                raise InputError("mask_blur is for inpainting: give a mask_image too")
            strength = DEFAULT_STRENGTH if strength is None else strength
        else:
            masks = per_image(mask_image, n, "masks", lambda one: mask_array(one, self.height, self.width, mask_blur))
            strength = DEFAULT_INPAINT_STRENGTH if strength is None else strength
        return Job(images=images, masks=masks, mask_blur=mask_blur, strength=strength,
                   start=checks.first_step(self.steps, strength), full=float(strength) == 1.0, aesthetic_scores=scores)

    def _parameters(self, prompt, prompt_2, negative, negative_2, seed, guidance_scale, micro,
                    dropped: int) -> dict[str, Any]:
        zeroed = negative is None and self.force_zeros_for_empty_prompt  # neither encoder's text was used
        params = {
            "prompt": prompt,
            "prompt_2": prompt_2,
            "negative_prompt": "" if negative is None else negative,
            "negative_prompt_2": "" if zeroed else negative_2,
            "seed": seed,
            "steps": self.steps,
            "guidance_scale": guidance_scale,
            "scheduler": self.scheduler_name,
            "width": self.width,
            "height": self.height,
            "dtype": checks.dtype_name(self.dtype),
            "model": self.model_name,
            "original_size": list(micro.original_size),
            "crops_coords_top_left": list(micro.crops_coords_top_left),
            "target_size": list(micro.target_size),
            "tokens_dropped": dropped,
        }
        # The prompts above are as written; how they were read, where it is not CLIP's one chunk as written.
        if self.text_chunks > 1:
            params["max_text_chunks"] = self.text_chunks
        if self.prompt_weighting is not None:
            params["prompt_weighting"] = self.prompt_weighting
        if self.loras:
            params["loras"] = [{"path": path, "scale": scale} for path, scale in self.loras]
        return params

    def describe(self) -> dict[str, Any]:
        """The pipeline's fixed settings and its compile statistics, for manifests and benchmarks."""
        return {
            "model": self.model_name,
            "device": self.device_kind,
            "device_detail": self.runtime.detail(),
            "num_devices": self.num_devices,
            "data_parallel": self.mesh is not None,
            "dtype": checks.dtype_name(self.dtype),
            "vae_dtype": checks.dtype_name(self.vae_dtype),
            "batch_size": self.batch_size,
            "width": self.width,
            "height": self.height,
            "sizes": [buckets.size_text(size) for size in self.sizes],
            "steps": self.steps,
            "scheduler": self.scheduler_name,
            "max_text_chunks": self.text_chunks,
            "prompt_weighting": self.prompt_weighting,
            "inpainting_unet": self.inpainting_unet,
            "refiner": None if self.refiner is None else self.refiner.model_name,
            "loras": [{"path": path, "scale": scale} for path, scale in self.loras],
            "torch_compile": self.torch_compile,
            "compile_count": self.compile_count,
            "lora_compile_count": self.lora_compile_count,
            "warmup_seconds": self.warmup_seconds,
            "compile_seconds": self.compile_seconds,
            "persistent_cache": self.cache_status,
            "persistent_cache_hits": self.persistent_cache_hits,
        }


# ---------------------------------------------------------------------- helpers


def _prepare_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:  # from_pretrained already loaded the right dtype
        module = module.to(dtype)
    return module.to(device).eval().requires_grad_(False)


def _vae_dtype_for(dtype: torch.dtype, vae_config) -> torch.dtype:
    # SDXL's VAE overflows in fp16 and says so with force_upcast; bf16 has fp32's range and is safe.
    force_upcast = getattr(vae_config, "force_upcast", None)
    if force_upcast is None and isinstance(vae_config, dict):
        force_upcast = vae_config.get("force_upcast", True)
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def _read_scheduler_config(source: str) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler

    try:
        return dict(EulerDiscreteScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise InputError(f"could not read the scheduler config of {source}: {err}") from None


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="denoising")


