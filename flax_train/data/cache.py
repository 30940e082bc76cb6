"""The latent cache: what `flax-train prepare` writes and training reads.

Layout of a cache directory (a local path or anything `etils.epath` opens, such as gs://):

    manifest.json             written last, when every shard exists: settings, counts, shard list
    plan.json                 settings and shard layout of a prepare in progress (for resuming)
    empty_prompt.safetensors  prompt_embeds [77, 2048] and pooled_prompt_embeds [1280] of ""
    skipped.json              every source entry that was skipped, with the reason
    shards/shard-00000.safetensors ...

Shard k holds the usable samples among source items [k * shard_size, (k + 1) * shard_size): arrays
`latents` [n, 4, h, w], `prompt_embeds` [n, 77, 2048], `pooled_prompt_embeds` [n, 1280],
`add_time_ids` [n, 6] (int32), `index` [n] (the source item), with the `token_ids` setting also
`input_ids` and `input_ids_2` [n, 77] (int32: both tokenizers' ids of the caption); and in the
safetensors metadata the captions, keys and skipped entries. A shard is written in one piece
(temporary file + rename), so a shard file that exists is complete.

Reading is random access: a sample is a handful of small reads at offsets computed from the
shard's header, with no file kept open, so threads can read concurrently. Remote shards are copied
to a local folder the first time one of their samples is read. `make_loader` turns the cache into
the training batches (grain, each process its own share, checkpointable position).
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import grain
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from etils import epath

from flax_train import model_source
from flax_train.data.images import PreprocessSpec, SourceSpec
from flax_train.errors import BadInput, InputNotFound
from flax_train.storage import atomic_write_bytes

FORMAT = "sdxl-tpu latent cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
SKIPPED = "skipped.json"
SHARDS = "shards"
SAMPLE_ARRAYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")
TOKEN_ARRAYS = ("input_ids", "input_ids_2")
# What a run that encodes the prompts itself (lora.train_text_encoder) reads: ids, not embeddings.
TOKEN_SAMPLE_ARRAYS = ("latents", "add_time_ids") + TOKEN_ARRAYS
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
LATENT_SOURCES = ("mean", "sample")
# The files of a component folder that determine what it computes.
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".txt")
_MODEL_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
}


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

    def __post_init__(self):
        if self.latent_source not in LATENT_SOURCES:
            raise BadInput(f"latent_source must be one of {LATENT_SOURCES}, got {self.latent_source!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise BadInput(f"cache dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")

    def to_json(self) -> dict[str, Any]:
        settings = {
            "source": self.source.to_json(),
            "preprocess": dataclasses.asdict(self.preprocess),
            "model": dict(self.model),
            "latent_source": self.latent_source,
            "dtype": self.dtype,
        }
        if self.token_ids:  # only when set: caches made before the setting existed still match
            settings["token_ids"] = True
        return _jsonable(settings)


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
    component folder at ``path``: local, or fetched as the trainer fetches it (flax_train.model_source)."""
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


def encode_shard(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> bytes:
    """A shard file's bytes; metadata values are stored as JSON strings."""
    return safetensors.numpy.save(
        {name: np.ascontiguousarray(a) for name, a in arrays.items()},
        metadata={key: json.dumps(value) for key, value in metadata.items()},
    )


@dataclass(frozen=True)
class _Tensor:
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file


@dataclass(frozen=True)
class ShardHeader:
    tensors: dict[str, _Tensor]
    metadata: dict[str, Any]

    @property
    def num_samples(self) -> int:
        return self.tensors["index"].shape[0]


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """The tensor table and metadata of a safetensors shard, without reading its arrays."""
    with epath.Path(path).open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = {key: json.loads(value) for key, value in header.pop("__metadata__", {}).items()}
    tensors = {
        name: _Tensor(_SAFETENSORS_DTYPES[t["dtype"]], tuple(t["shape"]), 8 + length + t["data_offsets"][0])
        for name, t in header.items()
    }
    return ShardHeader(tensors, metadata)


def read_rows(f: BinaryIO, header: ShardHeader, row: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Row `row` of each named tensor, read at its offset from the open shard file `f`."""
    out = {}
    for name in names:
        tensor = header.tensors[name]
        row_bytes = tensor.dtype.itemsize * int(np.prod(tensor.shape[1:], dtype=np.int64))
        f.seek(tensor.offset + row * row_bytes)
        out[name] = np.frombuffer(f.read(row_bytes), dtype=tensor.dtype).reshape(tensor.shape[1:])
    return out


def write_manifest(
    cache_dir: epath.Path, plan: Mapping[str, Any], rejected: list[tuple[str, str]]
) -> tuple[int, list[tuple[str, str]]]:
    """Writes skipped.json and manifest.json once every shard of the plan exists.

    `plan` is {"settings": ..., "layout": {"num_shards": ..., ...}}; `rejected` are the source
    entries refused before decoding. Returns (number of samples, every skipped (key, reason)).
    """
    shards, skipped = [], [tuple(entry) for entry in rejected]
    arrays: dict[str, Any] = {}
    for k in range(plan["layout"]["num_shards"]):
        path = shard_path(cache_dir, k)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing after every process finished: with several hosts, cache_dir must be "
                "storage they all see (e.g. gs://)"
            )
        header = read_shard_header(path)
        shards.append({"file": f"{SHARDS}/{path.name}", "num_samples": header.num_samples})
        skipped += [tuple(entry) for entry in header.metadata["skipped"]]
        arrays = {name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype)} for name, t in header.tensors.items()}
    num_samples = sum(s["num_samples"] for s in shards)
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
            "arrays": arrays,
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return num_samples, skipped


def read_empty_prompt(cache_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """prompt_embeds [77, 2048] and pooled_prompt_embeds [1280] of the empty caption."""
    return safetensors.numpy.load(epath.Path(cache_dir, EMPTY_PROMPT).read_bytes())


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    path = epath.Path(cache_dir) / MANIFEST
    if not path.exists():
        raise CacheMissingError(f"{cache_dir}: no finished latent cache (no {MANIFEST}); run `flax-train prepare` first")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMismatchError(
            f"{cache_dir}: not a version-{VERSION} latent cache (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r}); prepare it again"
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


class LatentCache:
    """Random access to the samples of a finished cache: `cache[i]` is a dict of numpy arrays.

    This is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`). `expected` settings, when
    given, are checked against the manifest first. A sample is read where it is, local or remote
    (`gs://...`): a ranged read of its rows, never a copy of the cache to local disk. Each reader
    thread keeps its shard files open, so a remote object is looked up once per thread, not per
    sample.
    """

    def __init__(self, cache_dir: str | os.PathLike, expected: CacheSettings | None = None):
        self.cache_dir = epath.Path(cache_dir)
        self.manifest = verify_cache(cache_dir, expected) if expected is not None else read_manifest(cache_dir)
        self._arrays = TOKEN_SAMPLE_ARRAYS if expected is not None and expected.token_ids else SAMPLE_ARRAYS
        self._files = [shard["file"] for shard in self.manifest["shards"]]
        counts = [shard["num_samples"] for shard in self.manifest["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self._headers: dict[int, ShardHeader] = {}
        self._lock = threading.Lock()
        self._open = threading.local()

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"LatentCache({str(self.cache_dir)!r}, {len(self)} samples in {len(self._files)} shards)"

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside the cache's {len(self)} samples")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _file(self, shard: int) -> BinaryIO:
        """This thread's open handle on the shard's file."""
        handles = self._open.__dict__.setdefault("handles", {})
        if shard not in handles:
            handles[shard] = (self.cache_dir / self._files[shard]).open("rb")
        return handles[shard]

    def _header(self, shard: int) -> ShardHeader:
        header = self._headers.get(shard)
        if header is None:
            # Only the tensor table is kept: captions of a large dataset would cost memory in every reader.
            header = dataclasses.replace(read_shard_header(self.cache_dir / self._files[shard]), metadata={})
            with self._lock:
                self._headers[shard] = header
        return header

    def _metadata(self, index: int, name: str) -> Any:
        shard, row = self._locate(int(index))
        return read_shard_header(self.cache_dir / self._files[shard]).metadata[name][row]

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for grain's worker processes: locks and open files stay behind.
        state = dict(self.__dict__)
        state.update(_headers={}, _lock=None, _open=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _open=threading.local())

    def _read(self, index: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        shard, row = self._locate(int(index))
        return read_rows(self._file(shard), self._header(shard), row, names)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._read(index, self._arrays)

    def caption(self, index: int) -> str:
        return self._metadata(index, "captions")

    def source_index(self, index: int) -> int:
        """The position of the sample in its source (skipped items leave gaps)."""
        return int(self._read(index, ("index",))["index"])

    def key(self, index: int) -> str:
        """The sample's name in the source (file path or row), for tracing a sample back."""
        return self._metadata(index, "keys")

    def empty_prompt(self) -> dict[str, np.ndarray]:
        return read_empty_prompt(self.cache_dir)


# ---------------------------------------------------------------------------------------------
# Training batches, with grain.
#
# Every process computes the same global order (the cache reshuffled every epoch from the run's
# seed) and cuts it into global batches of global_batch_size samples; process p of P reads only
# rows [p * n, (p + 1) * n) of each (n = global_batch_size / P) and yields them as dicts of numpy
# arrays named as in the cache (`latents`, `prompt_embeds`, `pooled_prompt_embeds`,
# `add_time_ids`; for expected settings with token_ids, `input_ids` and `input_ids_2` in place of
# the embeddings). So the global batch at each step is the same whatever the number of processes:
# 2 hosts x 4 chips train exactly what 1 host x 8 chips does. Threads read ahead a few batches.
#
# The iterator is a `grain.DatasetIterator`: `state = it.get_state()` (a small JSON-able dict) and
# `it.set_state(state)` on a freshly made iterator continue with exactly the batches the first one
# would have yielded next. The state is the same on every process (they advance in lockstep), so
# the checkpoint keeps one.


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
    """The infinite stream of this process's batches; see the comment above."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise BadInput(f"global batch size {global_batch_size} is not divisible by the {process_count} processes")
    if len(cache) < global_batch_size:
        raise BadInput(f"the cache holds {len(cache)} samples: fewer than one global batch of {global_batch_size}")
    local_batch_size = global_batch_size // process_count
    dataset = (
        grain.MapDataset.source(cache)
        .shuffle(seed=seed % 2**32)
        .repeat()  # each epoch shuffled anew: grain folds the epoch into the seed
        .batch(local_batch_size, drop_remainder=True)  # lazy: a batch is read only when asked for
    )[process_index::process_count]
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches))


def make_loader(cache: LatentCache, *, global_batch_size: int, seed: int, **options) -> grain.DatasetIterator:
    """An iterator over `make_dataset(...)`, with `get_state()` / `set_state()`."""
    return iter(make_dataset(cache, global_batch_size=global_batch_size, seed=seed, **options))
