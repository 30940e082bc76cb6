"""Device mesh, the logical-axis table, and shardings for parameters and batches.

The mesh has three axes:

* ``data``   — pure data parallelism: parameters replicated, the batch split (the old pmap layout);
               with ``mesh.slices`` > 1 (multislice) it spans the slices, over the data-centre
               network (DCN), so only gradients cross between slices;
* ``fsdp``   — the batch split too, and parameters / optimizer state sharded along one dimension
               each (ZeRO-3 style), gathered just in time by XLA inside the step;
* ``tensor`` — attention heads, MLP width and convolution output channels split across chips.

Weights carry logical axis names (``flax_train.models.layers``); ``RULES`` maps each name to a mesh
axis. A dimension whose size does not divide by its mesh axis is replicated instead: small models
(the demo) then still run on any mesh, and the choice is logged once per shape.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax._src import distributed as jax_distributed  # the coordination service's client: no public handle
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sdxl_common.errors import BadInput

MESH_AXES = ("data", "fsdp", "tensor")

# The batch dimension is split over every axis that replicates computation per example.
# fsdp first: with the batch split ("data", "fsdp") on a mesh where data, fsdp and tensor are all
# > 1, XLA (jax 0.10) miscompiles a matmul whose weight is sharded ("tensor", "fsdp") feeding a
# residual add — it permutes the batch shards of one operand only, and examples 2..5 of 8 come
# out wrong. Which process holds which rows does not matter: each contributes its own.
BATCH_AXES = ("fsdp", "data")

# logical axis name -> mesh axis, tuple of mesh axes, or None (replicated). One table for every model.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp",
    "conv_in": "fsdp",
    "vocab": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "conv_out": "tensor",
    "norm": None,
}


def mesh_axis_problems(mesh: Any) -> list[str]:
    problems = []
    for axis in MESH_AXES:
        size = getattr(mesh, axis)
        if size != -1 and size < 1:
            problems.append(f"mesh.{axis} must be a positive number of devices or -1 (the rest), got {size}")
    if getattr(mesh, "slices", 1) < 1:
        problems.append(f"mesh.slices must be a positive number of slices, got {mesh.slices}")
    filled = [axis for axis in MESH_AXES if getattr(mesh, axis) == -1]
    if len(filled) > 1:
        problems.append(
            f"mesh: only one axis may be -1, got {' and '.join(f'mesh.{a}=-1' for a in filled)}; "
            "give the others explicit sizes"
        )
    return problems


def resolve_mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Axis sizes {data, fsdp, tensor} on `num_devices` devices, the -1 axis taking the rest. The
    config's sizes describe one slice; with ``mesh.slices`` > 1 the data axis is that many times
    longer."""
    problems = mesh_axis_problems(mesh_cfg)
    if problems:
        raise BadInput("; ".join(problems))
    if num_devices < 1:
        raise ValueError(f"the number of devices must be positive, got {num_devices}")
    slices = getattr(mesh_cfg, "slices", 1)
    if num_devices % slices:
        raise BadInput(f"mesh.slices={slices} cannot split the {num_devices} devices into equal slices")
    shape = _slice_mesh_shape(mesh_cfg, num_devices // slices)
    shape["data"] *= slices
    return shape


def _slice_mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    shape = {axis: getattr(mesh_cfg, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in shape.values() if size != -1)
    described = " x ".join(f"{axis}={size}" for axis, size in shape.items())
    filled = [axis for axis, size in shape.items() if size == -1]
    if filled:
        if num_devices % fixed:
            raise BadInput(
                f"mesh: {described} cannot be laid on {num_devices} devices: "
                f"the fixed axes take {fixed}, which does not divide {num_devices}"
            )
        shape[filled[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise BadInput(f"mesh: {described} needs {fixed} devices, but there are {num_devices}")
    return shape


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    dims = tuple(sizes[axis] for axis in MESH_AXES)
    slices = getattr(mesh_cfg, "slices", 1)
    if slices > 1:
        return Mesh(_multislice_grid(devices, slices, (dims[0] // slices, *dims[1:])), MESH_AXES)
    try:
        # Topology-aware placement on TPU/GPU (keeps `tensor` on the fastest links).
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(dims, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, MESH_AXES)


def _multislice_grid(devices: list, slices: int, per_slice: tuple[int, ...]) -> np.ndarray:
    """Devices as a (data, fsdp, tensor) grid whose data axis runs over `slices` slices, each slice
    laid out on its own interconnect (JAX's hybrid device mesh). A TPU device knows its slice; on
    CPU or GPU hosts each process stands for a slice, and one process's CPU devices (the tests'
    simulated chips) are cut into slices in order."""
    from jax.experimental import mesh_utils

    for granule in ("slice_index", "process_index"):
        if len({getattr(d, granule, None) for d in devices}) == slices:
            return mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices,
                                                        process_is_granule=granule == "process_index")
    if devices[0].platform == "cpu":
        return np.asarray(devices).reshape(slices * per_slice[0], *per_slice[1:])
    found = len({getattr(d, "slice_index", 0) for d in devices})
    raise BadInput(f"mesh.slices={slices}, but the {len(devices)} devices are in {found} slice(s) and "
                   f"{jax.process_count()} process(es)")


def spec_for(
    axes: tuple[str | None, ...] | None,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] = RULES,
) -> P:
    """The PartitionSpec of one array from its logical axes; indivisible dims are replicated."""
    if not axes:
        return P()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        target = rules.get(name) if name is not None else None
        mesh_axes = tuple(a for a in ((target,) if isinstance(target, str) else (target or ())) if mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or used.intersection(mesh_axes) or size % ways:
            spec.append(None)
        else:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
    return P(*spec)


def merged_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The default table with a config's ``mesh.rules`` entries on top."""
    return {**RULES, **dict(overrides or {})}


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Mapping[str, str | None] = RULES) -> NamedSharding:
    axes = variable.get_metadata().get("axes")
    return NamedSharding(mesh, spec_for(axes, tuple(variable.get_value().shape), mesh, rules))


def tree_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> Any:
    """Shardings for a pytree holding NNX Variables (abstract or concrete), with the tree's own
    structure: Variables follow their logical ``axes`` (optimizer moments inherit the parameters'
    axes), every other leaf (step counters, RNG keys) is replicated."""
    return jax.tree.map(
        lambda x: x.replace(variable_sharding(x, mesh, rules)) if isinstance(x, nnx.Variable) else replicated(mesh),
        tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def initialize_distributed() -> None:
    """Starts JAX's multi-process runtime when this is one process of many.

    On a TPU pod slice ``jax.distributed.initialize()`` finds its peers by itself; elsewhere the
    coordinator address, process count and id come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID. A single process on one host needs none of it.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        # Must not touch a backend before initialize(): decide CPU collectives from the environment.
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        jax.distributed.initialize()


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree's arrays. Arrays sharded over other processes' devices are gathered
    first (a collective: on a pod every process must call this, in the same order)."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x)) if hasattr(x, "shape") else x

    return jax.tree.map(one, tree)


_barriers = itertools.count()


def sync(name: str, timeout_s: float = 3 * 3600) -> None:
    """All processes wait here for each other, up to ``timeout_s`` (a no-op on one process).

    A barrier of the coordination service that ``jax.distributed`` runs, not a device collective:
    the wait can be long (process 0 writing an export to Cloud Storage, a peer still compiling),
    and on CPU a collective gives up after 30 s. Every process passes the same barriers in the same
    order, so a counter tells them apart.
    """
    if jax.process_count() > 1:
        client = jax_distributed.global_state.client
        client.wait_at_barrier(f"{name} #{next(_barriers)}", int(timeout_s * 1000))
