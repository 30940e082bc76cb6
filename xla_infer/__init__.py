"""SDXL generation with PyTorch/XLA from fixed-shape graphs compiled once (plain torch for comparison).

Importing this package does not import torch_xla; only `Pipeline(device="xla")` does.
"""
from xla_infer.pipeline import InputError, Pipeline, RecompilationError
from xla_infer.schedulers import SCHEDULER_NAMES

__all__ = ["InputError", "Pipeline", "RecompilationError", "SCHEDULER_NAMES"]
