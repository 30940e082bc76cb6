"""What a TPU estimate compiles: the slices (libtpu's names, each chip's limits from
sdxl_common.chips), the mesh layouts, the scenario names (SLICE_MESH_REMAT_RESpx_bBATCH) and the
settings beyond a name (scanned layers, LoRA, attention, the sampler)."""
from __future__ import annotations

import dataclasses
import re

from sdxl_common import chips


@dataclasses.dataclass(frozen=True)
class Slice:
    """A single-host TPU slice as libtpu names it, or several of them joined over the data-centre
    network (multislice: the mesh's data axis spans them, mesh.slices). Each chip's limits are its
    row of sdxl_common.chips."""

    topology: str  # libtpu topology name of one slice
    host_bounds: tuple[int, int, int]  # chips per host along x, y, z (one host holds the slice)
    chip: str  # key of sdxl_common.chips.CHIPS
    slices: int = 1
    dcn_gb_per_s: float | None = None  # data-centre network bandwidth per chip (Cloud TPU documentation), for slices > 1

    @property
    def limits(self) -> chips.Chip:
        return chips.CHIPS[self.chip]


SLICES: dict[str, Slice] = {
    "v5e-8": Slice("v5e:2x4", (2, 4, 1), "tpu_v5e"),
    "v5e-4": Slice("v5e:2x2", (2, 2, 1), "tpu_v5e"),
    # v5p-8 is 4 chips (8 TensorCores, fused in pairs as megacores): JAX sees 4 devices.
    "v5p-8": Slice("v5p:2x2x1", (2, 2, 1), "tpu_v5p"),
    # Two v5p-8 slices over the data-centre network: 50 Gbit/s per chip (the v5p page's table).
    "2xv5p-8": Slice("v5p:2x2x1", (2, 2, 1), "tpu_v5p", slices=2, dcn_gb_per_s=50 / 8),
    "v6e-8": Slice("v6e:2x4", (2, 4, 1), "tpu_v6e"),
    "v6e-4": Slice("v6e:2x2", (2, 2, 1), "tpu_v6e"),
    # One chip: what a Colab TPU runtime has.
    "v5e-1": Slice("v5e:1x1", (1, 1, 1), "tpu_v5e"),
    "v6e-1": Slice("v6e:1x1", (1, 1, 1), "tpu_v6e"),
}

# Mesh layouts (flax_train.config.MeshConfig fields).
MESHES: dict[str, dict[str, int]] = {
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},  # state sharded over every chip
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},  # state replicated on every chip (the pmap layout)
    "hybrid": {"data": 2, "fsdp": -1, "tensor": 1},  # two replicas, each sharded over half the chips
}
REMATS = ("none", "full", "dots", "dots_no_batch")
# --attention: model.attention, as the results files name it.
ATTENTION_NAMES = {"xla": "XLA", "splash": "splash (Pallas TPU flash)"}

# SDXL's transformer_layers_per_block is [1, 2, 10]; the shallower copies change the last entry.
SDXL_DEPTH = 10

_NAME = re.compile(r"^(?P<slice>[a-z0-9]+-\d+)_(?P<mesh>[a-z]+)_(?P<remat>[a-z_]+?)_(?P<res>\d+)px_b(?P<batch>\d+)$")


@dataclasses.dataclass(frozen=True)
class Scenario:
    slice: str
    mesh: str
    remat: str
    resolution: int
    per_chip_batch: int

    @property
    def name(self) -> str:
        return f"{self.slice}_{self.mesh}_{self.remat}_{self.resolution}px_b{self.per_chip_batch}"

    @classmethod
    def parse(cls, name: str) -> "Scenario":
        m = _NAME.match(name)
        if not m or m["slice"] not in SLICES or m["mesh"] not in MESHES or m["remat"] not in REMATS:
            raise ValueError(
                f"scenario {name!r}: expected SLICE_MESH_REMAT_RESpx_bBATCH with SLICE in {sorted(SLICES)}, "
                f"MESH in {sorted(MESHES)}, REMAT in {list(REMATS)}, e.g. v5e-8_fsdp_full_1024px_b1"
            )
        if int(m["res"]) % 64:
            raise ValueError(f"scenario {name!r}: the resolution must be a multiple of 64 (VAE x UNet downsampling)")
        return cls(m["slice"], m["mesh"], m["remat"], int(m["res"]), int(m["batch"]))


# With --scan-layers --attention splash, the first, third and fourth are the tpu_v5e_8, tpu_v5p_8
# and tpu_v6e_8 presets' layouts (the v6e-8 compile needs more than 23 GiB of host memory: on a
# smaller host, add swap).
DEFAULT_SCENARIOS = (
    "v5e-8_fsdp_dots_1024px_b1",
    "v5e-8_dp_full_1024px_b1",  # pure data parallel: 41 GB of replicated fp32 state cannot fit 16 GiB
    "v5p-8_hybrid_dots_1024px_b4",
    "v6e-8_fsdp_dots_1024px_b3",
    "v5e-8_fsdp_full_1024px_b1",
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a scenario is compiled, beyond its name."""

    scan_layers: bool = False  # model.scan_layers: each stack of transformer layers as one scan
    lora_rank: int | None = None  # a LoRA run's step (train.method: lora) of this rank
    attention: str = "xla"  # model.attention: xla, or splash (the Pallas TPU flash-attention kernel)
    inference_steps: int | None = None  # the sampler (this many Euler steps, guidance, VAE decode)
    # Compile for one CPU device of this host instead of the TPU slice (benchmarks/compile_time.py).
    host_cpu: bool = False

    def suffix(self) -> str:
        """What a results file's name adds for these settings, e.g. ``_scan_splash``."""
        return (("_scan" if self.scan_layers else "") + (f"_lora{self.lora_rank}" if self.lora_rank else "")
                + (f"_{self.attention}" if self.attention != "xla" else "")
                + (f"_infer{self.inference_steps}" if self.inference_steps else ""))

    def flags(self) -> list[str]:
        """These settings as the command line gives them (to a worker process)."""
        return (["--attention", self.attention] + (["--scan-layers"] if self.scan_layers else [])
                + (["--lora-rank", str(self.lora_rank)] if self.lora_rank else [])
                + (["--inference", str(self.inference_steps)] if self.inference_steps else [])
                + (["--host-cpu"] if self.host_cpu else []))

