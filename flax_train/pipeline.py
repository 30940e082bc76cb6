"""What a training run needs around the step: its SDXL pipeline folder, latent cache, loader,
validation images and export — each derived from the config in one place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from flax_train import config as config_lib, models

log = logging.getLogger(__name__)

# The SDXL 1.0 base UNet (REFERENCE.md), for random-init runs at full size and AOT estimates.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


# The demo pipeline's shape beyond the tiny defaults, sized for a 2-core CPU. A 3-level VAE (factor
# 4) gives 8x8 latents for the demo's 32x32 images; its narrow first level (16 channels, where the
# convolutions run at full resolution) halves the cost of training it, and two minutes of that
# still keep every shape's colours (`python -m flax_train.vae_train`). One transformer layer per
# attention block instead of SDXL-style growth (1, 2) makes a UNet step 18% cheaper and learned the
# captions as well in 500 steps (90% seen-caption adherence against 85%).
DEMO_PIPELINE: dict[str, Any] = {"vae_channels": (16, 32, 32), "layers_per_block": 1, "transformer_layers_per_block": (1, 1)}
# The demo's noise schedule: SDXL's betas rescaled to zero terminal SNR, trailing timesteps and
# v-prediction (Lin et al., 2023). With SDXL's own schedule the last timestep still shows about 7%
# of the image; averaged over a flat-coloured background that is a clear signal, so the UNet reads
# the colours off its noisy input instead of learning them from the caption, and images sampled
# from pure noise come out in random colours.
DEMO_SCHEDULER: dict[str, Any] = {
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def unet_config(spec: str | Mapping[str, Any], resolution: int) -> dict[str, Any]:
    """``model.unet_config``: "sdxl", "tiny" (the demo pipeline's UNet) or a config dict."""
    if isinstance(spec, Mapping):
        return {"_class_name": "UNet2DConditionModel", **models.thaw_config(spec)}
    if spec == "sdxl":
        return dict(SDXL_UNET_CONFIG)
    if spec == "tiny":
        from flax_train import tiny

        # The UNet's architecture does not depend on the tokenizer's vocabulary.
        configs = tiny.tiny_component_configs(vocab_size=1, image_size=resolution, **DEMO_PIPELINE)
        return {"_class_name": "UNet2DConditionModel", **configs["unet"]}
    raise config_lib.ConfigError(f"model.unet_config: {spec!r}; use 'sdxl', 'tiny' or a config table")


# --------------------------------------------------------------------------------------------
# The pipeline folder


def pipeline_folder(cfg: config_lib.Config) -> Path:
    """The diffusers folder the run starts from (VAE, text encoders, tokenizers, scheduler, UNet).

    ``model.pretrained`` names it (a local folder, or a Hub id for users who are online). Without
    one, a small SDXL-architecture pipeline is built offline in ``<run_dir>/base`` — random text
    encoders and a VAE trained briefly on the run's data, so that latents decode to real images.
    """
    if cfg.model.pretrained:
        root = models.resolve_folder(cfg.model.pretrained)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"model.pretrained: {root} is not a diffusers pipeline folder (no model_index.json)")
        return root
    base = Path(cfg.run_dir) / "base"
    if (base / "model_index.json").is_file():
        return base
    if jax.process_index() == 0:
        build_demo_pipeline(cfg, base)
    _sync("demo pipeline")
    return base


def build_demo_pipeline(cfg: config_lib.Config, base: Path) -> None:
    from flax_train import tiny, vae_train
    from flax_train.data.preprocess import prepare_sample
    from flax_train.data.sources import open_source

    partial = base.with_name(base.name + ".partial")
    tiny.save_tiny_pipeline(
        partial, seed=cfg.train.seed, image_size=cfg.data.resolution, scheduler=DEMO_SCHEDULER, **DEMO_PIPELINE
    )
    # The VAE learns from exactly the pixels the latent cache will encode.
    source_spec, preprocess = data_specs(cfg)
    source = open_source(source_spec)
    images = np.stack([prepare_sample(source[i], i, preprocess).pixels for i in range(len(source))])
    report = vae_train.train_vae(partial / "vae", images, seed=cfg.train.seed)
    log.info("demo VAE trained: %s", report)
    partial.rename(base)


def scheduler_config(base: Path) -> dict[str, Any]:
    return json.loads((Path(base) / "scheduler" / "scheduler_config.json").read_text())


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------------------------
# Latent cache and loader


def data_specs(cfg: config_lib.Config) -> tuple[Any, Any]:
    """The data section of the config as the cache's source and preprocessing specs."""
    from flax_train.data.preprocess import PreprocessSpec
    from flax_train.data.sources import SourceSpec

    d = cfg.data
    path = d.path or str(Path(cfg.run_dir) / "synthetic")
    source = SourceSpec(
        kind=d.source,
        path=path,
        caption_column=d.caption_column,
        image_column=d.image_column,
        split=d.split,
        dataset_config=d.dataset_config,
        num_images=d.synthetic.num_images if d.source == "synthetic" else 0,
        image_size=d.resolution,
        seed=d.synthetic.seed,
    )
    preprocess = PreprocessSpec(
        resolution=d.resolution,
        center_crop=d.crop == "center",
        random_flip=d.random_flip,
        max_pixels=d.max_pixels,
        # Only random crops and flips use the seed; keep it out of a deterministic cache's settings.
        seed=cfg.train.seed if (d.crop != "center" or d.random_flip) else 0,
    )
    return source, preprocess


def cache_dir(cfg: config_lib.Config) -> str:
    return cfg.data.cache_dir or str(Path(cfg.run_dir) / "cache")


def open_cache(cfg: config_lib.Config, base: Path, *, prepare_if_missing: bool = True):
    """The run's latent cache, prepared first if it does not exist; refused if it does not match."""
    from flax_train.data import cache as cache_lib, prepare

    source, preprocess = data_specs(cfg)
    settings = prepare.cache_settings(source, preprocess, base, vae_path=cfg.model.vae, latent_source=cfg.data.latent_mode)
    directory = cache_dir(cfg)
    try:
        return cache_lib.LatentCache(directory, expected=settings)
    except cache_lib.CacheMissingError:
        if not prepare_if_missing:
            raise
    report = prepare.prepare_cache(
        directory, base, source, preprocess, vae_path=cfg.model.vae, latent_source=cfg.data.latent_mode
    )
    log.info("%s", report.summary())
    return cache_lib.LatentCache(directory, expected=settings)


def make_loader(cfg: config_lib.Config, cache: Any):
    from flax_train.data import loader

    rows = cfg.train.global_batch_size * cfg.train.grad_accum_steps
    return loader.make_loader(cache, global_batch_size=rows, seed=cfg.train.seed)


# --------------------------------------------------------------------------------------------
# Validation images and export


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows*H, columns*W, 3) image."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


class Validator:
    """Generates the configured prompts with the JAX sampler every ``validation.every_steps``.

    The text encoders and VAE are loaded once and the prompts encoded once; each call only runs the
    sampler with the current (EMA) UNet weights and writes a PNG grid and a TensorBoard image.
    """

    def __init__(self, cfg: config_lib.Config, base: Path, run_dir: Path, writer: Any):
        from flax_train.generate import Generator

        v = cfg.validation
        self.cfg = cfg
        self.writer = writer
        self.out = Path(run_dir) / "samples"
        self.generator = Generator(
            base,
            vae=cfg.model.vae,
            scheduler=v.scheduler,
            num_steps=v.num_steps,
            resolution=v.resolution or cfg.data.resolution,
            dtype=jnp.dtype(cfg.model.dtype),
            load_unet=False,
        )
        self.prompts = list(v.prompts)
        self.embeds = self.generator.encode(self.prompts, [v.negative_prompt] * len(self.prompts))

    def run(self, step: int, graphdef: nnx.GraphDef, params: nnx.State) -> Path:
        v = self.cfg.validation
        images = self.generator.generate_from_embeds(
            graphdef, params, self.embeds, seed=v.seed, guidance_scale=v.guidance_scale
        )
        grid = image_grid(np.asarray(images))
        path = self.out / f"step_{step:07d}.png"
        if jax.process_index() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grid).save(path)
            self.writer.image(step, "validation", grid)
        return path


def export(cfg: config_lib.Config, base: Path, graphdef: nnx.GraphDef, params: nnx.State, run_dir: Path) -> Path:
    """Writes the diffusers folder (process 0; parameters are gathered from the mesh first)."""
    from flax_train import export as export_lib

    out = Path(cfg.export.dir or Path(run_dir) / "export")
    host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if hasattr(x, "shape") else x, params)
    if jax.process_index() == 0:
        unet = nnx.merge(graphdef, host_params)
        export_lib.export_pipeline(unet, base, out, vae=cfg.model.vae)
        log.info("exported the diffusers pipeline to %s", out)
    _sync("export")
    return out
