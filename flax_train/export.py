"""Export: a complete diffusers SDXL folder with the trained UNet.

The trained UNet is written as PyTorch-layout safetensors under ``unet/``; every other component
(VAE, text encoders, tokenizers, scheduler, ``model_index.json``) is copied from the pipeline the
run started from, so ``StableDiffusionXLPipeline.from_pretrained(out)`` loads the result, and so do
``xla_infer`` and the other tools that read the diffusers format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flax import nnx

from flax_train import models

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
    base_root = models.resolve_folder(base)
    index_path = base_root / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{base_root}: not a diffusers pipeline folder (no model_index.json)")
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
