"""The SDXL VAE: diffusers' ``AutoencoderKL`` (KL-regularised autoencoder) in Flax NNX.

    vae = flax_train.models.load("sdxl/vae")
    mean, logvar = vae.encode(images)            # images NCHW in [-1, 1]
    latents = sample_posterior(mean, logvar, key) * vae.config["scaling_factor"]
    images = vae.decode(latents / vae.config["scaling_factor"])

Submodules carry diffusers' names (``encoder.down_blocks.0.resnets.1.conv2``, ``decoder.mid_block
.attentions.0.to_q``...), so the safetensors of a diffusers ``vae/`` folder load as they are.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from sdxl_common.errors import BadInput

from flax_train.models import freeze_config, layers
from flax_train.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from flax_train.models.layers import Dtype

# diffusers' AutoencoderKL defaults, used for keys a config.json leaves out.
DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# Every norm in the VAE uses this epsilon, whatever the config says (diffusers hard-codes it too).
NORM_EPS = 1e-6

# cuDNN's fused attention handles head dims up to 128 (256 on Hopper, inference only); the VAE's
# single head is as wide as the block (512 in SDXL), so wider heads use the XLA path.
CUDNN_MAX_HEAD_DIM = 128


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian ``encode`` describes: mean + exp(logvar / 2) * noise."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over the H*W positions of a feature map, with GroupNorm and a residual."""

    def __init__(
        self, channels: int, *, groups: int, attention: str, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.group_norm = layers.GroupNorm(groups, channels, eps=NORM_EPS, **kw)
        self.to_q = layers.Linear(channels, channels, axes=(layers.EMBED, layers.HEADS), rngs=rngs, **kw)
        self.to_k = layers.Linear(channels, channels, axes=(layers.EMBED, layers.HEADS), rngs=rngs, **kw)
        self.to_v = layers.Linear(channels, channels, axes=(layers.EMBED, layers.HEADS), rngs=rngs, **kw)
        # torch's ``to_out`` is ModuleList([Linear, Dropout]); index 0 keeps the key ``to_out.0``.
        self.to_out = nnx.List([layers.Linear(channels, channels, axes=(layers.HEADS, layers.EMBED), rngs=rngs, **kw)])
        implementation = layers.resolve_attention(attention)
        if implementation == "cudnn" and channels > CUDNN_MAX_HEAD_DIM:
            implementation = "xla"
        self.attention = implementation

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x.reshape(b, h * w, c))
        # (B, L, heads=1, C)
        q, k, v = (proj(tokens)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
        attended = layers.dot_product_attention(q, k, v, implementation=self.attention).reshape(b, h * w, c)
        return x.astype(attended.dtype) + self.to_out[0](attended).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet -> (attention) -> resnet at the lowest resolution (diffusers' ``UNetMidBlock2D``)."""

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        add_attention: bool,
        attention: str,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=NORM_EPS, **kw) for _ in range(2)]
        )
        self.attentions = nnx.List(
            [SpatialSelfAttention(channels, groups=groups, attention=attention, **kw)] if add_attention else []
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=None,
                    groups=groups,
                    eps=NORM_EPS,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        # The encoder pads bottom/right only before its stride-2 convolutions (padding=0).
        self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, **kw)]) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=None,
                    groups=groups,
                    eps=NORM_EPS,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    """Image (NHWC) -> 2 * latent_channels maps (mean and log-variance), downsampled 2^(levels-1) times."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        add_attention: bool,
        attention: str,
        remat: str,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.remat = remat
        self.conv_in = layers.Conv(in_channels, block_out_channels[0], 3, padding=1, **kw)
        levels = len(block_out_channels)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    block_out_channels[max(i - 1, 0)],
                    block_out_channels[i],
                    num_layers=layers_per_block,
                    groups=groups,
                    add_downsample=i < levels - 1,
                    **kw,
                )
                for i in range(levels)
            ]
        )
        top = block_out_channels[-1]
        self.mid_block = MidBlock(top, groups=groups, add_attention=add_attention, attention=attention, **kw)
        self.conv_norm_out = layers.GroupNorm(groups, top, eps=NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = layers.Conv(top, out_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = layers.call_block(block, x, remat=self.remat)
        x = layers.call_block(self.mid_block, x, remat=self.remat)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (NHWC) -> image, upsampled 2^(levels-1) times; channels run through the levels in reverse."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
        add_attention: bool,
        attention: str,
        remat: str,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.remat = remat
        top = block_out_channels[-1]
        self.conv_in = layers.Conv(in_channels, top, 3, padding=1, **kw)
        self.mid_block = MidBlock(top, groups=groups, add_attention=add_attention, attention=attention, **kw)
        reversed_channels = tuple(reversed(block_out_channels))
        levels = len(reversed_channels)
        # One resnet more per level than the encoder, as in diffusers' Decoder.
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    reversed_channels[max(i - 1, 0)],
                    reversed_channels[i],
                    num_layers=layers_per_block + 1,
                    groups=groups,
                    add_upsample=i < levels - 1,
                    **kw,
                )
                for i in range(levels)
            ]
        )
        bottom = block_out_channels[0]
        self.conv_norm_out = layers.GroupNorm(groups, bottom, eps=NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = layers.Conv(bottom, out_channels, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        x = layers.call_block(self.mid_block, x, remat=self.remat)
        for block in self.up_blocks:
            x = layers.call_block(block, x, remat=self.remat)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(layers.Component):
    """diffusers' ``AutoencoderKL``: ``encode`` to a diagonal Gaussian over latents, ``decode`` back.

    Public methods take and return NCHW arrays like diffusers; the work inside is NHWC.
    """

    WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
    # Checkpoints saved by diffusers before its attention refactor name the mid-block attention's
    # projections query/key/value/proj_attn; diffusers still loads them, and so do we.
    TORCH_CHECKPOINT_RENAMES = tuple(
        (rf"(\.attentions\.\d+\.){old}\.", rf"\1{new}.")
        for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
    )

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
        attention: str = "xla",
        remat: str = "none",
    ):
        cfg = {**DEFAULT_CONFIG, "_class_name": "AutoencoderKL", **config}
        if cfg["act_fn"] not in ("silu", "swish"):
            raise BadInput(f"AutoencoderKL: act_fn {cfg['act_fn']!r} is not supported (only silu)")
        levels = len(cfg["block_out_channels"])
        for name, block_type in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if tuple(cfg[name]) != (block_type,) * levels:
                raise BadInput(f"AutoencoderKL: {name} must be {levels} x {block_type}, got {cfg[name]}")
        if remat not in layers.REMAT_POLICIES:
            raise BadInput(f"remat policy {remat!r}; choose one of {tuple(layers.REMAT_POLICIES)}")
        self.config = freeze_config(cfg)
        self.dtype = dtype

        latent = cfg["latent_channels"]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        shared = dict(
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg["layers_per_block"],
            groups=cfg["norm_num_groups"],
            add_attention=cfg["mid_block_add_attention"],
            attention=attention,
            remat=remat,
            **kw,
        )
        self.encoder = Encoder(cfg["in_channels"], 2 * latent, **shared)
        self.decoder = Decoder(latent, cfg["out_channels"], **shared)
        self.quant_conv = layers.Conv(2 * latent, 2 * latent, 1, **kw) if cfg["use_quant_conv"] else None
        self.post_quant_conv = layers.Conv(latent, latent, 1, **kw) if cfg["use_post_quant_conv"] else None


    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, C, H, W) -> (mean, logvar), each (B, latent_channels, H/f, W/f).

        The log-variance is clipped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution`` does.
        """
        moments = self.encoder(jnp.transpose(x, (0, 2, 3, 1)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        return jnp.transpose(mean, (0, 3, 1, 2)), jnp.transpose(logvar, (0, 3, 1, 2))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, latent_channels, h, w), already divided by the scaling factor -> images (B, C, H, W)."""
        z = jnp.transpose(z, (0, 2, 3, 1)).astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean (diffusers' ``forward`` without sampling)."""
        mean, _ = self.encode(x)
        return self.decode(mean)
