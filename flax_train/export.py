"""Export: a complete diffusers SDXL folder with the trained UNet, or a LoRA file.

The trained UNet is written as PyTorch-layout safetensors under ``unet/``; every other component
(VAE, text encoders, tokenizers, scheduler, ``model_index.json``) is copied from the pipeline the
run started from, so ``StableDiffusionXLPipeline.from_pretrained(out)`` loads the result, and so do
``xla_infer`` and the other tools that read the diffusers format.

A LoRA run (``train.method: lora``) exports only its factors, as diffusers' LoRA training scripts
do: ``<export dir>/pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(<export dir>)``
applies to a pipeline of ``model.pretrained``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
from etils import epath
from flax import nnx

from flax_train import config as config_lib, lora, models, sharding, storage

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
) -> epath.Path:
    """Writes ``out`` (a folder or a URL) as a diffusers folder: ``unet`` from the given module, the
    rest from ``base``.

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
    return storage.publish_folder(tmp, out, marker="model_index.json")


def export_lora(factors: nnx.State, lora_cfg: config_lib.LoraConfig, out: storage.PathLike) -> epath.Path:
    """Writes ``out`` as a folder holding ``pytorch_lora_weights.safetensors`` from host
    ``factors``; built aside and published whole, like a pipeline folder."""
    tmp = storage.staging_dir(out)
    lora.save_weights(factors, lora_cfg, tmp / lora.WEIGHT_NAME)
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
            export_lora(host_params, cfg.lora, out)
            log.info("exported the LoRA weights to %s", out / lora.WEIGHT_NAME)
        sharding.sync("export")
        return out
    if jax.process_index() == 0:
        base = models.resolve_pipeline(cfg.model.pretrained, revision=cfg.model.revision, variant=cfg.model.variant)
        export_pipeline(nnx.merge(graphdef, host_params), base, out, vae=cfg.model.vae, variant=cfg.model.variant)
        log.info("exported the diffusers pipeline to %s", out)
    sharding.sync("export")
    return out
