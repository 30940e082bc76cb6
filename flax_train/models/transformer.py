"""The spatial transformer of the SDXL UNet: diffusers' ``Transformer2DModel`` and its parts.

``Transformer2DModel`` (GroupNorm, input projection, ``BasicTransformerBlock`` x N, output
projection, residual) sits after each resnet in the cross-attention levels of the UNet. Each block
is self-attention, cross-attention on the text embeddings, and a GEGLU feed-forward, each
pre-normalised with LayerNorm and added back to its input. Attribute names follow the torch
modules (``attn1.to_q``, ``attn1.to_out.0``), except the feed-forward, whose torch path
``ff.net.0.proj`` / ``ff.net.2`` the UNet maps with ``TORCH_KEY_RENAMES``. Inputs are NHWC images
and (B, L, C) sequences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_train.models import layers
from flax_train.models.layers import EMBED, HEADS, MLP, Dtype


class Attention(nnx.Module):
    """Multi-head attention with bias-free q/k/v projections and a biased output projection.

    Keys and values come from ``context`` (cross-attention) or from ``x`` itself (self-attention).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        attention: str = "xla",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        layers.resolve_attention(attention)  # fail at construction on an unknown implementation
        self.heads = heads
        self.head_dim = head_dim
        self.attention = attention
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = layers.Linear(query_dim, inner, use_bias=False, axes=(EMBED, HEADS), **kw)
        self.to_k = layers.Linear(context_dim, inner, use_bias=False, axes=(EMBED, HEADS), **kw)
        self.to_v = layers.Linear(context_dim, inner, use_bias=False, axes=(EMBED, HEADS), **kw)
        # torch's to_out is [Linear, Dropout]; a one-element list keeps the key "to_out.0".
        self.to_out = nnx.List([layers.Linear(inner, query_dim, axes=(HEADS, EMBED), **kw)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        batch, q_len, _ = x.shape
        split = lambda t: t.reshape(batch, t.shape[1], self.heads, self.head_dim)  # noqa: E731
        out = layers.dot_product_attention(
            split(self.to_q(x)),
            split(self.to_k(context)),
            split(self.to_v(context)),
            implementation=self.attention,
        )
        return self.to_out[0](out.reshape(batch, q_len, self.heads * self.head_dim))


class GEGLUProjection(layers.Linear):
    """Input projection of a GEGLU feed-forward: ``value * gelu(gate)`` from one matmul.

    torch stores one (2 * inner, in) weight whose first ``inner`` rows give the value and the rest
    the gate. Here the kernel is (in, 2, inner): value and gate stay separate along their own axis,
    so the ``mlp`` axis can be split over devices without the halves straddling shards.
    """

    def __init__(
        self,
        in_features: int,
        inner: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        kernel = layers._uniform_fan_in(rngs.params(), (in_features, 2, inner), in_features, param_dtype)
        bias = layers._uniform_fan_in(rngs.params(), (2, inner), in_features, param_dtype)
        self.kernel = nnx.Param(kernel, axes=(EMBED, None, MLP))
        self.bias = nnx.Param(bias, axes=(None, MLP))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...d,dgm->...gm", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, self.dtype)
        value, gate = y[..., 0, :], y[..., 1, :]
        # diffusers' GEGLU uses the exact (erf) GELU, not the tanh approximation.
        return value * jax.nn.gelu(gate, approximate=False)

    @staticmethod
    def to_torch(name: str, value: np.ndarray) -> np.ndarray:
        if name == "kernel":
            return value.reshape(value.shape[0], -1).T
        return value.reshape(-1)

    @staticmethod
    def from_torch(name: str, value: np.ndarray) -> np.ndarray:
        if name == "kernel":
            return value.T.reshape(value.shape[1], 2, -1)
        return value.reshape(2, -1)


class FeedForward(nnx.Module):
    """GEGLU feed-forward with 4x expansion (torch: ``ff.net.0.proj`` and ``ff.net.2``)."""

    def __init__(
        self, dim: int, *, mult: int = 4, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        inner = dim * mult
        self.geglu = GEGLUProjection(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out = layers.Linear(inner, dim, axes=(MLP, EMBED), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.geglu(x))


# torch key fragments of the feed-forward, for the top-level model's TORCH_KEY_RENAMES.
FEED_FORWARD_TORCH_RENAMES = ((r"\.ff\.geglu$", ".ff.net.0.proj"), (r"\.ff\.out$", ".ff.net.2"))


class BasicTransformerBlock(nnx.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        head_dim: int,
        cross_attention_dim: int,
        norm_eps: float = 1e-5,
        attention: str = "xla",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        attn_kw = dict(heads=heads, head_dim=head_dim, attention=attention, rngs=rngs, **kw)
        self.norm1 = layers.LayerNorm(dim, eps=norm_eps, **kw)
        self.attn1 = Attention(dim, **attn_kw)
        self.norm2 = layers.LayerNorm(dim, eps=norm_eps, **kw)
        self.attn2 = Attention(dim, context_dim=cross_attention_dim, **attn_kw)
        self.norm3 = layers.LayerNorm(dim, eps=norm_eps, **kw)
        self.ff = FeedForward(dim, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus the input.

    ``use_linear_projection`` picks Linear projections (SDXL) or 1x1 convolutions (SD 1.x style);
    on NHWC both are the same matmul, only the stored weight layout differs.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        heads: int,
        head_dim: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        attention: str = "xla",
        remat: str = "none",
        scan_layers: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.remat = remat
        self.scan_layers = scan_layers  # run the blocks as one lax.scan (layers.call_stack)
        self.use_linear_projection = use_linear_projection
        inner = heads * head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = layers.GroupNorm(norm_num_groups, in_channels, eps=1e-6, **kw)
        if use_linear_projection:
            # The same logical axes as the 1x1 convolution variant, so both shard alike.
            axes = (layers.CONV_IN, layers.CONV_OUT)
            self.proj_in = layers.Linear(in_channels, inner, axes=axes, rngs=rngs, **kw)
            self.proj_out = layers.Linear(inner, in_channels, axes=axes, rngs=rngs, **kw)
        else:
            self.proj_in = layers.Conv(in_channels, inner, 1, rngs=rngs, **kw)
            self.proj_out = layers.Conv(inner, in_channels, 1, rngs=rngs, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    heads=heads,
                    head_dim=head_dim,
                    cross_attention_dim=cross_attention_dim,
                    attention=attention,
                    rngs=rngs,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.reshape(batch, height * width, channels))
        else:
            h = self.proj_in(h)
            h = h.reshape(batch, height * width, h.shape[-1])
        h = layers.call_stack(list(self.transformer_blocks), h, context, remat=self.remat, scan=self.scan_layers)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(batch, height, width, channels)
        else:
            h = self.proj_out(h.reshape(batch, height, width, h.shape[-1]))
        return h + x.astype(h.dtype)
