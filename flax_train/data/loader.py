"""Training batches from the latent cache, with grain.

Process p of P reads only its contiguous share of the cache (samples [p * n, (p + 1) * n), n =
len // P, so every process has as many batches as the others), reshuffled every epoch from the
run's seed, and yields batches of global_batch_size / P samples: dicts of numpy arrays named as in
the cache (`latents`, `prompt_embeds`, `pooled_prompt_embeds`, `add_time_ids`). Threads read
ahead a few batches on the host.

The iterator is a `grain.DatasetIterator`: `state = it.get_state()` (a small JSON-able dict) and
`it.set_state(state)` on a freshly made iterator continue with exactly the batches the first one
would have yielded next. Orbax checkpoints it through `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)`.
"""
from __future__ import annotations

import grain
import jax

from flax_train.data.cache import LatentCache


def process_share(num_samples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of the samples process `process_index` reads; every share has the same size."""
    per_process = num_samples // process_count
    return process_index * per_process, (process_index + 1) * per_process


def make_dataset(
    cache: LatentCache,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 4,
    prefetch_batches: int = 8,
) -> grain.IterDataset:
    """The infinite stream of this process's batches; see the module doc."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the {process_count} processes")
    local_batch_size = global_batch_size // process_count
    start, stop = process_share(len(cache), process_index, process_count)
    if stop - start < local_batch_size:
        raise ValueError(
            f"the cache holds {len(cache)} samples, {stop - start} per process: fewer than one batch of "
            f"{local_batch_size} per process"
        )
    dataset = (
        grain.MapDataset.source(cache)[start:stop]
        .shuffle(seed=seed % 2**32)
        .repeat()  # each epoch shuffled anew: grain folds the epoch into the seed
        .batch(local_batch_size, drop_remainder=True)
    )
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))


def make_loader(cache: LatentCache, *, global_batch_size: int, seed: int, **options) -> grain.DatasetIterator:
    """An iterator over `make_dataset(...)`, with `get_state()` / `set_state()`."""
    return iter(make_dataset(cache, global_batch_size=global_batch_size, seed=seed, **options))
