"""Random access to the latent cache, and the grain loader over it (per-process shares, shuffling, resumable state).

The caches here are written directly in the cache format with recognisable contents (no models),
so these tests are fast; tests/test_data_prepare.py covers caches written by prepare.
"""
import json

import ml_dtypes
import numpy as np
import pytest
from etils import epath

from flax_train import storage
from flax_train.data import cache as cache_lib
from flax_train.data.cache import CacheMismatchError, CacheMissingError, CacheSettings, LatentCache, verify_cache
from flax_train.data.cache import make_loader
from flax_train.data.images import PreprocessSpec, SourceSpec

SETTINGS = CacheSettings(
    source=SourceSpec("imagefolder", "/data/set"),
    preprocess=PreprocessSpec(resolution=16),
    model={"vae": "a" * 64, "text_encoder": "b" * 64},
)


def write_cache(path, shard_counts, dtype=np.float32, settings=SETTINGS):
    """Sample n has latents filled with n, prompt embeds with n + 0.5, etc. Item numbering leaves gaps
    (skipped items) so that cache index and source index differ."""
    cache_dir = epath.Path(path)
    n = 0
    for k, count in enumerate(shard_counts):
        index = np.arange(n, n + count)
        arrays = {
            "latents": np.broadcast_to(index[:, None, None, None], (count, 4, 2, 2)).astype(dtype),
            "prompt_embeds": np.broadcast_to(index[:, None, None] + 0.5, (count, 77, 8)).astype(dtype),
            "pooled_prompt_embeds": np.broadcast_to(index[:, None] + 0.25, (count, 4)).astype(dtype),
            "add_time_ids": np.stack([index, index + 1, index % 3, index % 5, 16 + 0 * index, 16 + 0 * index], 1).astype(np.int32),
            "index": index * 2,
        }
        metadata = {"shard": k, "keys": [f"img{i}.png" for i in index], "captions": [f"caption {i}" for i in index],
                    "skipped": [[f"bad{k}.png", "unreadable image"]]}
        storage.atomic_write_bytes(cache_lib.shard_path(cache_dir, k), cache_lib.encode_shard(arrays, metadata))
        n += count
    plan = {"settings": settings.to_json(), "layout": {"shard_size": 10, "num_items": 2 * n, "num_shards": len(shard_counts)}}
    cache_lib.write_manifest(cache_dir, plan, rejected=[("../x.png", "path outside dataset folder")])
    return cache_dir


def test_random_access_across_shards(tmp_path):
    cache = LatentCache(write_cache(tmp_path, [4, 0, 3, 5]))  # an all-skipped (empty) shard included
    assert len(cache) == 12
    for i in [0, 3, 4, 6, 7, 11]:
        sample = cache[i]
        assert set(sample) == {"latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids"}
        np.testing.assert_array_equal(sample["latents"], np.full((4, 2, 2), i, np.float32))
        np.testing.assert_array_equal(sample["prompt_embeds"], np.full((77, 8), i + 0.5, np.float32))
        np.testing.assert_array_equal(sample["pooled_prompt_embeds"], np.full((4,), i + 0.25, np.float32))
        assert sample["add_time_ids"].tolist() == [i, i + 1, i % 3, i % 5, 16, 16]
        assert cache.caption(i) == f"caption {i}" and cache.key(i) == f"img{i}.png"
    with pytest.raises(IndexError):
        cache[12]
    manifest = cache.manifest
    assert manifest["num_samples"] == 12 and manifest["num_skipped"] == 5
    assert manifest["skipped_by_reason"] == {"unreadable image": 4, "path outside dataset folder": 1}
    assert json.loads((tmp_path / "skipped.json").read_text())[0] == ["../x.png", "path outside dataset folder"]


def test_bfloat16_storage_reads_back(tmp_path):
    cache = LatentCache(write_cache(tmp_path, [3], dtype=ml_dtypes.bfloat16))
    sample = cache[2]
    assert sample["latents"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(sample["prompt_embeds"].astype(np.float32), np.full((77, 8), 2.5))


def test_mismatched_cache_is_refused_with_what_differs(tmp_path):
    cache_dir = write_cache(tmp_path, [3])
    assert verify_cache(cache_dir, SETTINGS)["num_samples"] == 3
    other = CacheSettings(
        source=SETTINGS.source,
        preprocess=PreprocessSpec(resolution=32, random_flip=True),
        model={"vae": "c" * 64, "text_encoder": "b" * 64},
        latent_source="sample",
    )
    with pytest.raises(CacheMismatchError) as info:
        LatentCache(cache_dir, expected=other)
    message = str(info.value)
    assert "preprocess.resolution: cache has 16, config has 32" in message
    assert "preprocess.random_flip: cache has false, config has true" in message
    assert 'model.vae: cache has "aaaaaaaaaaaa…", config has "cccccccccccc…"' in message
    assert 'latent_source: cache has "mean", config has "sample"' in message
    assert "text_encoder" not in message and "seed" not in message
    with pytest.raises(CacheMissingError, match="flax-train prepare"):
        LatentCache(tmp_path / "nothing-here")


def batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def ids(batch):
    return batch["latents"][:, 0, 0, 0].astype(int).tolist()


def test_processes_read_disjoint_rows_of_the_same_global_batches(tmp_path):
    cache = LatentCache(write_cache(tmp_path, [10, 10, 7]))  # 27 samples
    one = batches(make_loader(cache, global_batch_size=4, seed=0, process_index=0, process_count=1), 9)
    two = [batches(make_loader(cache, global_batch_size=4, seed=0, process_index=p, process_count=2, num_threads=2), 9)
           for p in range(2)]
    for step in range(9):
        # Process 0 holds the first half of each global batch, process 1 the second: whatever the
        # number of processes, every step trains the same samples in the same order.
        assert ids(two[0][step]) + ids(two[1][step]) == ids(one[step])
    first = sum((ids(b) for b in one), [])
    assert sorted(first[:24]) == sorted(set(first[:24])) and first[:24] != sorted(first[:24])  # shuffled, no repeats
    everything = sum((ids(b) for b in batches(make_loader(cache, global_batch_size=3, seed=0, process_index=0, process_count=1), 9)), [])
    assert sorted(everything) == list(range(27))  # one epoch is a permutation
    other = sum((ids(b) for b in batches(make_loader(cache, global_batch_size=3, seed=1, process_index=0, process_count=1), 9)), [])
    assert other != everything
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_loader(cache, global_batch_size=32, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="not divisible"):
        make_loader(cache, global_batch_size=5, seed=0, process_index=0, process_count=2)


def test_restored_loader_yields_the_same_next_batches(tmp_path):
    cache = LatentCache(write_cache(tmp_path, [10, 10]))
    loader = make_loader(cache, global_batch_size=3, seed=42, process_index=0, process_count=1)
    batches(loader, 5)
    state = json.loads(json.dumps(loader.get_state()))  # as it travels through a checkpoint
    expected = batches(loader, 12)  # crosses into the next epochs
    restored = make_loader(cache, global_batch_size=3, seed=42, process_index=0, process_count=1)
    restored.set_state(state)
    for want, got in zip(expected, batches(restored, 12)):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    # Epochs differ in order: the second epoch is not the first one again.
    fresh = make_loader(cache, global_batch_size=4, seed=42, process_index=0, process_count=1)
    run = sum((ids(b) for b in batches(fresh, 10)), [])
    assert sorted(run[:20]) == sorted(run[20:40]) == list(range(20)) and run[:20] != run[20:40]


def test_cache_survives_pickling_for_worker_processes(tmp_path):
    import pickle

    cache = LatentCache(write_cache(tmp_path, [3, 4]))
    cache[5]  # opens state that must not travel
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[5]["latents"], cache[5]["latents"])
    assert clone.caption(6) == "caption 6"
