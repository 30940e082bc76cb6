"""Checkpoints: one orbax CheckpointManager holding everything a run needs to continue bit-exactly.

A checkpoint has two items: ``state`` (parameters, optimizer state, EMA, step and RNG key, saved
sharded — each process writes its own shards) and ``data`` (the loader's iterator state, JSON).
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it), so a
preempted save never leaves a half-written checkpoint that resume would pick up. A newest
checkpoint that does not restore all the same (files damaged on disk) is set aside and the one
before is used; a save that fails (a full disk) stops the run at once with one line.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flax_train import errors, sharding, storage

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(
        self,
        directory: storage.PathLike,
        *,
        keep: int = 3,
        every_steps: int = 1000,
        use_async: bool = True,
        read_only: bool = False,
    ):
        """``read_only``: for reading a finished run, which must have a checkpoint (checked first)."""
        self.every_steps = every_steps
        directory = storage.path(directory)
        if read_only:
            require(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=use_async,
            create=not read_only,
        )
        # A URL (gs://...) stays one; a local path becomes absolute, as orbax wants.
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
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state or {}),
                ),
                force=force,
            )
        except Exception as error:  # the previous background save's failure surfaces here too
            raise self._failure(error) from error
        if saved:
            log.info("checkpoint at step %d started", step)
        return saved

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores into ``abstract_state``'s shapes, dtypes and shardings (a ShapeDtypeStruct tree).

        Without ``step``: the newest checkpoint that restores. One that does not (a file truncated,
        missing or unreadable) is named in a warning and moved aside to ``<dir>/damaged/`` (never
        deleted: someone may want to look at it), and the one before is tried; the run then redoes
        the steps after that one and can save them again.
        """
        if step is not None:
            return self._restore(step, abstract_state)
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self._restore(candidate, abstract_state)
                failure = None
            except Exception as error:  # whatever orbax or tensorstore raise on damaged files
                failure = error
            if self._everywhere(failure is None):
                return restored
            self._set_aside(candidate, failure)
        raise errors.InputNotFound(f"no checkpoint in {self.manager.directory} restores")

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.data or {})

    @staticmethod
    def _everywhere(ok: bool) -> bool:
        """Whether ``ok`` holds on every process (each reads its own part of a checkpoint)."""
        if jax.process_count() == 1:
            return ok
        return bool(np.all(multihost_utils.process_allgather(np.array(ok))))

    def _set_aside(self, step: int, error: Exception | None) -> None:
        directory = storage.path(self.manager.directory)
        target = directory / "damaged" / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        reason = _first_line(error) if error is not None else "it failed to restore on another process"
        log.warning("checkpoint %s cannot be restored (%s); moved to %s, trying the one before",
                    directory / str(step), reason, target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (directory / str(step)).rename(target)
        sharding.sync("checkpoint set aside")
        self.manager.reload()

    def check(self, *, wait: bool = False) -> None:
        """Stops the run at once, in one line, when a background save failed (a full disk, storage
        gone): the checkpoints before it are intact and the next start resumes from the newest.
        ``wait``: for the saves under way first."""
        try:
            if wait:
                self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as error:
            raise self._failure(error) from error

    def _failure(self, error: Exception) -> errors.RunFailure:
        return errors.RunFailure(f"a checkpoint could not be written to {self.manager.directory}: {_first_line(error)}")

    def close(self) -> None:
        try:
            self.check(wait=True)
        finally:
            self.manager.close()


def require(directory: storage.PathLike) -> None:
    """Fails in one line when ``directory`` holds no checkpoint: cheap, so commands that need one
    ask before building anything."""
    folder = storage.path(directory)
    if not (folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())):
        raise errors.InputNotFound(f"no checkpoint in {folder}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


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
