"""Suite-wide set-up: 8 fake CPU devices for JAX, compiled fast (xla_options.py), torch_xla on the
CPU, no Hub access.

These must be set before jax / torch_xla are imported anywhere, hence at conftest import time.
"""
import os
import tempfile

from xla_options import FAST_COMPILE_FLAGS

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if FAST_COMPILE_FLAGS not in os.environ["XLA_FLAGS"]:  # see xla_options.py
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs two pytest workers on two cores: one intra-op thread each for torch (and any
# OpenMP code), or the workers oversubscribe the cores and stall each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Models copied from gs:// URLs go to a folder of this session, not the user's ~/.cache.
os.environ.setdefault("SDXL_TPU_MODEL_CACHE", tempfile.mkdtemp(prefix="sdxl-tpu-models-"))

from pathlib import Path  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same small models: JAX's persistent compilation cache (which works on
# CPU) lets the second compile of an identical program load the first one's result.
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

from benchmarks.gcs_emulator import Emulator  # noqa: E402

# gcsfs's default file system first probes a bucket's type over gRPC, which the plain-HTTP
# emulator does not speak: each new bucket then costs about a minute of retries. The classic
# JSON-API file system is what the emulator serves. Read at gcsfs import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session")
def gcs_bucket():
    """A real Cloud Storage JSON API on localhost (gcp-storage-emulator, in memory, see
    benchmarks/gcs_emulator.py), and the variables that point gcsfs (etils.epath's gs:// backend),
    tensorstore (orbax's array writer) and google-cloud-storage at it, for this process and the
    ones it starts. Yields "gs://<bucket>"; tests write under a prefix of their own."""
    with Emulator() as bucket:
        yield bucket
