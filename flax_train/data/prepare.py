"""`flax-train prepare`: encode a dataset once into the latent cache.

Images are decoded and preprocessed on the host by a thread pool, a fixed-size batch at a time;
the VAE encoder and both text encoders run in one jitted function, the batch split over every
device (all processes of a pod), weights replicated. The last batch is padded, so nothing
recompiles. With aspect-ratio buckets a batch holds one bucket's images: each process queues its
samples by bucket, and at each step every process encodes the same bucket (`_next_size`), so the
encoders compile once per bucket.

Shard k holds the usable samples of source items [k * shard_size, (k + 1) * shard_size), or, for a
WebDataset, those of tar k (read front to back: flax_train.data.webdataset); process p of P encodes
the shards k with k % P == p and writes them itself, and the processes step together until the
last of them has nothing left. A shard file is written whole (temporary file + rename), so an
interrupted prepare resumes at the first missing shard, and a finished one (manifest present, same
settings) returns at once.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from flax_train.data import cache as cache_lib
from sdxl_common.errors import BadInput
from flax_train.data.cache import (
    CacheMissingError,
    MANIFEST,
    PLAN,
    SKIPPED,
    CacheMismatchError,
    CacheSettings,
    VERSION,
    encode_shard,
    model_fingerprint,
    read_json,
    settings_differences,
    LatentCache,
    shard_path,
    write_json,
    write_manifest,
)
from flax_train.data import survey, webdataset
from flax_train.data.images import (
    PreparedSample,
    PreprocessSpec,
    RawSample,
    SkippedSample,
    Source,
    SourceSpec,
    TarSource,
    open_source,
    prefetched,
    prepare_sample,
)
from flax_train import config as config_lib, models, sharding
from sdxl_common import buckets, prompt_weights, sdxl
from sdxl_common.storage import atomic_write_bytes
from flax_train.prompt_encoding import encode_text
from flax_train.models.vae import sample_posterior

log = logging.getLogger(__name__)

# The tokens of each caption past its text chunks: counted for the manifest, not stored in the cache.
TOKENS_DROPPED = "tokens_dropped"


def cache_settings(
    source: SourceSpec,
    preprocess: PreprocessSpec,
    model_path: str | os.PathLike,
    *,
    vae_path: str | os.PathLike | None = None,
    latent_source: str = "mean",
    dtype: str = "float32",
    token_ids: bool = False,
    max_text_chunks: int = 1,
) -> CacheSettings:
    """The settings a cache for this data and model must have; training checks a cache against them."""
    return CacheSettings(
        source=source,
        preprocess=preprocess,
        model=model_fingerprint(model_path, vae_path),
        latent_source=latent_source,
        dtype=dtype,
        token_ids=token_ids,
        max_text_chunks=max_text_chunks,
    )


# ---------------------------------------------------------------------------------------------
# The encoders, as one jitted function over a batch-sharded mesh.


def encode_image(vae: Any, pixels: jax.Array, indices: jax.Array, latent_source: str, seed: int) -> jax.Array:
    """uint8 NHWC pixels -> scaled latents (B, 4, H/f, W/f): the posterior mean, or a draw from the
    posterior whose noise depends only on (seed, sample index)."""
    x = jnp.transpose(pixels.astype(jnp.float32) / 127.5 - 1.0, (0, 3, 1, 2))
    mean, logvar = vae.encode(x)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    if latent_source == "sample":
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
        latents = jax.vmap(lambda m, lv, k: sample_posterior(m[None], lv[None], k)[0])(mean, logvar, keys)
    else:
        latents = mean
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config["scaling_factor"]


class Encoder:
    """Tokenizers on the host; VAE + text encoders jitted once for `batch_size` samples over `devices`.

    With ``max_text_chunks`` N > 1 each caption is laid out in N chunks of 75 tokens and encoded
    as the sampler encodes a prompt of N chunks without weighting (`prompt_encoding.encode_text`):
    prompt_embeds of N * 77 rows, the pooled embedding of the first chunk. Each row's
    ``tokens_dropped`` then says how many tokens of its caption did not fit."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        vae_path: str | os.PathLike | None = None,
        devices: Sequence[jax.Device] | None = None,
        batch_size: int,
        latent_source: str = "mean",
        seed: int = 0,
        token_ids: bool = False,
        max_text_chunks: int = 1,
    ):
        devices = list(jax.devices() if devices is None else devices)
        if batch_size % len(devices):
            raise BadInput(f"prepare batch size {batch_size} must be a multiple of the {len(devices)} devices")
        num_processes = len({d.process_index for d in devices})
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.batch_size = batch_size
        self.local_batch_size = batch_size // num_processes
        self.tokenizers = sdxl.load_tokenizers(model_path)
        self.text_chunks = max_text_chunks
        vae = models.load(vae_path) if vae_path is not None else models.load(model_path, subfolder="vae")
        modules = (vae, models.load(model_path, subfolder="text_encoder"), models.load(model_path, subfolder="text_encoder_2"))
        graphdefs, states = zip(*(nnx.split(m) for m in modules))
        if jax.process_count() > 1:  # host arrays are what device_put spreads over every process's devices
            states = jax.tree.map(np.asarray, states)
        replicated = NamedSharding(self.mesh, P())
        self._states = jax.device_put(states, replicated)
        self._batch = NamedSharding(self.mesh, P("data"))

        def encode(states, pixels, ids1, ids2, indices, dropped):
            vae, te1, te2 = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
            prompt_embeds, pooled = encode_text(te1, te2, {"ids": ids1}, {"ids": ids2}, chunks=max_text_chunks,
                                                weighting=None)
            out = {
                "latents": encode_image(vae, pixels, indices, latent_source, seed),
                "prompt_embeds": prompt_embeds,
                "pooled_prompt_embeds": pooled,
            }
            # Through the devices with the rest, so every row comes back in one place.
            if token_ids:
                out.update(zip(cache_lib.TOKEN_ARRAYS, (ids1, ids2)))
            if max_text_chunks > 1:
                out[TOKENS_DROPPED] = dropped
            return out

        self._encode = jax.jit(encode, in_shardings=(replicated,) + (self._batch,) * 5, out_shardings=self._batch)

    def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Both tokenizers' int32 ids (B, 77 * max_text_chunks) of the captions, and the tokens
        each caption loses past the chunks (the more of the two tokenizers'; 0s with one chunk,
        which is cut as SDXL's pipeline cuts it)."""
        if self.text_chunks == 1:
            return *sdxl.tokenize(self.tokenizers, captions), np.zeros(len(captions), np.int32)
        laid_out = [[prompt_weights.prompt_tokens(tokenizer, caption, self.text_chunks, sdxl.TOKEN_LENGTH, None)[0]
                     for caption in captions] for tokenizer in self.tokenizers]
        ids1, ids2 = (np.stack([c.ids.reshape(-1) for c in chunks]).astype(np.int32) for chunks in laid_out)
        dropped = np.array([max(len(a.dropped), len(b.dropped)) for a, b in zip(*laid_out)], np.int32)
        return ids1, ids2, dropped

    def dispatch(self, pixels: np.ndarray, captions: Sequence[str], indices: np.ndarray) -> dict[str, jax.Array]:
        """Starts encoding this process's share of a batch; returns without waiting for the result."""
        ids1, ids2, dropped = self.tokenize(captions)
        local = (pixels, ids1, ids2, indices.astype(np.int32), dropped)
        arrays = [jax.make_array_from_process_local_data(self._batch, x) for x in local]
        return self._encode(self._states, *arrays)

    def fetch(self, outputs: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """This process's rows of a dispatched batch, on the host."""
        local = multihost_utils.global_array_to_host_local_array(outputs, self.mesh, P("data"))
        return {name: np.asarray(value) for name, value in local.items()}


# ---------------------------------------------------------------------------------------------
# The prepare loop.


@dataclass
class PrepareReport:
    cache_dir: str
    num_items: int  # entries of the source, rejected ones included
    num_samples: int  # samples in the cache
    skipped: list[tuple[str, str]]  # (key, reason) of every entry not in the cache
    shards_written: int = 0
    shards_reused: int = 0
    seconds: float = 0.0  # encoding loop (the slowest process)
    images_per_second: float = 0.0  # source items per second, all processes together, after compilation
    already_done: bool = False
    buckets: dict[str, int] | None = None  # "WxH" -> samples, with aspect-ratio buckets
    buckets_dropped: dict[str, int] | None = None  # "WxH" -> images it would have held
    captions_cut: dict[str, int] | None = None  # with max_text_chunks > 1: the manifest's captions_cut

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(collections.Counter(reason for _, reason in self.skipped))

    def summary(self, max_listed: int = 20) -> str:
        if self.already_done:
            lines = [f"prepare: {self.cache_dir} is already a finished cache of {self.num_samples} samples; nothing to do"]
        else:
            lines = [
                f"prepare: {self.num_samples} samples in {self.cache_dir} "
                f"({self.shards_written} shards written, {self.shards_reused} kept from an earlier run)",
                f"prepare throughput: {self.images_per_second:.1f} images/s ({self.seconds:.1f} s encoding)",
            ]
        if self.buckets:
            lines.append("buckets (width x height: samples): " + ", ".join(f"{name}: {n}" for name, n in self.buckets.items() if n))
        if self.buckets_dropped:
            lines.append("buckets dropped (images each would have held, now in the nearest kept): "
                         + ", ".join(f"{name}: {n}" for name, n in self.buckets_dropped.items()))
        if self.skipped:
            reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped_by_reason.items()))
            lines.append(f"skipped {len(self.skipped)} of {self.num_items}: {reasons} (all listed in {SKIPPED})")
            lines += [f"  {key}: {reason}" for key, reason in self.skipped[:max_listed]]
            if len(self.skipped) > max_listed:
                lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        return "\n".join(lines)


@dataclass
class _Skip:
    index: int
    key: str
    reason: str


def _load_one(index: int, raw: RawSample | Callable[[], RawSample] | tuple[str, str], spec: PreprocessSpec) -> PreparedSample | _Skip:
    """Source item `index` prepared: `raw` is the sample, a function that reads it, or the
    (key, reason) of a sample its source already refused."""
    if isinstance(raw, tuple):
        return _Skip(index, *raw)
    # Nothing raised by one sample may end the run: whatever goes wrong becomes a skip.
    key = f"item {index}"
    try:
        raw = raw() if callable(raw) else raw
        key = raw.key
        return prepare_sample(raw, index, spec)
    except SkippedSample as e:
        return _Skip(index, key, e.reason)
    except Exception as e:  # noqa: BLE001 - deliberately broad, see above
        log.warning("skipping %s after an unexpected error: %r", key, e)
        return _Skip(index, key, f"unexpected error ({type(e).__name__})")


class _ShardAssembler:
    """Collects the encoded samples and skips of each pending shard; writes a shard once all its
    items have arrived (in any order: rows are sorted by bucket, then item index) and their number
    is known (`expect`: at the start for a source with random access, at a tar's end for a
    WebDataset). ``sizes``: the buckets of a cache with buckets, in order."""

    def __init__(self, cache_dir: epath.Path, shards: list[int], stride: int, storage: np.dtype,
                 row_shapes: dict[str, tuple], sizes: Sequence[tuple[int, int]] = (), count_cuts: bool = False):
        # Item i belongs to shard i // stride.
        self.cache_dir, self.stride, self.storage, self.row_shapes = cache_dir, stride, storage, row_shapes
        # With text chunks, each shard's metadata counts its captions cut (cache.captions_cut sums them).
        self.cuts: dict[int, list[int]] | None = {k: [] for k in shards} if count_cuts else None
        self.bucket_order = {tuple(size): k for k, size in enumerate(sizes)} if sizes else None
        self.expected: dict[int, int | None] = {k: None for k in shards}
        self.samples: dict[int, list[tuple[PreparedSample, dict[str, np.ndarray]]]] = {k: [] for k in shards}
        self.skips: dict[int, list[_Skip]] = {k: [] for k in shards}
        self.written = self.num_skipped = 0

    def expect(self, shard: int, count: int) -> None:
        self.expected[shard] = count
        self._write_if_complete(shard)

    def add(self, result: PreparedSample | _Skip, row: dict[str, np.ndarray], tokens_dropped: int = 0) -> None:
        shard = result.index // self.stride
        if isinstance(result, _Skip):
            self.skips[shard].append(result)
            self.num_skipped += 1
        else:
            self.samples[shard].append((result, row))
            if self.cuts is not None and tokens_dropped:
                self.cuts[shard].append(tokens_dropped)
        self._write_if_complete(shard)

    def _write_if_complete(self, shard: int) -> None:
        if len(self.samples[shard]) + len(self.skips[shard]) == self.expected[shard]:
            atomic_write_bytes(shard_path(self.cache_dir, shard), self._encode(shard))
            del self.samples[shard], self.skips[shard], self.expected[shard]
            if self.cuts is not None:
                del self.cuts[shard]
            self.written += 1

    def _bucket(self, sample: PreparedSample) -> tuple[int, int] | None:
        return None if self.bucket_order is None else tuple(int(d) for d in sample.time_ids[4:6])

    def _arrays(self, members: list[tuple[PreparedSample, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
        def column(name: str, shape: tuple) -> np.ndarray:
            # Token ids stay integers; everything else is stored in the cache's dtype.
            dtype = np.dtype(np.int32) if name in cache_lib.TOKEN_ARRAYS else self.storage
            return np.stack([row[name] for _, row in members]).astype(dtype) if members else np.zeros((0, *shape), dtype)

        time_ids = np.stack([sample.time_ids for sample, _ in members]) if members else np.zeros((0, 6), np.int32)
        return {**{name: column(name, shape) for name, shape in self.row_shapes.items()}, "add_time_ids": time_ids}

    def _encode(self, shard: int) -> bytes:
        order = self.bucket_order
        entries = sorted(self.samples[shard], key=lambda e: (order[self._bucket(e[0])] if order else 0, e[0].index))
        groups = {None if size is None else buckets.size_text(size): self._arrays(list(members))
                  for size, members in itertools.groupby(entries, key=lambda e: self._bucket(e[0]))}
        if order is None and not groups:  # a shard without samples still has its (empty) table
            groups[None] = self._arrays([])
        samples = [sample for sample, _ in entries]
        metadata = {
            "shard": shard,
            "keys": [s.key for s in samples],
            "captions": [s.caption for s in samples],
            "skipped": [[s.key, s.reason] for s in sorted(self.skips[shard], key=lambda s: s.index)],
        }
        if self.cuts is not None:
            metadata["captions_cut"] = {"count": len(self.cuts[shard]), "max_tokens_dropped": max(self.cuts[shard], default=0)}
        return encode_shard(np.array([s.index for s in samples], np.int64), groups, metadata)

    @property
    def unfinished(self) -> list[int]:
        return sorted(self.expected)


def _check_previous_run(cache_dir: epath.Path, plan: dict[str, Any]) -> bool:
    """True when `cache_dir` already holds the finished cache this plan describes."""
    for name, finished in ((MANIFEST, True), (PLAN, False)):
        path = cache_dir / name
        if not path.exists():
            continue
        previous = read_json(path)
        differences = settings_differences(
            {"settings": previous["settings"], "layout": previous["layout"]},
            {"settings": plan["settings"], "layout": plan["layout"]},
        )
        if differences:
            what = "a finished cache" if finished else "an unfinished prepare"
            raise CacheMismatchError(
                f"{cache_dir} holds {what} with different settings:\n  " + "\n  ".join(differences)
                + "\nUse another cache directory, or delete this one to start over."
            )
        if finished:
            return True
    return False


def _fit_buckets(cache_dir: epath.Path, source: Source | TarSource, preprocess: PreprocessSpec) -> dict[str, Any]:
    """The buckets of ``preprocess`` to keep (``fits_buckets``), from the sizes in the images'
    headers (flax_train.data.survey): each process reads its share and writes what it found
    beside the cache; all then choose alike from the same files. Also the images each dropped
    bucket would have held, for the manifest."""
    process, count = jax.process_index(), jax.process_count()
    found = survey.survey(source, preprocess.max_pixels, share=(process, count), progress=process == 0)
    sizes = found.sizes
    if count > 1:
        shares = cache_dir / "survey"
        shares.mkdir(parents=True, exist_ok=True)
        write_json(shares / f"{process}.json", [[h, w, n] for (h, w), n in sizes.items()])
        sharding.sync("flax_train prepare: image sizes read")
        sizes = collections.Counter()
        for p in range(count):
            for h, w, n in read_json(shares / f"{p}.json"):
                sizes[h, w] += n
    kept = buckets.fit(sizes, preprocess.buckets, preprocess.max_buckets, preprocess.min_bucket_images)
    dropped = {buckets.size_text(b): n for b, n in buckets.assign(sizes, preprocess.buckets).items() if n and b not in kept}
    if dropped and process == 0:
        log.info("buckets dropped (images each would have held; they go to the nearest kept): %s",
                 ", ".join(f"{name} ({n})" for name, n in dropped.items()))
    return {"kept": [list(b) for b in kept], "dropped": dropped}


def _tar_items(source: TarSource, pending: list[int], assembler: _ShardAssembler) -> Iterator[tuple[int, Any]]:
    """(source item, sample) of the pending tars, front to back; at a tar's end the assembler
    learns how many items its shard waits for."""
    for k in pending:
        count = 0
        for count, sample in enumerate(webdataset.read_tar(source.tars[k], source.caption_column), 1):
            yield k * webdataset.TAR_STRIDE + count - 1, sample
        assembler.expect(k, count)


def _bucket_counts(manifest: dict[str, Any]) -> dict[str, int] | None:
    return {b["size"]: b["num_samples"] for b in manifest["buckets"]} if "buckets" in manifest else None


def _next_size(queued: list[int], sizes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The size every process encodes next: the one with the most samples queued on all processes
    together (of equals, the first), or None when no process has any left. Each process queues
    until one of its sizes fills a batch or its share is read, so every step has a full batch on
    at least one process until the end."""
    if jax.process_count() > 1:  # every process takes part in each encoding step, so all decide alike
        queued = multihost_utils.process_allgather(np.array(queued, np.int64)).sum(axis=0).tolist()
    best = int(np.argmax(queued))
    return sizes[best] if queued[best] > 0 else None


def prepare_cache(
    cache_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    source_spec: SourceSpec,
    preprocess: PreprocessSpec,
    *,
    vae_path: str | os.PathLike | None = None,
    latent_source: str = "mean",
    dtype: str = "float32",
    token_ids: bool = False,
    max_text_chunks: int = 1,
    batch_size: int | None = None,
    shard_size: int = 256,
    devices: Sequence[jax.Device] | None = None,
    num_workers: int = 8,
    progress: bool = True,
    source: Source | TarSource | None = None,
) -> PrepareReport:
    """Encodes every sample of the source into a latent cache at `cache_dir`; see the module doc.

    `batch_size` is global (default: one sample per device) and a multiple of the device count.
    `source` overrides `open_source(source_spec)` (which then only describes it in the manifest).
    `token_ids`: also keep both tokenizers' ids of every caption (see CacheSettings).
    `max_text_chunks`: the chunks of 75 tokens each caption is encoded in (see `Encoder`); with
    more than one, the manifest's ``captions_cut`` counts the captions longer than that.
    """
    cache_dir = epath.Path(cache_dir)
    devices = list(jax.devices() if devices is None else devices)
    batch_size = batch_size or len(devices)
    settings = cache_settings(
        source_spec, preprocess, model_path, vae_path=vae_path, latent_source=latent_source, dtype=dtype,
        token_ids=token_ids, max_text_chunks=max_text_chunks,
    )
    # Our own bound on pixels replaces PIL's global one, which would otherwise refuse first.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, preprocess.max_pixels)
    source = open_source(source_spec) if source is None else source
    if isinstance(source, TarSource):  # one cache shard per tar
        num_shards = len(source.tars)
        layout = {"num_shards": num_shards, "shards": "one per tar", "format_version": VERSION}
    else:
        num_items = len(source)
        if num_items == 0:
            raise BadInput(f"the data source {source_spec.path} has no usable entries (rejected: {source.rejected[:5]})")
        num_shards = math.ceil(num_items / shard_size)
        layout = {"shard_size": shard_size, "num_items": num_items, "num_shards": num_shards, "format_version": VERSION}
    plan = {"settings": settings.to_json(), "layout": layout}
    if _check_previous_run(cache_dir, plan):
        manifest = read_json(cache_dir / MANIFEST)
        skipped = [tuple(s) for s in read_json(cache_dir / SKIPPED)]
        return PrepareReport(str(cache_dir), manifest["num_samples"] + len(skipped), manifest["num_samples"], skipped,
                             already_done=True, buckets=_bucket_counts(manifest),
                             buckets_dropped=manifest.get("buckets_dropped"), captions_cut=manifest.get("captions_cut"))
    process, num_processes = jax.process_index(), jax.process_count()
    if preprocess.fits_buckets:
        plan["buckets"] = _fit_buckets(cache_dir, source, preprocess)
    # The buckets images go to: those kept, when prepare chooses (the manifest lists them all).
    placing = dataclasses.replace(preprocess, buckets=tuple(map(tuple, plan["buckets"]["kept"]))) if preprocess.fits_buckets else preprocess
    if process == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_json(cache_dir / PLAN, plan)

    mine = [k for k in range(num_shards) if k % num_processes == process]
    pending = [k for k in mine if not shard_path(cache_dir, k).exists()]

    encoder = Encoder(
        model_path, vae_path=vae_path, devices=devices, batch_size=batch_size,
        latent_source=latent_source, seed=preprocess.seed, token_ids=token_ids, max_text_chunks=max_text_chunks,
    )
    local_batch = encoder.local_batch_size
    res = preprocess.resolution
    storage = cache_lib.dtype_named(dtype)

    # The empty prompt's embeddings, for caption dropout at training time. Also compiles the step.
    empty = encoder.fetch(encoder.dispatch(np.zeros((local_batch, res, res, 3), np.uint8), [""] * local_batch, np.zeros(local_batch)))
    empty.pop(TOKENS_DROPPED, None)
    row_shapes = {name: value.shape[1:] for name, value in empty.items()}
    if process == 0:
        cache_lib.write_empty_prompt(cache_dir, {"prompt_embeds": empty["prompt_embeds"][0].astype(storage),
                                                 "pooled_prompt_embeds": empty["pooled_prompt_embeds"][0].astype(storage)})

    if isinstance(source, TarSource):
        assembler = _ShardAssembler(cache_dir, pending, webdataset.TAR_STRIDE, storage, row_shapes, preprocess.buckets,
                                     count_cuts=max_text_chunks > 1)
        work, total = _tar_items(source, pending, assembler), None
    else:
        assembler = _ShardAssembler(cache_dir, pending, shard_size, storage, row_shapes, preprocess.buckets,
                                     count_cuts=max_text_chunks > 1)
        ranges = {k: range(k * shard_size, min((k + 1) * shard_size, num_items)) for k in pending}
        for k, items in ranges.items():
            assembler.expect(k, len(items))
        work = ((i, functools.partial(source.__getitem__, i)) for items in ranges.values() for i in items)
        total = sum(map(len, ranges.values()))
    bar = None
    if progress and process == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc="prepare", smoothing=0.1)

    def finish(results: list[PreparedSample], outputs: dict[str, jax.Array]) -> None:
        rows = encoder.fetch(outputs)
        dropped = rows.pop(TOKENS_DROPPED, np.zeros(len(results), np.int32))
        for slot, result in enumerate(results):
            assembler.add(result, {name: rows[name][slot] for name in rows}, int(dropped[slot]))
        if bar is not None:
            bar.set_postfix(skipped=assembler.num_skipped, refresh=False)
            bar.update(len(results))

    results_iter = prefetched(functools.partial(_load_one, spec=placing), work, num_workers, 4 * local_batch + num_workers)
    # Every batch is of one size (one bucket); each process queues its samples by size, and all
    # processes encode the same size at each step (see _next_size).
    sizes = [tuple(size) for size in placing.buckets] or [(res, res)]
    queues: dict[tuple[int, int], list[PreparedSample]] = {size: [] for size in sizes}
    start = time.perf_counter()
    previous, processed, exhausted = None, 0, False
    while True:
        while not exhausted and max(map(len, queues.values())) < local_batch:
            result = next(results_iter, None)
            if result is None:
                exhausted = True
            elif isinstance(result, _Skip):  # nothing to encode
                assembler.add(result, {})
                processed += 1
                if bar is not None:
                    bar.update(1)
            else:
                queues[tuple(int(d) for d in result.pixels.shape[:2])].append(result)
        size = _next_size([len(queues[size]) for size in sizes], sizes)
        if size is None:
            break
        results, queues[size] = queues[size][:local_batch], queues[size][local_batch:]
        processed += len(results)
        pixels = np.zeros((local_batch, *size, 3), np.uint8)
        captions = [""] * local_batch
        indices = np.zeros(local_batch, np.int64)
        for slot, result in enumerate(results):  # slots past the results are padding
            indices[slot], pixels[slot], captions[slot] = result.index, result.pixels, result.caption
        outputs = encoder.dispatch(pixels, captions, indices)
        if previous is not None:
            finish(*previous)  # the host stores batch t-1 while the devices encode batch t
        previous = (results, outputs)
    if previous is not None:
        finish(*previous)
    seconds = time.perf_counter() - start
    if num_processes > 1:
        counts = multihost_utils.process_allgather(np.array([processed, seconds], np.float64))
        processed, seconds = int(counts[:, 0].sum()), float(counts[:, 1].max())
    if bar is not None:
        bar.close()
    if assembler.unfinished:
        raise RuntimeError(f"prepare: shards {assembler.unfinished} did not receive all their items (a bug)")

    sharding.sync("flax_train prepare: shards written")
    failure = None
    if process == 0:
        try:
            write_manifest(cache_dir, plan, source.rejected)
            (cache_dir / PLAN).unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - raised below, after the other processes are released
            failure = e
    sharding.sync("flax_train prepare: manifest written")
    if failure is not None:
        raise failure
    if not (cache_dir / MANIFEST).exists():
        raise FileNotFoundError(f"{cache_dir / MANIFEST} was not written: see process 0's error")
    manifest = read_json(cache_dir / MANIFEST)
    skipped = [tuple(s) for s in read_json(cache_dir / SKIPPED)]
    report = PrepareReport(
        cache_dir=str(cache_dir),
        num_items=manifest["num_samples"] + len(skipped),
        num_samples=manifest["num_samples"],
        skipped=skipped,
        shards_written=assembler.written,
        shards_reused=len(mine) - len(pending),
        seconds=seconds,
        images_per_second=processed / seconds if seconds > 0 else 0.0,
        buckets=_bucket_counts(manifest),
        buckets_dropped=manifest.get("buckets_dropped"),
        captions_cut=manifest.get("captions_cut"),
    )
    if report.captions_cut and report.captions_cut["count"] and process == 0:
        log.warning("prepare: %d captions longer than %d chunks of 75 tokens were cut, losing up to %d tokens each "
                    "(manifest.json: captions_cut)",
                    report.captions_cut["count"], max_text_chunks, report.captions_cut["max_tokens_dropped"])
    if progress and process == 0:
        print(report.summary(), flush=True)
    return report


# ---------------------------------------------------------------------------------------------
# The data section of a run's config.


def specs_from_config(cfg: config_lib.Config) -> tuple[SourceSpec, PreprocessSpec]:
    """``data.*`` as the cache's source and preprocessing specs."""
    d = cfg.data
    source = SourceSpec(
        kind=d.source,
        path=d.path,
        caption_column=d.caption_column,
        image_column=d.image_column,
        split=d.split,
        dataset_config=d.dataset_config,
        instance_prompt=d.instance_prompt,
    )
    preprocess = PreprocessSpec(
        resolution=d.resolution,
        center_crop=d.crop == "center",
        random_flip=d.random_flip,
        max_pixels=d.max_pixels,
        # Only random crops and flips use the seed; keep it out of a deterministic cache's settings.
        seed=cfg.train.seed if (d.crop != "center" or d.random_flip) else 0,
        buckets=bucket_sizes(d),
        max_buckets=d.max_buckets,
        min_bucket_images=d.min_bucket_images,
    )
    return source, preprocess


def bucket_sizes(d: config_lib.DataConfig) -> tuple[tuple[int, int], ...]:
    """``data.buckets`` as (height, width) sizes. SDXL's list scaled to ``data.resolution`` has
    sides in multiples of 32, the least an SDXL UNet takes (the VAE's factor 8 times its two
    downsamplings); at 1024 it is the paper's list itself."""
    if d.buckets == ("sdxl",):
        return buckets.scaled(buckets.SDXL_BUCKETS, d.resolution, 32)
    return tuple(buckets.parse_size(size) for size in d.buckets)


def cache_dir(cfg: config_lib.Config) -> str:
    return cfg.data.cache_dir or str(epath.Path(cfg.run_dir) / "cache")


def open_cache(cfg: config_lib.Config, base: str | os.PathLike, *, prepare_if_missing: bool = True) -> LatentCache:
    """The run's latent cache, prepared first if it does not exist; refused if it does not match."""
    source, preprocess = specs_from_config(cfg)
    # A LoRA of the text encoders encodes the captions in the step, from their token ids.
    token_ids = cfg.train.method == "lora" and cfg.lora.train_text_encoder
    options = dict(vae_path=cfg.model.vae, latent_source=cfg.data.latent_mode, token_ids=token_ids,
                   max_text_chunks=cfg.data.max_text_chunks)
    settings = cache_settings(source, preprocess, base, **options)
    try:
        return LatentCache(cache_dir(cfg), expected=settings)
    except CacheMissingError:
        if not prepare_if_missing:
            raise
    prepare_cache(cache_dir(cfg), base, source, preprocess, shard_size=cfg.data.cache_shard_size, **options)
    return LatentCache(cache_dir(cfg), expected=settings)


def make_loader(cfg: config_lib.Config, cache: LatentCache):
    """Batches of ``global_batch_size x grad_accum_steps`` rows (this process's share), one per
    step up to ``train.max_steps``, checkpointable; without the samples ``data.validation_split``
    holds out."""
    rows = cfg.train.global_batch_size * cfg.train.grad_accum_steps
    return cache_lib.make_loader(cache, global_batch_size=rows, seed=cfg.train.seed,
                                 reads_in_flight=cfg.data.reads_in_flight, num_batches=cfg.train.max_steps,
                                 validation_split=cfg.data.validation_split)
