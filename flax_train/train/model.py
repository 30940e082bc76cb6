"""The UNet to train (with LoRA: the adapted UNet and text encoders), created straight into
its shardings: loaded from the pipeline folder, or drawn at random for a new architecture."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_train import config as config_lib, lora, models, sharding
from sdxl_common import lora_files, sdxl
from flax_train.models import weights

log = logging.getLogger(__name__)


def unet_options(cfg: config_lib.Config) -> dict[str, Any]:
    return dict(
        dtype=jnp.dtype(cfg.model.dtype),
        param_dtype=jnp.dtype(cfg.model.param_dtype),
        attention=cfg.model.attention,
        remat=cfg.model.remat,
        scan_layers=cfg.model.scan_layers,
    )


def unet_architecture(cfg: config_lib.Config, base: Path) -> dict[str, Any]:
    """The pipeline folder's UNet config, or ``model.unet_config``'s for a new UNet."""
    spec = cfg.model.unet_config
    if spec is None:
        return models.read_config(models.resolve_folder(base, "unet"))
    if spec == "sdxl":
        return dict(sdxl.UNET_CONFIG)
    return {"_class_name": "UNet2DConditionModel", **models.thaw_config(spec)}


def build_unet(
    cfg: config_lib.Config, mesh: jax.sharding.Mesh, base: Path, rules: dict[str, Any]
) -> tuple[nnx.GraphDef, nnx.State]:
    """The UNet's graph and parameters, each parameter created directly in its sharding.

    The UNet is loaded from the pipeline folder's ``unet/`` (fine-tuning), or initialised with
    random weights of ``model.unet_config``'s architecture.
    """
    if cfg.model.unet_config is None:
        place = functools.partial(sharding.variable_sharding, mesh=mesh, rules=rules)
        unet = models.load(base, subfolder="unet", sharding_fn=place, **unet_options(cfg))
        return nnx.split(unet, nnx.Param)
    return init_unet(cfg, unet_architecture(cfg, base), mesh, rules)


def init_unet(
    cfg: config_lib.Config, architecture: dict[str, Any], mesh: jax.sharding.Mesh, rules: dict[str, Any]
) -> tuple[nnx.GraphDef, nnx.State]:
    """A UNet of ``architecture`` with random weights drawn from ``train.seed``, placed sharded.

    The weights are drawn op by op on the host's CPU, and each device receives only its shard.
    Compiled as one program instead, the initialisers of SDXL's 1,680 arrays each become a kernel
    of their own, and compiling them dominates: a fifth-width SDXL took 248 s to initialise that way
    on a 2-core host, and takes 18 s op by op, optimizer state included (the phase times that
    ``benchmarks/train_throughput.py --unet medium`` prints). Every process draws the same weights
    from the same seed.
    """
    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU out: the first accelerator draws them
        host = jax.local_devices()[0]
    with jax.default_device(host):
        graphdef, params = nnx.split(models.create(architecture, seed=cfg.train.seed, **unet_options(cfg)), nnx.Param)
    shardings = sharding.tree_shardings(params, mesh, rules)
    return graphdef, jax.tree.map(lambda x, s: weights.place(np.asarray(x), s), params, shardings)


def frozen_unet_options(cfg: config_lib.Config) -> dict[str, Any]:
    """LoRA's UNet: the base weights stored in the compute dtype (2 bytes a weight in bf16: they
    get no gradient, optimizer state or EMA, so nothing needs them in fp32), the factors in
    ``model.param_dtype``."""
    return dict(unet_options(cfg), param_dtype=jnp.dtype(cfg.model.dtype))


def frozen_text_options(cfg: config_lib.Config) -> dict[str, Any]:
    """The text encoders of ``lora.train_text_encoder``: frozen like the UNet (``frozen_unet_options``)."""
    dtype = jnp.dtype(cfg.model.dtype)
    return dict(dtype=dtype, param_dtype=dtype, attention=cfg.model.attention, remat=cfg.model.remat)


def text_encoder_configs(cfg: config_lib.Config, base: Path) -> dict[str, dict[str, Any]]:
    """With ``lora.train_text_encoder``: name -> config of both text encoders; else none."""
    if not cfg.lora.train_text_encoder:
        return {}
    return {name: models.read_config(base / name) for name in lora.TEXT_ENCODERS}


def lora_unet(cfg: config_lib.Config, architecture: dict[str, Any],
              text_configs: dict[str, dict[str, Any]] | None = None) -> nnx.Module:
    """An abstract UNet of ``architecture`` (shapes only), with ``text_configs`` (see
    ``text_encoder_configs``) in an ``nnx.Dict`` with the text encoders, with concrete LoRA factors
    drawn from ``train.seed``: called under ``jax.jit`` it creates the factors alone, under
    ``nnx.eval_shape`` it is the whole model's shape."""
    unet = models.abstract(architecture, **frozen_unet_options(cfg))
    encoders = {name: models.abstract(config, **frozen_text_options(cfg))
                for name, config in (text_configs or {}).items()}
    return lora.inject_all(unet, encoders, cfg.lora, seed=cfg.train.seed, param_dtype=jnp.dtype(cfg.model.param_dtype))


def lora_init(cfg: config_lib.Config) -> tuple[config_lib.Config, lora_files.LoraWeights | None]:
    """With ``lora.init_from``: the config with that file's rank, alpha and targets, and the file's
    factors to start from (component -> module -> factors: the UNet's, and with
    ``lora.train_text_encoder`` the text encoders' it holds); else ``cfg`` unchanged and None."""
    source = cfg.lora.init_from
    if cfg.train.method != "lora" or not source:
        return cfg, None
    base = models.pretrained_pipeline(cfg.model)
    architecture = unet_architecture(cfg, base)
    paths = {name: lora.module_paths(models.abstract(models.read_config(base / name)))
             for name in lora.TEXT_ENCODERS if (base / name).is_dir()}
    paths["unet"] = lora.module_paths(models.abstract(architecture))
    read = lora_files.read(source, modules=paths, unet_config=architecture)
    text = {name: read[name] for name in lora.TEXT_ENCODERS if name in read}
    if text and not cfg.lora.train_text_encoder:
        log.warning("lora.init_from %s: its text-encoder factors are left out (lora.train_text_encoder is off)", source)
        text = {}
    elif cfg.lora.train_text_encoder and set(text) != set(lora.TEXT_ENCODERS):
        log.info("lora.init_from %s: no factors for %s, whose adapters start afresh", source,
                 " and ".join(sorted(set(lora.TEXT_ENCODERS) - set(text))))
    start = {"unet": read.get("unet", {}), **text}
    resolved = lora.config_from_file(cfg.lora, start["unet"], source, text)
    if resolved != cfg.lora:
        log.info("lora.init_from %s: rank %d, alpha %s, target modules %s (the file's, not the lora section's)",
                 source, resolved.rank, resolved.alpha, list(resolved.target_modules))
    return dataclasses.replace(cfg, lora=resolved), start


def build_lora_unet(
    cfg: config_lib.Config, mesh: jax.sharding.Mesh, base: Path, rules: dict[str, Any],
    start: lora_files.LoraWeights | None = None,
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """The graph of the pretrained UNet with LoRA adapters (with ``lora.train_text_encoder``: of
    the UNet and both text encoders, see ``lora.inject_all``), its LoRA factors (``start``'s values
    when given, see ``lora_init``) and its frozen weights, each created directly in its sharding
    (the frozen ones by the FSDP rules of a full fine-tune)."""
    place = functools.partial(sharding.variable_sharding, mesh=mesh, rules=rules)
    unet = models.load(base, subfolder="unet", sharding_fn=place, **frozen_unet_options(cfg))
    text_configs = text_encoder_configs(cfg, base)
    encoders = {name: models.load(base, subfolder=name, sharding_fn=place, **frozen_text_options(cfg))
                for name in text_configs}
    _, frozen = nnx.split(nnx.Dict(unet=unet, **encoders) if encoders else unet, nnx.Param)
    architecture = unet_architecture(cfg, base)
    graphdef, abstract_factors, _ = lora.split(nnx.eval_shape(lambda: lora_unet(cfg, architecture, text_configs)))

    @functools.partial(jax.jit, out_shardings=sharding.tree_shardings(abstract_factors, mesh, rules))
    def init():
        return lora.split(lora_unet(cfg, architecture, text_configs))[1]

    factors = init()
    if start is not None:
        factors = lora.factors_from_file(factors, start, cfg.lora.init_from)
    return graphdef, factors, frozen
