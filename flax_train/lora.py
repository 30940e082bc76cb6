"""LoRA of the UNet (and optionally both text encoders): trainable low-rank factors beside frozen
weights, exported for diffusers.

A targeted layer (a ``Linear`` or ``Conv`` of ``flax_train.models``) gets a ``lora`` submodule, and
its output becomes ``base(x) + scale * B(A(dropout(x)))`` with ``scale = alpha / rank``: the
computation of peft's ``LoraLayer``, which diffusers' ``load_lora_weights`` builds, so an export
gives diffusers the same UNet. The factors are ``nnx.LoRAParam`` variables, so one filter splits a
model into the trainable factors and the frozen rest (``split``). As peft initialises them, A is
drawn like torch's default init of the layer it stands for (kaiming-uniform) and B is zero, so the
model at step 0 is the base model.

Targets are named like peft's ``target_modules``: a module matches a name when its diffusers module
path is the name or ends with "." + the name (``to_q`` matches every ``...attn1.to_q``). The text
encoders' modules have transformers' paths (``text_model.encoder.layers.0.self_attn.q_proj``).

With ``lora.train_text_encoder`` the trained model is an ``nnx.Dict`` of the three (``inject_all``),
and the factors' state paths start with the component's name; without it, the UNet alone, whose
paths never start with one (``component_of``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
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

from sdxl_common import lora_files
from sdxl_common.errors import BadInput
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
# The text encoders' attention projections: what diffusers' scripts adapt with --train_text_encoder.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# The file diffusers' LoRA training scripts write, its metadata key (see lora_files), and the
# prefix of the UNet's keys in it (diffusers' `unet_name`).
WEIGHT_NAME, METADATA_KEY = lora_files.WEIGHT_NAME, lora_files.METADATA_KEY
PREFIX = "unet"

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


def targets(model: nnx.Module, names: Sequence[str]) -> list[tuple[str, nnx.Module]]:
    """(diffusers / transformers module path, layer) of every Linear / Conv layer that ``names`` target."""
    return [(path, layer) for path, layer in weights.param_layers(model)
            if isinstance(layer, (layers.Linear, layers.Conv)) and matches(path, names)]


def inject(model: nnx.Module, cfg: Any, *, seed: int, param_dtype: Any = jnp.float32,
           names: Sequence[str] | None = None, first: int = 0) -> nnx.Module:
    """Adds a LoraAdapter to every layer ``names`` (default: ``cfg.target_modules``, ``cfg`` a
    ``config.LoraConfig``) target; returns ``model``.

    Layer i's A is drawn from ``fold_in(PRNGKey(seed), first + i)``: the factors do not depend on
    how the base weights were made (loaded, random, abstract)."""
    what = "lora.target_modules" if names is None else "LoRA targets"
    names = cfg.target_modules if names is None else names
    chosen = targets(model, names)
    if not chosen:
        raise BadInput(f"{what} {list(names)} match no layer of this {type(model).__name__}")
    root = jax.random.PRNGKey(seed)
    for i, (_, layer) in enumerate(chosen, first):
        # Without dropout the salt is unused: one value keeps the layers of a stack identical, so
        # model.scan_layers can scan them (layers.call_stack).
        layer.lora = LoraAdapter(layer, rank=cfg.rank, scale=scale(cfg.rank, cfg.alpha), dropout=cfg.dropout,
                                 salt=i if cfg.dropout else 0, key=jax.random.fold_in(root, i),
                                 param_dtype=param_dtype)
    return model


def inject_all(unet: nnx.Module, text_encoders: Mapping[str, nnx.Module], cfg: Any, *, seed: int,
               param_dtype: Any = jnp.float32) -> nnx.Module:
    """What a LoRA run trains: ``unet`` with adapters, or with ``text_encoders`` (name -> encoder,
    for ``lora.train_text_encoder``) an ``nnx.Dict`` of the UNet and the encoders, their attention
    projections adapted too. Layers are numbered on across the models, so no two share an A draw or
    a dropout salt; the UNet's are those of a UNet-only LoRA."""
    inject(unet, cfg, seed=seed, param_dtype=param_dtype)
    if not text_encoders:
        return unet
    first = len(targets(unet, cfg.target_modules))
    for encoder in text_encoders.values():
        inject(encoder, cfg, seed=seed, param_dtype=param_dtype, names=TEXT_ENCODER_TARGETS, first=first)
        first += len(targets(encoder, TEXT_ENCODER_TARGETS))
    return nnx.Dict(**{PREFIX: unet}, **text_encoders)


def components(model: nnx.Module) -> dict[str, nnx.Module]:
    """component -> model of what ``inject_all`` returned (the UNet alone is {"unet": it})."""
    return dict(model.items()) if isinstance(model, nnx.Dict) else {PREFIX: model}


def component_of(path: tuple) -> tuple[str, tuple]:
    """(component, path inside it) of a state path of ``inject_all``'s model."""
    return (str(path[0]), path[1:]) if path and path[0] in lora_files.COMPONENTS else (PREFIX, path)


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph, LoRA factors, everything else) of a model with adapters."""
    return nnx.split(model, nnx.LoRAParam, ...)


def combine(lora_state: nnx.State, frozen: nnx.State) -> nnx.State:
    """One state for ``nnx.merge(graphdef, ...)`` from the factors and the frozen weights."""
    return nnx.merge_state(frozen, lora_state)


# --------------------------------------------------------------------------------------------
# diffusers' file format


_RENAMES = [(re.compile(p), r) for p, r in UNet2DConditionModel.TORCH_KEY_RENAMES]


def _module_path(path: tuple) -> tuple[str, str]:
    """(component, diffusers / transformers module path) of a factor's state path (..., "to_q",
    "lora", "a"): ours, renamed where the UNet's differ from diffusers' (ff.geglu -> ff.net.0.proj)."""
    component, path = component_of(path)
    prefix = ".".join(str(p) for p in path[:-2])
    for pattern, replacement in _RENAMES if component == PREFIX else ():
        prefix = pattern.sub(replacement, prefix)
    return component, prefix


def torch_factors(lora_state: nnx.State, alpha: float) -> lora_files.LoraWeights:
    """component -> diffusers module path -> the factors in torch layouts: Linear A (rank, in), B
    (out, rank); Conv A (rank, in, kh, kw), B (out, rank, 1, 1). ``lora_state``: host (numpy)
    values, as ``sharding.to_host`` gives."""
    adapters: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for path, value in nnx.to_flat_state(lora_state):
        adapters.setdefault(_module_path(path), {})[path[-1]] = np.asarray(value.get_value())
    out: lora_files.LoraWeights = {}
    for (component, module), f in sorted(adapters.items()):
        a, b = f["a"], f["b"]
        if a.ndim == 4:  # convolution: A is HWIO (kh, kw, in, r) -> OIHW; B is a 1x1 convolution
            a_torch, b_torch = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
        else:  # B (r, out) or (r, 2, inner) -> (out, r), the GEGLU halves in torch's order
            a_torch, b_torch = a.T, b.reshape(b.shape[0], -1).T
        out.setdefault(component, {})[module] = lora_files.Factors(
            down=np.ascontiguousarray(a_torch, dtype=np.float32), up=np.ascontiguousarray(b_torch, dtype=np.float32),
            alpha=alpha)
    return out


def torch_state_dict(lora_state: nnx.State) -> dict[str, np.ndarray]:
    """The factors under diffusers' keys (``<component>.<module path>.lora_A.weight`` /
    ``lora_B.weight``, component ``unet``, ``text_encoder`` or ``text_encoder_2``) in torch layouts
    (see ``torch_factors``)."""
    out = {}
    for component, modules in torch_factors(lora_state, alpha=0.0).items():
        for module, factors in modules.items():
            out[f"{component}.{module}.lora_A.weight"] = factors.down
            out[f"{component}.{module}.lora_B.weight"] = factors.up
    return out


def adapter_metadata(cfg: Any, components: Sequence[str] = (PREFIX,)) -> dict[str, str]:
    """The safetensors metadata diffusers writes with a LoRA: each adapter's peft LoraConfig keys,
    prefixed by its component ("unet.r", "text_encoder.r", ...), as JSON. diffusers builds its
    LoraConfigs from it, so the scale alpha / rank survives; without it diffusers would assume
    alpha = rank."""
    packed = {}
    for component in components:
        names = cfg.target_modules if component == PREFIX else TEXT_ENCODER_TARGETS
        config = {"r": cfg.rank, "lora_alpha": cfg.rank if cfg.alpha is None else cfg.alpha,
                  "lora_dropout": cfg.dropout, "target_modules": sorted(names), "bias": "none"}
        packed.update({f"{component}.{key}": value for key, value in config.items()})
    return {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def save_weights(lora_state: nnx.State, cfg: Any, path: Any) -> None:
    """Writes the factors (host values) to the file ``path`` for diffusers' ``load_lora_weights``,
    which looks for the name ``WEIGHT_NAME`` in a folder."""
    tensors = torch_state_dict(lora_state)
    present = [c for c in lora_files.COMPONENTS if any(key.startswith(c + ".") for key in tensors)]
    save_file(tensors, str(path), metadata=adapter_metadata(cfg, present))


def save_kohya(lora_state: nnx.State, cfg: Any, path: Any, unet_config: Mapping[str, Any]) -> None:
    """Writes the factors (host values) to the file ``path`` in kohya's format, for A1111 and ComfyUI."""
    alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
    lora_files.write_kohya(torch_factors(lora_state, alpha), path, unet_config)


def trainable_count(lora_state: nnx.State) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(lora_state))


def read_metadata(file: Any, component: str = PREFIX) -> Mapping[str, Any]:
    """One component's adapter config stored in a file written by ``save_weights`` (keys without
    "<component>.")."""
    with safe_open(str(file), framework="np") as handle:
        packed = json.loads(handle.metadata()[METADATA_KEY])
    prefix = component + "."
    return {key.removeprefix(prefix): value for key, value in packed.items() if key.startswith(prefix)}


# --------------------------------------------------------------------------------------------
# Applying LoRA files (any format lora_files reads)


def config_from_file(cfg: Any, unet_factors: Mapping[str, lora_files.Factors], source: str,
                     text_factors: lora_files.LoraWeights | None = None) -> Any:
    """``cfg`` (a ``config.LoraConfig``) with the rank, alpha and target modules of a LoRA file's
    UNet factors, so that training can continue from it. One rank and one alpha for every module,
    as this trainer's LoRA has, the ``text_factors`` (text encoders' factors continued too)
    included; the targets are the module names of ``SUPPORTED_TARGETS`` the file's modules end with."""
    if not unet_factors:
        raise lora_files.LoraFileError(f"{source}: holds no UNet factors to continue training from")
    every = [*unet_factors.values(), *(f for modules in (text_factors or {}).values() for f in modules.values())]
    ranks = {f.rank for f in every}
    alphas = {f.alpha for f in every}
    if len(ranks) > 1 or len(alphas) > 1:
        raise lora_files.LoraFileError(f"{source}: modules of different ranks {sorted(ranks)} or alphas {sorted(alphas)}; "
                                       "training continues from a LoRA with one rank and one alpha")
    names = set()
    for module in unet_factors:
        name = next((t for t in SUPPORTED_TARGETS if matches(module, [t])), None)
        if name is None:
            raise lora_files.LoraFileError(f"{source}: adapts {module!r}, which is none of the modules a LoRA here can "
                                           f"train ({', '.join(SUPPORTED_TARGETS)})")
        names.add(name)
    rank, alpha = ranks.pop(), alphas.pop()
    return dataclasses.replace(cfg, rank=rank, alpha=None if alpha == rank else alpha,
                               target_modules=tuple(t for t in SUPPORTED_TARGETS if t in names))


def factors_from_file(lora_state: nnx.State, start: lora_files.LoraWeights, source: str) -> nnx.State:
    """``lora_state`` (abstract or concrete factors, laid out by ``inject_all``) with the values of a
    LoRA file's factors (component -> module -> factors), each in the sharding of the value it
    replaces; a component ``start`` does not hold keeps its values. In a component it holds, every
    adapter must be in the file and every factor of the file must have an adapter
    (``config_from_file`` makes it so for the UNet)."""
    flat = nnx.to_flat_state(lora_state)
    modules = {_module_path(path) for path, _ in flat if component_of(path)[0] in start}
    given = {(component, module) for component, factors in start.items() for module in factors}
    missing, extra = sorted(modules - given), sorted(given - modules)
    if missing or extra:
        first = ".".join((missing or extra)[0])
        raise lora_files.LoraFileError(f"{source}: {'has no factors for' if missing else 'adapts'} {first!r}, which "
                                       f"{'this LoRA adapts' if missing else 'this LoRA does not adapt'} "
                                       f"({len(missing)} missing, {len(extra)} extra)")
    values = []
    for path, variable in flat:
        component, module = _module_path(path)
        if component not in start:
            values.append((path, variable))
            continue
        factors, name = start[component][module], path[-1]
        shape = tuple(variable.get_value().shape)
        if name == "a":  # down: (r, in) -> (in, r); (r, in, kh, kw) -> HWIO (kh, kw, in, r)
            value = factors.down.transpose(2, 3, 1, 0) if factors.down.ndim == 4 else factors.down.T
        else:  # up: (out, r) or (out, r, 1, 1) -> (r, out), or (r, 2, inner) for a GEGLU projection
            value = factors.up.reshape(factors.up.shape[0], -1).T
        if value.size != math.prod(shape) or (name == "a" and value.shape != shape):
            raise lora_files.LoraFileError(f"{source}: {component}.{module}: factor of shape {value.shape} where "
                                           f"this LoRA needs {shape}")
        value = np.ascontiguousarray(value.reshape(shape), dtype=variable.get_value().dtype)
        values.append((path, variable.replace(weights.place(value, getattr(variable.get_value(), "sharding", None)))))
    return nnx.from_flat_state(values)


def module_paths(model: nnx.Module) -> list[str]:
    """The diffusers / transformers module paths of the layers of ``model`` a LoRA file may name."""
    return [path for path, _ in weights.param_layers(model)]


def merge(model: nnx.Module, factors: Mapping[str, lora_files.Factors], scale: float, source: str) -> None:
    """Adds ``scale`` times each module's update to the weights of ``model`` (a UNet or text encoder
    without adapters), in place: sampling with a LoRA costs nothing per step."""
    by_path = dict(weights.param_layers(model))
    for module, update in factors.items():
        layer = by_path.get(module)
        if not isinstance(layer, (layers.Linear, layers.Conv)):
            raise lora_files.LoraFileError(f"{source}: adapts {module!r}, which is not a linear or convolution "
                                           "layer of this model")
        kernel = layer.kernel.get_value()
        delta = update.delta(scale)
        expected = weights.torch_shape(layer, "kernel", kernel.shape)
        if delta.shape != expected:
            raise lora_files.LoraFileError(f"{source}: {module}: update of shape {delta.shape} where this model's weight "
                                           f"is {expected}")
        merged = kernel.astype(jnp.float32) + jnp.asarray(layer.from_torch("kernel", delta))
        layer.kernel.set_value(merged.astype(kernel.dtype))
