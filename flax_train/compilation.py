"""JAX's persistent compilation cache: where it is, and how many programs a start compiled.

A training run keeps its compiled programs in ``<run_dir>/compilation_cache`` (local or ``gs://``,
as the run directory), beside its checkpoints: a run resumed after a preemption, on the same VM
or a fresh one, loads them instead of compiling again. ``SDXL_TPU_COMPILATION_CACHE`` (empty: no
cache) or JAX's own ``JAX_COMPILATION_CACHE_DIR`` choose another folder; the other commands use
``~/.cache/sdxl-tpu/jax``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

from sdxl_common import storage

HOME_CACHE = Path.home() / ".cache" / "sdxl-tpu" / "jax"
RUN_DIR_CACHE = "compilation_cache"


def chosen_by_user() -> bool:
    return "SDXL_TPU_COMPILATION_CACHE" in os.environ or "JAX_COMPILATION_CACHE_DIR" in os.environ


def use(folder: str | os.PathLike | None, min_compile_time_s: float = 1.0) -> None:
    """JAX's persistent cache in ``folder`` (None: off), for programs that took at least
    ``min_compile_time_s`` to compile. Set before the process compiles anything."""
    jax.config.update("jax_compilation_cache_dir", str(folder) if folder else None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


def use_default() -> None:
    """The cache the user chose, else ``HOME_CACHE``: for every command but training."""
    if jax.config.jax_compilation_cache_dir is None:  # JAX_COMPILATION_CACHE_DIR is read by JAX itself
        use(os.environ.get("SDXL_TPU_COMPILATION_CACHE", str(HOME_CACHE)))


def use_run_dir(run_dir: str | os.PathLike) -> None:
    """A training run's cache: ``<run_dir>/compilation_cache`` unless the user chose one. Every
    program goes in, however quickly it compiled, so that a resumed run compiles none."""
    if not chosen_by_user():
        use(storage.path(run_dir) / RUN_DIR_CACHE, min_compile_time_s=0.0)


@dataclasses.dataclass
class CompileCount:
    """XLA compilations from its creation to ``close()``, and how many of them the persistent cache
    served, from JAX's monitoring events (counted only while a persistent cache is in use)."""

    requests: int = 0
    hits: int = 0

    def __post_init__(self):
        jax.monitoring.register_event_listener(self._event)

    def _event(self, event: str, **_) -> None:
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            self.requests += 1
        elif event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    @property
    def compiled(self) -> int:
        return self.requests - self.hits

    def close(self) -> None:
        jax.monitoring.unregister_event_listener(self._event)
