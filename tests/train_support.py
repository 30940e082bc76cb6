"""What the trainer's tests share: a tiny SDXL-shaped workspace, the demo config made small for it,
and ways to run the CLIs as users do (one process, or several joined by jax.distributed)."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from flax_train import config as config_lib
from flax_train.demo import CONFIG as DEMO_CONFIG, synthetic, tiny

REPO = Path(__file__).resolve().parents[1]
RESOLUTION = 16  # the tiny VAE downsamples by 2: 8x8 latents
BATCH = 8  # one sample per device
STEPS = 4


@dataclasses.dataclass(frozen=True)
class Workspace:
    root: Path
    base: Path  # the pretrained pipeline folder every run starts from
    cache: Path  # the latent cache every run shares


def make_workspace(root: Path, text_layers: int = 1) -> Workspace:
    """A tiny SDXL-shaped pipeline (one resnet and one transformer layer per level, ``text_layers``
    per text encoder, 16x16 images -> 8x8 latents) and a synthetic dataset of one global batch; the
    cache is made by the first run."""
    base = tiny.save_tiny_pipeline(
        root / "base",
        seed=0,
        image_size=RESOLUTION,
        layers_per_block=1,
        transformer_layers_per_block=(1, 1),
        text_layers=text_layers,
    )
    synthetic.write_synthetic_dataset(root / "synthetic", BATCH, image_size=RESOLUTION, seed=0)
    return Workspace(root, base, root / "cache")


def overrides(ws: Workspace, run_dir: Path, *extra: str) -> list[str]:
    """The demo config made small; the step it compiles is the same for every run of the tests
    (constant learning rate: the schedule does not depend on max_steps), so the persistent
    compilation cache serves all but the first compile."""
    return [
        f"model.pretrained={ws.base}",
        "model.unet_config=null",
        f"data.resolution={RESOLUTION}",
        f"data.path={ws.root / 'synthetic'}",
        f"data.cache_dir={ws.cache}",
        f"train.global_batch_size={BATCH}",
        f"train.max_steps={STEPS}",
        "train.warmup_steps=0",
        "train.lr_schedule=constant",
        "train.learning_rate=1e-3",
        "train.ema.decay=0.9",
        "checkpoint.every_steps=0",  # at the end only (each save costs seconds): tests that need more say so
        "validation.every_steps=0",
        "export.at_end=false",
        "logging.every_steps=1",
        "logging.tensorboard=false",
        f"run_dir={run_dir}",
        *extra,
    ]


def make_config(ws: Workspace, run_dir: Path, *extra: str) -> config_lib.Config:
    return config_lib.load([DEMO_CONFIG], overrides(ws, run_dir, *extra))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `flax-train` child process: it compiles the same step as the tests, so
    it uses the session's compilation cache, if there is one (and never the CLI's default cache in
    the home directory)."""
    env = dict(os.environ, **extra)
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(jax.config.jax_persistent_cache_min_compile_time_secs)
    else:
        env["SDXL_TPU_COMPILATION_CACHE"] = ""
    return env


def run_cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, module: str = "flax_train.cli") -> str:
    """Runs a CLI as a user would; returns its stdout, fails the test with its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{module} {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


def host(tree: Any) -> Any:
    """A numpy copy (the step donates its input state)."""
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def assert_trees_equal(a: Any, b: Any) -> None:
    leaves_a, tree_a = jax.tree.flatten(host(a))
    leaves_b, tree_b = jax.tree.flatten(host(b))
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


# Devices per process in the multi-process tests: more than one, as on every TPU host, but not 4.
# Every collective crosses processes through gloo and each of its device threads waits in it; with
# 2 processes x 4 devices on 2 cores the tiny model's step took 4 s, with 2 x 2 devices 1.1 s
# (8 steps of `flax-train train` as below, nothing else running).
DEVICES_PER_PROCESS = 2


class Processes:
    """`flax-train` as N processes x DEVICES_PER_PROCESS CPU devices on localhost, joined by JAX's
    distributed runtime (what every worker of a TPU pod slice runs), with their output in files."""

    def __init__(self, tmp_path: Path, name: str, *args: str, count: int = 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = cli_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count), JAX_PLATFORMS="cpu",
                      XLA_FLAGS=re.sub(r"device_count=\d+", f"device_count={DEVICES_PER_PROCESS}", os.environ["XLA_FLAGS"]))
        self.logs = [tmp_path / f"{name}.{i}.log" for i in range(count)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen([sys.executable, "-m", "flax_train.cli", *args], cwd=REPO,
                                                   env=dict(env, JAX_PROCESS_ID=str(i)), stdout=out, stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for i, proc in enumerate(self.procs):
                assert proc.poll() is None, f"process {i} exited ({proc.returncode}) before {what}:\n{self.output(i)[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} in {timeout} s"
            time.sleep(0.2)

    def wait(self, timeout: float = 600) -> list[str]:
        """Every process's output, once all exited 0."""
        try:
            for proc in self.procs:
                proc.wait(timeout=timeout)
        finally:
            self.kill()
        for i, proc in enumerate(self.procs):
            assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{self.output(i)[-3000:]}"
        return [self.output(i) for i in range(len(self.procs))]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def run_script_in_processes(tmp_path: Path, script: str, *args: str, count: int = 2,
                            devices_per_process: int = DEVICES_PER_PROCESS, timeout: float = 300) -> list[str]:
    """A Python script as `count` processes x `devices_per_process` CPU devices joined by JAX's
    distributed runtime (the script calls sharding.initialize_distributed()); their outputs, once
    all exited 0. Only stdout: the distributed runtime's own logging (gloo's peer-connection lines)
    goes to stderr at moments of its own choosing and would split the scripts' lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "worker.py").write_text(script)
    env = cli_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count), JAX_PLATFORMS="cpu",
                  XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), *args], cwd=REPO,
                                env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for i in range(count)]
    try:
        streams = [w.communicate(timeout=timeout) for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0] * count, streams
    return [stdout for stdout, _ in streams]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Finished checkpoints (orbax renames a checkpoint's temporary folder to its step when done)."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def flip_bytes_in_the_largest_file(checkpoint: Path) -> None:
    """Bit rot: the files are all there, whole and readable, but some values are not what was saved."""
    largest = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    largest.write_bytes(bytes(data))
