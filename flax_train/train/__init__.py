"""The SDXL UNet trainer, in pipeline order:

- ``model``: the UNet (with LoRA, the adapted UNet and text encoders), created into its shardings;
- ``state``: the TrainState, its optimizer, its sharded start and its shapes alone (``abstract_state``);
- ``step``: the loss, one update, and the step compiled ahead of time;
- ``loop``: ``train``, the run from mesh to export;
- ``restore``: a run's checkpoints read back, and exports from them.

What the CLI, the demo, the benchmarks and the tests use is exported here.
"""

from flax_train.train.loop import TrainResult, train
from flax_train.train.model import build_lora_unet, build_unet, init_unet, lora_init, unet_architecture, unet_options
from flax_train.train.restore import export_from_checkpoint, restore_checkpoint
from flax_train.train.state import TrainState, abstract_state, build_optimizer, build_state
from flax_train.train.step import (
    CompiledStep,
    batch_spec,
    compile_step,
    diffusion_loss,
    global_batch,
    hardware_flops,
    make_step_fn,
    step_config,
    train_step,
    unconditional_inputs,
)

__all__ = [
    "CompiledStep",
    "TrainResult",
    "TrainState",
    "abstract_state",
    "batch_spec",
    "build_lora_unet",
    "build_optimizer",
    "build_state",
    "build_unet",
    "compile_step",
    "diffusion_loss",
    "export_from_checkpoint",
    "global_batch",
    "hardware_flops",
    "init_unet",
    "lora_init",
    "make_step_fn",
    "restore_checkpoint",
    "step_config",
    "train",
    "train_step",
    "unconditional_inputs",
    "unet_architecture",
    "unet_options",
]
