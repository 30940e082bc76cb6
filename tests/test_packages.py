"""The two halves stand apart: `xla_infer` imports no JAX and nothing of `flax_train`, the trainer
nothing of `xla_infer` or torch_xla, and what both use (`sdxl_common`) neither stack; each half's
stack is its own install extra."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from train_support import REPO

IMPORTS = {
    "xla_infer": ["xla_infer.cli", "xla_infer.pipeline", "xla_infer.schedulers"],
    "flax_train": ["flax_train.cli", "flax_train.train", "flax_train.sampling", "flax_train.export"],
    "sdxl_common": ["sdxl_common." + m for m in
                    ("errors", "storage", "model_source", "sdxl", "single_file", "lora_files", "prompts", "prompt_weights",
                     "samplers", "png")],
}
FORBIDDEN = {
    "xla_infer": {"jax", "flax", "optax", "orbax", "grain", "flax_train"},
    "flax_train": {"xla_infer", "torch_xla"},
    "sdxl_common": {"jax", "flax", "torch", "torch_xla", "diffusers", "flax_train", "xla_infer"},
}


@pytest.mark.parametrize("package", sorted(IMPORTS))
def test_a_half_imports_neither_the_other_half_nor_its_stack(package):
    code = (
        "import importlib, sys\n"
        f"for name in {IMPORTS[package]!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(eval(result.stdout.strip().splitlines()[-1]))
    assert not loaded & FORBIDDEN[package], sorted(loaded & FORBIDDEN[package])


def test_each_half_installs_its_own_stack():
    extras: dict[str, set[str]] = {}
    for requirement in importlib.metadata.requires("sdxl-tpu"):
        name = requirement.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower()
        extra = requirement.split("extra ==")[1].strip().strip("'\"") if "extra ==" in requirement else ""
        extras.setdefault(extra, set()).add(name.replace("_", "-"))
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= extras["train"]
    assert {"torch", "torch-xla", "diffusers"} <= extras["infer"]
    assert not extras["infer"] & {"jax", "flax", "optax", "orbax-checkpoint", "grain"}
    assert not extras[""] & {"jax", "flax", "torch", "torch-xla"}  # what every install gets

