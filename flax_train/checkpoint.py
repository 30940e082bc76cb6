"""Checkpoints: one orbax CheckpointManager holding everything a run needs to continue bit-exactly.

A checkpoint has three items: ``state`` (parameters, optimizer state, EMA, step and RNG key, saved
sharded — each process writes its own shards), ``data`` (the loader's iterator state, JSON) and
``checksums`` (one number per array of ``state`` and one for ``data``, computed before the save).
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it), so a
preempted save never leaves a half-written checkpoint that resume would pick up. A newest
checkpoint that does not restore, or restores to values that do not match its checksums (files
damaged on disk, bytes flipped), is set aside and the one before is used; a save that fails (a
full disk) stops the run at once with one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store

from flax_train import sharding
from sdxl_common import errors, storage

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "checksums")


class DamagedCheckpoint(Exception):
    """A checkpoint restored, but to values other than those saved."""


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
        self.manager = ocp.CheckpointManager(
            directory, options=options, item_names=ITEMS, item_handlers={"state": _state_handler()}
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
        """Starts an asynchronous save of ``state`` (a pytree of sharded arrays) at ``step``."""
        if not force and not self.due(step):
            return False
        data_state = data_state or {}
        sums = checksums(state, data_state)  # of the values in memory, so the files are checked against them
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state),
                    data=ocp.args.JsonSave(data_state),
                    checksums=ocp.args.JsonSave(sums),
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

        Without ``step``: the newest checkpoint that restores to the values saved. One that does
        not (a file truncated, missing, unreadable or with bytes changed) is named in a warning and moved aside to ``<dir>/damaged/`` (never
        deleted: someone may want to look at it), and the one before is tried; the run then redoes
        the steps after that one and can save them again.
        """
        if step is not None:
            state, data_state, saved = self._read(step, abstract_state)
            self._verify(state, data_state, saved)
            return state, data_state
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            # Each process reads its own part, so a damaged file may fail the read on one process
            # only: all agree on the reads before the checksums, whose program is a collective
            # that every process must run (a process that skipped it would meet the others in the
            # next collective with the wrong data, and the pod would crash instead of going on).
            try:
                (state, data_state, saved), failure = self._read(candidate, abstract_state), None
            except Exception as error:  # whatever orbax or tensorstore raise on damaged files
                failure = error
            if self._everywhere(failure is None):
                try:  # the same verdict on every process: the sums are computed over the global arrays
                    self._verify(state, data_state, saved)
                    return state, data_state
                except DamagedCheckpoint as error:
                    failure = error
            self._set_aside(candidate, failure)
        raise errors.InputNotFound(f"no checkpoint in {self.manager.directory} restores")

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data state, the checksums saved with them) of checkpoint ``step``, this
        process's part read from its files."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
                ),
                data=ocp.args.JsonRestore(),
                checksums=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, dict(restored.data or {}), dict(restored.checksums or {})

    @staticmethod
    def _verify(state: Any, data_state: dict, saved: dict) -> None:
        """Raises DamagedCheckpoint unless the values read are those ``saved`` checksums describe."""
        found = checksums(state, data_state)
        wrong = [name for name in found if saved.get(name) != found[name]]
        if wrong or saved.keys() != found.keys():
            raise DamagedCheckpoint(
                f"restored values differ from those saved in {len(wrong) or 'its list of'} arrays "
                f"({', '.join(wrong[:3]) or 'names'}{', ...' if len(wrong) > 3 else ''})"
            )

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


# Arrays replicated over devices on other hosts are written "replica-parallel" (each replica
# writes a slice), but only slices of at least this size: each slice is cut on the device by a
# small program, compiled at the first save, and tiny slices cost more than they save.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's handler for the state, with replica-parallel writes only across hosts. orbax's
    default slices every replicated array per device even in one process, where a single writer
    gains nothing: 850 small replicated float32 arrays on 8 CPU devices (orbax 0.12.8) took 15 s
    to save the first time and 6 s later, instead of 2.6 s and 2.3 s; a `flax-train train` of the
    tests' tiny model, 4 steps and 2 saves, about 4 s less."""
    arrays = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=jax.process_count() > 1,
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
        # As orbax's default handler (no public name): without it a restore that fails on damaged
        # files left thousands of unfinished reads behind.
        array_metadata_store=array_metadata_store.Store(),
    )
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def require(directory: storage.PathLike) -> None:
    """Fails in one line when ``directory`` holds no checkpoint: cheap, so commands that need one
    ask before building anything."""
    folder = storage.path(directory)
    if not (folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())):
        raise errors.InputNotFound(f"no checkpoint in {folder}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


def checksums(state: Any, data_state: dict) -> dict[str, int]:
    """One 32-bit number per array of ``state`` (by tree path) and one for ``data_state``.

    An array's number is the sum, modulo 2**32, of its elements' bits (as unsigned integers) times
    an odd weight that depends on the position. Changing any one element changes the sum (an odd
    weight is invertible modulo 2**32); integer sums do not depend on the reduction order, so the
    number is the same however the array is sharded. Computed on the devices, in one program.
    """
    flat = jax.tree_util.tree_flatten_with_path(state)[0]  # once: flattening 853 nnx Variables takes 0.3 s
    sums = [int(x) for x in sharding.to_host(_array_sums([x for _, x in flat]))] if flat else []
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    data = hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).digest()
    return {**dict(zip(names, sums)), "data": int.from_bytes(data[:4], "little")}


@jax.jit
def _array_sums(leaves: list[jax.Array]) -> jax.Array:
    def bits(x: jax.Array) -> jax.Array:
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            return x.astype(jnp.uint32)
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)

    def weighted_sum(x: jax.Array) -> jax.Array:
        b = bits(x)
        weights = jnp.arange(b.size, dtype=jnp.uint32).reshape(b.shape) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.sum(b * (weights * jnp.uint32(0x9E3779B1)), dtype=jnp.uint32)

    # One array: one transfer to the host, not one per array of the state (853 for the tests' tiny model).
    return jnp.stack([weighted_sum(x) for x in leaves])


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

    ``grace_s``: the process exits (status 1, with a line saying why) that many seconds after the
    stop began even if the checkpoint is not written by then; orbax writes into a temporary folder,
    so an abandoned save leaves the checkpoints before it as they were. A second SIGTERM changes
    nothing.
    """

    def __init__(self, grace_s: float | None = None) -> None:
        self.requested = threading.Event()
        self.grace_s = grace_s
        self._previous = None
        self._deadline: threading.Timer | None = None

    def __enter__(self) -> "PreemptionGuard":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested.is_set():
            log.warning("SIGTERM again: already stopping; the checkpoint being written is not interrupted")
            return
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested.set()
        self._start_deadline()

    def _start_deadline(self) -> None:
        if self.grace_s is not None and self._deadline is None:
            self._deadline = threading.Timer(self.grace_s, self._give_up)
            self._deadline.daemon = True
            self._deadline.start()

    def _give_up(self) -> None:
        print(f"flax-train: error: stopping on SIGTERM took longer than checkpoint.sigterm_grace_s={self.grace_s} s; "
              "exiting without finishing the checkpoint (the next start resumes from the newest complete one)",
              file=sys.stderr, flush=True)
        os._exit(errors.EXIT_FAILURE)  # from a timer thread: the main thread is busy in the save

    def __exit__(self, *exc) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested.is_set()
        # Every process must ask at every step (the protocol counts steps).
        if multihost_utils.reached_preemption_sync_point(step):
            log.warning("preemption notice: all processes save a checkpoint at step %d and stop", step)
            self._start_deadline()
            return True
        return False
