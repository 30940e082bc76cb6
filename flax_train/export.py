"""Export: a complete diffusers SDXL folder with the trained UNet.

The trained UNet is written as PyTorch-layout safetensors under ``unet/``; every other component
(VAE, text encoders, tokenizers, scheduler, ``model_index.json``) is copied from the pipeline the
run started from, so ``StableDiffusionXLPipeline.from_pretrained(out)`` loads the result, and so do
``xla_infer`` and the other tools that read the diffusers format.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from flax_train import config as config_lib, models, sharding

log = logging.getLogger(__name__)

# Files worth copying from a component folder: configs, weights, tokenizer vocabularies.
_COPY_SUFFIXES = (".json", ".safetensors", ".txt", ".model")
SDXL_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _copy_component(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if f.is_file() and f.suffix in _COPY_SUFFIXES:
            shutil.copy2(f, target / f.name)


def export_pipeline(unet: nnx.Module, base: str | Path, out: str | Path, *, vae: str | Path | None = None) -> Path:
    """Writes ``out`` as a diffusers folder: ``unet`` from the given module, the rest from ``base``.

    ``base`` is the pretrained pipeline folder (or Hub id) the run used; ``vae`` an optional VAE
    folder that replaced the pipeline's own (for example an fp16-safe SDXL VAE).
    """
    out = Path(out)
    index_path = models.resolve_pipeline(base) / "model_index.json"
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    index = json.loads(index_path.read_text())
    for name in SDXL_COMPONENTS:
        if not index.get(name) or index[name][0] is None:
            continue
        source = models.resolve_folder(vae) if (name == "vae" and vae) else models.resolve_folder(base, name)
        _copy_component(source, tmp / name)
    models.save(unet, tmp / "unet")
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    # Replace the target in one move, so an interrupted export never leaves a half-written folder.
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def export_run(cfg: config_lib.Config, graphdef: nnx.GraphDef, params: nnx.State) -> Path:
    """Writes a run's diffusers folder to ``export.dir`` (default ``<run_dir>/export``).

    Parameters are gathered from the mesh first; process 0 writes, the others wait for it.
    """
    out = Path(cfg.export.dir or Path(cfg.run_dir) / "export")
    host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if hasattr(x, "shape") else x, params)
    if jax.process_index() == 0:
        export_pipeline(nnx.merge(graphdef, host_params), cfg.model.pretrained, out, vae=cfg.model.vae)
        log.info("exported the diffusers pipeline to %s", out)
    sharding.sync("export")
    return out
