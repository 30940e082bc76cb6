"""Random access to the latent cache, and the loader over it (per-process shares, shuffling,
resumable state, the same rows as the loader before it), locally and on Cloud Storage (a local
emulator counts the requests and bytes), and a cache of ten million samples.

The caches here are written directly in the cache format with recognisable contents (no models),
so these tests are fast; tests/test_data_prepare.py covers caches written by prepare.
"""
import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
from etils import epath

from sdxl_common import storage
from flax_train.data import cache as cache_lib
from flax_train.data.cache import CacheMismatchError, CacheMissingError, CacheSettings, LatentCache, verify_cache
from flax_train.data.cache import make_loader
from flax_train.data.images import PreprocessSpec, SourceSpec

SETTINGS = CacheSettings(
    source=SourceSpec("imagefolder", "/data/set"),
    preprocess=PreprocessSpec(resolution=16),
    model={"vae": "a" * 64, "text_encoder": "b" * 64},
)


def write_cache(path, shard_counts, dtype=np.float32, settings=SETTINGS, token_ids=False):
    """Sample n has latents filled with n, prompt embeds with n + 0.5, etc. (token ids: n and -n).
    Item numbering leaves gaps (skipped items) so that cache index and source index differ."""
    cache_dir = epath.Path(path)
    n = 0
    for k, count in enumerate(shard_counts):
        index = np.arange(n, n + count)
        arrays = {
            "latents": np.broadcast_to(index[:, None, None, None], (count, 4, 2, 2)).astype(dtype),
            "prompt_embeds": np.broadcast_to(index[:, None, None] + 0.5, (count, 77, 8)).astype(dtype),
            "pooled_prompt_embeds": np.broadcast_to(index[:, None] + 0.25, (count, 4)).astype(dtype),
            "add_time_ids": np.stack([index, index + 1, index % 3, index % 5, 16 + 0 * index, 16 + 0 * index], 1).astype(np.int32),
        }
        if token_ids:
            arrays.update(input_ids=np.broadcast_to(index[:, None], (count, 77)).astype(np.int32),
                          input_ids_2=np.broadcast_to(-index[:, None], (count, 77)).astype(np.int32))
        metadata = {"shard": k, "keys": [f"img{i}.png" for i in index], "captions": [f"caption {i}" for i in index],
                    "skipped": [[f"bad{k}.png", "unreadable image"]]}
        storage.atomic_write_bytes(cache_lib.shard_path(cache_dir, k), cache_lib.encode_shard(index * 2, {None: arrays}, metadata))
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
    two = [batches(make_loader(cache, global_batch_size=4, seed=0, process_index=p, process_count=2, reads_in_flight=2), 9)
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


def test_a_loader_told_the_runs_length_reads_nothing_past_it(tmp_path):
    cache = LatentCache(write_cache(tmp_path, [10, 10]))
    read = []

    def counting(indices):
        read.append(list(indices))
        return cache.read_batch(indices)

    options = dict(global_batch_size=2, seed=3, process_index=0, process_count=1)
    with make_loader(cache, **options) as unbounded, make_loader(cache, num_batches=3, **options) as bounded:
        bounded._read_batch = counting
        expected = batches(unbounded, 5)
        got = batches(bounded, 3)
        assert len(read) == 3  # the read-ahead (2 x 64 threads) stopped at the run's 3 batches
        got += batches(bounded, 2)  # past them: read when asked, the same batches
        assert len(read) == 5
    assert [ids(b) for b in got] == [ids(b) for b in expected]


def test_cache_survives_pickling_for_worker_processes(tmp_path):
    import pickle

    cache = LatentCache(write_cache(tmp_path, [3, 4]))
    cache[5]  # opens state that must not travel
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[5]["latents"], cache[5]["latents"])
    assert clone.caption(6) == "caption 6"


def todays_loader(cache, *, global_batch_size, seed, process_index, process_count):
    """The loader as it was before batches were read with one request per sample (grain over the
    samples themselves, each read on its own): the reference for which rows every step trains."""
    import grain

    local = global_batch_size // process_count
    dataset = (grain.MapDataset.source(cache).shuffle(seed=seed % 2**32).repeat()
               .batch(local, drop_remainder=True))[process_index::process_count]
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


@pytest.mark.parametrize("processes", [1, 2])
def test_every_process_trains_the_rows_it_trained_before_and_after_a_resume(tmp_path, processes):
    cache = LatentCache(write_cache(tmp_path, [10, 0, 10, 7]))  # 27 samples: batches cross epochs
    options = dict(global_batch_size=6, seed=3, process_count=processes)
    for p in range(processes):
        want = batches(todays_loader(cache, process_index=p, **options), 14)
        loader = make_loader(cache, process_index=p, reads_in_flight=4, **options)
        got = batches(loader, 5)
        state = json.loads(json.dumps(loader.get_state()))
        got += batches(loader, 9)
        resumed = make_loader(cache, process_index=p, **options)
        resumed.set_state(state)
        for step, (w, g) in enumerate(zip(want, got)):
            assert ids(g) == ids(w), step
            for name in w:
                np.testing.assert_array_equal(g[name], w[name])
        assert [ids(b) for b in batches(resumed, 9)] == [ids(b) for b in want[5:]]


def test_a_cache_on_cloud_storage_reads_one_request_of_exactly_its_bytes_per_sample(tmp_path, gcs_bucket):
    from benchmarks.gcs_emulator import stats

    local = LatentCache(write_cache(tmp_path / "local", [10, 10, 7], dtype=ml_dtypes.bfloat16))
    remote_dir = f"{gcs_bucket}/{tmp_path.name}/cache"
    storage.upload_tree(tmp_path / "local", remote_dir)
    remote = LatentCache(remote_dir)
    indices = [26, 3, 14, 3, 9, 20]
    before = stats()
    batch = remote.read_batch(indices)
    after = stats()
    assert after["requests"] - before["requests"] == len(indices)
    needed = sum(value.nbytes for value in batch.values())
    assert after["bytes_sent"] - before["bytes_sent"] == needed
    want = local.read_batch(indices)
    assert set(batch) == set(want) == set(cache_lib.SAMPLE_ARRAYS)
    for name in want:
        np.testing.assert_array_equal(batch[name], want[name])
    assert ids(batch) == indices
    options = dict(global_batch_size=4, seed=5, process_index=0, process_count=1)
    # closed on leaving: no read of theirs is left running when the emulator stops
    with make_loader(remote, **options) as loader, make_loader(local, **options) as reference:
        for got, want in zip(batches(loader, 8), batches(reference, 8)):
            for name in want:
                np.testing.assert_array_equal(got[name], want[name])


def test_runs_that_encode_captions_read_the_token_ids_and_not_the_embeddings(tmp_path):
    settings = dataclasses.replace(SETTINGS, token_ids=True)
    cache_dir = write_cache(tmp_path, [5, 4], settings=settings, token_ids=True)
    cache = LatentCache(cache_dir, expected=settings)
    batch = cache.read_batch([8, 0])
    assert set(batch) == set(cache_lib.TOKEN_SAMPLE_ARRAYS)
    assert batch["input_ids"][:, 0].tolist() == [8, 0] and batch["input_ids_2"][:, 0].tolist() == [-8, 0]
    assert ids(batch) == [8, 0] and batch["add_time_ids"][:, 0].tolist() == [8, 0]
    # what is read is one span of each record: the token ids and what sits between them and the time ids
    layout = cache.layout
    start, end = layout.span(cache_lib.TOKEN_SAMPLE_ARRAYS)
    assert (start, end) == (0, layout.fields["add_time_ids"].offset + layout.fields["add_time_ids"].nbytes)
    assert LatentCache(cache_dir, expected=dataclasses.replace(settings, token_ids=False))[8].keys() == set(cache_lib.SAMPLE_ARRAYS)
    with pytest.raises(CacheMismatchError, match="token_ids: cache has"):
        LatentCache(write_cache(tmp_path / "without", [5]), expected=settings)


def test_a_cache_of_ten_million_samples_opens_from_a_small_manifest_without_reading_a_shard(tmp_path):
    """Only the manifest is read to open a cache and start its loader; its size and what opening it
    costs in memory grow with the number of shards (a few bytes each), not of samples."""
    import tracemalloc

    from flax_train.data.cache import batch_indices

    shard_size, samples = 256, 10_000_000
    counts = [shard_size] * (samples // shard_size) + [samples % shard_size]
    counts[7] -= 3  # three skipped items
    layout = cache_lib.RecordLayout.of({"latents": (ml_dtypes.bfloat16, (4, 128, 128)), "add_time_ids": (np.int32, (6,)),
                                        "pooled_prompt_embeds": (ml_dtypes.bfloat16, (1280,)),
                                        "prompt_embeds": (ml_dtypes.bfloat16, (77, 2048))})
    manifest = {"format": cache_lib.FORMAT, "version": cache_lib.VERSION, "settings": SETTINGS.to_json(),
                "layout": {"shard_size": shard_size, "num_items": samples, "num_shards": len(counts)},
                "num_samples": sum(counts), "num_skipped": 3, "record": layout.to_json(),
                "shards": {"num_samples": counts, "records_offset": [4096] * len(counts)}}
    cache_lib.write_json(epath.Path(tmp_path) / cache_lib.MANIFEST, manifest)
    assert (tmp_path / cache_lib.MANIFEST).stat().st_size < 2**20

    tracemalloc.start()
    cache = LatentCache(tmp_path, expected=SETTINGS)
    loader = make_loader(cache, global_batch_size=64, seed=0, process_index=1, process_count=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    assert len(cache) == samples - 3 and loader is not None
    shards, rows = cache.locate([0, 255, 256, 7 * 256, 8 * 256 - 4, 8 * 256 - 3, len(cache) - 1])
    assert shards.tolist() == [0, 0, 1, 7, 7, 8, len(counts) - 1]
    assert rows.tolist() == [0, 255, 0, 0, 252, 0, counts[-1] - 1]
    first = batch_indices(len(cache), 16, 0, 1, 4)[0]
    assert len(set(first.tolist())) == 16 and 0 <= first.min() and first.max() < len(cache)
    with pytest.raises(FileNotFoundError):  # no shard exists: the loader reads only when asked for a batch
        next(loader)


def test_a_loader_on_cloud_storage_leaves_nothing_running_when_its_process_exits(tmp_path, gcs_bucket):
    """Reads ahead are dropped or finished when the loader closes: no storage request is left
    pending at exit (an earlier reader kept files open whose background fetches ended in a burst of
    "Task was destroyed but it is pending!" errors after a successful run)."""
    import subprocess
    import sys

    from benchmarks.loader_throughput import write_cache as write_sdxl_like_cache

    write_sdxl_like_cache(tmp_path / "cache", 256, 128, {"latent": (4, 64, 64), "prompt": (77, 512), "pooled": (64,)})
    remote = f"{gcs_bucket}/{tmp_path.name}/cache"
    storage.upload_tree(tmp_path / "cache", remote)
    code = ("import sys; from flax_train.data.cache import LatentCache, make_loader\n"
            "with make_loader(LatentCache(sys.argv[1]), global_batch_size=16, seed=0, process_index=0, process_count=1) as loader:\n"
            "    print(sum(len(next(loader)['latents']) for _ in range(6)))\n")
    result = subprocess.run([sys.executable, "-c", code, remote], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["96"], result.stderr[-3000:]
    assert "ERROR" not in result.stderr and "Task was destroyed" not in result.stderr, result.stderr[-3000:]
