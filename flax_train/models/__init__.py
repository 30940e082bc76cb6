"""Flax NNX implementations of the SDXL components, loaded from and saved to diffusers folders.

    unet = flax_train.models.load("sdxl/unet", dtype=jnp.bfloat16)
    flax_train.models.save(unet, "out/unet")

``load`` reads a component folder's ``config.json``, picks the class from it (diffusers'
``_class_name`` or transformers' ``architectures``), builds the module abstractly (no memory), and
fills it from safetensors, optionally straight into per-parameter shardings.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from sdxl_common import model_source
from sdxl_common.errors import InputNotFound
from flax_train.models import weights
from flax_train.models.weights import WeightsError

# config class name -> "module:Class" (imported lazily, so one missing model does not break the rest)
REGISTRY: dict[str, str] = {
    "UNet2DConditionModel": "flax_train.models.unet:UNet2DConditionModel",
    "AutoencoderKL": "flax_train.models.vae:AutoencoderKL",
    "CLIPTextModel": "flax_train.models.clip:CLIPTextModel",
    "CLIPTextModelWithProjection": "flax_train.models.clip:CLIPTextModelWithProjection",
}


def freeze_config(config: Mapping[str, Any]) -> FrozenDict:
    """Configs live on modules as static, hashable attributes: lists become tuples, dicts FrozenDicts."""

    def freeze(value):
        if isinstance(value, Mapping):
            return FrozenDict({k: freeze(v) for k, v in value.items()})
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        return value

    return freeze(config)


def thaw_config(config: Mapping[str, Any]) -> dict:
    """The inverse of ``freeze_config``, for writing ``config.json``."""

    def thaw(value):
        if isinstance(value, Mapping):
            return {k: thaw(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [thaw(v) for v in value]
        return value

    return thaw(config)


def class_name_of(config: Mapping[str, Any]) -> str | None:
    if "_class_name" in config:
        return config["_class_name"]
    architectures = config.get("architectures") or []
    return architectures[0] if architectures else None


def model_class(config: Mapping[str, Any], source: str = "config") -> type[nnx.Module]:
    name = class_name_of(config)
    if name not in REGISTRY:
        raise WeightsError(
            f"{source}: model class {name!r} is not an SDXL component this package implements "
            f"(supported: {', '.join(REGISTRY)})"
        )
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder}: missing config.json")
    try:
        return json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8: the folder's file, not our code
        raise WeightsError(f"{path}: not a valid JSON config ({error})") from None


def resolve_folder(
    path: str | Path, subfolder: str | None = None, *, revision: str | None = None, variant: str | None = None
) -> Path:
    """A local component folder: ``subfolder`` of the pipeline at ``path``, or, without ``subfolder``,
    ``path`` itself as one component (a separate VAE). ``path`` is a folder, a Hub id or a URL
    (see ``sdxl_common.model_source``)."""
    if subfolder:
        local = model_source.local_folder(path, revision=revision, variant=variant) / subfolder
    else:
        local = model_source.local_folder(path, revision=revision, variant=variant, component=True)
    if not local.exists():
        raise WeightsError(f"{local}: no such folder")
    return local


def resolve_pipeline(
    path: str | Path, *, revision: str | None = None, variant: str | None = None, config: str | None = None
) -> Path:
    """A whole diffusers pipeline folder (``model_index.json`` and one folder per component), local
    or fetched from a Hub id or URL, or converted from a single ``.safetensors`` file with the
    configs of the pipeline ``config`` (see ``sdxl_common.model_source``)."""
    root = model_source.local_folder(path, revision=revision, variant=variant, config=config)
    if not (root / "model_index.json").is_file():
        raise InputNotFound(f"{root} is not a diffusers pipeline folder (no model_index.json)")
    return root


def pretrained_pipeline(model: Any) -> Path:
    """The pipeline folder of a run's ``model`` config section (``model.pretrained`` and the keys
    that say how to fetch or convert it)."""
    return resolve_pipeline(model.pretrained, revision=model.revision, variant=model.variant, config=model.config_from)


def create(
    config: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    **options: Any,
) -> nnx.Module:
    """A randomly initialised model of the class the config names."""
    cls = model_class(config)
    return cls.from_config(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed), **options)


def abstract(config: Mapping[str, Any], **kwargs: Any) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: create(config, **kwargs))


def load(
    path: str | Path,
    *,
    subfolder: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    sharding_fn: Callable[[nnx.Variable], jax.sharding.Sharding] | None = None,
    **options: Any,
) -> nnx.Module:
    """Loads one component folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``).

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the weights. ``options``
    are model switches such as ``attention="cudnn"`` or ``remat="dots"``.
    """
    folder = resolve_folder(path, subfolder)
    config = read_config(folder)
    cls = model_class(config, source=str(folder / "config.json"))
    files = weights.find_weight_files(folder, cls.WEIGHTS_NAME)
    model = abstract(config, dtype=dtype, param_dtype=param_dtype, **options)
    weights.load_into(model, weights.SafetensorsReader(files), source=str(folder), sharding_fn=sharding_fn)
    return model


def save(model: nnx.Module, path: str | Path) -> Path:
    """Writes ``config.json`` and the safetensors weights that diffusers / transformers load."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(thaw_config(model.config), indent=2, sort_keys=True) + "\n")
    weights.save_safetensors(model, folder / model.WEIGHTS_NAME)
    return folder


def count_params(model: nnx.Module) -> int:
    """Number of parameters; works on abstract models too."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
