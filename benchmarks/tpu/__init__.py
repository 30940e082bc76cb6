"""Ahead-of-time estimates of SDXL on Cloud TPU, compiled on a host without a TPU
(``python -m benchmarks.tpu_aot``; docs/tpu_estimates.md). The parts, one concern each:

* ``scenarios``: the slices, meshes, scenario names and compile settings;
* ``training`` and ``inference``: the trainer's step and the JAX sampler compiled for a slice;
  ``compiled``: the figures read from a compiled program (memory plan, cost, HLO counts, OOM);
* ``worker``: each compile in its own process, and what the host spent on it;
* ``roofline``: the figures derived from a row (totals, roofline, MFU) and the extrapolation in depth;
* ``results``: the table, the results files and their markdown, ``--reanalyse``.

The environment is set here, before any part imports JAX, so that whichever part comes first
compiles for a described slice and never initialises a TPU backend.
"""
import os

# Compile for a described TPU slice; never initialise a TPU backend (there is none on this host).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without these libtpu probes GCE metadata for a TPU that is not there and logs warnings.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu takes a host-wide lock meant for a real TPU; compiling for a described slice touches no
# chip, so two compiles (two benchmark runs) may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
