"""The data half of the trainer: sources -> SDXL preprocessing -> latent cache -> grain loader.

    source, preprocess = prepare.specs_from_config(cfg)                 # data.* of a run's config
    prepare.prepare_cache(cache_dir, model_path, source, preprocess)    # flax-train prepare
    cache = cache.LatentCache(cache_dir, expected=settings)             # refuses a mismatched cache
    batches = loader.make_loader(cache, global_batch_size=..., seed=...)

The package imports none of its modules, so importing one (``flax_train.data.images`` from the
config schema) does not pull in the rest.
"""
