"""Training metrics: throughput, MFU, and the writers (TensorBoard, JSON lines, Weights & Biases,
progress bar).

Only process 0 writes. Values arrive one step late (the loop hands over the previous step's
device arrays after dispatching the next step), so logging never stalls the accelerator.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from flax_train.wandb_sink import WandbSink
from sdxl_common import chips, storage

# Dense bf16 peak per chip, for MFU (sdxl_common.chips). None: no meaningful peak (MFU is
# reported only when logging.peak_tflops is given).
CHIP_PEAK_TFLOPS: dict[str, float | None] = {name: chip.peak_tflops for name, chip in chips.CHIPS.items()}


def detect_chip(device: Any | None = None) -> str | None:
    """The CHIP_PEAK_TFLOPS key of ``device`` (default: the first JAX device), or None."""
    return chips.chip_of((device or jax.devices()[0]).device_kind)


def memory_summary(compiled: Any) -> str:
    """Per-device memory the compiler plans for the step (arguments, outputs, temporaries)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return "memory analysis unavailable on this backend"
    if m is None:
        return "memory analysis unavailable on this backend"
    gib = 1024**3
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return (
        f"per device: arguments {m.argument_size_in_bytes / gib:.2f} GiB, outputs {m.output_size_in_bytes / gib:.2f} GiB, "
        f"temporaries {m.temp_size_in_bytes / gib:.2f} GiB, aliased {m.alias_size_in_bytes / gib:.2f} GiB, "
        f"total {total / gib:.2f} GiB"
    )


def throughput(
    step_seconds: float,
    images_per_step: int,
    hardware_flops_per_device: float | None,
    model_flops_per_step: float | None,
    peak_tflops: float | None,
) -> dict[str, float]:
    """Speed of one step, and how much of the chips' peak it uses, two ways (see ``flax_train.flops``):

    - ``mfu``: model FLOPs utilisation, 3 x the forward FLOPs per image (what the model needs,
      recomputation not counted) over the peak of all devices: the figure to compare trainers by;
    - ``hfu``: hardware FLOPs utilisation, the FLOPs the compiled step executes (counted from its
      HLO by ``flax_train.hlo_cost``: rematerialisation included, loops as often as they run), per
      device over one device's peak.
    """
    out = {"step_time_s": step_seconds, "images_per_s": images_per_step / step_seconds}
    devices = jax.device_count()
    if hardware_flops_per_device:
        out["tflops_per_device"] = hardware_flops_per_device / step_seconds / 1e12
    if model_flops_per_step:
        out["model_tflops_per_device"] = model_flops_per_step / devices / step_seconds / 1e12
    if peak_tflops:
        if hardware_flops_per_device:
            out["hfu"] = out["tflops_per_device"] / peak_tflops
        if model_flops_per_step:
            out["mfu"] = out["model_tflops_per_device"] / peak_tflops
    return out


def _rows_up_to(path: epath.Path, step: int) -> tuple[bytes, list[int]]:
    """The lines of a metrics.jsonl whose step is at most ``step``, and the steps of the others (a
    torn last line, written when a process was killed, is dropped too)."""
    if not path.exists():
        return b"", []
    kept, dropped = [], []
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if row_step <= step:
            kept.append(line + "\n")
        else:
            dropped.append(row_step)
    return "".join(kept).encode(), dropped


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per logged step) and TensorBoard event files in the run
    directory, and a Weights & Biases run when ``wandb`` (``logging.wandb``) is given, written by
    process 0 only.

    A run resumed from the checkpoint of ``start_step`` redoes the steps after it: rows of those
    steps in ``metrics.jsonl`` are dropped, and the new TensorBoard event file purges them from
    the earlier ones (TensorBoard's ``purge_step``), so both hold one row per step. W&B cannot drop
    rows: there both tries of a redone step show (see ``wandb_sink.STEP``).

    Object stores cannot append, so for a remote run directory (``gs://...``) both are written to a
    local folder and uploaded whole at most every ``upload_every_s`` seconds and on ``flush()`` /
    ``close()`` (the trainer flushes at every checkpoint).
    """

    def __init__(
        self,
        run_dir: storage.PathLike,
        *,
        start_step: int = 0,
        tensorboard: bool = True,
        jsonl: bool = True,
        wandb: Any = None,
        run_config: Mapping[str, Any] | None = None,
        upload_every_s: float = 60.0,
    ):
        """``wandb``: the ``logging.wandb`` section (``config.WandbConfig``) or None; ``run_config``:
        the resolved config, the W&B run's config."""
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self.redone: list[int] = []  # steps an earlier run logged after ``start_step``
        if not self.enabled:
            return
        self.run_dir = storage.path(run_dir)
        self._remote = storage.is_remote(run_dir)
        self._upload_every_s = upload_every_s
        self._uploaded_at = time.monotonic()
        if self._remote:
            self.local_dir = Path(tempfile.mkdtemp(prefix="sdxl-tpu-metrics-"))
        else:
            self.local_dir = Path(str(self.run_dir))
            self.local_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            kept, self.redone = _rows_up_to(self.run_dir / "metrics.jsonl", start_step)
            storage.atomic_write_bytes(self.local_dir / "metrics.jsonl", kept)
            self._jsonl = open(self.local_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # The event file is named by the second it was opened in; a resume within the same
            # second would overwrite the previous run's file without a suffix that sorts after it.
            self._tb = SummaryWriter(str(self.local_dir / "tensorboard"), purge_step=start_step + 1,
                                     filename_suffix=f".{time.time_ns()}")
        if wandb is not None:
            self._wandb = WandbSink(wandb, self.run_dir, run_config or {})

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.scalars(step, clean)
        if self._remote and time.monotonic() - self._uploaded_at > self._upload_every_s:
            self.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """``image`` is HWC uint8."""
        if not self.enabled:
            return
        if self._tb:
            self._tb.add_image(tag, image, step, dataformats="HWC")
        if self._wandb:
            self._wandb.image(step, tag, image)

    def flush(self) -> None:
        """Makes everything logged so far visible in the run directory."""
        if not self.enabled:
            return
        if self._jsonl:
            self._jsonl.flush()
        if self._tb:
            self._tb.flush()
        if self._remote:
            storage.upload_tree(self.local_dir, self.run_dir)
            self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.close()
        if self._remote:  # one upload, of everything the closed files hold
            storage.upload_tree(self.local_dir, self.run_dir)
            shutil.rmtree(self.local_dir, ignore_errors=True)
