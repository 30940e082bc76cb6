"""Export: a complete diffusers SDXL folder with the trained UNet, or a LoRA file.

The trained UNet is written as PyTorch-layout safetensors under ``unet/``; every other component
(VAE, text encoders, tokenizers, scheduler, ``model_index.json``) is copied from the pipeline the
run started from, so ``StableDiffusionXLPipeline.from_pretrained(out)`` loads the result, and so do
``xla_infer`` and the other tools that read the diffusers format.

A LoRA run (``train.method: lora``) exports only its factors (with ``lora.train_text_encoder`` the
text encoders' too), as diffusers' LoRA training scripts do:
``<export dir>/pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(<export dir>)``
applies to a pipeline of ``model.pretrained``; with ``export.kohya_lora`` also
``lora_kohya.safetensors``, the same factors under kohya's names, which A1111 and ComfyUI load.

With ``export.single_file`` a full fine-tune is also written as ``<export dir>.safetensors``, one
checkpoint in Stability's original layout (``sdxl_common.single_file``), as A1111, ComfyUI and
diffusers' ``from_single_file`` read SDXL.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
from etils import epath
from flax import nnx

from flax_train import config as config_lib, lora, models, sharding
from sdxl_common import single_file as single_file_lib, storage

log = logging.getLogger(__name__)

# Files worth copying from a component folder: configs, weights, tokenizer vocabularies.
_COPY_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
SDXL_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _copy_component(source: Path, target: Path, variant: str | None = None) -> None:
    """Configs, tokenizer files and one precision of weights: the ``variant``'s files
    (``model.fp16.safetensors``) where the folder has them, else the plain ones, written under the
    plain names so that loading the export needs no ``variant``."""
    target.mkdir(parents=True, exist_ok=True)
    files = [f for f in sorted(source.iterdir()) if f.is_file() and f.suffix in _COPY_SUFFIXES]
    weights = {f: f.stem.partition(".")[2] for f in files if f.suffix == ".safetensors"}  # file -> its variant
    precision = variant if variant in weights.values() else ""
    for f in files:
        if f not in weights:
            shutil.copy2(f, target / f.name)
        elif weights[f] == precision:
            shutil.copy2(f, target / (f.stem.partition(".")[0] + f.suffix))


def export_pipeline(
    unet: nnx.Module,
    base: str | Path,
    out: storage.PathLike,
    *,
    vae: str | Path | None = None,
    variant: str | None = None,
    single_file: bool = False,
    single_file_dtype: str | None = None,
) -> epath.Path:
    """Writes ``out`` (a folder or a URL) as a diffusers folder: ``unet`` from the given module, the
    rest from ``base``; with ``single_file`` also the same pipeline as one original-layout
    checkpoint, `single_file_path` (every tensor in ``single_file_dtype``, or else as in the folder).

    ``base`` is the pretrained pipeline folder (or Hub id) the run used; ``vae`` an optional VAE
    folder that replaced the pipeline's own (for example an fp16-safe SDXL VAE); ``variant`` the
    precision of the other components' weights to copy (``model.variant``). The folder is built
    on local disk and then published whole (``storage.publish_folder``), so an interrupted export
    never leaves a half-written folder where ``out`` is.
    """
    index_path = models.resolve_pipeline(base) / "model_index.json"
    tmp = storage.staging_dir(out)
    index = storage.read_json(index_path)
    for name in SDXL_COMPONENTS:
        if not index.get(name) or index[name][0] is None:
            continue
        source = models.resolve_folder(vae) if (name == "vae" and vae) else models.resolve_folder(base, name)
        _copy_component(source, tmp / name, variant)
    models.save(unet, tmp / "unet")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if single_file:
        _write_single_file(tmp, single_file_path(out), single_file_dtype)
    return storage.publish_folder(tmp, out, marker="model_index.json")


def single_file_path(out: storage.PathLike) -> epath.Path:
    """Where ``export.single_file`` puts the checkpoint: beside the folder ``out``, named after it."""
    return storage.path(str(out).rstrip("/") + ".safetensors")


def _write_single_file(folder: Path, target: epath.Path, dtype: str | None) -> None:
    if not storage.is_remote(target):
        single_file_lib.write_single_file(folder, Path(os.path.expanduser(str(target))), dtype=dtype)
        return
    # Written locally, then uploaded as one object: it appears only once complete.
    local = Path(tempfile.mkdtemp(prefix="sdxl-tpu-single-file-")) / target.name
    try:
        single_file_lib.write_single_file(folder, local, dtype=dtype)
        storage.copy_file(local, target)
    finally:
        shutil.rmtree(local.parent)


# The kohya-format copy of a LoRA export (export.kohya_lora), beside diffusers' file.
KOHYA_LORA_NAME = "lora_kohya.safetensors"


def export_lora(factors: nnx.State, lora_cfg: config_lib.LoraConfig, out: storage.PathLike,
                kohya_unet_config: Mapping[str, Any] | None = None) -> epath.Path:
    """Writes ``out`` as a folder holding ``pytorch_lora_weights.safetensors`` from host
    ``factors``, and with ``kohya_unet_config`` (the UNet's config) the same factors in kohya's
    format; built aside and published whole, like a pipeline folder."""
    tmp = storage.staging_dir(out)
    lora.save_weights(factors, lora_cfg, tmp / lora.WEIGHT_NAME)
    if kohya_unet_config is not None:
        lora.save_kohya(factors, lora_cfg, tmp / KOHYA_LORA_NAME, kohya_unet_config)
    return storage.publish_folder(tmp, out, marker=lora.WEIGHT_NAME)


def export_dir(cfg: config_lib.Config) -> epath.Path:
    return storage.path(cfg.export.dir or storage.path(cfg.run_dir) / "export")


def export_run(cfg: config_lib.Config, graphdef: nnx.GraphDef, params: nnx.State) -> epath.Path:
    """Writes a run's diffusers folder (a LoRA run: its LoRA file) to ``export.dir`` (default
    ``<run_dir>/export``). ``params``: the UNet's, or a LoRA run's factors.

    Every process calls this: parameters are gathered from the mesh (across processes on a pod)
    first; process 0 writes, the others wait for it.
    """
    out = export_dir(cfg)
    host_params = sharding.to_host(params)
    if cfg.train.method == "lora":
        if jax.process_index() == 0:
            unet_config = None
            if cfg.export.kohya_lora:
                base = models.pretrained_pipeline(cfg.model)
                unet_config = models.read_config(base / "unet")
            export_lora(host_params, cfg.lora, out, unet_config)
            log.info("exported the LoRA weights to %s", out / lora.WEIGHT_NAME)
        sharding.sync("export")
        return out
    if jax.process_index() == 0:
        base = models.pretrained_pipeline(cfg.model)
        export_pipeline(nnx.merge(graphdef, host_params), base, out, vae=cfg.model.vae, variant=cfg.model.variant,
                        single_file=cfg.export.single_file, single_file_dtype=cfg.export.single_file_dtype)
        log.info("exported the diffusers pipeline to %s", out)
    sharding.sync("export")
    return out
