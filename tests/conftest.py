"""Suite-wide set-up: 8 fake CPU devices for JAX, torch_xla on the CPU, no Hub access.

These must be set before jax / torch_xla are imported anywhere, hence at conftest import time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs two pytest workers on two cores: one intra-op thread each for torch (and any
# OpenMP code), or the workers oversubscribe the cores and stall each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same small models: JAX's persistent compilation cache (which works on
# CPU) lets the second compile of an identical program load the first one's result.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
