"""Each compile in a process of its own (``python -m benchmarks.tpu_aot --worker``): libtpu allows
one user at a time, and a compiler crash or the host memory it took then does not carry over. The
worker records what the host spent on the compile; ``host_info`` describes the host for the
results files."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.tpu.inference import compile_inference
from benchmarks.tpu.paths import REPO
from benchmarks.tpu.scenarios import Scenario, Settings
from benchmarks.tpu.training import compile_scenario


def run_in_subprocess(name: str, unet: str, depth: int | None, timeout_s: float, settings: Settings) -> dict[str, Any]:
    """The worker's row for scenario ``name``, or a row saying how the worker timed out or crashed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.tpu_aot", "--worker", name, "--unet", unet,
                   "--worker-out", str(out), *settings.flags()]
        if depth is not None:
            command += ["--worker-depth", str(depth)]
        start = time.perf_counter()
        scenario = dataclasses.asdict(Scenario.parse(name))
        failure = {"scenario": name, **scenario, "unet": unet, "depth": depth, "scan_layers": settings.scan_layers,
                   "attention": settings.attention}
        try:
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**failure, "status": "timeout", "compile_s": time.perf_counter() - start}
        if out.exists():
            return json.loads(out.read_text())
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {**failure, "status": "crashed", "returncode": proc.returncode, "error": tail,
                "compile_s": time.perf_counter() - start}


def run_worker(name: str, unet: str, depth: int | None, out: Path, settings: Settings) -> None:
    """In the worker process: one compile, its row (with the host's peak memory, CPU time and swap)
    written to ``out``."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # a compile, never a cache hit
    swapped_before = swapped_out_bytes()
    devices = jax.devices("cpu")[:1] if settings.host_cpu else None
    if settings.inference_steps:
        result = compile_inference(Scenario.parse(name), settings, unet, devices)
    else:
        result = compile_scenario(Scenario.parse(name), unet, depth, settings, devices)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["host_peak_rss_gib"] = usage.ru_maxrss / 1024**2
    # On a shared host the wall time depends on the load; the CPU time does not.
    result["host_cpu_s"] = usage.ru_utime + usage.ru_stime
    if swapped_before is not None:
        # The peak RSS leaves out what the kernel swapped out: a compile that needed more memory than
        # the host has shows here (system-wide, so other work's pages count too).
        result["host_swapped_out_gib"] = (swapped_out_bytes() - swapped_before) / 1024**3
    out.write_text(json.dumps(result, indent=2))


def swapped_out_bytes() -> int | None:
    try:
        pages = int(re.search(r"^pswpout (\d+)$", Path("/proc/vmstat").read_text(), re.M)[1])
    except (OSError, TypeError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def host_info() -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    memory_gib = None
    if Path("/proc/meminfo").exists():
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        memory_gib = round(kb / 1024**2, 1)
    return {
        "host": "CPU-only (no TPU attached); TPU programs compiled ahead of time by libtpu",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        **{package: version(package) for package in ("jax", "jaxlib", "libtpu", "flax", "optax")},
    }
