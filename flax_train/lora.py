"""LoRA of the UNet: trainable low-rank factors beside frozen weights, exported for diffusers.

A targeted layer (a ``Linear`` or ``Conv`` of ``flax_train.models``) gets a ``lora`` submodule, and
its output becomes ``base(x) + scale * B(A(dropout(x)))`` with ``scale = alpha / rank``: the
computation of peft's ``LoraLayer``, which diffusers' ``load_lora_weights`` builds, so an export
gives diffusers the same UNet. The factors are ``nnx.LoRAParam`` variables, so one filter splits a
model into the trainable factors and the frozen rest (``split``). As peft initialises them, A is
drawn like torch's default init of the layer it stands for (kaiming-uniform) and B is zero, so the
model at step 0 is the base model.

Targets are named like peft's ``target_modules``: a module matches a name when its diffusers module
path is the name or ends with "." + the name (``to_q`` matches every ``...attn1.to_q``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from flax_train.errors import BadInput
from flax_train.models import layers, weights
from flax_train.models.layers import CONV_IN, CONV_OUT
from flax_train.models.unet import UNet2DConditionModel

# The module names a LoRA may target, by group. Attention projections are what diffusers' LoRA
# training scripts target; the feed-forward and resnet convolutions are optional extras.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
RESNET_TARGETS = ("conv1", "conv2", "conv_shortcut")
SUPPORTED_TARGETS = ATTENTION_TARGETS + FEED_FORWARD_TARGETS + RESNET_TARGETS
DEFAULT_TARGETS = ATTENTION_TARGETS

# The file diffusers' LoRA training scripts write and `load_lora_weights` looks for in a folder.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The prefix of the UNet's keys in that file (diffusers' `unet_name`), and the safetensors metadata
# key under which diffusers stores each adapter's peft LoraConfig (its LORA_ADAPTER_METADATA_KEY).
PREFIX = "unet"
METADATA_KEY = "lora_adapter_metadata"

# The key of the step's dropout masks while a training forward pass is traced; None (validation,
# export, sampling): no dropout. A context variable rather than an argument, because the layers
# sit many calls deep inside the UNet and only LoRA needs a key there.
_dropout_key: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout(key: jax.Array) -> Iterator[None]:
    """LoRA dropout on for the forward passes traced inside, with masks drawn from ``key``."""
    token = _dropout_key.set(key)
    try:
        yield
    finally:
        _dropout_key.reset(token)


class LoraAdapter(nnx.Module):
    """The low-rank update of one layer: ``scale * B(A(dropout(x)))``, added to the layer's output.

    Factors are stored in our layouts (A: (in, rank), or HWIO (kh, kw, in, rank) for a
    convolution, with the layer's stride and padding; B: (rank, out), or (rank, 2, inner) for a
    GEGLU projection) and carry the layer's logical axes on their in/out dimensions, so they shard
    like the weights they update; the rank dimension is replicated.
    """

    def __init__(self, layer: nnx.Module, *, rank: int, scale: float, dropout: float, salt: int,
                 key: jax.Array, param_dtype: Any):
        shape = tuple(layer.kernel.get_value().shape)
        axes = layer.kernel.get_metadata().get("axes") or (None,) * len(shape)
        self.scale = scale
        self.dropout = dropout
        self.salt = salt  # tells this layer's dropout masks from the others' under one step key
        self.conv = isinstance(layer, layers.Conv)
        if self.conv:
            kh, kw, cin, cout = shape
            self.stride, self.padding = layer.stride, layer.padding
            a_shape, a_axes = (kh, kw, cin, rank), (None, None, CONV_IN, None)
            b_shape, b_axes = (rank, cout), (None, CONV_OUT)
            fan_in = kh * kw * cin
        else:
            cin, out = shape[0], shape[1:]  # (out,) or (2, inner) for a GEGLU projection
            a_shape, a_axes = (cin, rank), (axes[0], None)
            b_shape, b_axes = (rank, *out), (None, *axes[1:])
            fan_in = cin
        # peft: kaiming_uniform_(a=sqrt(5)) on lora_A, which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        self.a = nnx.LoRAParam(jax.random.uniform(key, a_shape, param_dtype, -bound, bound), axes=a_axes)
        self.b = nnx.LoRAParam(jnp.zeros(b_shape, param_dtype), axes=b_axes)

    def __call__(self, x: jax.Array, dtype: Any) -> jax.Array:
        x = x.astype(dtype)
        key = _dropout_key.get()
        if self.dropout and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dtype)
        a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
        if self.conv:
            pad = ((self.padding, self.padding), (self.padding, self.padding))
            h = jax.lax.conv_general_dilated(x, a, (self.stride, self.stride), pad,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            h = jnp.dot(x, a)
        return jnp.tensordot(h, b, axes=1) * jnp.asarray(self.scale, dtype)


def scale(rank: int, alpha: float | None) -> float:
    """peft's scaling: alpha / rank; alpha null means alpha = rank (diffusers' scripts set it so)."""
    return (rank if alpha is None else alpha) / rank


def matches(path: str, names: Sequence[str]) -> bool:
    return any(path == name or path.endswith("." + name) for name in names)


def targets(unet: nnx.Module, names: Sequence[str]) -> list[tuple[str, nnx.Module]]:
    """(diffusers module path, layer) of every Linear / Conv layer that ``names`` target."""
    return [(path, layer) for path, layer in weights.param_layers(unet)
            if isinstance(layer, (layers.Linear, layers.Conv)) and matches(path, names)]


def inject(unet: nnx.Module, cfg: Any, *, seed: int, param_dtype: Any = jnp.float32) -> nnx.Module:
    """Adds a LoraAdapter to every layer ``cfg`` (a ``config.LoraConfig``) targets; returns ``unet``.

    Layer i's A is drawn from ``fold_in(PRNGKey(seed), i)``: the factors do not depend on how the
    base weights were made (loaded, random, abstract)."""
    chosen = targets(unet, cfg.target_modules)
    if not chosen:
        raise BadInput(f"lora.target_modules {list(cfg.target_modules)} match no layer of this UNet")
    root = jax.random.PRNGKey(seed)
    for i, (_, layer) in enumerate(chosen):
        layer.lora = LoraAdapter(layer, rank=cfg.rank, scale=scale(cfg.rank, cfg.alpha), dropout=cfg.dropout,
                                 salt=i, key=jax.random.fold_in(root, i), param_dtype=param_dtype)
    return unet


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph, LoRA factors, everything else) of a model with adapters."""
    return nnx.split(model, nnx.LoRAParam, ...)


def combine(lora_state: nnx.State, frozen: nnx.State) -> nnx.State:
    """One state for ``nnx.merge(graphdef, ...)`` from the factors and the frozen weights."""
    return nnx.merge_state(frozen, lora_state)


# --------------------------------------------------------------------------------------------
# diffusers' file format


def torch_state_dict(lora_state: nnx.State) -> dict[str, np.ndarray]:
    """The factors under diffusers' keys (``unet.<module path>.lora_A.weight`` / ``lora_B.weight``)
    in torch layouts: Linear A (rank, in), B (out, rank); Conv A (rank, in, kh, kw), B (out, rank, 1, 1).
    ``lora_state``: host (numpy) values, as ``sharding.to_host`` gives."""
    # Our module paths, renamed where the UNet's differ from diffusers' (ff.geglu -> ff.net.0.proj).
    renames = [(re.compile(p), r) for p, r in UNet2DConditionModel.TORCH_KEY_RENAMES]
    adapters: dict[str, dict[str, np.ndarray]] = {}
    for path, value in nnx.to_flat_state(lora_state):
        *module, _, name = path  # (..., "to_q", "lora", "a")
        prefix = ".".join(str(p) for p in module)
        for pattern, replacement in renames:
            prefix = pattern.sub(replacement, prefix)
        adapters.setdefault(prefix, {})[name] = np.asarray(value.get_value())
    out = {}
    for prefix, f in sorted(adapters.items()):
        a, b = f["a"], f["b"]
        if a.ndim == 4:  # convolution: A is HWIO (kh, kw, in, r) -> OIHW; B is a 1x1 convolution
            a_torch, b_torch = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
        else:  # B (r, out) or (r, 2, inner) -> (out, r), the GEGLU halves in torch's order
            a_torch, b_torch = a.T, b.reshape(b.shape[0], -1).T
        out[f"{PREFIX}.{prefix}.lora_A.weight"] = np.ascontiguousarray(a_torch, dtype=np.float32)
        out[f"{PREFIX}.{prefix}.lora_B.weight"] = np.ascontiguousarray(b_torch, dtype=np.float32)
    return out


def adapter_metadata(cfg: Any) -> dict[str, str]:
    """The safetensors metadata diffusers writes with a LoRA: the UNet adapter's peft LoraConfig
    keys, each prefixed "unet.", as JSON. diffusers builds its LoraConfig from it, so the scale
    alpha / rank survives; without it diffusers would assume alpha = rank."""
    config = {"r": cfg.rank, "lora_alpha": cfg.rank if cfg.alpha is None else cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.target_modules), "bias": "none"}
    packed = {f"{PREFIX}.{key}": value for key, value in config.items()}
    return {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def save_weights(lora_state: nnx.State, cfg: Any, path: Any) -> None:
    """Writes the factors (host values) to the file ``path`` for diffusers' ``load_lora_weights``,
    which looks for the name ``WEIGHT_NAME`` in a folder."""
    save_file(torch_state_dict(lora_state), str(path), metadata=adapter_metadata(cfg))


def trainable_count(lora_state: nnx.State) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(lora_state))


def read_metadata(file: Any) -> Mapping[str, Any]:
    """The adapter config stored in a file written by ``save_weights`` (keys without "unet.")."""
    with safe_open(str(file), framework="np") as handle:
        packed = json.loads(handle.metadata()[METADATA_KEY])
    return {key.removeprefix(PREFIX + "."): value for key, value in packed.items()}
