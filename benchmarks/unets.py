"""The UNets the benchmarks time and compile, by name: `tiny` (the demo's), `medium` (SDXL's
layout at a fifth of its width) and `sdxl`."""
from __future__ import annotations

from typing import Any

# The medium model's random SDXL folder (flax_train.demo.tiny.save_tiny_pipeline's sizes) at 256px:
# the UNet has SDXL's blocks, 1/2/10 transformer layers and 64-wide heads at channels 64/128/256, a
# CPU-sized step still dominated by SDXL's kinds of work (26 GFLOP forward per image at 256px,
# 158M parameters; SDXL: 6.76 TFLOP at 1024px). The text encoders have SDXL's widths (768 and
# 1280, which the UNet's cross-attention and added embeddings take) but 2 layers each, and the VAE
# (factor 8) a quarter of SDXL's channels: both run once per image, the UNet twice per step.
MEDIUM_SIZES = dict(
    image_size=256, unet_channels=(64, 128, 256), unet_heads=(1, 2, 4), transformer_layers_per_block=(1, 2, 10),
    layers_per_block=2, text_hidden=(768, 1280), text_layers=2, text_projection_dim=1280,
    addition_time_embed_dim=256, norm_num_groups=32, vae_channels=(32, 64, 128, 128))

NAMES = ("tiny", "medium", "sdxl")


def unet_architecture(unet: str, resolution: int, depth: int | None = None) -> dict[str, Any]:
    """The diffusers UNet config of `unet` (one of NAMES) for images of `resolution` pixels;
    `depth`: the last block's transformer layers instead of the model's own (SDXL's is 10)."""
    from flax_train.demo import tiny
    from sdxl_common import sdxl

    if unet == "sdxl":
        architecture = {**sdxl.UNET_CONFIG, "sample_size": resolution // 8}
    elif unet == "medium":
        architecture = tiny.unet_config(**{**MEDIUM_SIZES, "image_size": resolution})
    elif unet == "tiny":
        architecture = tiny.unet_config(resolution, **tiny.DEMO_SIZES)
    else:
        raise ValueError(f"unknown UNet {unet!r}; choose one of {', '.join(NAMES)}")
    if depth is not None:
        layers = list(architecture["transformer_layers_per_block"])
        architecture["transformer_layers_per_block"] = layers[:-1] + [depth]
    return architecture
