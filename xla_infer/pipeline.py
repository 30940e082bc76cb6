"""Fixed-shape SDXL generation on an XLA device, and on plain torch for comparison.

The diffusers / transformers torch modules do the network work; this file owns the loop around
them, built so that an XLA device compiles three graphs once and reuses them for every later call
of the same batch size and image size:

- text encode: both tokenisers always pad/truncate to 77 tokens, and the negative prompt is always
  encoded (empty string when absent, zeroed by a per-row mask where SDXL's
  `force_zeros_for_empty_prompt` asks for zeros), so prompts never change the graph;
- denoise step: one UNet call on the doubled batch (negative and positive rows interleaved, so
  data-parallel sharding keeps each image's pair on one chip), guidance scale a device tensor, the
  sampler arithmetic read from device tables with a device step counter (xla_infer.schedulers):
  the same graph at every step, with nothing read back to the host;
- decode: the VAE in the dtype its config calls for, scaled to [0, 1] on the device.

Everything that varies between calls (token ids, masks, micro-conditioning, guidance, seeds'
noise) enters as device data, never as a constant baked into a graph. A compile counter
(torch_xla's CompileTime metric) guards the promise: after warm-up, a new compilation raises
`RecompilationError` (or warns, with on_recompile="warn").
"""
from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from flax_train import model_source, sdxl, storage  # these import neither JAX nor the trainer
from flax_train.errors import BadInput
from xla_infer.schedulers import UnsupportedScheduler, canonical_name, draw_noise, make_sampler

logger = logging.getLogger("xla_infer")

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
}
DEVICES = ("xla", "cpu", "cuda")
Size = tuple[int, int]


class InputError(BadInput):
    """Bad user input: a missing model folder or component, an impossible size, a bad prompt list..."""


class RecompilationError(RuntimeError):
    """An XLA compilation happened after warm-up, where the fixed-shape design promises none."""


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


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def _check_local_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist (or is not a folder)")
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise InputError(
            f"model folder {folder} is not a complete SDXL diffusers folder: missing {', '.join(missing)} "
            f"(needs {', '.join(COMPONENTS)})"
        )
    for name, config in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                         ("text_encoder_2", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (folder / name / config).is_file():
            raise InputError(f"model folder {folder}: {name}/{config} is missing")


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size conditioning for one call: (height, width) pairs and the crop corner (top, left)."""

    original_size: Size
    crops_coords_top_left: Size
    target_size: Size
    negative_original_size: Size
    negative_crops_coords_top_left: Size
    negative_target_size: Size

    def rows(self) -> tuple[list[int], list[int]]:
        positive = [*self.original_size, *self.crops_coords_top_left, *self.target_size]
        negative = [*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size]
        return negative, positive


def _pair(value: Any, name: str) -> Size:
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a pair of integers, got {value!r}") from None


class Pipeline:
    """SDXL text-to-image with graphs compiled once per (batch size, image size, steps, scheduler).

    Build with `Pipeline.from_pretrained(folder_or_hub_id, device="xla", ...)`, then call it with
    prompts; the first call (or `warmup()`) compiles.
    """

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        scheduler_config: dict[str, Any],
        force_zeros_for_empty_prompt: bool = True,
        device: str = "xla",
        dtype: str | torch.dtype = "bf16",
        vae_dtype: str | torch.dtype | None = None,
        batch_size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int = 30,
        scheduler: str | None = None,
        torch_compile: bool = False,
        data_parallel: bool | None = None,
        cache_dir: str | Path | None = None,
        on_recompile: str = "raise",
        model_name: str = "",
    ):
        if device not in DEVICES:
            raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        if on_recompile not in ("raise", "warn"):
            raise InputError("on_recompile must be 'raise' or 'warn'")
        self.device_kind = device
        self.model_name = model_name
        self.dtype = parse_dtype(dtype)
        self.vae_scale_factor = sdxl.vae_scale_factor(vae.config)
        self.vae_dtype = parse_dtype(vae_dtype) if vae_dtype is not None else _vae_dtype_for(self.dtype, vae.config)
        self.height = int(height or unet.config.sample_size * self.vae_scale_factor)
        self.width = int(width or unet.config.sample_size * self.vae_scale_factor)
        for name, value in (("height", self.height), ("width", self.width)):
            if value <= 0 or value % self.vae_scale_factor:
                raise InputError(
                    f"{name} {value} is not a positive multiple of the VAE factor {self.vae_scale_factor}"
                )
        if not isinstance(steps, int) or steps <= 0:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        self.steps = steps
        self.text_length = int(text_encoder.config.max_position_embeddings)
        _check_sdxl_shapes(unet, text_encoder, text_encoder_2)

        scheduler_name = scheduler or scheduler_config.get("_class_name", "euler")
        try:
            self.scheduler_name = canonical_name(scheduler_name)
            self.sampler = make_sampler(self.scheduler_name, scheduler_config, steps)
        except UnsupportedScheduler as err:
            raise InputError(str(err)) from None

        self.cache_status = "not requested"
        self.mesh = None
        self._xla_metrics = None
        if device == "xla":
            self.device, n_devices = self._setup_xla(cache_dir, data_parallel)
        else:
            if cache_dir is not None:
                self.cache_status = f"not used: the persistent compilation cache is an XLA feature (device={device})"
            if device == "cuda" and not torch.cuda.is_available():
                raise InputError("device 'cuda' requested but torch sees no CUDA device")
            self.device, n_devices = torch.device(device), 1
        self.num_devices = n_devices if self.mesh is not None else 1
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
        self.text_encoder = _prepare_module(text_encoder, self.device, self.dtype)
        self.text_encoder_2 = _prepare_module(text_encoder_2, self.device, self.dtype)
        self.vae = _prepare_module(vae, self.device, self.vae_dtype)
        self.sampler.to(self.device)
        self.latent_shape = (int(unet.config.in_channels), self.height // self.vae_scale_factor,
                             self.width // self.vae_scale_factor)

        self.on_recompile = on_recompile
        self.torch_compile = torch_compile
        self._encode_graph = self._wrap(self._encode, "sdxl_text_encode")
        self._step_graph = self._wrap(self._denoise_step, "sdxl_denoise_step")
        self._decode_graph = self._wrap(self._decode, "sdxl_vae_decode")
        self._compiles_at_start = self._raw_compile_count()
        self.warmed_up = False
        self.warmup_seconds: float | None = None
        self.compile_seconds: float | None = None
        self.last_call: dict[str, float] = {}

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
        steps: int = 30,
        scheduler: str | None = None,
        vae_dtype: str | torch.dtype | None = None,
        torch_compile: bool = False,
        data_parallel: bool | None = None,
        cache_dir: str | Path | None = None,
        on_recompile: str = "raise",
        variant: str | None = None,
        revision: str | None = None,
    ) -> "Pipeline":
        """Load an SDXL diffusers folder, Hub id or gs:// folder and prepare it on `device`.

        A Hub id or URL is fetched as the trainer fetches it (flax_train.model_source): the files
        the pipeline loads, at `revision` (Hub branch, tag or commit), with the `variant` ("fp16")
        weights. Weights are read from .safetensors only. `scheduler` is one of euler, euler_a,
        ddim, dpmpp_2m (default: the folder's own scheduler), configured from the folder's
        scheduler config.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        torch_dtype = parse_dtype(dtype)
        if not isinstance(steps, int) or steps <= 0:
            raise InputError(f"steps must be a positive integer, got {steps!r}")
        if scheduler is not None:
            try:
                canonical_name(scheduler)
            except UnsupportedScheduler as err:
                raise InputError(str(err)) from None
        try:
            folder = model_source.local_folder(model, revision=revision, variant=variant)
        except (OSError, ValueError) as err:
            raise InputError(f"could not fetch the model {model}: {err}") from None
        _check_local_folder(folder)
        source = str(folder)
        # A Hub id or URL names the model better than the cache folder it was fetched to.
        fetched = storage.is_remote(model) or model_source.is_hub_id(model)

        def load(what: str, fn, **kwargs):
            try:
                return fn(source, subfolder=what, **kwargs)
            except (OSError, ValueError) as err:
                raise InputError(f"could not load {what} from {source}: {err}") from None

        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
        scheduler_config = _read_scheduler_config(source)
        vae_config = load("vae", AutoencoderKL.load_config)
        factor = sdxl.vae_scale_factor(vae_config)
        for name, value in (("height", height), ("width", width)):  # fail before loading any weights
            if value is not None and (value <= 0 or value % factor):
                raise InputError(f"{name} {value} is not a positive multiple of the VAE factor {factor}")
        vae_torch_dtype = parse_dtype(vae_dtype) if vae_dtype is not None else _vae_dtype_for(torch_dtype, vae_config)
        weights = dict(use_safetensors=True, variant=variant)
        return cls(
            unet=load("unet", UNet2DConditionModel.from_pretrained, torch_dtype=torch_dtype, **weights),
            vae=load("vae", AutoencoderKL.from_pretrained, torch_dtype=vae_torch_dtype, **weights),
            text_encoder=load("text_encoder", CLIPTextModel.from_pretrained, dtype=torch_dtype, **weights),
            text_encoder_2=load("text_encoder_2", CLIPTextModelWithProjection.from_pretrained, dtype=torch_dtype,
                                **weights),
            tokenizer=load("tokenizer", CLIPTokenizer.from_pretrained),
            tokenizer_2=load("tokenizer_2", CLIPTokenizer.from_pretrained),
            scheduler_config=scheduler_config,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
            device=device, dtype=torch_dtype, vae_dtype=vae_torch_dtype, batch_size=batch_size,
            height=height, width=width, steps=steps, scheduler=scheduler, torch_compile=torch_compile,
            data_parallel=data_parallel, cache_dir=cache_dir, on_recompile=on_recompile,
            model_name=str(model) if fetched else source,
        )

    def _setup_xla(self, cache_dir: str | Path | None, data_parallel: bool | None) -> tuple[torch.device, int]:
        import torch_xla
        import torch_xla.debug.metrics as metrics
        import torch_xla.runtime as xr

        self._xla_metrics = metrics
        platform = xr.device_type()
        if cache_dir is not None:
            if platform != "TPU":
                # Checked: on CPU torch_xla writes cache entries but cannot deserialize them
                # ("Deserializing serialized executable not supported"), so a cache would only cost.
                self.cache_status = (
                    f"not used: torch_xla cannot load a persistent compilation cache back on {platform}; "
                    "every process start compiles again"
                )
                logger.warning("--cache-dir: %s", self.cache_status)
            elif torch_xla._XLAC._xla_computation_cache_is_initialized():
                self.cache_status = "not used: XLA had already compiled in this process before the cache was set"
                logger.warning("--cache-dir: %s", self.cache_status)
            else:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                xr.initialize_cache(str(cache_dir), readonly=False)
                self.cache_status = f"enabled at {cache_dir}"
        n_devices = xr.global_runtime_device_count()
        if data_parallel is None:
            data_parallel = n_devices > 1
        if data_parallel and n_devices > 1:
            import torch_xla.distributed.spmd as xs

            # One process drives all local chips; the batch axis of every per-image input is split
            # over them and the weights are replicated (see docs/xla_infer.md for why not one
            # process per chip).
            xr.use_spmd()
            self.mesh = xs.Mesh(np.arange(n_devices), (n_devices,), ("data",))
        return torch_xla.device(), n_devices

    # ------------------------------------------------------------------ graphs

    def _wrap(self, fn, name: str):
        if self.device_kind == "xla":
            import torch_xla

            # full_graph: any host read inside (an .item(), a data-dependent shape) is an error,
            # not a silent graph break; max_different_graphs: a second traced variant is an error.
            return torch_xla.compile(fn, full_graph=True, name=name, max_different_graphs=1)
        if self.torch_compile:
            return torch.compile(fn, dynamic=False)
        return fn

    @torch.no_grad()
    def _encode(self, ids_1: torch.Tensor, ids_2: torch.Tensor, keep: torch.Tensor):
        out_1 = self.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        # SDXL conditions on the penultimate layer of both encoders and the projected pooled output of the second.
        embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds
        keep = keep.to(embeds.dtype)
        return embeds * keep[:, None, None], pooled * keep[:, None]

    @torch.no_grad()
    def _denoise_step(self, latents, step, state, noise, embeds, pooled, time_ids, guidance):
        sampler = self.sampler
        model_input = sampler.scale_input(latents, step).repeat_interleave(2, dim=0).to(self.dtype)
        out = self.unet(
            model_input,
            sampler.timestep(step),
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            return_dict=False,
        )[0]
        out = out.to(torch.float32).unflatten(0, (-1, 2))
        uncond, cond = out[:, 0], out[:, 1]
        guided = uncond + guidance * (cond - uncond)
        step_noise = None if noise is None else noise.index_select(0, step)[0]
        latents, state = sampler.step(latents, guided, step, state, step_noise)
        return latents, step + 1, state

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            channels = latents.shape[1]
            mean_t = torch.tensor(mean, dtype=latents.dtype).view(1, channels, 1, 1).to(latents.device)
            std_t = torch.tensor(std, dtype=latents.dtype).view(1, channels, 1, 1).to(latents.device)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents.to(self.vae_dtype), return_dict=False)[0]
        return (image.to(torch.float32) * 0.5 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ compile accounting

    def _raw_compile_count(self) -> int:
        if self._xla_metrics is not None:
            data = self._xla_metrics.metric_data("CompileTime")
            return 0 if data is None else int(data[0])
        if self.torch_compile:
            from torch._dynamo.utils import counters

            return int(counters["stats"]["unique_graphs"])
        return 0

    @property
    def compile_count(self) -> int:
        """Compilations in this process since the pipeline was built (XLA graphs, or torch.compile graphs)."""
        return self._raw_compile_count() - self._compiles_at_start

    def _compile_seconds_total(self) -> float:
        if self._xla_metrics is None:
            return 0.0
        data = self._xla_metrics.metric_data("CompileTime")
        return 0.0 if data is None else data[1] / 1e9

    @property
    def persistent_cache_hits(self) -> int:
        """Graphs loaded from the persistent compilation cache instead of compiled (TPU only)."""
        if self._xla_metrics is None:
            return 0
        return int(self._xla_metrics.counter_value("PersistentCacheHit") or 0)

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

    def _to_device(self, tensor: torch.Tensor, batch_dim: int | None = 0) -> torch.Tensor:
        tensor = tensor.to(self.device)
        if self.mesh is not None and batch_dim is not None:
            import torch_xla.distributed.spmd as xs

            spec = tuple("data" if d == batch_dim else None for d in range(tensor.dim()))
            xs.mark_sharding(tensor, self.mesh, spec)
        return tensor

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Ids for both tokenisers, padded/truncated to 77, and how many tokens each text lost."""
        length = self.text_length
        ids, dropped = [], [0] * len(texts)
        for tokenizer in (self.tokenizer, self.tokenizer_2):
            ids.append(tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids)
            full = tokenizer(texts, verbose=False).input_ids
            dropped = [max(d, len(f) - length) for d, f in zip(dropped, full)]
        return ids[0], ids[1], dropped

    def _micro_conditioning(self, original_size, crops_coords_top_left, target_size, negative_original_size,
                            negative_crops_coords_top_left, negative_target_size) -> MicroConditioning:
        size = (self.height, self.width)
        original = _pair(original_size or size, "original_size")
        crops = _pair(crops_coords_top_left or (0, 0), "crops_coords_top_left")
        target = _pair(target_size or size, "target_size")
        # As diffusers: the negative rows get their own conditioning only when both sizes are given.
        if negative_original_size is not None and negative_target_size is not None:
            negative = (_pair(negative_original_size, "negative_original_size"),
                        _pair(negative_crops_coords_top_left or (0, 0), "negative_crops_coords_top_left"),
                        _pair(negative_target_size, "negative_target_size"))
        else:
            negative = (original, crops, target)
        return MicroConditioning(original, crops, target, *negative)

    def _host_batch(self, prompts, negatives, seeds, guidance_scale, micro: MicroConditioning):
        """Host tensors for one batch of exactly `batch_size` rows, conditioning rows interleaved (neg, pos)."""
        texts, keep = [], []
        for prompt, negative in zip(prompts, negatives):
            texts += [negative or "", prompt]
            zero_negative = negative is None and self.force_zeros_for_empty_prompt
            keep += [0.0 if zero_negative else 1.0, 1.0]
        ids_1, ids_2, dropped = self._tokenize(texts)
        negative_row, positive_row = micro.rows()
        time_ids = torch.tensor([negative_row, positive_row] * len(prompts), dtype=self.dtype)
        # guidance <= 1 means no guidance in diffusers (the positive prediction alone); scale 1 gives that.
        scale = guidance_scale if guidance_scale > 1 else 1.0
        guidance = torch.full((len(prompts), 1, 1, 1), float(scale), dtype=torch.float32)
        latents, noise = draw_noise(seeds, self.latent_shape, self.steps, self.sampler.needs_step_noise)
        latents = latents * self.sampler.init_noise_sigma
        return dict(ids_1=ids_1, ids_2=ids_2, keep=torch.tensor(keep), time_ids=time_ids, guidance=guidance,
                    latents=latents, noise=noise), dropped

    # ------------------------------------------------------------------ generation

    def _run_batch(self, host: dict[str, torch.Tensor], progress=None) -> torch.Tensor:
        """Dispatch one batch; returns the device tensor of images (B, 3, H, W) in [0, 1]."""
        embeds, pooled = self._encode_graph(
            self._to_device(host["ids_1"]), self._to_device(host["ids_2"]), self._to_device(host["keep"])
        )
        time_ids = self._to_device(host["time_ids"])
        guidance = self._to_device(host["guidance"])
        latents = self._to_device(host["latents"])
        noise = None if host["noise"] is None else self._to_device(host["noise"], batch_dim=1)
        state = {k: self._to_device(v) for k, v in self.sampler.initial_state(host["latents"]).items()}
        step = self._to_device(torch.zeros(1, dtype=torch.long), batch_dim=None)
        for _ in range(self.steps):
            latents, step, state = self._step_graph(latents, step, state, noise, embeds, pooled, time_ids, guidance)
            if progress is not None:
                progress.update(1)
        return self._decode_graph(latents)

    def warmup(self) -> float:
        """Compile the text-encode, denoise-step and decode graphs (one full batch); returns seconds."""
        start, compile_start = time.perf_counter(), self._compile_seconds_total()
        micro = self._micro_conditioning(None, None, None, None, None, None)
        n = self.batch_size
        host, _ = self._host_batch([""] * n, [None] * n, list(range(n)), 5.0, micro)
        self._run_batch(host).cpu()
        self.warmup_seconds = time.perf_counter() - start
        self.compile_seconds = self._compile_seconds_total() - compile_start if self._xla_metrics else None
        self.warmed_up = True
        logger.info("warm-up: %.1f s, %d compilation(s)", self.warmup_seconds, self.compile_count)
        return self.warmup_seconds

    def __call__(
        self,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str | None] | None = None,
        seeds: int | Sequence[int] | None = None,
        guidance_scale: float = 5.0,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        output_type: str = "pil",
        progress: bool = False,
    ):
        """Generate one image per prompt; returns PIL images (or an (N, H, W, 3) float array for "np").

        `seeds`: one per prompt, or an int s giving s, s+1, ...; absent, random seeds are drawn and
        recorded in each image's `info`. Prompts are run in batches of the pipeline's batch size,
        the last one padded. `negative_prompts` entries that are None give SDXL's zeroed negative
        conditioning; strings are encoded. The size arguments are SDXL's micro-conditioning, as in
        diffusers' StableDiffusionXLPipeline.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompts given")
        if not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be strings")
        n = len(prompts)
        if negative_prompts is None or isinstance(negative_prompts, str):
            negatives = [negative_prompts] * n
        else:
            negatives = list(negative_prompts)
            if len(negatives) != n:
                raise InputError(f"{len(negatives)} negative prompts for {n} prompts")
        if seeds is None:
            base = secrets.randbelow(2**31)
            seed_list = [base + i for i in range(n)]
        elif isinstance(seeds, int):
            seed_list = [seeds + i for i in range(n)]
        else:
            seed_list = [int(s) for s in seeds]
            if len(seed_list) != n:
                raise InputError(f"{len(seed_list)} seeds for {n} prompts")
        if output_type not in ("pil", "np"):
            raise InputError("output_type must be 'pil' or 'np'")
        micro = self._micro_conditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                         negative_crops_coords_top_left, negative_target_size)
        if not self.warmed_up:
            self.warmup()

        start, compiles_before = time.perf_counter(), self.compile_count
        b = self.batch_size
        batches = math.ceil(n / b)
        bar = _progress_bar(batches * self.steps) if progress else None
        arrays: list[np.ndarray] = []
        dropped_all: list[int] = []
        pending = None
        for k in range(batches):
            rows = slice(k * b, (k + 1) * b)
            real = len(prompts[rows])
            pad = b - real
            host, dropped = self._host_batch(
                prompts[rows] + [""] * pad, negatives[rows] + [None] * pad, seed_list[rows] + [0] * pad,
                float(guidance_scale), micro,
            )
            self._warn_truncation(k * b, prompts[rows], negatives[rows], dropped[: 2 * real])
            dropped_all += dropped[: 2 * real]
            images = self._run_batch(host, bar)
            # Fetch the previous batch only now, so the device works on this one meanwhile.
            if pending is not None:
                arrays.append(_fetch(*pending))
            pending = (images, real)
        arrays.append(_fetch(*pending))
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        self.last_call = {"images": n, "batches": batches, "seconds": seconds, "seconds_per_image": seconds / n,
                          "images_per_second": n / seconds}
        self._guard(compiles_before, "generation")

        pixels = np.concatenate(arrays)
        if output_type == "np":
            return pixels
        return [
            _to_pil(pixels[i], self._parameters(prompts[i], negatives[i], seed_list[i], guidance_scale, micro,
                                                dropped_all[2 * i: 2 * i + 2]))
            for i in range(n)
        ]

    def _warn_truncation(self, offset, prompts, negatives, dropped):
        for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
            rows = ((negative, dropped[2 * i], "negative prompt"), (prompt, dropped[2 * i + 1], "prompt"))
            for text, lost, kind in rows:
                if lost > 0:
                    logger.warning(
                        "%s %d is longer than CLIP's %d tokens: the last %d token(s) were dropped (%.60r...)",
                        kind, offset + i, self.text_length, lost, text,
                    )

    def _parameters(self, prompt, negative, seed, guidance_scale, micro, dropped) -> dict[str, Any]:
        params = {
            "prompt": prompt,
            "negative_prompt": "" if negative is None else negative,
            "seed": seed,
            "steps": self.steps,
            "guidance_scale": guidance_scale,
            "scheduler": self.scheduler_name,
            "width": self.width,
            "height": self.height,
            "dtype": _dtype_name(self.dtype),
            "model": self.model_name,
            "original_size": list(micro.original_size),
            "crops_coords_top_left": list(micro.crops_coords_top_left),
            "target_size": list(micro.target_size),
            "tokens_dropped": max(dropped) if dropped else 0,
        }
        return params

    def describe(self) -> dict[str, Any]:
        """The pipeline's fixed settings and its compile statistics, for manifests and benchmarks."""
        return {
            "model": self.model_name,
            "device": self.device_kind,
            "device_detail": _device_detail(self.device_kind),
            "num_devices": self.num_devices,
            "data_parallel": self.mesh is not None,
            "dtype": _dtype_name(self.dtype),
            "vae_dtype": _dtype_name(self.vae_dtype),
            "batch_size": self.batch_size,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "scheduler": self.scheduler_name,
            "torch_compile": self.torch_compile,
            "compile_count": self.compile_count,
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


def _check_sdxl_shapes(unet, text_encoder, text_encoder_2) -> None:
    cfg = unet.config
    if cfg.addition_embed_type != "text_time":
        raise InputError(f"the UNet is not SDXL-style (addition_embed_type={cfg.addition_embed_type!r})")
    hidden = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if cfg.cross_attention_dim != hidden:
        raise InputError(f"UNet cross_attention_dim {cfg.cross_attention_dim} != text hidden sizes summed {hidden}")
    expected = unet.add_embedding.linear_1.in_features
    passed = cfg.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
    if expected != passed:
        raise InputError(f"UNet expects {expected} added-embedding inputs, the text encoder gives {passed}")
    if text_encoder.config.max_position_embeddings != text_encoder_2.config.max_position_embeddings:
        raise InputError("the two text encoders disagree on the token length")


def _read_scheduler_config(source: str) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler

    try:
        return dict(EulerDiscreteScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError) as err:
        raise InputError(f"could not read the scheduler config of {source}: {err}") from None


def _fetch(images: torch.Tensor, real: int) -> np.ndarray:
    return images.cpu()[:real].permute(0, 2, 3, 1).numpy()


def _to_pil(pixels: np.ndarray, info: dict[str, Any]):
    from PIL import Image

    image = Image.fromarray((pixels * 255).round().astype("uint8"))
    image.info.update(info)
    return image


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="denoising")


def _device_detail(kind: str) -> str:
    if kind == "xla":
        import torch_xla.runtime as xr

        return f"{xr.device_type()} x{xr.global_runtime_device_count()} (torch_xla)"
    if kind == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
