"""A run's checkpoints read back: the state onto the config's mesh, and a diffusers export from it."""

from __future__ import annotations

import dataclasses

from etils import epath
from flax import nnx

from flax_train import checkpoint, config as config_lib, export, models, sharding
from sdxl_common import storage
from flax_train.train.model import lora_init, text_encoder_configs, unet_architecture
from flax_train.train.state import TrainState, abstract_state


def checkpoint_dir(cfg: config_lib.Config) -> epath.Path:
    return storage.path(cfg.checkpoint.dir or storage.path(cfg.run_dir) / "checkpoints")


def restore_checkpoint(cfg: config_lib.Config, *, step: int | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """The UNet graph and the TrainState saved at ``step`` (default: the newest) in ``cfg``'s run,
    restored onto the config's mesh. A run without a checkpoint is refused before anything is built.
    For LoRA the state holds the factors only (a plain TrainState)."""
    cfg, _ = lora_init(cfg)  # the rank and targets of a continued LoRA, which its checkpoints have
    ckpt = checkpoint.Checkpointer(checkpoint_dir(cfg), use_async=False, read_only=True)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
        rules = sharding.merged_rules(cfg.mesh.rules)
        base = models.pretrained_pipeline(cfg.model)
        graphdef, abstract = abstract_state(cfg, unet_architecture(cfg, base), text_encoder_configs(cfg, base))
        shardings = sharding.tree_shardings(abstract, mesh, rules)
        state, _ = ckpt.restore(checkpoint.abstract_with_shardings(abstract, shardings), step)
    finally:
        ckpt.close()
    return graphdef, state


def export_params(cfg: config_lib.Config, state: TrainState) -> nnx.State:
    """The weights an export writes: the EMA when ``export.use_ema`` says so (null: when EMA is on)."""
    use_ema = cfg.export.use_ema if cfg.export.use_ema is not None else cfg.train.ema.enabled
    return state.ema if (use_ema and state.ema is not None) else state.params


def export_from_checkpoint(cfg: config_lib.Config, *, out: storage.PathLike | None = None) -> epath.Path:
    """Writes a diffusers folder from the newest checkpoint of ``cfg.run_dir``, as ``export.*`` says."""
    if out is not None:
        cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dir=str(out)))
    storage.writable_folder(export.export_dir(cfg))
    graphdef, state = restore_checkpoint(cfg)  # which looks for a checkpoint before building anything
    return export.export_run(cfg, graphdef, export_params(cfg, state))
