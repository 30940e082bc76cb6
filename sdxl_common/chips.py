"""The accelerators the project knows, one row each: what the trainer's MFU divides by and what
the TPU estimates (benchmarks/tpu/) take as each chip's limits.

Figures per chip from the Cloud TPU system-architecture pages (v4, v5e, v5p, v6e) and NVIDIA's H100
SXM datasheet (its peak only): dense bf16 peak, HBM capacity and bandwidth, and the bidirectional inter-chip
interconnect bandwidth. None where a figure is not used or has no single value.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_tflops: float | None  # dense bf16, per chip
    hbm_gib: float | None  # HBM per chip
    hbm_gb_per_s: float | None  # HBM bandwidth per chip
    ici_gb_per_s: float | None  # bidirectional inter-chip interconnect bandwidth per chip
    device_kinds: tuple[str, ...] = ()  # lower-case pieces of the device_kind JAX and torch_xla report


CHIPS: dict[str, Chip] = {
    "tpu_v4": Chip(275.0, 32.0, 1200.0, None, ("v4",)),
    "tpu_v5e": Chip(197.0, 16.0, 819.0, 400.0, ("v5 lite", "v5e")),
    "tpu_v5p": Chip(459.0, 95.0, 2765.0, 1200.0, ("v5p", "v5")),
    "tpu_v6e": Chip(918.0, 32.0, 1640.0, 800.0, ("v6 lite", "v6e")),
    # The H200 has the H100's compute dies (and more memory): its peak is the H100's.
    "h100": Chip(989.0, None, None, None, ("h100", "h200")),
    "cpu": Chip(None, None, None, None),
}


def chip_of(device_kind: str) -> str | None:
    """The CHIPS key of a device's ``device_kind`` ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...);
    the first match in table order, so "v5 lite" is a v5e before "v5" makes it a v5p."""
    kind = device_kind.lower()
    for name, chip in CHIPS.items():
        if any(piece in kind for piece in chip.device_kinds):
            return name
    return None
