"""Checkpoints: one orbax CheckpointManager holding everything a run needs to continue bit-exactly.

A checkpoint has two items: ``state`` (parameters, optimizer state, EMA, step and RNG key, saved
sharded — each process writes its own shards) and ``data`` (the loader's iterator state, JSON).
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it), so a
preempted save never leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flax_train import storage

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: storage.PathLike, *, keep: int = 3, every_steps: int = 1000, use_async: bool = True):
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=use_async,
            create=True,
        )
        # A URL (gs://...) stays one; a local path becomes absolute, as orbax wants.
        directory = storage.path(directory)
        if not storage.is_remote(directory):
            directory = directory.absolute()
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
        """Starts an asynchronous save of ``state`` (a pytree of sharded arrays) at ``step``."""
        if not force and not self.due(step):
            return False
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
            ),
            force=force,
        )
        if saved:
            log.info("checkpoint at step %d started", step)
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into ``abstract_state``'s shapes, dtypes and shardings (a ShapeDtypeStruct tree)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.data or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree,
        shardings,
    )


class PreemptionGuard:
    """Tells the training loop when to save a checkpoint and stop because of SIGTERM (a TPU
    preemption notice, or ``kill``): ``guard.stop(step)``, asked after every step.

    One process: a SIGTERM handler sets a flag. Several processes (a pod slice): SIGTERM may reach
    one host only, and every host must stop at the same step or the others would wait forever in
    the next step's collectives. JAX's preemption sync manager (started by
    ``jax.distributed.initialize``) catches SIGTERM itself and, through the coordination service,
    picks one step that all processes reach; ``stop`` turns true there on every process. A Python
    handler would replace that manager's own, so none is installed then.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous = None

    def __enter__(self) -> "PreemptionGuard":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested.set()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested.is_set()
        # Every process must ask at every step (the protocol counts steps).
        if multihost_utils.reached_preemption_sync_point(step):
            log.warning("preemption notice: all processes save a checkpoint at step %d and stop", step)
            return True
        return False
