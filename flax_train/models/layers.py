"""Building blocks shared by the SDXL UNet, VAE and CLIP text encoders.

Conventions every model in this package follows, so that weight conversion and sharding stay
generic:

* Attribute paths mirror the diffusers / transformers module paths (``down_blocks[0].resnets[1]
  .conv1``), so a torch key is the module path joined by dots plus the torch parameter name.
  Each layer class knows its torch parameter names and layouts (``TORCH_NAMES`` and
  ``to_torch`` / ``from_torch``); ``weights.py`` needs nothing else.
* Activations are channels-last inside the models (NHWC images, (B, L, C) sequences): that is
  what XLA on TPU prefers. Public model entry points accept and return NCHW like diffusers.
* Every parameter carries logical axis names in its ``axes`` metadata (for example
  ``("embed", "mlp")``). ``flax_train.sharding`` maps those names to mesh axes with one table.
* Parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` where they are used;
  normalisations and softmax statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax_train.errors import BadInput

Dtype = jnp.dtype | type

# Logical axis names used on weights. sharding.py maps each to a mesh axis (or to None).
EMBED = "embed"  # model width of a transformer / MLP input
MLP = "mlp"  # hidden width of a feed-forward layer
HEADS = "heads"  # attention projection width (heads x head_dim)
CONV_IN = "conv_in"  # input channels of a convolution
CONV_OUT = "conv_out"  # output channels of a convolution
VOCAB = "vocab"
NORM = "norm"  # scales and biases of normalisations: always replicated


def _uniform_fan_in(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Dtype) -> jax.Array:
    # torch's default Linear/Conv init (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(fan_in), +).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nnx.Module):
    """y = x @ kernel + bias. ``kernel`` is (in, out); torch stores ``weight`` as (out, in)."""

    TORCH_NAMES = {"kernel": "weight", "bias": "bias"}
    lora = None  # a flax_train.lora.LoraAdapter when a LoRA targets this layer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        axes: tuple[str | None, str | None] = (EMBED, MLP),
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        key = rngs.params()
        self.kernel = nnx.Param(
            _uniform_fan_in(key, (in_features, out_features), in_features, param_dtype), axes=axes
        )
        self.bias = (
            nnx.Param(
                _uniform_fan_in(rngs.params(), (out_features,), in_features, param_dtype),
                axes=(axes[1],),
            )
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, self.dtype)
        return y

    @staticmethod
    def to_torch(name: str, value: np.ndarray) -> np.ndarray:
        return value.T if name == "kernel" else value

    @staticmethod
    def from_torch(name: str, value: np.ndarray) -> np.ndarray:
        return value.T if name == "kernel" else value


class Conv(nnx.Module):
    """2-D convolution on NHWC. ``kernel`` is HWIO; torch stores ``weight`` as OIHW."""

    TORCH_NAMES = {"kernel": "weight", "bias": "bias"}
    lora = None  # a flax_train.lora.LoraAdapter when a LoRA targets this layer

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.stride = stride
        self.padding = padding
        fan_in = in_channels * kernel_size * kernel_size
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(
            _uniform_fan_in(rngs.params(), shape, fan_in, param_dtype),
            axes=(None, None, CONV_IN, CONV_OUT),
        )
        self.bias = (
            nnx.Param(
                _uniform_fan_in(rngs.params(), (out_channels,), fan_in, param_dtype),
                axes=(CONV_OUT,),
            )
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=pad,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x, self.dtype)
        return y

    @staticmethod
    def to_torch(name: str, value: np.ndarray) -> np.ndarray:
        return value.transpose(3, 2, 0, 1) if name == "kernel" else value

    @staticmethod
    def from_torch(name: str, value: np.ndarray) -> np.ndarray:
        return value.transpose(2, 3, 1, 0) if name == "kernel" else value


class GroupNorm(nnx.Module):
    """GroupNorm over the last (channel) axis of NHWC or (B, L, C) inputs; statistics in float32."""

    TORCH_NAMES = {"scale": "weight", "bias": "bias"}

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        if num_channels % num_groups:
            raise BadInput(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype), axes=(NORM,))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), axes=(NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        grouped = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)

    to_torch = from_torch = staticmethod(lambda name, value: value)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32."""

    TORCH_NAMES = {"scale": "weight", "bias": "bias"}

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), axes=(NORM,))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype), axes=(NORM,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)

    to_torch = from_torch = staticmethod(lambda name, value: value)


class Embed(nnx.Module):
    """Lookup table; the same (num, dim) layout as torch's ``nn.Embedding.weight``."""

    TORCH_NAMES = {"embedding": "weight"}

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str | None, str | None] = (VOCAB, EMBED),
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        init = 0.02 * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype)
        self.embedding = nnx.Param(init, axes=axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    to_torch = from_torch = staticmethod(lambda name, value: value)


class Component(nnx.Module):
    """Base of the top-level SDXL components (UNet, VAE, text encoders).

    Subclasses take ``(config, *, dtype, param_dtype, rngs, attention, remat)`` and keep the config
    in ``self.config``; ``from_config`` is the diffusers/transformers spelling of the same call.
    """

    WEIGHTS_NAME: str

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
        attention: str = "xla",
        remat: str = "none",
    ):
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention, remat=remat)


# Layers that own parameters; weights.py walks a model and converts exactly these.
PARAM_LAYERS: tuple[type[nnx.Module], ...] = (Linear, Conv, GroupNorm, LayerNorm, Embed)


# --------------------------------------------------------------------------------------------
# Attention

Attention = Literal["xla", "cudnn", "auto"]
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = get_args(Attention)


def resolve_attention(implementation: str) -> str:
    """'auto' picks cuDNN's fused kernel on GPU and XLA's elsewhere; the results agree."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise BadInput(f"attention implementation {implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return implementation


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    is_causal: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention on (batch, length, heads, head_dim) inputs.

    The one place attention is computed, so a faster kernel (cuDNN on GPU, later a Pallas
    kernel on TPU) is a one-line choice with identical semantics. cuDNN needs bf16/fp16
    inputs; for float32 the XLA path is used.
    """
    impl = resolve_attention(implementation)
    if impl == "cudnn" and query.dtype == jnp.float32:
        impl = "xla"
    if impl == "xla":
        # Softmax in float32 whatever the compute dtype: bf16 logits lose too much for long sequences.
        scale = 1.0 / math.sqrt(query.shape[-1])
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
        if is_causal:
            q_len, k_len = query.shape[1], key.shape[1]
            causal = jnp.tril(jnp.ones((q_len, k_len), dtype=bool))
            logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal, implementation=impl)


# --------------------------------------------------------------------------------------------
# Rematerialisation

Remat = Literal["none", "full", "dots", "dots_no_batch"]
REMAT_POLICIES: dict[Remat, Callable | None] = {
    "none": None,  # keep every activation: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul/conv outputs, recompute the cheap ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The config offers the Literal's names; each must have a policy here.
assert tuple(REMAT_POLICIES) == get_args(Remat)


def call_block(block: nnx.Module, *args, remat: str = "none"):
    """Calls ``block(*args)``, rematerialised with the named policy unless ``remat == "none"``."""
    if remat not in REMAT_POLICIES:
        raise BadInput(f"remat policy {remat!r}; choose one of {tuple(REMAT_POLICIES)}")
    if remat == "none":
        return block(*args)
    # jax.checkpoint of a pure function of the block's weights, not nnx.remat: the blocks change no
    # state when called, and nnx.remat refuses to run inside a loop body (lax.scan / fori_loop,
    # as the sampler calls the UNet) with a TraceContextError.
    graphdef, state = nnx.split(block)

    def run(state, *inputs):
        return nnx.merge(graphdef, state)(*inputs)

    return jax.checkpoint(run, policy=REMAT_POLICIES[remat])(state, *args)


def timestep_embedding(
    timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of (B,) scalars into (B, dim), with diffusers' ``Timesteps`` conventions."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
