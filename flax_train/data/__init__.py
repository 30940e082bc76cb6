"""The data half of the trainer: sources -> SDXL preprocessing -> latent cache -> grain loader.

    settings = cache_settings(source_spec, preprocess_spec, model_path)   # what a cache must match
    prepare_cache(cache_dir, model_path, source_spec, preprocess_spec)  # flax-train prepare
    cache = LatentCache(cache_dir, expected=settings)                    # refuses a mismatched cache
    batches = make_loader(cache, global_batch_size=..., seed=...)
"""
from flax_train.data.cache import (
    CacheMismatchError,
    CacheMissingError,
    CacheSettings,
    LatentCache,
    model_fingerprint,
    read_empty_prompt,
    read_manifest,
    verify_cache,
)
from flax_train.data.loader import make_dataset, make_loader
from flax_train.data.prepare import PrepareReport, cache_settings, prepare_cache
from flax_train.data.preprocess import PreprocessSpec, SkippedSample, prepare_sample
from flax_train.data.sources import RawSample, SourceSpec, open_source

__all__ = [
    "CacheMismatchError",
    "CacheMissingError",
    "CacheSettings",
    "LatentCache",
    "PrepareReport",
    "PreprocessSpec",
    "RawSample",
    "SkippedSample",
    "SourceSpec",
    "cache_settings",
    "make_dataset",
    "make_loader",
    "model_fingerprint",
    "open_source",
    "prepare_cache",
    "prepare_sample",
    "read_empty_prompt",
    "read_manifest",
    "verify_cache",
]
