"""Facts about Stable Diffusion XL that more than one part of the trainer needs, in one place.

The numbers are those of stabilityai/stable-diffusion-xl-base-1.0's released configs
(``unet/config.json``, ``scheduler/scheduler_config.json``, ``model_index.json``) and of the SDXL
paper (Podell et al., 2023, arXiv:2307.01952). Only the standard library, numpy and the tokenizers'
calling convention are used here, so the PyTorch side and the offline pipeline builder can import
it without JAX.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from sdxl_common import storage

# Both CLIP tokenizers pad and truncate every prompt to CLIP's context length.
TOKEN_LENGTH = 77

# The SDXL 1.0 base UNet: 2,567,463,684 parameters. For random-init runs at full size and for the
# ahead-of-time TPU estimates, which need the architecture without the weights.
UNET_CONFIG: dict[str, Any] = {
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

# SDXL 1.0 base's scheduler: the keys EulerDiscreteScheduler takes ...
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)
# ... and the keys its scheduler_config.json also carries, for the schedulers users swap in from it
# (DDIM reads clip_sample and set_alpha_to_one).
SCHEDULER_EXTRA_KEYS: dict[str, Any] = dict(
    clip_sample=False,
    set_alpha_to_one=False,
    sample_max_value=1.0,
    skip_prk_steps=True,
)


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Image side / latent side: the VAE halves the resolution at every level but the last (8 for SDXL)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def tokenize(tokenizers: Sequence[Any], prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
    """int32 token ids (N, 77), one array per tokenizer, padded and truncated as SDXL's pipeline does."""
    return tuple(
        np.asarray(
            tok(list(prompts), padding="max_length", max_length=TOKEN_LENGTH, truncation=True, return_tensors="np").input_ids,
            dtype=np.int32,
        )
        for tok in tokenizers
    )


def load_tokenizers(folder: str | epath.PathLike) -> tuple[Any, Any]:
    """The pipeline folder's two CLIP tokenizers (``tokenizer/``, ``tokenizer_2/``)."""
    from transformers import CLIPTokenizer  # heavy; only the callers that tokenise pay for it

    return tuple(CLIPTokenizer.from_pretrained(str(epath.Path(folder) / name)) for name in ("tokenizer", "tokenizer_2"))


def force_zeros_for_empty_prompt(folder: str | epath.PathLike) -> bool:
    """Whether the model's unconditional input is all-zero text embeddings, not the encoded "".

    The one rule for "no prompt", read from the pipeline folder's ``model_index.json`` as diffusers'
    StableDiffusionXLPipeline reads it (default true: SDXL base was trained that way). Caption
    dropout trains the unconditional branch on this input, and every sampler (the JAX sampler,
    validation images, xla_infer, diffusers) feeds it when no negative prompt is given, so all of
    them generate the same images from an exported folder.
    """
    index = epath.Path(folder) / "model_index.json"
    if not index.exists():
        return True
    return bool(storage.read_json(index).get("force_zeros_for_empty_prompt", True))


def scheduler_config(folder: str | epath.PathLike) -> dict[str, Any]:
    """The pipeline folder's ``scheduler/scheduler_config.json``."""
    return storage.read_json(epath.Path(folder) / "scheduler" / "scheduler_config.json")
