"""flax_train.flops: our count of a UNet's forward against torch's FLOP counter on diffusers' UNet,
and loops counted as often as they run."""

import jax
import jax.numpy as jnp
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

import flax_train.models as models
from flax_train import flops

# SDXL's layout (three levels, text-time conditioning, 10-deep transformers at the last level)
# at a width small enough to count on a CPU in seconds.
CONFIG = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 3),
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    cross_attention_dim=48,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    sample_size=16,
)


@pytest.mark.parametrize("size", [16, 24])
def test_unet_forward_flops_equal_torchs_count_of_the_diffusers_unet(size):
    torch_unet = TorchUNet(**CONFIG).eval()
    # Attention as explicit batched matrix products: torch's counter has no formula for the CPU
    # scaled_dot_product_attention kernel and would leave attention out.
    torch_unet.set_attn_processor(AttnProcessor())
    inputs = dict(
        sample=torch.zeros(1, 4, size, size),
        timestep=torch.tensor([10]),
        encoder_hidden_states=torch.zeros(1, 77, 48),
        added_cond_kwargs={"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)},
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        torch_unet(**inputs)

    abstract = models.abstract({"_class_name": "UNet2DConditionModel", **CONFIG})
    shapes = {
        "latents": jax.ShapeDtypeStruct((8, 4, size, size), jnp.float32),  # batch 8: counted per sample
        "prompt_embeds": jax.ShapeDtypeStruct((8, 77, 48), jnp.float32),
        "pooled_prompt_embeds": jax.ShapeDtypeStruct((8, 32), jnp.float32),
        "add_time_ids": jax.ShapeDtypeStruct((8, 6), jnp.float32),
    }
    assert flops.unet_forward_flops(abstract, shapes) == counter.get_total_flops()
