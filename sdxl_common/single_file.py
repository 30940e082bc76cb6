"""SDXL in one file: the original ("sgm") checkpoint layout <-> the diffusers folder layout.

Stability released SDXL as one safetensors file per model (``sd_xl_base_1.0.safetensors``), in the
layout of its generative-models code, which A1111 and ComfyUI read and diffusers converts with
``from_single_file``. Every weight of every component sits in it under a prefix:

- UNet under ``model.diffusion_model.``: ``input_blocks.i.j`` (a flat numbering of the down path:
  the input convolution, then per level its resnet + attention pairs and a downsampler),
  ``middle_block.k``, ``output_blocks.i.j`` and ``time_embed``, ``label_emb``, ``out``;
- VAE under ``first_stage_model.``: ``encoder.down.i.block.j``, ``mid.block_1/attn_1/block_2``,
  ``decoder.up.i`` numbered from the lowest resolution's side (diffusers numbers the decoder's
  levels in the order they run), and 1x1 convolutions where diffusers has linear attention
  projections;
- the CLIP ViT-L text encoder under ``conditioner.embedders.0.transformer.`` with transformers' own
  names, and the OpenCLIP ViT-bigG encoder under ``conditioner.embedders.1.model.`` (the refiner
  has only that one, as ``embedders.0``) in OpenCLIP's names: q, k and v as one ``in_proj`` matrix,
  the text projection stored for ``x @ text_projection``.

The mapping is derived from the component configs (levels, layers per level, which levels attend),
so a tiny test model maps exactly as SDXL does. ``layout`` lists one `Entry` per tensor of the file;
``write_single_file`` and ``convert_to_folder`` move tensors along it. ``unet_original_name`` /
``unet_diffusers_name`` map module paths, for names in other tools' formats (kohya LoRA files use
the original UNet paths).

Imports neither JAX nor torch at import time (``xla_infer`` reads files through here); the file
conversions import torch, which reads and writes every dtype a checkpoint may hold (bf16 too).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from sdxl_common import storage
from sdxl_common.errors import BadInput

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."  # transformers' CLIPTextModel names below it

# Entries of released single files that hold no weight a diffusers folder keeps: CLIP's position
# ids (arange(77)), OpenCLIP's contrastive temperature, the training-time denoiser's sigma table
# and EMA bookkeeping. They are skipped when reading; any other unknown key is an error.
IGNORED_KEYS = (
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.model.logit_scale",
    "conditioner.embedders.1.model.logit_scale",
    "denoiser.sigmas",
    "model_ema.decay",
    "model_ema.num_updates",
)

# Where each component's weights live in a diffusers folder.
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}

# The shipped configs (package data), chosen from a file's keys when no config folder is given.
CONFIGS_DIR = Path(__file__).parent / "single_file_configs"
SHIPPED = {"base": CONFIGS_DIR / "sdxl_base", "refiner": CONFIGS_DIR / "sdxl_refiner"}


class SingleFileError(BadInput):
    """A single-file checkpoint that does not match the configs it is read with."""


# ---------------------------------------------------------------------------------------------
# Module paths: tables of (diffusers path, original path), matched on the longest prefix


def _rename(path: str, table: Mapping[str, str]) -> str | None:
    """``path`` with its longest prefix (whole dot-separated parts) found in ``table`` replaced."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        head = ".".join(parts[:end])
        if head in table:
            return ".".join([table[head], *parts[end:]])
    return None


def _per_block(value: Any, blocks: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


# A UNet resnet's layers: diffusers' names -> the original's (its Sequential indices).
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def _unet_table(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module path -> original module path for every module of a UNet2DConditionModel."""
    levels = len(config["block_out_channels"])
    layers = _per_block(config.get("layers_per_block", 2), levels)
    table = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }

    def resnet(ours: str, theirs: str) -> None:
        for a, b in _UNET_RESNET.items():
            table[f"{ours}.{a}"] = f"{theirs}.{b}"

    # The original numbers the down path flat: after input_blocks.0 (conv_in), one block per
    # resnet (with its attention as .1), then one per downsampler (every level but the last).
    index = 1
    for level, kind in enumerate(config["down_block_types"]):
        for j in range(layers[level]):
            resnet(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{index}.0")
            if "CrossAttn" in kind:
                table[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    mid_attends = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
    resnet("mid_block.resnets.0", "middle_block.0")
    if mid_attends:
        table["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", f"middle_block.{2 if mid_attends else 1}")

    # The up path has one more resnet per level than the down path (it also takes the skip from
    # the downsampler's output); the upsampler joins the level's last block, after its attention.
    index = 0
    for level, kind in enumerate(config["up_block_types"]):
        attends = "CrossAttn" in kind
        for j in range(list(reversed(layers))[level] + 1):
            resnet(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{index}.0")
            if attends:
                table[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            table[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{index - 1}.{2 if attends else 1}.conv"
    return table


def unet_original_name(path: str, config: Mapping[str, Any]) -> str:
    """The original layout's path (without ``model.diffusion_model.``) of a diffusers UNet module
    or parameter path, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` for SDXL's UNet ``config``."""
    found = _rename(path, _unet_table(config))
    if found is None:
        raise SingleFileError(f"{path!r} is not a module of this UNet (no original-layout name for it)")
    return found


def unet_diffusers_name(path: str, config: Mapping[str, Any]) -> str:
    """The inverse of `unet_original_name`: a diffusers path for an original-layout UNet path."""
    found = _rename(path, {theirs: ours for ours, theirs in _unet_table(config).items()})
    if found is None:
        raise SingleFileError(f"{path!r} is not a module of this UNet's original layout")
    return found


def _vae_table(config: Mapping[str, Any]) -> dict[str, str]:
    levels = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    table = {name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                     "quant_conv", "post_quant_conv")}

    def resnet(ours: str, theirs: str) -> None:
        for name in ("norm1", "conv1", "norm2", "conv2"):
            table[f"{ours}.{name}"] = f"{theirs}.{name}"
        table[f"{ours}.conv_shortcut"] = f"{theirs}.nin_shortcut"

    for side in ("encoder", "decoder"):
        table[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        for ours, theirs in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
            table[f"{side}.mid_block.attentions.0.{ours}"] = f"{side}.mid.attn_1.{theirs}"
    for level in range(levels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}")
        if level < levels - 1:
            table[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = f"encoder.down.{level}.downsample.conv"
        # The decoder runs its levels from the lowest resolution up; the original numbers them by
        # resolution as the encoder does, so diffusers' up_blocks.0 is the original's last up.
        theirs = levels - 1 - level
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{theirs}.block.{j}")
        if level < levels - 1:
            table[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = f"decoder.up.{theirs}.upsample.conv"
    return table


# OpenCLIP's names for the layers of one transformer block (below ``transformer.resblocks.i.``).
_OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "self_attn.out_proj": "attn.out_proj", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm": "ln_final"}


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of the single file and where its values are in the diffusers folder."""

    original: str  # the key in the single file
    component: str  # "unet", "vae", "text_encoder" or "text_encoder_2"
    keys: tuple[str, ...]  # the component's keys; several are stacked along axis 0 (OpenCLIP's in_proj)
    kind: str = "same"  # "same"; "conv1x1": diffusers' (out, in) linear is an (out, in, 1, 1) conv; "transpose"

    def original_shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """The single file's shape for the given shapes of ``keys``."""
        if self.kind == "conv1x1":
            return (*shapes[0], 1, 1)
        if self.kind == "transpose":
            return tuple(reversed(shapes[0]))
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def to_original(self, values: list) -> Any:
        """The single file's torch tensor from the tensors of ``keys``."""
        import torch

        value = torch.cat(values) if len(values) > 1 else values[0]
        if self.kind == "conv1x1":
            return value[:, :, None, None]
        return value.T if self.kind == "transpose" else value

    def to_diffusers(self, value: Any, sizes: list[int]) -> list:
        """The tensors of ``keys`` from the single file's torch tensor; ``sizes``: their first dimensions."""
        import torch

        if self.kind == "conv1x1":
            value = value[:, :, 0, 0]
        elif self.kind == "transpose":
            value = value.T
        parts = torch.split(value, sizes) if len(sizes) > 1 else [value]
        return [part.contiguous() for part in parts]


def open_clip_prefix(has_clip_l: bool) -> str:
    """Where the OpenCLIP encoder sits: the second embedder of the base, the only one of the refiner."""
    return f"conditioner.embedders.{1 if has_clip_l else 0}.model."


def _renamed_entries(component: str, prefix: str, table: Mapping[str, str], keys) -> list[tuple[str, str]]:
    """(key, original name under ``prefix``) of each of a component's keys, renamed by ``table``."""
    renamed = []
    for key in keys:
        theirs = _rename(key, table)
        if theirs is None:
            raise SingleFileError(f"{component}: the weight {key!r} has no place in the original layout")
        renamed.append((key, prefix + theirs))
    return renamed


def _unet_entries(config, keys) -> list[Entry]:
    return [Entry(theirs, "unet", (key,)) for key, theirs in _renamed_entries("unet", UNET_PREFIX, _unet_table(config), keys)]


def _vae_entries(config, keys) -> list[Entry]:
    entries = []
    for key, theirs in _renamed_entries("vae", VAE_PREFIX, _vae_table(config), keys):
        projection = ".mid.attn_1." in theirs and not theirs.endswith((".norm.weight", ".bias"))
        entries.append(Entry(theirs, "vae", (key,), "conv1x1" if projection else "same"))
    return entries


def _clip_entries(keys) -> list[Entry]:
    # Newer transformers save CLIPTextModel without its "text_model." prefix; the original has it.
    return [Entry(CLIP_PREFIX + "text_model." + key.removeprefix("text_model."), "text_encoder", (key,)) for key in keys]


def _open_clip_entries(keys, prefix: str) -> list[Entry]:
    entries, qkv = [], {}
    for key in keys:
        short = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            entries.append(Entry(prefix + "text_projection", "text_encoder_2", (key,), "transpose"))
            continue
        top = _rename(short, _OPEN_CLIP_TOP)
        if top is not None:
            entries.append(Entry(prefix + top, "text_encoder_2", (key,)))
            continue
        parts = short.split(".")  # encoder.layers.<i>.<layer...>.<param>
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            raise SingleFileError(f"text_encoder_2: the weight {key!r} has no place in the original layout")
        block = f"{prefix}transformer.resblocks.{parts[2]}."
        layer, param = ".".join(parts[3:-1]), parts[-1]
        if layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((block, param), {})[layer.removeprefix("self_attn.")[0]] = key
        elif layer in _OPEN_CLIP_BLOCK:
            entries.append(Entry(f"{block}{_OPEN_CLIP_BLOCK[layer]}.{param}", "text_encoder_2", (key,)))
        else:
            raise SingleFileError(f"text_encoder_2: the weight {key!r} has no place in the original layout")
    for (block, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise SingleFileError(f"text_encoder_2: {block}: q, k and v projections must all be present")
        entries.append(Entry(f"{block}attn.in_proj_{param}", "text_encoder_2", (parts["q"], parts["k"], parts["v"])))
    return entries


def layout(configs: Mapping[str, Mapping[str, Any]], keys: Mapping[str, Iterable[str]]) -> list[Entry]:
    """One `Entry` per tensor of the single file of a pipeline whose components have ``keys``
    (component name -> its diffusers/transformers parameter names) and ``configs`` (the UNet's and
    the VAE's config dicts are read). Components: unet, vae, text_encoder_2 and, for the base,
    text_encoder."""
    entries = _unet_entries(configs["unet"], keys["unet"]) + _vae_entries(configs["vae"], keys["vae"])
    if "text_encoder" in keys:
        entries += _clip_entries(keys["text_encoder"])
    entries += _open_clip_entries(keys["text_encoder_2"], open_clip_prefix("text_encoder" in keys))
    seen: dict[str, Entry] = {}
    for entry in entries:
        if entry.original in seen:
            raise SingleFileError(f"{seen[entry.original].keys[0]!r} and {entry.keys[0]!r} both map to {entry.original!r}")
        seen[entry.original] = entry
    return sorted(entries, key=lambda e: e.original)


# ---------------------------------------------------------------------------------------------
# Files


def _components(index: Mapping[str, Any]) -> list[str]:
    """The weight-bearing components a pipeline's ``model_index.json`` names."""
    present = [name for name in WEIGHT_FILES if isinstance(index.get(name), list) and index[name][0] is not None]
    for needed in ("unet", "vae", "text_encoder_2"):
        if needed not in present:
            raise SingleFileError(f"the pipeline has no {needed}: not an SDXL base or refiner")
    return present


def _weight_files(folder: Path, name: str) -> list[Path]:
    """The full-precision weights of a component folder: one file, or the shards its index names
    (not every *.safetensors: a folder may hold other precisions' files too)."""
    if (folder / name).is_file():
        return [folder / name]
    index = folder / f"{name}.index.json"
    if index.is_file():
        return sorted({folder / shard for shard in storage.read_json(index)["weight_map"].values()})
    raise SingleFileError(f"{folder}: no {name} (nor a sharded index)")


def write_single_file(folder: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Writes the local diffusers SDXL folder ``folder`` as one original-layout safetensors file
    ``out`` (written aside and renamed, so ``out`` is never half-written). ``dtype`` ("float16",
    "bfloat16", "float32"): convert every tensor to it; None keeps each tensor's own."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    index = storage.read_json(folder / "model_index.json")
    tensors: dict[str, dict[str, Any]] = {}
    for name in _components(index):
        tensors[name] = {}
        for file in _weight_files(folder / name, WEIGHT_FILES[name]):
            with safe_open(str(file), framework="pt") as handle:
                tensors[name].update({key: handle.get_tensor(key) for key in handle.keys()})
    configs = {name: storage.read_json(folder / name / "config.json") for name in ("unet", "vae")}
    result = {}
    for entry in layout(configs, {name: list(t) for name, t in tensors.items()}):
        value = entry.to_original([tensors[entry.component][key] for key in entry.keys])
        if dtype is not None:
            value = value.to(getattr(torch, dtype))
        result[entry.original] = value.contiguous()
    if "text_encoder" in tensors:
        # Released files carry CLIP's position ids, and some tools check for them.
        positions = tensors["text_encoder"]
        width = next(v for k, v in positions.items() if k.endswith("position_embedding.weight")).shape[0]
        result[IGNORED_KEYS[0]] = torch.arange(width, dtype=torch.int64)[None]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    save_file(result, str(partial), metadata={"format": "pt"})
    os.replace(partial, out)
    return out


def _expected_shapes(name: str, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a component built from ``config`` on torch's meta device (no memory),
    under the names the installed diffusers / transformers save."""
    import torch

    with torch.device("meta"):
        if name == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
        elif name == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig.from_dict(config))
    return {key: tuple(value.shape) for key, value in model.state_dict().items() if not key.endswith("position_ids")}


def detect_kind(keys: Iterable[str]) -> str:
    """"base" or "refiner", from where a single file keeps its OpenCLIP encoder."""
    keys = set(keys)
    for kind, has_clip_l in (("base", True), ("refiner", False)):
        if open_clip_prefix(has_clip_l) + "positional_embedding" in keys:
            return kind
    raise SingleFileError("not an SDXL base or refiner single file (no OpenCLIP text encoder at "
                          "conditioner.embedders.{0,1}.model); give the matching diffusers folder as the config")


def file_keys(file: str | Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except SafetensorError as err:  # a pickle renamed .safetensors: refused, never unpickled
        raise SingleFileError(f"{file}: not a safetensors file ({err})") from None


def convert_to_folder(file: str | Path, out: str | Path, config_folder: str | Path | None = None) -> Path:
    """Writes the diffusers folder ``out`` from the single file ``file``: weights from the file,
    everything else (model_index.json, component configs, tokenizers, scheduler) from the local
    diffusers folder ``config_folder``, or else from the shipped SDXL base or refiner configs
    (chosen from the file's keys). Every tensor the configs call for must be in the file with the
    configs' shape, and every tensor of the file must be one of them (or a known non-weight)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file, out = Path(file), Path(out)
    keys = file_keys(file)
    config_folder = Path(config_folder) if config_folder is not None else SHIPPED[detect_kind(keys)]
    index = storage.read_json(config_folder / "model_index.json")
    components = _components(index)
    configs = {name: storage.read_json(config_folder / name / "config.json") for name in components}
    shapes = {name: _expected_shapes(name, configs[name]) for name in components}
    entries = layout(configs, shapes)
    wanted = {entry.original: entry for entry in entries}
    unknown = sorted(set(keys) - set(wanted) - set(IGNORED_KEYS))
    if unknown:
        raise SingleFileError(f"{file}: {len(unknown)} tensors the configs in {config_folder} have no place for, "
                              f"first {unknown[0]!r} (a different model, or the wrong config folder)")
    missing = sorted(set(wanted) - set(keys))
    if missing:
        raise SingleFileError(f"{file}: {len(missing)} tensors the configs in {config_folder} call for are missing, "
                              f"first {missing[0]!r} (a different model, or the wrong config folder)")
    with safe_open(str(file), framework="pt") as handle:
        # Every shape first (cheap, from the header), so a wrong file fails before anything is written.
        for original, entry in wanted.items():  # sorted: the first mismatch named is stable
            expected = entry.original_shape([shapes[entry.component][key] for key in entry.keys])
            found = tuple(handle.get_slice(original).get_shape())
            if found != expected:
                raise SingleFileError(f"{file}: {original!r} has shape {list(found)}, the configs in "
                                      f"{config_folder} call for {list(expected)}")
        out.mkdir(parents=True, exist_ok=True)
        for name in components:  # one component in memory at a time
            tensors = {}
            for entry in (e for e in entries if e.component == name):
                parts = entry.to_diffusers(handle.get_tensor(entry.original), [shapes[name][k][0] for k in entry.keys])
                tensors.update(zip(entry.keys, parts))
            (out / name).mkdir()
            shutil.copy2(config_folder / name / "config.json", out / name / "config.json")
            save_file(tensors, str(out / name / WEIGHT_FILES[name]), metadata={"format": "pt"})
    copy_other_files(config_folder, out)
    return out


def copy_other_files(config_folder: Path, out: Path) -> None:
    """Copies ``model_index.json`` and the folders without weights (tokenizers, scheduler) of the
    pipeline ``config_folder`` into ``out``."""
    index = storage.read_json(config_folder / "model_index.json")
    for name, value in index.items():
        if isinstance(value, list) and value[0] is not None and name not in WEIGHT_FILES:
            shutil.copytree(config_folder / name, out / name)
            if config_folder in SHIPPED.values():  # the shipped tokenizers share one copy of the BPE tables
                for table in ("vocab.json", "merges.txt"):
                    shutil.copy2(CONFIGS_DIR / "clip_bpe" / table, out / name / table)
    shutil.copy2(config_folder / "model_index.json", out / "model_index.json")
