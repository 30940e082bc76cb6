"""Weights & Biases (``logging.wandb``): one more sink of ``metrics.MetricsWriter``, on process 0.

- One run directory, one W&B run: the run's id is kept in ``<run_dir>/wandb_run_id`` (a local
  folder or a ``gs://`` URL), and a later run in the same directory (a resumed one) passes it to
  ``wandb.init`` with ``resume="allow"``, so it continues that W&B run.
- W&B's own files (an offline run's records, logs, media) go to ``<run_dir>/wandb`` for a local
  run directory; for a remote one, where W&B puts them by default (``$WANDB_DIR``, else
  ``./wandb``): W&B appends to them as it goes, which an object store cannot take, and an
  offline run must outlive the process to be synced (``wandb sync``).
- Logging does not wait on the network: ``log`` hands each row to W&B's own service process.

The ``wandb`` package is an optional extra (``pip install 'sdxl-tpu[wandb]'``), imported only
when ``logging.wandb`` is set.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from etils import epath

from sdxl_common import storage
from sdxl_common.errors import BadInput, RunFailure

if TYPE_CHECKING:
    from flax_train.config import WandbConfig

RUN_ID_FILE = "wandb_run_id"
# W&B's own step (``_step``) only grows, and a row logged at a lower one is dropped; but a resumed
# run redoes the steps after its checkpoint, which the W&B run may hold already. So the training
# step is a metric of its own, named as metrics.jsonl's column, and every other metric is plotted
# against it (``define_metric``): nothing is refused, and a redone step shows both of its tries.
STEP = "step"


def import_wandb() -> Any:
    """The ``wandb`` module, or a one-line BadInput saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise BadInput("logging.wandb is set but the wandb package is not installed: "
                       "pip install 'sdxl-tpu[wandb]' (or set logging.wandb: null)") from None
    return wandb


class WandbSink:
    """The W&B run of ``run_dir``, started (or continued) with ``config`` as its run config."""

    def __init__(self, settings: WandbConfig, run_dir: epath.Path, config: Mapping[str, Any]):
        self._wandb = import_wandb()
        id_file = run_dir / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:  # written before the run starts, so a run that dies at once is still continued
            run_id = uuid.uuid4().hex[:16]
            storage.atomic_write_bytes(id_file, run_id.encode())
        errors = self._wandb.errors
        try:
            self.run = self._wandb.init(
                project=settings.project,
                entity=settings.entity,
                name=settings.name,
                tags=list(settings.tags) or None,  # None keeps a resumed run's tags
                mode=settings.mode,
                id=run_id,
                resume="allow",
                dir=None if storage.is_remote(run_dir) else str(run_dir),
                config=dict(config),
            )
        # Not logged in, or an entity or project the key cannot write to: the user's to fix. W&B's
        # server out of reach: the run's failure. Either in one line, not a traceback.
        except (errors.AuthenticationError, errors.UsageError) as error:
            raise BadInput(f"logging.wandb: W&B refused the run: {_first_line(error)}") from None
        except errors.CommError as error:
            raise RunFailure(f"logging.wandb: W&B could not be reached: {_first_line(error)}") from None
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({STEP: step, **values})

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """``image`` is HWC uint8."""
        self.run.log({STEP: step, tag: self._wandb.Image(image)})

    def close(self) -> None:
        self.run.finish()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
