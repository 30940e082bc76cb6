"""The latent cache: what `flax-train prepare` writes and training reads.

Layout of a cache directory (a local path or anything `etils.epath` opens, such as gs://):

    manifest.json             written last, when every shard exists: settings, counts, record layout,
                              where each shard's records start
    plan.json                 settings and shard layout of a prepare in progress (for resuming)
    empty_prompt.safetensors  prompt_embeds [77 * N, 2048] and pooled_prompt_embeds [1280] of ""
    skipped.json              every source entry that was skipped, with the reason
    shards/shard-00000.safetensors ...

Shard k holds the usable samples among source items [k * shard_size, (k + 1) * shard_size) (of a
WebDataset: those of tar k), one record per sample: the tensor `records` [n, record_bytes] (uint8) holds each sample's arrays back
to back (`latents` [4, h, w], `add_time_ids` [6] int32, `pooled_prompt_embeds` [1280],
`prompt_embeds` [77 * N, 2048]; with the `token_ids` setting also `input_ids` and `input_ids_2` [77 * N]
int32, both tokenizers' ids of the caption), `index` [n] the source item; N is the
`max_text_chunks` setting (1: CLIP's 77 tokens; see `CacheSettings`); the safetensors metadata
holds the captions, keys, skipped entries and the record layout. A shard is written in one piece
(temporary file + rename), so a shard file that exists is complete. With aspect-ratio buckets
(`PreprocessSpec.buckets`) the samples of a shard are stored bucket by bucket, a records tensor for
each bucket present (`records.WxH`: its latents are of that size), and the manifest lists each
bucket with its count and where its records sit in every shard.

A record rather than a tensor per array, because on Cloud Storage every request costs tens of
milliseconds before its first byte: what a training run reads of a sample is one contiguous span
of its record (RECORD_ORDER puts the arrays both kinds of run need in the middle), so one ranged
read per sample, and a batch's reads are all in flight at once (`LatentCache.read_batch`).
`make_loader` turns the cache into the training batches (grain, each process its own share,
checkpointable position).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from etils import epath

from sdxl_common import buckets, model_source
from flax_train.data.images import PreprocessSpec, SourceSpec
from sdxl_common.errors import BadInput, InputNotFound
from sdxl_common import storage
from sdxl_common.storage import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "sdxl-tpu latent cache"
VERSION = 2  # 1: a tensor per array (four reads a sample); 2: a record per sample
MANIFEST = "manifest.json"
PLAN = "plan.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
SKIPPED = "skipped.json"
SHARDS = "shards"
SAMPLE_ARRAYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")
TOKEN_ARRAYS = ("input_ids", "input_ids_2")
# What a run that encodes the prompts itself (lora.train_text_encoder) reads: ids, not embeddings.
TOKEN_SAMPLE_ARRAYS = ("latents", "add_time_ids") + TOKEN_ARRAYS
# The order of the arrays in a record: each kind of run reads one contiguous span of it (the
# token ids and the embeddings sit at the two ends, the arrays both need in the middle).
RECORD_ORDER = TOKEN_ARRAYS + ("latents", "add_time_ids", "pooled_prompt_embeds", "prompt_embeds")
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
LATENT_SOURCES = ("mean", "sample")
# The files of a component folder that determine what it computes.
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".txt")
_MODEL_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class CacheMismatchError(BadInput):
    """A cache that was prepared with other settings than the ones asked for."""


class CacheMissingError(InputNotFound):
    """No finished cache where one was expected."""


@dataclass
class CacheSettings:
    """Everything that determines a cache's contents. Training refuses a cache whose settings differ."""

    source: SourceSpec
    preprocess: PreprocessSpec
    model: dict[str, str]  # component folder -> sha256 of its files (see model_fingerprint)
    latent_source: str = "mean"  # "mean": VAE posterior mean; "sample": a draw from the posterior
    dtype: str = "float32"  # storage dtype of latents and embeddings
    token_ids: bool = False  # also keep the captions' token ids (TOKEN_ARRAYS)
    # Each caption laid out in this many chunks of 75 tokens (sdxl_common.prompt_weights.chunk),
    # encoded as the sampler encodes a prompt of that many chunks; longer captions are cut.
    max_text_chunks: int = 1

    def __post_init__(self):
        if self.latent_source not in LATENT_SOURCES:
            raise BadInput(f"latent_source must be one of {LATENT_SOURCES}, got {self.latent_source!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise BadInput(f"cache dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")

    def to_json(self) -> dict[str, Any]:
        settings = {
            "source": self.source.to_json(),
            "preprocess": {k: v for k, v in dataclasses.asdict(self.preprocess).items()
                           if k not in _UNSET_PREPROCESS or v != _UNSET_PREPROCESS[k]},
            "model": dict(self.model),
            "latent_source": self.latent_source,
            "dtype": self.dtype,
        }
        # Buckets, token_ids and max_text_chunks only when set: caches made before those settings
        # existed still match.
        if self.token_ids:
            settings["token_ids"] = True
        if self.max_text_chunks != 1:
            settings["max_text_chunks"] = self.max_text_chunks
        return _jsonable(settings)


# Preprocessing settings newer than the first caches, left out of the settings while unset.
_UNSET_PREPROCESS = {"buckets": (), "max_buckets": None, "min_bucket_images": 0}


def _jsonable(value: Any) -> Any:
    # Tuples and lists compare equal after a JSON round trip, as they will once read back.
    return json.loads(json.dumps(value, sort_keys=True))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _short(value: Any) -> str:
    text = json.dumps(value)
    # Hashes are long; twelve characters tell them apart in a message.
    return text[:13] + '…"' if isinstance(value, str) and len(value) == 64 else text


def settings_differences(cached: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs: `name: cache has X, config has Y`."""
    a, b = _flatten(_jsonable(cached)), _flatten(_jsonable(expected))
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: cache has {_short(a.get(key, '<absent>'))}, config has {_short(b.get(key, '<absent>'))}")
    return lines


def _component_folder(path: str, component: str | None) -> Path:
    """``component``'s folder of the pipeline at ``path``, or, without ``component``, the separate
    component folder at ``path``: local, or fetched as the trainer fetches it (sdxl_common.model_source)."""
    if component:
        return model_source.local_folder(path) / component
    return model_source.local_folder(path, component=True)


def _hash_folder(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise InputNotFound(f"{folder}: no config, weights or tokenizer files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 23):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def model_fingerprint(model_path: str | os.PathLike, vae_path: str | os.PathLike | None = None) -> dict[str, str]:
    """sha256 per component the cache depends on (VAE, both text encoders, both tokenizers).

    Hashes the names and bytes of the configs, weights and tokenizer files, so a cache follows the
    model it came from: a fine-tuned UNet in the same folder does not invalidate it, a changed VAE
    does. `vae_path` is a separate VAE folder or Hub id used in place of `model_path`/vae.
    """
    fingerprint = {}
    for component in _MODEL_COMPONENTS:
        if component == "vae" and vae_path is not None:
            folder = _component_folder(str(vae_path), None)
        else:
            folder = _component_folder(str(model_path), component)
        fingerprint[component] = _hash_folder(folder)
    return fingerprint


def write_json(path: epath.Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: epath.Path) -> Any:
    return json.loads(path.read_text())


def shard_path(cache_dir: epath.Path, shard: int) -> epath.Path:
    return cache_dir / SHARDS / f"shard-{shard:05d}.safetensors"


@dataclass(frozen=True)
class Field:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the record

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class RecordLayout:
    """Where each array of a sample sits in its record; the same for every shard of a cache."""

    fields: dict[str, Field]
    record_bytes: int

    @classmethod
    def of(cls, arrays: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> RecordLayout:
        """The layout for arrays {name: (dtype, per-sample shape)}, in RECORD_ORDER."""
        unknown = set(arrays) - set(RECORD_ORDER)
        if unknown:
            raise ValueError(f"arrays {sorted(unknown)} have no place in a cache record")
        fields, offset = {}, 0
        for name in RECORD_ORDER:
            if name in arrays:
                dtype, shape = arrays[name]
                fields[name] = Field(np.dtype(dtype), tuple(int(d) for d in shape), offset)
                offset += fields[name].nbytes
        return cls(fields, offset)

    def to_json(self) -> dict[str, Any]:
        return {
            "record_bytes": self.record_bytes,
            "fields": {name: {"dtype": str(f.dtype), "shape": list(f.shape), "offset": f.offset}
                       for name, f in self.fields.items()},
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RecordLayout:
        fields = {name: Field(dtype_named(f["dtype"]), tuple(f["shape"]), f["offset"]) for name, f in value["fields"].items()}
        return cls(fields, value["record_bytes"])

    def span(self, names: Sequence[str]) -> tuple[int, int]:
        """The bytes [start, end) of a record that hold `names` (and whatever lies between them)."""
        missing = [name for name in names if name not in self.fields]
        if missing:
            raise CacheMismatchError(f"the cache's records hold no {', '.join(missing)}: prepare the cache with token ids")
        return (min(self.fields[n].offset for n in names),
                max(self.fields[n].offset + self.fields[n].nbytes for n in names))


def dtype_named(name: str) -> np.dtype:
    """numpy's dtype of that name, bfloat16 included."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def records_tensor(bucket: str | None) -> str:
    """The shard tensor that holds a bucket's records ("records" in a cache without buckets)."""
    return "records" if bucket is None else f"records.{bucket}"


def encode_shard(index: np.ndarray, groups: Mapping[str | None, Mapping[str, np.ndarray]],
                 metadata: Mapping[str, Any]) -> bytes:
    """A shard file's bytes. ``groups``: per bucket (its "WxH" name; None in a cache without
    buckets) its samples' arrays, each [n_b, ...], packed into one record per sample; ``index``
    [n] holds the source item of every sample, group after group in the order of ``groups``.
    Metadata values are stored as JSON strings; with buckets, ``metadata["buckets"]`` gets each
    group's count and record layout, in order."""
    tensors, layouts = {}, {}
    for bucket, arrays in groups.items():
        layout = RecordLayout.of({name: (a.dtype, a.shape[1:]) for name, a in arrays.items()})
        n = len(next(iter(arrays.values()))) if arrays else 0
        records = np.empty((n, layout.record_bytes), np.uint8)
        for name, field in layout.fields.items():
            column = np.ascontiguousarray(arrays[name], dtype=field.dtype).reshape(n, math.prod(field.shape))
            records[:, field.offset:field.offset + field.nbytes] = column.view(np.uint8)
        tensors[records_tensor(bucket)], layouts[bucket] = records, (n, layout)
    tensors["index"] = np.ascontiguousarray(index, dtype=np.int64)
    if list(groups) == [None]:
        described = {"record": layouts[None][1].to_json()}
    else:
        described = {"buckets": {bucket: {"count": n, "record": layout.to_json()} for bucket, (n, layout) in layouts.items()}}
    return safetensors.numpy.save(tensors, metadata={key: json.dumps(value) for key, value in {**metadata, **described}.items()})


@dataclass(frozen=True)
class ShardHeader:
    num_samples: int
    records: dict[str | None, tuple[int, int]]  # bucket (None: no buckets) -> (samples, where its records start)
    index_offset: int  # where the index tensor starts
    metadata: dict[str, Any]


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """The record tables and metadata of a shard, without reading its records."""
    (prefix,) = storage.read_ranges([(path, 0, 8)])
    (length,) = struct.unpack("<Q", prefix)
    (raw,) = storage.read_ranges([(path, 8, 8 + length)])
    header = json.loads(raw)
    metadata = {key: json.loads(value) for key, value in header.pop("__metadata__", {}).items()}
    names = list(metadata["buckets"]) if "buckets" in metadata else [None]
    records = {b: (header[records_tensor(b)]["shape"][0], 8 + length + header[records_tensor(b)]["data_offsets"][0])
               for b in names}
    return ShardHeader(header["index"]["shape"][0], records, 8 + length + header["index"]["data_offsets"][0], metadata)


def write_manifest(
    cache_dir: epath.Path, plan: Mapping[str, Any], rejected: list[tuple[str, str]]
) -> tuple[int, list[tuple[str, str]]]:
    """Writes skipped.json and manifest.json once every shard of the plan exists.

    `plan` is {"settings": ..., "layout": {"num_shards": ..., ...}}; `rejected` are the source
    entries refused before decoding. Returns (number of samples, every skipped (key, reason)).
    The shard headers are read many at a time: on Cloud Storage each read waits tens of ms.
    """
    def header(path: epath.Path) -> ShardHeader:
        try:
            return read_shard_header(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path} is missing after every process finished: with several hosts, cache_dir must be "
                "storage they all see (e.g. gs://)"
            ) from None

    with concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="cache-manifest") as pool:
        headers = list(pool.map(header, (shard_path(cache_dir, k) for k in range(plan["layout"]["num_shards"]))))
    skipped = [tuple(entry) for entry in rejected]
    for h in headers:
        skipped += [tuple(entry) for entry in h.metadata["skipped"]]
    num_samples = sum(h.num_samples for h in headers)
    # Columns, not a list of objects: a cache of millions of samples keeps a small manifest.
    shards: dict[str, Any] = {"num_samples": [h.num_samples for h in headers]}
    tables: dict[str, Any] = {}
    bucket_sizes = plan["settings"]["preprocess"].get("buckets")
    if bucket_sizes:
        tables["buckets"] = []
        for h_w in bucket_sizes:
            name = buckets.size_text(tuple(h_w))
            found = [h.records.get(name, (0, 0)) for h in headers]
            layouts = [h.metadata["buckets"][name]["record"] for h in headers if name in h.metadata["buckets"]]
            tables["buckets"].append({
                "size": name, "height": h_w[0], "width": h_w[1], "num_samples": sum(n for n, _ in found),
                "record": layouts[0] if layouts else None,
                "shards": {"num_samples": [n for n, _ in found], "records_offset": [o for _, o in found]},
            })
    else:
        shards["records_offset"] = [h.records[None][1] for h in headers]
        tables["record"] = headers[0].metadata["record"] if headers else RecordLayout({}, 0).to_json()
    write_json(cache_dir / SKIPPED, [list(s) for s in skipped])
    write_json(
        cache_dir / MANIFEST,
        {
            "format": FORMAT,
            "version": VERSION,
            "settings": plan["settings"],
            "layout": plan["layout"],
            "num_samples": num_samples,
            "num_skipped": len(skipped),
            "skipped_by_reason": dict(collections.Counter(reason for _, reason in skipped)),
            **tables,
            # Buckets prepare dropped (PreprocessSpec.fits_buckets): the images each would have held.
            **({"buckets_dropped": plan["buckets"]["dropped"]} if "buckets" in plan else {}),
            **({"captions_cut": captions_cut(headers)} if "max_text_chunks" in plan["settings"] else {}),
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return num_samples, skipped


def captions_cut(headers: Sequence[ShardHeader]) -> dict[str, int]:
    """The captions longer than a cache's text chunks hold, over its shards: how many were cut and
    the most tokens one of them lost (each shard counts its own, see prepare's _ShardAssembler)."""
    cuts = [h.metadata["captions_cut"] for h in headers]
    return {"count": sum(c["count"] for c in cuts), "max_tokens_dropped": max((c["max_tokens_dropped"] for c in cuts), default=0)}


def write_empty_prompt(cache_dir: epath.Path, arrays: Mapping[str, np.ndarray]) -> None:
    atomic_write_bytes(epath.Path(cache_dir) / EMPTY_PROMPT,
                       safetensors.numpy.save({name: np.ascontiguousarray(a) for name, a in arrays.items()}))


def read_empty_prompt(cache_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """prompt_embeds [77 * max_text_chunks, 2048] and pooled_prompt_embeds [1280] of the empty caption."""
    return safetensors.numpy.load(epath.Path(cache_dir, EMPTY_PROMPT).read_bytes())


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    path = epath.Path(cache_dir) / MANIFEST
    if not path.exists():
        raise CacheMissingError(f"{cache_dir}: no finished latent cache (no {MANIFEST}); run `flax-train prepare` first")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMismatchError(
            f"{cache_dir}: not a version-{VERSION} latent cache (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r}); prepare it again in another cache_dir, or delete this one"
        )
    return manifest


def verify_cache(cache_dir: str | os.PathLike, expected: CacheSettings) -> dict[str, Any]:
    """The manifest of the finished cache at `cache_dir`; raises CacheMismatchError if its settings differ."""
    manifest = read_manifest(cache_dir)
    cached = dict(manifest["settings"])
    if not expected.token_ids:
        # A cache with token ids also holds everything a run without them reads.
        cached.pop("token_ids", None)
    differences = settings_differences(cached, expected.to_json())
    if differences:
        raise CacheMismatchError(
            f"the latent cache at {cache_dir} was prepared with different settings:\n  "
            + "\n  ".join(differences)
            + "\nPrepare a cache for this config (another cache_dir), or change the config back."
        )
    return manifest


@dataclass(frozen=True)
class CacheBucket:
    """The samples of one bucket (one image size): cache indices [first, first + len), stored
    shard after shard (``starts``: the bucket's samples before each shard, and the total)."""

    name: str | None  # "WxH"; None in a cache without buckets
    size: tuple[int, int]  # (height, width) of its images
    layout: RecordLayout
    first: int
    starts: np.ndarray  # int64 [shards + 1]
    records_offset: np.ndarray  # int64 [shards]: where the bucket's records start in each shard file
    rows_before: np.ndarray  # int64 [shards]: samples of earlier buckets in each shard (they come first)

    def __len__(self) -> int:
        return int(self.starts[-1])


def cache_buckets(manifest: Mapping[str, Any]) -> list[CacheBucket]:
    """The buckets of a cache, from its manifest; a cache without buckets is one bucket."""
    shard_counts = np.asarray(manifest["shards"]["num_samples"], np.int64)
    if "buckets" not in manifest:
        resolution = manifest["settings"]["preprocess"]["resolution"]
        tables = [(None, (resolution, resolution), manifest["record"], manifest["shards"])]
    else:
        tables = [(b["size"], (b["height"], b["width"]), b["record"], b["shards"]) for b in manifest["buckets"]]
    out, first, rows_before = [], 0, np.zeros(len(shard_counts), np.int64)
    for name, size, record, shards in tables:
        counts = np.asarray(shards["num_samples"], np.int64)
        layout = RecordLayout.from_json(record) if record else RecordLayout({}, 0)
        out.append(CacheBucket(name, size, layout, first, np.concatenate([[0], np.cumsum(counts)]),
                               np.asarray(shards["records_offset"], np.int64), rows_before.copy()))
        first += int(counts.sum())
        rows_before += counts
    return out


class LatentCache:
    """Random access to the samples of a finished cache: `cache[i]` is a dict of numpy arrays, and
    `cache.read_batch(indices)` the same arrays for many samples of one bucket, stacked.

    This is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`). `expected` settings, when
    given, are checked against the manifest first, and decide which arrays a sample has (token ids
    or embeddings). A sample is read where it is, local or remote (`gs://...`): one ranged read of
    its record, never a copy of the cache to local disk; the reads of a batch are in flight
    together. Opening a cache reads only its manifest (a few bytes per shard), whatever its size.
    With aspect-ratio buckets the samples are numbered bucket after bucket (`buckets`).
    """

    def __init__(self, cache_dir: str | os.PathLike, expected: CacheSettings | None = None):
        self.cache_dir = epath.Path(cache_dir)
        self.manifest = verify_cache(cache_dir, expected) if expected is not None else read_manifest(cache_dir)
        self.arrays = TOKEN_SAMPLE_ARRAYS if expected is not None and expected.token_ids else SAMPLE_ARRAYS
        self.buckets = cache_buckets(self.manifest)
        last = self.buckets[-1]
        self._firsts = np.array([b.first for b in self.buckets] + [last.first + len(last)], np.int64)  # and the end
        self._rows_before = np.stack([b.rows_before for b in self.buckets])  # [buckets, shards]
        self._spans = [b.layout.span(self.arrays) if len(b) else (0, 0) for b in self.buckets]
        # A string per shard, not an epath per shard: a million shards cost tens of MB as objects.
        self._shards_prefix = str(shard_path(self.cache_dir, 0))[: -len("00000.safetensors")]

    @property
    def layout(self) -> RecordLayout:
        """The record layout of a cache without buckets."""
        (bucket,) = self.buckets
        return bucket.layout

    def __len__(self) -> int:
        return int(self._firsts[-1])

    def __repr__(self) -> str:
        return f"LatentCache({str(self.cache_dir)!r}, {len(self)} samples in {len(self.buckets[0].records_offset)} shards)"

    def _bucket_rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket, shard, row among the bucket's samples in the shard) of each sample index."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample {int(indices.max() if indices.max() >= len(self) else indices.min())} is "
                             f"outside the cache's {len(self)} samples")
        which = np.searchsorted(self._firsts, indices, side="right") - 1
        shards, rows = np.empty_like(indices), np.empty_like(indices)
        for b in np.unique(which):
            bucket, here = self.buckets[b], which == b
            within = indices[here] - bucket.first
            shards[here] = np.searchsorted(bucket.starts, within, side="right") - 1
            rows[here] = within - bucket.starts[shards[here]]
        return which, shards, rows

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in the shard) of each sample index."""
        which, shards, rows = self._bucket_rows(indices)
        return shards, rows + self._rows_before[which, shards]

    def _file(self, shard: int) -> str:
        return f"{self._shards_prefix}{shard:05d}.safetensors"

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The samples `indices` (of one bucket), each array stacked along a new first axis; one
        ranged read per sample."""
        which, shards, rows = self._bucket_rows(indices)
        if len(set(which.tolist())) > 1:
            raise ValueError(f"samples of buckets {sorted({self.buckets[b].name for b in which})} in one batch")
        bucket = self.buckets[int(which[0])] if which.size else self.buckets[0]
        start, end = self._spans[int(which[0])] if which.size else (0, 0)
        offsets = bucket.records_offset[shards] + rows * bucket.layout.record_bytes + start
        chunks = storage.read_ranges([(self._file(int(k)), int(o), int(o) + end - start) for k, o in zip(shards, offsets)])
        out = {}
        for name in self.arrays:  # one copy of each array out of each record
            field = bucket.layout.fields[name]
            out[name] = column = np.empty((len(chunks), *field.shape), field.dtype)
            for row, chunk in zip(column, chunks):
                row[...] = np.frombuffer(chunk, field.dtype, math.prod(field.shape), field.offset - start).reshape(field.shape)
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: value[0] for name, value in self.read_batch([int(index)]).items()}

    def _metadata(self, index: int, name: str) -> Any:
        shards, rows = self.locate([int(index)])
        return read_shard_header(self._file(int(shards[0]))).metadata[name][int(rows[0])]

    def caption(self, index: int) -> str:
        return self._metadata(index, "captions")

    def source_index(self, index: int) -> int:
        """The position of the sample in its source (skipped items leave gaps)."""
        shards, rows = self.locate([int(index)])
        file = self._file(int(shards[0]))
        start = read_shard_header(file).index_offset + 8 * int(rows[0])
        (data,) = storage.read_ranges([(file, start, start + 8)])
        return int(np.frombuffer(data, np.int64)[0])

    def key(self, index: int) -> str:
        """The sample's name in the source (file path or row), for tracing a sample back."""
        return self._metadata(index, "keys")

    def empty_prompt(self) -> dict[str, np.ndarray]:
        return read_empty_prompt(self.cache_dir)


# ---------------------------------------------------------------------------------------------
# Training batches.
#
# Every process computes the same global order (the cache reshuffled every epoch from the run's
# seed, by grain's lazy index shuffle) and cuts it into global batches of global_batch_size
# samples; process p of P reads only rows [p * n, (p + 1) * n) of each (n = global_batch_size / P)
# and yields them as dicts of numpy arrays named as in the cache (`latents`, `prompt_embeds`,
# `pooled_prompt_embeds`, `add_time_ids`; for expected settings with token_ids, `input_ids` and
# `input_ids_2` in place of the embeddings). So the global batch at each step is the same whatever
# the number of processes: 2 hosts x 4 chips train exactly what 1 host x 8 chips does.
#
# Each batch is read by `read_batch`, all its samples' reads in flight together, and a pool of
# threads reads the next batches at once, so about `reads_in_flight` reads wait on storage at any
# time. On Cloud Storage, where a read takes tens of milliseconds to its first byte, that hides the
# wait until the process's CPU is the limit (docs/loader.md has the measurements).
#
# `state = loader.get_state()` (a small JSON-able dict, {"next_index": batches yielded}, as grain's
# iterators have it) and `loader.set_state(state)` on a fresh loader continue with exactly the
# batches the first one would have yielded next. The state is the same on every process (they
# advance in lockstep), so the checkpoint keeps one.

# With aspect-ratio buckets every batch comes from one bucket (its images share a size), and each
# step's bucket and samples are a function of the seed and the step alone, so every process of a
# pod computes the same without talking (`BucketBatches`). Each bucket's samples form an endless
# stream, reshuffled every time it is used up (grain's index shuffle, as above), cut into global
# batches. Epoch e of the cache holds floor((e + 1) n_b / B) - floor(e n_b / B) batches of bucket
# b (n_b samples, global batch B): every bucket in proportion to its size, every sample once an
# epoch give or take a batch (one bucket's batch may hold the end of its stream's pass and the
# start of the next), every batch full. The epoch's batches are shuffled, from the seed and the
# epoch, to decide which bucket each step takes. A bucket of fewer samples than a batch repeats
# samples within a batch (the loader warns; merge such buckets when preparing).
#
# A validation split (`validation_split` > 0, the share of the cache validation holds out) takes
# floor(n x share) samples of each bucket (n samples) out of its stream: evenly spaced positions,
# a function of n and the share alone, so the same in every run, on every process, whatever the
# seed (`held_out`). The streams then shuffle the samples left; with no split they are exactly
# what they were before validation splits existed.

# Enough to hide a 40 ms latency until a process's CPU is the limit: one process read 1,087 SDXL
# samples/s at 40 ms a read and 1,002 with none (docs/loader.md).
READS_IN_FLIGHT = 512
MAX_READER_THREADS = 64


def held_out(num_samples: int, share: float) -> np.ndarray:
    """The positions among ``num_samples`` samples that a validation split of ``share`` holds out:
    floor(num_samples x share) of them, evenly spaced (see the comment above)."""
    # The small epsilon: a share such as 0.29 of 100 samples is 28.999... in floating point.
    count = math.floor(num_samples * share + 1e-9)
    return (2 * np.arange(count, dtype=np.int64) + 1) * num_samples // (2 * count) if count else np.zeros(0, np.int64)


def training_samples(num_samples: int, share: float) -> np.ndarray | None:
    """The positions among ``num_samples`` left for training by a validation split of ``share``
    (None: all of them)."""
    out = held_out(num_samples, share)
    return np.setdiff1d(np.arange(num_samples, dtype=np.int64), out) if len(out) else None


def _shuffled(num_samples: int, seed: int, kept: np.ndarray | None) -> grain.MapDataset:
    """The positions ``kept`` (None: all of ``num_samples``), reshuffled at every pass (grain folds
    the pass into the seed), endlessly."""
    stream = grain.MapDataset.range(num_samples if kept is None else len(kept)).shuffle(seed=seed).repeat()
    return stream if kept is None else stream.map(lambda i: kept[i])


def batch_indices(num_samples: int, local_batch_size: int, seed: int, process_index: int, process_count: int,
                  validation_split: float = 0.0) -> grain.MapDataset:
    """The sample indices of this process's batches, in order: lazy, so a cache of any size costs
    no memory here."""
    kept = training_samples(num_samples, validation_split)
    return _shuffled(num_samples, seed % 2**32, kept).batch(local_batch_size, drop_remainder=True)[
        process_index::process_count]


_BUCKET_ORDER_STREAM = 0xB0C  # any constant: the stream of the epochs' bucket orders under the seed


class BucketBatches:
    """This process's sample indices of each step's batch, for a cache with several buckets (see
    the comment above); ``bucket_of(step)`` names its bucket. Indexed by the step, like
    ``batch_indices``."""

    def __init__(self, cache_buckets: Sequence[CacheBucket], global_batch_size: int, seed: int,
                 process_index: int, process_count: int, validation_split: float = 0.0):
        self.buckets = [b for b in cache_buckets if len(b)]
        kept = [training_samples(len(b), validation_split) for b in self.buckets]
        self.counts = np.array([len(b) if k is None else len(k) for b, k in zip(self.buckets, kept)], np.int64)
        self.global_batch, self.seed = global_batch_size, seed
        self.rows = slice(process_index * global_batch_size // process_count,
                          (process_index + 1) * global_batch_size // process_count)
        # Each bucket's stream, reshuffled at every pass, from a seed of its own.
        seeds = np.random.SeedSequence(seed % 2**32).generate_state(len(self.buckets))
        self.streams = [_shuffled(len(b), int(k), samples) for b, k, samples in zip(self.buckets, seeds, kept)]
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, the bucket of each of its batches)

    def _batches_before(self, epoch: int) -> np.ndarray:
        """Per bucket, its batches in the epochs before ``epoch``."""
        return epoch * self.counts // self.global_batch

    def _epoch_of(self, step: int) -> int:
        # Epoch e starts after at least e N / B - (number of buckets) batches: `high` starts after step.
        low, high = 0, (step + len(self.buckets) + 1) * self.global_batch // int(self.counts.sum()) + 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self._batches_before(mid).sum() <= step else (low, mid)
        return low

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            per_bucket = self._batches_before(epoch + 1) - self._batches_before(epoch)
            order = np.repeat(np.arange(len(self.buckets)), per_bucket)
            np.random.default_rng([self.seed % 2**32, epoch, _BUCKET_ORDER_STREAM]).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def _where(self, step: int) -> tuple[int, int]:
        """(bucket, its batch number) at ``step``."""
        epoch = self._epoch_of(step)
        before = self._batches_before(epoch)
        position = step - int(before.sum())
        order = self._epoch_order(epoch)
        bucket = int(order[position])
        return bucket, int(before[bucket]) + int(np.count_nonzero(order[:position] == bucket))

    def bucket_of(self, step: int) -> CacheBucket:
        return self.buckets[self._where(step)[0]]

    def __getitem__(self, step: int) -> np.ndarray:
        bucket, number = self._where(step)
        positions = range(number * self.global_batch + self.rows.start, number * self.global_batch + self.rows.stop)
        stream = self.streams[bucket]
        return self.buckets[bucket].first + np.array([stream[i] for i in positions], np.int64)


class Loader:
    """This process's batches in order (see the comment above), the next ones read ahead by a
    pool of threads. `close()` (or leaving a `with` block) drops the reads not yet started and
    waits for those under way, so nothing is left reading when a run ends. ``num_batches``: the
    batches the run will take, if known: nothing past them is read ahead (each index of grain's
    shuffle costs milliseconds on a cache of a few samples, and a short run would otherwise read
    2 x threads batches it never takes)."""

    def __init__(self, read_batch: Any, indices: grain.MapDataset, *, threads: int, read_ahead: int,
                 num_batches: int | None = None):
        self._read_batch, self._indices, self._read_ahead = read_batch, indices, read_ahead
        self._end = num_batches
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cache-loader")
        self._next = 0  # the batch `next` returns
        self._ahead: collections.deque[concurrent.futures.Future] = collections.deque()  # batches _next, _next + 1, ...

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._fill()
        if not self._ahead:  # past num_batches: read on demand
            self._submit()
        batch = self._ahead.popleft().result()
        self._next += 1
        self._fill()
        return batch

    def _fill(self) -> None:
        while len(self._ahead) < self._read_ahead and (self._end is None or self._next + len(self._ahead) < self._end):
            self._submit()

    def _submit(self) -> None:
        self._ahead.append(self._pool.submit(self._read_batch, self._indices[self._next + len(self._ahead)]))

    def _drop_read_ahead(self) -> None:
        for future in self._ahead:
            future.cancel()
        concurrent.futures.wait(self._ahead)
        self._ahead.clear()

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._drop_read_ahead()
        self._next = int(state["next_index"])

    def close(self) -> None:
        self._drop_read_ahead()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_loader(
    cache: LatentCache,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    reads_in_flight: int = READS_IN_FLIGHT,
    num_batches: int | None = None,
    validation_split: float = 0.0,
) -> Loader:
    """This process's infinite stream of batches; see the comment above. Host memory holds at most
    about 4 x reads_in_flight samples: twice that many read ahead, and the batches being read,
    twice while they are copied (never fewer than 2 batches read ahead). ``num_batches``: see
    ``Loader``. ``validation_split``: the share of each bucket held out (``held_out``)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise BadInput(f"global batch size {global_batch_size} is not divisible by the {process_count} processes")
    training = len(cache) - sum(len(held_out(len(b), validation_split)) for b in cache.buckets)
    if training < global_batch_size:
        left = f" ({training} left for training by data.validation_split={validation_split})" if validation_split else ""
        raise BadInput(f"the cache holds {len(cache)} samples{left}: fewer than one global batch of {global_batch_size}")
    local_batch_size = global_batch_size // process_count
    threads = min(MAX_READER_THREADS, math.ceil(reads_in_flight / local_batch_size))
    if len([b for b in cache.buckets if len(b)]) > 1:
        small = [f"{b.name} ({len(b)})" for b in cache.buckets if 0 < len(b) < global_batch_size]
        if small:
            log.warning("buckets with fewer samples than a global batch of %d repeat samples within a batch: %s",
                        global_batch_size, ", ".join(small))
        indices = BucketBatches(cache.buckets, global_batch_size, seed, process_index, process_count, validation_split)
    else:
        indices = batch_indices(len(cache), local_batch_size, seed, process_index, process_count, validation_split)
    return Loader(cache.read_batch, indices, threads=threads, read_ahead=2 * threads, num_batches=num_batches)


def validation_batches(cache_buckets: Sequence[CacheBucket], share: float, global_batch_size: int) -> list[np.ndarray]:
    """The held-out samples (``held_out``) as global batches of ``global_batch_size`` cache
    indices, bucket by bucket, in order; the rest of each bucket's held-out samples, short of a
    batch, left out (every batch full: one compiled shape per bucket)."""
    out = []
    for bucket in cache_buckets:
        samples = bucket.first + held_out(len(bucket), share)
        out += [samples[i:i + global_batch_size] for i in range(0, len(samples) - global_batch_size + 1, global_batch_size)]
    return out
