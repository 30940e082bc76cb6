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

import functools
import math
from typing import Any, Callable, Literal, Mapping, Sequence, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sdxl_common.errors import BadInput
from flax_train.sharding import BATCH_AXES

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
        **options: Any,
    ):
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **options)


# Layers that own parameters; weights.py walks a model and converts exactly these.
PARAM_LAYERS: tuple[type[nnx.Module], ...] = (Linear, Conv, GroupNorm, LayerNorm, Embed)


# --------------------------------------------------------------------------------------------
# Attention

Attention = Literal["xla", "cudnn", "splash", "auto"]
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = get_args(Attention)


def resolve_attention(implementation: str) -> str:
    """'auto' picks cuDNN's fused kernel on GPU and XLA's elsewhere; the results agree.

    'auto' never picks splash: it is opt-in until it is measured faster than XLA on a TPU.
    Splash is refused on a GPU, where only its slow interpret mode could run.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise BadInput(f"attention implementation {implementation!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "splash" and jax.default_backend() == "gpu":
        raise BadInput("attention 'splash' is the TPU kernel (interpret mode elsewhere is for CPU tests); "
                       "on a GPU use cudnn, xla or auto")
    if implementation == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return implementation


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    is_causal: bool = False,
    key_mask: jax.Array | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Multi-head attention on (batch, length, heads, head_dim) inputs; ``key_mask`` (batch,
    key length) bool hides the keys where it is false.

    The one place attention is computed, so a faster kernel (cuDNN on GPU, splash on TPU) is a
    one-line choice with identical semantics. cuDNN needs bf16/fp16 inputs; for float32 the XLA
    path is used, and so it is with a key mask (only the text encoders' short sequences take one,
    for compel's prompt weighting). See ``splash_attention`` for the TPU kernel.
    """
    impl = resolve_attention(implementation)
    if (impl == "cudnn" and query.dtype == jnp.float32) or key_mask is not None:
        impl = "xla"
    if impl == "splash":
        return splash_attention(query, key, value, is_causal=is_causal)
    if impl == "xla":
        # Softmax in float32 whatever the compute dtype: bf16 logits lose too much for long sequences.
        scale = 1.0 / math.sqrt(query.shape[-1])
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
        if is_causal:
            q_len, k_len = query.shape[1], key.shape[1]
            causal = jnp.tril(jnp.ones((q_len, k_len), dtype=bool))
            logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return even_length_attention(query, key, value, is_causal=is_causal, implementation=impl)


def even_length_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool = False, implementation: str = "cudnn"
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with odd sequence lengths padded by one to even ones.

    cuDNN's training kernels refuse odd lengths (JAX 0.11 applies its "lengths must be even with a
    bias" rule to the placeholder it passes for no bias), and SDXL's cross-attention has 77 text
    tokens. The padded key is masked through ``key_value_seq_lengths``; under a causal mask it comes
    after every real query and is hidden already. A padded query's output row is dropped.
    """
    q_len, k_len = query.shape[1], key.shape[1]

    def padded(x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))

    lengths = None
    if k_len % 2 and not is_causal:
        lengths = jnp.full((query.shape[0],), k_len, jnp.int32)
    out = jax.nn.dot_product_attention(padded(query), padded(key), padded(value), is_causal=is_causal,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :q_len]


# The splash kernel tiles both sequences in blocks whose size is a multiple of the TPU's 128 lanes.
SPLASH_LANES = 128
SPLASH_BLOCKS = (512, 256, 128)  # tried largest first; 512 is MaxDiffusion's choice for SDXL


def _splash_block(length: int) -> int:
    return next(b for b in SPLASH_BLOCKS if length % b == 0)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool = False) -> jax.Array:
    """``dot_product_attention`` with the TPU flash-attention kernel that ships with JAX (splash).

    Pallas' splash kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) never holds the
    (q_len, k_len) logits in memory and runs its own backward kernels. What it needs, done here:

    * (heads, length, head_dim) per example: the inputs are transposed and the kernel vmapped
      over the batch;
    * no scaling of its own: the query is scaled by 1/sqrt(head_dim) first;
    * lengths a multiple of its blocks: both sequences are zero-padded to a multiple of 128
      (SDXL's 77 text tokens become 128) and a static mask gives the padded keys no weight; the
      padded queries' rows are cut off the output;
    * one device's data: XLA cannot split a Mosaic kernel over devices itself, so under a mesh
      (``jax.set_mesh``; the train step and validation sampling set theirs) the kernel runs per
      device in a ``shard_map``: batch over the batch axes, heads over ``tensor``. A program on
      several TPU devices without one fails to compile with JAX's "Mosaic kernels cannot be
      automatically partitioned".

    On a TPU it is the compiled Mosaic kernel; on any other platform the same kernel runs in
    Pallas interpret mode, which is exact but far slower than ``xla`` (it is there for tests). The
    choice is made when the program is lowered (``lax.platform_dependent``), so compiling for a
    TPU from a CPU host (benchmarks/tpu_aot.py) gets the real kernel.
    """
    batch, q_len, heads, head_dim = query.shape
    k_len = key.shape[1]
    if key.shape != value.shape or key.shape[0] != batch or key.shape[2:] != (heads, head_dim):
        raise BadInput(f"splash attention: query {query.shape}, key {key.shape} and value {value.shape} "
                       "must share batch, heads and head_dim")
    if is_causal and q_len != k_len:
        raise BadInput(f"splash attention: causal attention needs as many queries as keys, got {q_len} and {k_len}")
    pad = lambda n: -(-n // SPLASH_LANES) * SPLASH_LANES  # noqa: E731
    q_pad, k_pad = pad(q_len), pad(k_len)

    def per_device(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        q = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(q.dtype)
        # (B, L, H, D) -> (B, H, L, D), sequences padded to whole blocks.
        q, k, v = (
            jnp.pad(t.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, n - t.shape[1]), (0, 0)))
            for t, n in ((q, q_pad), (k, k_pad), (v, k_pad))
        )
        return platform_dependent_splash(q, k, v, q_len=q_len, k_len=k_len, is_causal=is_causal)

    out = _per_device(per_device, query, key, value)
    return out[:, :, :q_len].transpose(0, 2, 1, 3)


def platform_dependent_splash(
    q: jax.Array, k: jax.Array, v: jax.Array, *, q_len: int, k_len: int, is_causal: bool
) -> jax.Array:
    """The splash kernel on padded (batch, heads, length, head_dim) inputs; Mosaic on TPU, interpret elsewhere."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # imported when used: Pallas is big

    heads, q_pad, k_pad = q.shape[1], q.shape[2], k.shape[2]
    if is_causal:  # a real query i sees keys j <= i < k_len: the causal mask also hides the padding
        mask = splash.CausalMask((q_pad, k_pad))
    elif k_pad == k_len:
        mask = splash.FullMask((q_pad, k_pad))
    else:
        mask = splash.NumpyMask(np.broadcast_to(np.arange(k_pad) < k_len, (q_pad, k_pad)))
    block_q, block_kv = _splash_block(q_pad), _splash_block(k_pad)
    blocks = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )  # fmt: skip

    def run(q, k, v, *, interpret: bool):
        kernel = splash.make_splash_mha(
            splash.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
            interpret=interpret,
        )
        return jax.vmap(kernel)(q, k, v)

    del q_len  # the padded queries attend like real ones; the caller drops their rows
    return jax.lax.platform_dependent(
        q, k, v, tpu=functools.partial(run, interpret=False), default=functools.partial(run, interpret=True)
    )


def _per_device(fn: Callable, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """``fn(query, key, value)`` per device under the ambient mesh: batch over its batch axes, heads over tensor.

    An axis whose size does not divide its dimension is left out (that dimension is then whole on
    every device, as ``sharding.spec_for`` replicates it): still correct, only less parallel.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(query, key, value)
    batch_axes, size = [], 1
    for axis in BATCH_AXES:  # in the order the trainer splits the batch, so no shard moves
        if axis in mesh.axis_names and query.shape[0] % (size * mesh.shape[axis]) == 0:
            batch_axes.append(axis)
            size *= mesh.shape[axis]
    head_axis = "tensor" if "tensor" in mesh.axis_names and query.shape[2] % mesh.shape["tensor"] == 0 else None
    spec = jax.sharding.PartitionSpec(tuple(batch_axes) or None, None, head_axis, None)
    out_spec = jax.sharding.PartitionSpec(tuple(batch_axes) or None, head_axis, None, None)  # (B, H, L, D)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=out_spec, check_vma=False)(
        query, key, value
    )


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


def call_stack(blocks: Sequence[nnx.Module], x: jax.Array, *args, remat: str = "none", scan: bool = False) -> jax.Array:
    """``x = block(x, *args)`` for each block in turn, each rematerialised as ``call_block`` does.

    With ``scan``, blocks of one structure (the same graph, the same shapes) run as one
    ``lax.scan`` over their weights stacked along a new leading axis: XLA then compiles the block
    once instead of once per block, which is most of SDXL's compile time (60 of its 70 transformer
    layers sit in stacks of 10). The weights stay stored per block, under their own names; the
    stacked copy exists only inside the compiled program (for SDXL's stacks of 10, a transient
    copy of those weights). Blocks that differ (e.g. LoRA adapters with per-layer dropout salts)
    run one after another as without ``scan``.
    """
    if not scan or len(blocks) < 2:
        for block in blocks:
            x = call_block(block, x, *args, remat=remat)
        return x
    graphdefs, states = zip(*(nnx.split(block) for block in blocks))
    same_shapes = len({jax.tree.structure(s) for s in states}) == 1 and all(
        [v.shape for v in jax.tree.leaves(s)] == [v.shape for v in jax.tree.leaves(states[0])] for s in states)
    if any(g != graphdefs[0] for g in graphdefs) or not same_shapes:
        return call_stack(blocks, x, *args, remat=remat, scan=False)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    graphdef = graphdefs[0]

    def body(h, state):
        return nnx.merge(graphdef, state)(h, *args), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(body, x, stacked)[0]


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
