"""Convolutional blocks shared by the SDXL UNet and the VAE: resnet block, down- and upsampler.

They follow diffusers' ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D`` (the variants SDXL
uses: default time-embedding norm, no dropout, convolutional resampling), with the same
attribute names so the torch weight keys line up. Inputs and outputs are NHWC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_train.models import layers
from flax_train.models.layers import Dtype


class ResnetBlock2D(nnx.Module):
    """GroupNorm -> SiLU -> conv -> (+ time embedding) -> GroupNorm -> SiLU -> conv, plus a shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        output_scale_factor: float = 1.0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        self.output_scale_factor = output_scale_factor
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.GroupNorm(groups, in_channels, eps=eps, **kw)
        self.conv1 = layers.Conv(in_channels, out_channels, 3, padding=1, rngs=rngs, **kw)
        self.time_emb_proj = (
            layers.Linear(temb_channels, out_channels, axes=(layers.EMBED, layers.CONV_OUT), rngs=rngs, **kw)
            if temb_channels is not None
            else None
        )
        self.norm2 = layers.GroupNorm(groups_out, out_channels, eps=eps, **kw)
        self.conv2 = layers.Conv(out_channels, out_channels, 3, padding=1, rngs=rngs, **kw)
        # diffusers adds a 1x1 projection on the residual path exactly when the width changes.
        self.conv_shortcut = (
            layers.Conv(in_channels, out_channels, 1, rngs=rngs, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D was built with temb_channels but called without temb")
            h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Halves H and W with a stride-2 3x3 convolution (or 2x2 average pooling without ``use_conv``).

    ``padding=0`` pads one row and column at the bottom/right only, as diffusers does for the VAE
    encoder; ``padding=1`` pads symmetrically, as in the UNet.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        use_conv: bool = True,
        padding: int = 1,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = channels if out_channels is None else out_channels
        if not use_conv and out_channels != channels:
            raise ValueError("Downsample2D without a convolution cannot change the channel count")
        self.use_conv = use_conv
        self.padding = padding
        self.conv = (
            layers.Conv(
                channels, out_channels, 3, stride=2, padding=padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            if use_conv
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv is None:
            b, h, w, c = x.shape
            return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour resize of NHWC ``x``: x2 by default, else to ``output_size`` (torch's rule)."""
    b, h, w, c = x.shape
    if output_size is None or tuple(output_size) == (2 * h, 2 * w):
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    out_h, out_w = output_size
    return x[:, _nearest_source_index(h, out_h)][:, :, _nearest_source_index(w, out_w)]


def _nearest_source_index(size_in: int, size_out: int) -> np.ndarray:
    # torch's 'nearest' rule, float32 arithmetic included: src = min(floor(dst * (in / out)), in - 1).
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 (or to ``output_size``), then a 3x3 convolution."""

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        use_conv: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = channels if out_channels is None else out_channels
        self.conv = (
            layers.Conv(channels, out_channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if use_conv
            else None
        )

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return self.conv(x) if self.conv is not None else x
