"""diffusers / transformers safetensors <-> Flax NNX parameters, in both directions.

Models in ``flax_train.models`` name their submodules after the torch modules, so the mapping is
mechanical: the path of a parameter-owning layer (see ``layers.PARAM_LAYERS``), joined with dots,
plus the layer's torch parameter name, is the torch key. A model may rename path fragments where
diffusers' layout has no clean Flax equivalent (``TORCH_KEY_RENAMES``); the layer converts the
array layout (transposes of linear and convolution kernels). When reading, a model may also name
checkpoint entries that are buffers rather than parameters (``TORCH_IGNORED_KEYS``, regexes) and
rewrite checkpoint keys written in another known layout into its own (``TORCH_CHECKPOINT_RENAMES``).

Only ``.safetensors`` is ever read: pickle checkpoints can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sdxl_common.errors import BadInput
from flax_train.models import layers


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class WeightsError(BadInput):
    """A weights folder or file does not match the model it is loaded into."""


def _path_to_key(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def param_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """Yields (torch module prefix, layer) for every parameter-owning layer of ``model``."""
    renames = [(re.compile(p), r) for p, r in getattr(model, "TORCH_KEY_RENAMES", ())]
    for path, node in nnx.iter_graph(model):
        if isinstance(node, layers.PARAM_LAYERS):
            prefix = _path_to_key(path)
            for pattern, replacement in renames:
                prefix = pattern.sub(replacement, prefix)
            yield prefix, node


def torch_layout(model: nnx.Module) -> dict[str, tuple[nnx.Module, str]]:
    """Maps each torch key to (layer, our attribute name) for every parameter of ``model``."""
    layout = {}
    for prefix, layer in param_layers(model):
        for ours, theirs in layer.TORCH_NAMES.items():
            if getattr(layer, ours, None) is not None:
                layout[f"{prefix}.{theirs}"] = (layer, ours)
    return layout


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters under torch key names and layouts (float32 unless stored otherwise)."""
    out = {}
    for key, (layer, name) in torch_layout(model).items():
        value = np.asarray(jax.device_get(getattr(layer, name)[...]))
        out[key] = np.ascontiguousarray(layer.to_torch(name, value))
    return out


# --------------------------------------------------------------------------------------------
# Reading safetensors folders


def find_weight_files(folder: Path, weights_name: str) -> list[Path]:
    """The safetensors file(s) of one component folder: single file or sharded with an index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such component folder")
    single = folder / weights_name
    index = folder / f"{weights_name}.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in shard_names if not (folder / n).is_file()]
        if missing:
            raise WeightsError(f"{index}: names shard files that are missing: {missing}")
        return [folder / n for n in shard_names]
    any_safetensors = sorted(folder.glob("*.safetensors"))
    if any_safetensors:
        return any_safetensors
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder}: only pickle checkpoints found ({', '.join(pickles)}). They are never loaded, "
            "because unpickling can run arbitrary code. Convert them to safetensors first, e.g. "
            "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` "
            "in a trusted environment."
        )
    raise WeightsError(f"{folder}: no {weights_name} (nor a sharded index, nor any .safetensors file)")


class SafetensorsReader:
    """Lazy, key-addressed access to the tensors of one or more safetensors files, as numpy."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="np") as handle:
                    keys = handle.keys()
            except SafetensorError as error:  # e.g. a pickle renamed .safetensors: refused, never unpickled
                raise WeightsError(f"{f}: not a safetensors file ({error})") from None
            for key in keys:
                self._where[key] = f

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self._where[key]), framework="np") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        with safe_open(str(self._where[key]), framework="np") as handle:
            return handle.get_tensor(key)


def checkpoint_key_map(model: nnx.Module, checkpoint_keys: set[str], *, source: str) -> dict[str, str]:
    """Maps the model's torch key to the checkpoint's key for every checkpoint entry that is a parameter.

    Entries matching the model's ``TORCH_IGNORED_KEYS`` (non-parameter buffers that older libraries
    saved, such as CLIP's ``position_ids``) are dropped; ``TORCH_CHECKPOINT_RENAMES`` rewrites keys
    written in another known layout into the model's own.
    """
    ignored = [re.compile(p) for p in getattr(model, "TORCH_IGNORED_KEYS", ())]
    renames = [(re.compile(p), r) for p, r in getattr(model, "TORCH_CHECKPOINT_RENAMES", ())]
    mapping: dict[str, str] = {}
    for key in sorted(checkpoint_keys):
        if any(pattern.search(key) for pattern in ignored):
            continue
        ours = key
        for pattern, replacement in renames:
            ours = pattern.sub(replacement, ours)
        if ours in mapping:
            raise WeightsError(f"{source}: checkpoint keys {mapping[ours]!r} and {key!r} both name the weight {ours!r}")
        mapping[ours] = key
    return mapping


def torch_shape(layer: nnx.Module, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch layout's shape of ``layer``'s parameter ``name`` when ours has ``shape``."""
    return tuple(layer.to_torch(name, np.empty(shape, dtype=np.bool_)).shape)


def place(value: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A host array on the devices: whole on the default device, or straight into ``sharding``
    (each device receives only its shard, also when the sharding spans processes)."""
    if sharding is None:
        return jax.numpy.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_into(
    model: nnx.Module,
    reader: SafetensorsReader,
    *,
    source: str,
    sharding_fn: Callable[[nnx.Variable], jax.sharding.Sharding] | None = None,
) -> None:
    """Fills every parameter of ``model`` (abstract or concrete) from ``reader``.

    Every torch key must be present with the right shape, and no unexpected key may remain, so a
    wrong folder fails loudly rather than leaving random weights behind. With ``sharding_fn`` each
    array is placed straight into its sharding, so a large model never sits whole on one device.
    """
    layout = torch_layout(model)
    file_key = checkpoint_key_map(model, reader.keys(), source=source)
    available = set(file_key)
    missing = sorted(set(layout) - available)
    unexpected = sorted(available - set(layout))
    if missing or unexpected:
        lines = [f"{source}: the weights do not match the model config."]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}"
            )
        raise WeightsError("\n".join(lines))
    for key, (layer, name) in layout.items():
        variable = getattr(layer, name)
        ours = variable.get_value()
        expected = torch_shape(layer, name, ours.shape)
        found = reader.shape(file_key[key])
        if found != expected:
            raise WeightsError(f"{source}: weight {file_key[key]!r} has shape {found}, expected {expected}")
        value = layer.from_torch(name, reader.get(file_key[key])).astype(ours.dtype)
        variable.set_value(place(value, None if sharding_fn is None else sharding_fn(variable)))


def save_safetensors(model: nnx.Module, path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Writes the model's parameters to one safetensors file under torch names and layouts."""
    save_file(to_torch_state_dict(model), str(path), metadata=dict(metadata or {"format": "pt"}))
