"""Image generation with the Flax SDXL modules: validation images during training,
``flax-train sample``, and the demo's prompt-adherence check.

A ``Generator`` loads the tokenizers, both text encoders, the VAE and the scheduler config of a
diffusers folder once, and compiles two functions: prompt encoding, and sampling + decoding. The
UNet weights are an argument of the latter, so the trainer can pass its current (EMA) parameters
without rebuilding anything.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from flax_train import models, sampling, schedulers

TOKEN_LENGTH = 77


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; a file that is not UTF-8 is refused naming the line."""
    prompts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 ({error.reason})") from None
            if line:
                prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts


class Generator:
    def __init__(
        self,
        folder: str | Path,
        *,
        vae: str | Path | None = None,
        scheduler: str = "euler",
        num_steps: int = 25,
        resolution: int | None = None,
        dtype: Any = jnp.float32,
        load_unet: bool = True,
    ):
        from transformers import CLIPTokenizer

        root = models.resolve_folder(folder)
        self.tokenizers = [CLIPTokenizer.from_pretrained(str(root / name)) for name in ("tokenizer", "tokenizer_2")]
        encoders = [models.load(root, subfolder=name, dtype=dtype) for name in ("text_encoder", "text_encoder_2")]
        # The SDXL VAE overflows in fp16; decoding in fp32 is always safe and costs little.
        self.vae = models.load(models.resolve_folder(vae) if vae else models.resolve_folder(root, "vae"))
        self.unet = models.load(root, subfolder="unet", dtype=dtype) if load_unet else None
        scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.tables = schedulers.make_scheduler(scheduler, scheduler_config, num_steps)
        self.vae_scale = 2 ** (len(self.vae.config["block_out_channels"]) - 1)
        if resolution is None:
            unet_config = self.unet.config if self.unet is not None else models.read_config(root / "unet")
            resolution = unet_config["sample_size"] * self.vae_scale
        if resolution % self.vae_scale:
            raise ValueError(f"resolution {resolution} is not divisible by the VAE's factor {self.vae_scale}")
        self.resolution = resolution
        self.latent_channels = self.vae.config["latent_channels"]
        self._text = nnx.split(nnx.List(encoders))
        self._vae = nnx.split(self.vae)

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs: Any) -> "Generator":
        return cls(folder, **kwargs)

    # ------------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return tuple(
            np.asarray(
                tok(list(prompts), padding="max_length", max_length=TOKEN_LENGTH, truncation=True, return_tensors="np").input_ids,
                dtype=np.int32,
            )
            for tok in self.tokenizers
        )

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def _encode(self, graphdef: nnx.GraphDef, state: nnx.State, ids1: jax.Array, ids2: jax.Array):
        te1, te2 = nnx.merge(graphdef, state)
        return sampling.encode_prompts(te1, te2, ids1, ids2)

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> dict[str, jax.Array]:
        """Prompt and negative-prompt embeddings, computed once and reused by every call."""
        if len(prompts) != len(negative_prompts):
            raise ValueError("one negative prompt per prompt")
        embeds, pooled = self._encode(*self._text, *self.tokenize(prompts))
        neg_embeds, neg_pooled = self._encode(*self._text, *self.tokenize(negative_prompts))
        return {"prompt_embeds": embeds, "pooled": pooled, "neg_prompt_embeds": neg_embeds, "neg_pooled": neg_pooled}

    @functools.partial(jax.jit, static_argnums=(0, 1, 3))
    def _sample(self, unet_graph, unet_params, vae_graph, vae_state, embeds, latents, guidance_scale):
        unet = nnx.merge(unet_graph, unet_params)
        vae = nnx.merge(vae_graph, vae_state)
        size = (self.resolution, self.resolution)
        time_ids = sampling.make_time_ids(size, (0, 0), size, latents.shape[0])
        out = sampling.sample_latents(
            unet,
            self.tables,
            latents,
            embeds["prompt_embeds"],
            embeds["pooled"],
            time_ids,
            embeds["neg_prompt_embeds"],
            embeds["neg_pooled"],
            time_ids,
            guidance_scale,
        )
        return sampling.decode_latents(vae, out.astype(jnp.float32))

    def initial_latents(self, count: int, seed: int) -> jax.Array:
        """Image i starts from the noise of seed + i, whatever the batch it is generated in."""
        side = self.resolution // self.vae_scale
        shape = (self.latent_channels, side, side)
        return jnp.stack([jax.random.normal(jax.random.PRNGKey(seed + i), shape) for i in range(count)])

    def generate_from_embeds(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        embeds: dict[str, jax.Array],
        *,
        seed: int = 0,
        guidance_scale: float = 5.0,
        latents: jax.Array | None = None,
    ) -> np.ndarray:
        """uint8 images (N, H, W, 3) for pre-encoded prompts, with the given UNet weights.

        ``latents`` (N, C, h, w) replaces the seeded initial noise, e.g. to reproduce another
        implementation's images exactly."""
        if latents is None:
            latents = self.initial_latents(embeds["prompt_embeds"].shape[0], seed)
        images = self._sample(graphdef, params, *self._vae, embeds, latents, jnp.float32(guidance_scale))
        return np.asarray(jax.device_get(images))

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        negative_prompt: str = "",
        seed: int = 0,
        guidance_scale: float = 5.0,
        latents: jax.Array | None = None,
    ) -> list[Image.Image]:
        if self.unet is None:
            raise ValueError("this Generator was built without a UNet; use generate_from_embeds")
        embeds = self.encode(prompts, [negative_prompt] * len(prompts))
        graphdef, params = nnx.split(self.unet)
        images = self.generate_from_embeds(
            graphdef, params, embeds, seed=seed, guidance_scale=guidance_scale, latents=latents
        )
        return [Image.fromarray(image) for image in images]
