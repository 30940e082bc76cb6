"""LoRAs merged into the weights of the pipeline's torch modules, on the device, outside the
generation graphs: the files are read with `sdxl_common.lora_files`, checked against the model's
Linear / Conv2d layers, and each layer's weight is replaced by base + the scaled low-rank update.
The generation graphs read the weights as device inputs, so a merge recompiles none of them."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from sdxl_common import lora_files
from sdxl_common.errors import UserError
from xla_infer import checks
from xla_infer.checks import InputError
from xla_infer.runtime import Runtime

# component -> module path as LoRA files name it -> ("component.module" as the model names it, the layer)
Targets = dict[str, dict[str, tuple[str, torch.nn.Module]]]
Updates = dict[str, tuple[torch.nn.Module, list[tuple[lora_files.Factors, float]]]]


class MergedLoras:
    """The LoRAs merged into a model's UNet and text encoders, and the loaded weight of every layer
    they changed."""

    def __init__(self, models: dict[str, torch.nn.Module | None], runtime: Runtime):
        """`models`: "unet", "text_encoder" and "text_encoder_2" -> the module (None where the model
        has no such component)."""
        self.models = models
        self.runtime = runtime
        self.loras: list[tuple[str, float]] = []  # the LoRAs merged into the weights, with their scales
        # "component.module" -> (its layer, its loaded weight tensor), for every layer a LoRA changed
        self.loaded: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
        self.compile_count = 0  # the merges' own small graphs

    def set(self, loras: Sequence[tuple[str | Path, float] | str | Path]) -> None:
        """Merge `loras` in place of those merged before (see `Pipeline.set_loras`)."""
        if isinstance(loras, (str, Path)):
            raise InputError("loras must be a list of (path, scale) pairs, not one path")
        pairs = []
        for item in loras:
            location, scale = (item, 1.0) if isinstance(item, (str, Path)) else checks.lora_pair(item)
            pairs.append((str(location), checks.number(scale, f"the scale of LoRA {location}", "a finite number",
                                                 math.isfinite)))
        updates: Updates = {}
        targets = self._targets()
        # kohya names flatten module paths with "_", so such files are read against the model's own.
        modules = {component: list(layers) for component, layers in targets.items()}
        for location, scale in pairs:
            try:
                weights = lora_files.read(location, modules=modules, unet_config=dict(self.models["unet"].config))
            except UserError as err:  # a missing or unreadable file: already one line naming it
                raise InputError(str(err)) from None
            for component, by_path in weights.items():
                for module_path, factors in by_path.items():
                    key, layer = _layer(targets, location, component, module_path, factors)
                    updates.setdefault(key, (layer, []))[1].append((factors, scale))
        self._merge(updates)
        self.loras = pairs

    def _targets(self) -> Targets:
        """Every layer a LoRA may adapt, by component and by the module path LoRA files give it."""
        targets = {}
        for component, model in self.models.items():
            if model is None:
                continue
            # transformers 5 flattened CLIPTextModel; LoRA files keep its older "text_model." paths
            # (diffusers' loader strips the prefix the same way).
            prefix = "" if component == "unet" or hasattr(model, "text_model") else "text_model."
            targets[component] = {prefix + name: (f"{component}.{name}", layer) for name, layer in model.named_modules()
                                  if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}
        return targets

    @torch.no_grad()
    def _merge(self, updates: Updates) -> None:
        # All LoRAs of a module are one matmul: their factors concatenated along the rank, each
        # down factor pre-scaled on the host (scale * alpha / rank, float32), so that the device
        # computes base + up @ down. Per module one small graph, synced at once: its inputs are
        # device data and its shape is (weight shape, summed rank), so a scale or another LoRA of
        # the same ranks reuses it, and no pending merge leaks into the next generation graph.
        sync = None
        if self.runtime.kind == "xla":
            import torch_xla

            sync = torch_xla.sync
        device = self.runtime.device
        before = self.runtime.compilations()
        for key in [key for key in self.loaded if key not in updates]:
            layer, base = self.loaded.pop(key)
            layer.weight.data = base  # the loaded tensor itself: bit-equal
        for key, (layer, parts) in updates.items():
            base = self.loaded.setdefault(key, (layer, layer.weight.data))[1]
            up = torch.cat([torch.tensor(f.up.reshape(f.up.shape[0], f.rank), dtype=torch.float32) for f, _ in parts],
                           dim=1)
            down = torch.cat([torch.tensor(f.down.reshape(f.rank, -1), dtype=torch.float32) * (scale * f.alpha / f.rank)
                              for f, scale in parts])
            delta = (up.to(device) @ down.to(device)).reshape(base.shape)
            layer.weight.data = (base.float() + delta).to(base.dtype)
            if sync is not None:
                sync()
        self.compile_count += self.runtime.compilations() - before


def _layer(targets: Targets, location: str, component: str, module_path: str,
           factors: lora_files.Factors) -> tuple[str, torch.nn.Module]:
    """("component.module", the Linear / Conv2d) that a LoRA's module key names, checked to fit its factors."""
    key = f"{component}.{module_path}"
    if component not in targets:
        raise InputError(f"LoRA {location} adapts the {component} ({key}), which this model does not have")
    if module_path not in targets[component]:
        raise InputError(f"LoRA {location}: {key} is not a Linear or Conv2d layer of this model")
    name, layer = targets[component][module_path]
    shape = tuple(layer.weight.shape)
    update = (factors.up.shape[0], *factors.down.shape[1:])
    if update != shape or factors.up.shape[2:] not in ((), (1, 1)):
        raise InputError(f"LoRA {location}: {key} has factors {list(factors.down.shape)} and "
                         f"{list(factors.up.shape)}, which do not fit this model's weight {list(shape)}")
    return name, layer
