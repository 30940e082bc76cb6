"""Reading LoRA files: the per-module low-rank factors in torch layouts, whatever wrote them.

A LoRA file holds, for each adapted module of each model, a down projection (peft's ``lora_A``,
kohya's ``lora_down``), an up projection (``lora_B`` / ``lora_up``) and the scale's alpha. This
module reads such a file into one neutral form, ``{component: {diffusers module path: Factors}}``
with components "unet", "text_encoder" and "text_encoder_2", which both packages consume: the
trainer to continue training or to sample, ``xla_infer`` to merge into its weights.

Formats read:
- diffusers / peft (what ``StableDiffusionXLPipeline.save_lora_weights`` and this project's export
  write): ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight``; alpha from the peft
  LoraConfig diffusers stores as JSON in the safetensors metadata (``lora_adapter_metadata``:
  ``<component>.r``, ``.lora_alpha``, ``.rank_pattern``, ``.alpha_pattern``), or from per-module
  ``<component>.<module>.alpha`` tensors; without either alpha is the rank, as diffusers assumes.
- kohya (sd-scripts; what A1111 and ComfyUI read): ``lora_unet_<module>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, and ``lora_te1_`` / ``lora_te2_`` for the text encoders, where
  ``<module>`` is the module path with every "." written "_", the UNet's in the original (sgm)
  layout (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``; diffusers' own paths are accepted
  too). Underscores make those names ambiguous, so reading one needs the model's module paths
  (``modules``) and UNet config; ``write_kohya`` writes one.

Only safetensors is read: pickle files can run code when loaded. Values come out as float32 numpy
arrays (read through torch, which knows bfloat16); no JAX here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sdxl_common import single_file, storage
from sdxl_common.errors import BadInput, InputNotFound

# The file diffusers' LoRA scripts write and `load_lora_weights` looks for in a folder.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The safetensors metadata key under which diffusers stores each adapter's peft LoraConfig.
METADATA_KEY = "lora_adapter_metadata"

_KOHYA_KEY = re.compile(r"^lora_(?P<component>unet|te1|te2|te)_(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
# What kohya's sd-scripts write in a LoRA's metadata, which A1111 and ComfyUI show and read.
KOHYA_NETWORK_MODULE = "networks.lora"
KOHYA_BASE_MODEL = "sdxl_base_v1-0"
_PEFT_KEY = re.compile(r"^(?P<component>unet|text_encoder|text_encoder_2)\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")


class LoraFileError(BadInput):
    """A LoRA file that cannot be read, or that does not fit the model it is applied to."""


@dataclasses.dataclass(frozen=True)
class Factors:
    """One module's update ``alpha / rank * up @ down``, in torch layouts: ``down`` (rank, in) or,
    for a convolution, (rank, in, kh, kw); ``up`` (out, rank) or (out, rank, 1, 1)."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> np.ndarray:
        """The weight update in the module's torch layout, float32."""
        down = self.down.astype(np.float32).reshape(self.rank, -1)
        up = self.up.astype(np.float32).reshape(self.up.shape[0], self.rank)
        update = (scale * self.alpha / self.rank) * (up @ down)
        return update.reshape(up.shape[0], *self.down.shape[1:])


LoraWeights = dict[str, dict[str, Factors]]  # component -> diffusers module path -> factors


def weight_file(location: storage.PathLike) -> storage.PathLike:
    """The safetensors file at ``location``: the file itself, or ``WEIGHT_NAME`` in a folder."""
    path = storage.path(location)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.exists():
        raise InputNotFound(f"{location}: no such LoRA file" + (f" (looked for {WEIGHT_NAME})" if path.name == WEIGHT_NAME else ""))
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{location}: LoRA files are read from .safetensors only (pickle files can run code)")
    return path


def read(location: storage.PathLike, *, modules: Mapping[str, Iterable[str]] | None = None,
         unet_config: Mapping[str, Any] | None = None) -> LoraWeights:
    """The factors of the LoRA file (or folder holding ``WEIGHT_NAME``) at ``location``, local or a
    URL, in either format. A kohya file needs ``modules`` (component -> the diffusers module paths
    of the model it is applied to) and the ``unet_config`` of that model."""
    path = weight_file(location)
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="sdxl-tpu-lora-") as tmp:
            local = Path(tmp) / path.name
            storage.copy_file(path, local)
            return _read_local(local, str(location), modules, unet_config)
    return _read_local(Path(str(path)), str(location), modules, unet_config)


def _read_local(file: Path, source: str, modules, unet_config) -> LoraWeights:
    try:  # through torch: numpy has no bfloat16, the dtype many LoRA files are saved in
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key).float().numpy() for key in handle.keys()}
    except (SafetensorError, TypeError, RuntimeError) as error:
        raise LoraFileError(f"{source}: not a safetensors file ({error})") from None
    if not tensors:
        raise LoraFileError(f"{source}: holds no tensors")
    if any(key.startswith("lora_unet_") or key.startswith("lora_te") for key in tensors):
        if modules is None or unet_config is None:
            raise LoraFileError(f"{source}: a kohya-format LoRA is read against the model it is applied to")
        return _parse_kohya(tensors, source, modules, unet_config)
    return _parse_peft(tensors, metadata, source)


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _kohya_names(component: str, paths: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """kohya's flattened name -> diffusers module path, for every module path of one component."""
    names = {}
    for path in paths:
        names[_flat(path)] = path
        if component == "unet":
            try:
                names[_flat(single_file.unet_original_name(path, unet_config))] = path
            except single_file.SingleFileError:  # a module the original layout does not name
                pass
    return names


def _parse_kohya(tensors, source, modules, unet_config) -> LoraWeights:
    lookup = {component: _kohya_names(component, paths, unet_config) for component, paths in modules.items()}
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KOHYA_KEY.match(key)
        component = _KOHYA_COMPONENTS.get(match["component"]) if match else None
        module = lookup.get(component, {}).get(match["module"]) if match else None
        if module is None:
            raise LoraFileError(f"{source}: key {key!r} names no module of this model")
        parts.setdefault((component, module), {})[match["part"]] = value
    out: LoraWeights = {}
    for (component, module), found in sorted(parts.items()):
        if "lora_down.weight" not in found or "lora_up.weight" not in found:
            raise LoraFileError(f"{source}: {component} module {module} has only one of lora_down and lora_up")
        down, up = found["lora_down.weight"], found["lora_up.weight"]
        alpha = float(np.asarray(found["alpha"]).reshape(())) if "alpha" in found else float(down.shape[0])
        out.setdefault(component, {})[module] = _checked(down, up, alpha, f"{source}: {component}.{module}")
    return out


def write_kohya(weights: LoraWeights, file: str | Path, unet_config: Mapping[str, Any]) -> None:
    """Writes ``weights`` in kohya's format (UNet modules under their original-layout names) with
    the metadata sd-scripts writes (rank and alpha when they are one for all modules)."""
    tensors: dict[str, np.ndarray] = {}
    for component, modules in weights.items():
        for module, factors in modules.items():
            name = single_file.unet_original_name(module, unet_config) if component == "unet" else module
            key = f"{KOHYA_PREFIXES[component]}_{_flat(name)}"
            tensors[f"{key}.lora_down.weight"] = np.ascontiguousarray(factors.down, np.float32)
            tensors[f"{key}.lora_up.weight"] = np.ascontiguousarray(factors.up, np.float32)
            tensors[f"{key}.alpha"] = np.asarray(factors.alpha, np.float32)
    every = [f for modules in weights.values() for f in modules.values()]
    metadata = {"format": "pt", "ss_network_module": KOHYA_NETWORK_MODULE, "ss_base_model_version": KOHYA_BASE_MODEL}
    if len({f.rank for f in every}) == 1 and len({f.alpha for f in every}) == 1:
        metadata.update(ss_network_dim=str(every[0].rank), ss_network_alpha=f"{every[0].alpha:g}")
    save_file(tensors, str(file), metadata=metadata)


def _checked(down: np.ndarray, up: np.ndarray, alpha: float, where: str) -> Factors:
    if up.ndim != down.ndim or up.shape[1] != down.shape[0]:
        raise LoraFileError(f"{where}: down {down.shape} and up {up.shape} factors do not share a rank")
    return Factors(down=down, up=up, alpha=alpha)


def _peft_configs(metadata: Mapping[str, str], source: str) -> dict[str, dict[str, Any]]:
    """component -> its peft LoraConfig fields, from diffusers' metadata (keys "<component>.<field>")."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        packed = json.loads(metadata[METADATA_KEY])
    except ValueError as error:
        raise LoraFileError(f"{source}: metadata {METADATA_KEY!r} is not JSON ({error})") from None
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's alpha_pattern: the first pattern (a regex) that matches the module path or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def _parse_peft(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], source: str) -> LoraWeights:
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise LoraFileError(f"{source}: key {key!r} is not a diffusers LoRA key "
                                "(<unet|text_encoder|text_encoder_2>.<module>.lora_A.weight / lora_B.weight)")
        parts.setdefault((match["component"], match["module"]), {})[match["part"]] = value
    configs = _peft_configs(metadata, source)
    out: LoraWeights = {}
    for (component, module), found in sorted(parts.items()):
        if "lora_A.weight" not in found or "lora_B.weight" not in found:
            raise LoraFileError(f"{source}: {component}.{module} has only one of lora_A and lora_B")
        down, up = found["lora_A.weight"], found["lora_B.weight"]
        rank = down.shape[0]
        config = configs.get(component, {})
        if "alpha" in found:
            alpha = float(np.asarray(found["alpha"]).reshape(()))
        elif "lora_alpha" in config:
            alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
            if config.get("use_rslora"):
                # rank-stabilised LoRA scales by alpha / sqrt(rank): the same update as a plain
                # LoRA of alpha * sqrt(rank), which is how it is kept here.
                alpha *= math.sqrt(rank)
        else:
            alpha = float(rank)  # what diffusers assumes without metadata
        if component != "unet" and not module.startswith("text_model."):
            # Text-encoder modules are named from the transformers model class, which some versions
            # of it leave out of the path: one name for both.
            module = "text_model." + module
        out.setdefault(component, {})[module] = _checked(down, up, alpha, f"{source}: {component}.{module}")
    return out


def parse_spec(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` as the command lines take it (scale 1 when absent). Only a number after the
    last colon is a scale, so ``gs://bucket/lora`` is a path."""
    path, colon, tail = text.rpartition(":")
    if colon:
        try:
            scale = float(tail)
        except ValueError:
            if "/" not in tail:  # "x:abc": a scale that is not a number, not a URL's "//host/..."
                raise LoraFileError(f"--lora {text!r}: the scale after ':' must be a number") from None
        else:
            if not path:
                raise LoraFileError(f"--lora {text!r}: no path before the scale")
            return path, scale
    return text, 1.0


def parse_specs(texts: Iterable[str]) -> list[tuple[str, float]]:
    """The command lines' ``--lora`` arguments, each file checked to exist: a missing one is
    refused before any model is loaded (whether its keys fit is checked against the model)."""
    specs = [parse_spec(text) for text in texts]
    for location, _ in specs:
        weight_file(location)
    return specs
