"""The XLA flags the suite compiles with, and the way back to XLA's defaults for the tests that
need them.

The suite compiles hundreds of small programs and runs each a few times, so it turns off the CPU
backend's optimisation passes, which makes its compiles faster (conftest.py sets the flags before
JAX starts; a `flax-train train` of the tests' tiny model with an empty compilation cache took 60 s
instead of 73 s). Programs compiled that way may round differently from one another where XLA's optimised
code would not: the tests that assert two programs give bit-identical results compile them with
``jit_as_default``.
"""
from __future__ import annotations

from typing import Any, Callable

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DEFAULT_OPTIMISATION = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def jit_as_default(fn: Callable, *args: Any) -> Callable:
    """``fn`` compiled for ``args`` with XLA's default CPU optimisation, as outside the suite."""
    import jax

    return jax.jit(fn).lower(*args).compile(DEFAULT_OPTIMISATION)
