"""Where the pipeline's graphs run and how often they compile: the device (an XLA device, or plain
torch on CPU or CUDA for comparison), SPMD data parallelism over a host's chips, the persistent
compilation cache, the wrapper that makes each graph function one compiled graph, and the
compile counter that guards the compiled-once promise."""
from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from xla_infer.checks import InputError

logger = logging.getLogger("xla_infer")

DEVICES = ("xla", "cpu", "cuda")


class Runtime:
    def __init__(self, kind: str, *, cache_dir: str | Path | None = None, data_parallel: bool | None = None,
                 torch_compile: bool = False):
        """``kind``: one of DEVICES (the pipeline checks it first, before any other input)."""
        self.kind = kind
        self.torch_compile = torch_compile
        self.cache_status = "not requested"
        self.mesh = None  # an SPMD mesh over the host's chips, when the batch is split over them
        self._metrics = None  # torch_xla's metrics module, on an XLA device
        if kind == "xla":
            self.device, devices = self._setup_xla(cache_dir, data_parallel)
        else:
            if cache_dir is not None:
                self.cache_status = f"not used: the persistent compilation cache is an XLA feature (device={kind})"
            if kind == "cuda" and not torch.cuda.is_available():
                raise InputError("device 'cuda' requested but torch sees no CUDA device")
            self.device, devices = torch.device(kind), 1
        self.num_devices = devices if self.mesh is not None else 1

    def _setup_xla(self, cache_dir: str | Path | None, data_parallel: bool | None) -> tuple[torch.device, int]:
        import torch_xla
        import torch_xla.debug.metrics as metrics
        import torch_xla.runtime as xr

        self._metrics = metrics
        device_type = xr.device_type()
        if cache_dir is not None:
            if device_type != "TPU":
                # Checked: on CPU torch_xla writes cache entries but cannot deserialize them
                # ("Deserializing serialized executable not supported"), so a cache would only cost.
                self.cache_status = (
                    f"not used: torch_xla cannot load a persistent compilation cache back on {device_type}; "
                    "every process start compiles again"
                )
                logger.warning("--cache-dir: %s", self.cache_status)
            elif torch_xla._XLAC._xla_computation_cache_is_initialized():
                self.cache_status = "not used: XLA had already compiled in this process before the cache was set"
                logger.warning("--cache-dir: %s", self.cache_status)
            else:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                xr.initialize_cache(str(cache_dir), readonly=False)
                self.cache_status = f"enabled at {cache_dir}"
        n_devices = xr.global_runtime_device_count()
        if data_parallel is None:
            data_parallel = n_devices > 1
        if data_parallel and n_devices > 1:
            import torch_xla.distributed.spmd as xs

            # One process drives all local chips; the batch axis of every per-image input is split
            # over them and the weights are replicated. Not one process per chip (torch_xla.launch):
            # that compiles the same graphs N times at once, racing on one cache directory, holds N
            # copies of the weights in host memory while loading, and must split prompts, gather
            # images and survive one worker failing. The price: batches of a multiple of N.
            xr.use_spmd()
            self.mesh = xs.Mesh(np.arange(n_devices), (n_devices,), ("data",))
        return torch_xla.device(), n_devices

    def graph(self, fn: Callable, name: str) -> Callable:
        """``fn`` as one compiled graph: on XLA, any host read inside (an .item(), a data-dependent
        shape) is an error rather than a silent graph break, and a second traced variant is an
        error; with torch_compile, torch.compile with static shapes; else ``fn`` itself."""
        if self.kind == "xla":
            import torch_xla

            return torch_xla.compile(fn, full_graph=True, name=name, max_different_graphs=1)
        if self.torch_compile:
            return torch.compile(fn, dynamic=False)
        return fn

    def to_device(self, tensor: torch.Tensor, batch_dim: int | None = 0) -> torch.Tensor:
        """``tensor`` on the device; with a mesh, its ``batch_dim`` split over the chips (None: replicated)."""
        tensor = tensor.to(self.device)
        if self.mesh is not None and batch_dim is not None:
            import torch_xla.distributed.spmd as xs

            spec = tuple("data" if d == batch_dim else None for d in range(tensor.dim()))
            xs.mark_sharding(tensor, self.mesh, spec)
        return tensor

    def compilations(self) -> int:
        """Compilations in this process so far (XLA graphs, or torch.compile graphs)."""
        if self._metrics is not None:
            data = self._metrics.metric_data("CompileTime")
            return 0 if data is None else int(data[0])
        if self.torch_compile:
            from torch._dynamo.utils import counters

            return int(counters["stats"]["unique_graphs"])
        return 0

    def compile_seconds(self) -> float | None:
        """XLA's compile time in this process so far; None where it is not measured."""
        if self._metrics is None:
            return None
        data = self._metrics.metric_data("CompileTime")
        return 0.0 if data is None else data[1] / 1e9

    @property
    def persistent_cache_hits(self) -> int:
        """Graphs loaded from the persistent compilation cache instead of compiled (TPU only)."""
        if self._metrics is None:
            return 0
        return int(self._metrics.counter_value("PersistentCacheHit") or 0)

    def detail(self) -> str:
        """The device in words, for manifests and benchmarks."""
        if self.kind == "xla":
            import torch_xla.runtime as xr

            return f"{xr.device_type()} x{xr.global_runtime_device_count()} (torch_xla)"
        if self.kind == "cuda":
            return torch.cuda.get_device_name()
        return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
