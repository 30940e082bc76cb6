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

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402

# gcsfs's default file system first probes a bucket's type over gRPC, which the plain-HTTP
# emulator below does not speak: each new bucket then costs about a minute of retries. The
# classic JSON-API file system is what the emulator serves. Read at gcsfs import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session")
def gcs_bucket():
    """A real Cloud Storage JSON API on localhost (the gcp-storage-emulator package, in memory, see
    gcs_emulator.py), and
    the variables that point gcsfs (etils.epath's gs:// backend), tensorstore (orbax's array
    writer) and google-cloud-storage at it, for this process and the ones it starts. Yields
    "gs://<bucket>"; tests write under a prefix of their own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, bucket = f"http://127.0.0.1:{port}", "sdxl-tpu-test"
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "gcs_emulator.py"), "start", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", bucket, "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2).close()
            break
        except OSError:
            assert server.poll() is None, "the storage emulator exited"
            assert time.monotonic() < deadline, "the storage emulator did not start"
            time.sleep(0.2)
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=30)
