"""`prepare` on a tiny SDXL folder: the cache holds what the Flax models compute, on any device count; bad files
are skipped and reported; interrupted runs resume; a mismatched cache is refused."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flax_train.demo import synthetic
from train_support import run_script_in_processes
from flax_train.data.cache import (
    EMPTY_PROMPT,
    MANIFEST,
    PLAN,
    SKIPPED,
    CacheMismatchError,
    LatentCache,
    read_json,
    shard_path,
    verify_cache,
    write_json,
)
from flax_train.data.prepare import cache_settings, encode_image, prepare_cache
from flax_train.data.images import PreprocessSpec, SourceSpec, open_source, prepare_sample

pytestmark = pytest.mark.xdist_group("data_prepare")

PREPROCESS = PreprocessSpec(resolution=64, center_crop=False, random_flip=True, max_pixels=100 * 100, seed=3)
BAD = {
    "truncated.png": "truncated image",
    "notes.png": "unreadable image",
    "huge.png": "image too large",
    "uncaptioned.png": "empty caption",
    "../outside.png": "path outside dataset folder",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from flax_train.demo.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="module")
def source_spec(tmp_path_factory):
    """The synthetic set plus one file of every kind that must be skipped."""
    root = synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("data") / "set", 14, image_size=64, seed=2)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "full.png")
    data = (root / "full.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.png").write_text("not an image")
    Image.new("RGB", (120, 120), "red").save(root / "huge.png")
    Image.new("RGB", (64, 64), "red").save(root / "uncaptioned.png")
    Image.new("RGB", (64, 64), "red").save(root.parent / "outside.png")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    extra = [{"file_name": name, "text": "" if name == "uncaptioned.png" else "a red square"} for name in BAD]
    extra.append({"file_name": "full.png", "text": ["noise", "static", "a grey noise"]})
    lines = rows[:3] + extra + rows[3:]  # bad entries among good ones, inside the first shards
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in lines) + "\n")
    return SourceSpec("imagefolder", str(root))


@pytest.fixture(scope="module")
def cache8(model_dir, source_spec, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache8")
    report = prepare_cache(cache_dir, model_dir, source_spec, PREPROCESS, batch_size=8, shard_size=6, progress=False)
    return cache_dir, report


def test_bad_files_are_skipped_counted_and_listed(cache8):
    cache_dir, report = cache8
    assert len(jax.devices()) == 8
    assert sorted(report.skipped) == sorted(BAD.items())
    assert report.num_items == 14 + len(BAD) + 1 and report.num_samples == 15
    manifest = read_json(cache_dir / MANIFEST)
    assert manifest["num_samples"] == 15 and manifest["num_skipped"] == 5
    assert manifest["skipped_by_reason"] == {reason: 1 for reason in BAD.values()}
    assert sorted(map(tuple, read_json(cache_dir / SKIPPED))) == sorted(BAD.items())
    cache = LatentCache(cache_dir)
    assert len(cache) == 15
    assert cache.caption(3) in ("noise", "static", "a grey noise")  # one of the list, picked with the seed
    summary = report.summary()
    assert "skipped 5 of 20" in summary and "truncated.png: truncated image" in summary
    assert "images/s" in summary


def test_cache_holds_what_the_flax_models_compute(cache8, model_dir, source_spec):
    """Latents = the Flax VAE's posterior mean x scaling factor on the preprocessed pixels; embeddings =
    both text encoders' penultimate states and encoder 2's projection, run here directly."""
    from transformers import CLIPTokenizer

    from flax_train import models

    cache = LatentCache(cache8[0])
    source = open_source(source_spec)
    samples = [prepare_sample(source[cache.source_index(i)], cache.source_index(i), PREPROCESS) for i in range(len(cache))]
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(cache[i]["add_time_ids"], sample.time_ids)
        assert cache.caption(i) == sample.caption and cache.key(i) == sample.key
    flipped = [s for s in samples if s.key.startswith("images/")]
    assert len({tuple(s.time_ids[2:4]) for s in flipped}) > 3  # random crops really vary

    vae = models.load(model_dir / "vae")
    pixels = np.stack([s.pixels for s in samples]).astype(np.float32) / 127.5 - 1.0
    # jit only to compile once instead of op by op; the model is called as it is.
    mean, _ = jax.jit(vae.encode)(jnp.asarray(pixels.transpose(0, 3, 1, 2)))
    expected_latents = np.asarray(mean) * vae.config["scaling_factor"]
    cached = np.stack([cache[i]["latents"] for i in range(len(cache))])
    np.testing.assert_allclose(cached, expected_latents, rtol=1e-5, atol=1e-5)

    te1 = models.load(model_dir / "text_encoder")
    te2 = models.load(model_dir / "text_encoder_2")
    captions = [s.caption for s in samples] + [""]
    ids = [
        CLIPTokenizer.from_pretrained(model_dir / name)(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        for name in ("tokenizer", "tokenizer_2")
    ]
    assert ids[1][-1, -1] == 0  # tokenizer_2 pads with "!" (id 0), tokenizer 1 with the end token
    out1, out2 = jax.jit(lambda a, b: (te1(a), te2(b)))(jnp.asarray(ids[0]), jnp.asarray(ids[1]))
    expected_embeds = np.concatenate([np.asarray(out1.hidden_states[-2]), np.asarray(out2.hidden_states[-2])], -1)
    expected_pooled = np.asarray(out2.text_embeds)
    cached_embeds = np.stack([cache[i]["prompt_embeds"] for i in range(len(cache))])
    cached_pooled = np.stack([cache[i]["pooled_prompt_embeds"] for i in range(len(cache))])
    np.testing.assert_allclose(cached_embeds, expected_embeds[:-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached_pooled, expected_pooled[:-1], rtol=1e-5, atol=1e-5)
    empty = cache.empty_prompt()
    np.testing.assert_allclose(empty["prompt_embeds"], expected_embeds[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(empty["pooled_prompt_embeds"], expected_pooled[-1], rtol=1e-5, atol=1e-5)


def assert_close_in_float32(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    """Float32 on both sides; only the batch split over devices differs, which changes the order
    of the sums inside matrix products. Their rounding error is bounded relative to the size of the
    terms summed, not of each result (an element near zero may come from terms of size 1), so the
    bound is 1e-6 of the array's largest magnitude."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6 * max(1.0, float(np.abs(expected).max())),
                               err_msg=name)


def assert_same_cache(a: LatentCache, b: LatentCache) -> None:
    assert len(a) == len(b) == 15
    assert a.manifest["settings"] == b.manifest["settings"]
    assert a.manifest["shards"] == b.manifest["shards"]
    for i in range(len(a)):
        assert a.caption(i) == b.caption(i) and a.key(i) == b.key(i)
        for name, value in a[i].items():
            assert_close_in_float32(value, b[i][name], name)
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        assert_close_in_float32(a.empty_prompt()[name], b.empty_prompt()[name], name)


def test_one_device_writes_the_same_cache_as_eight(cache8, model_dir, source_spec, tmp_path):
    report = prepare_cache(
        tmp_path, model_dir, source_spec, PREPROCESS, batch_size=8, shard_size=6, devices=jax.devices()[:1], progress=False
    )
    assert sorted(report.skipped) == sorted(cache8[1].skipped)
    assert_same_cache(LatentCache(tmp_path), LatentCache(cache8[0]))


WORKER = """
import dataclasses, json, sys
from flax_train import sharding
sharding.initialize_distributed()
import jax
from flax_train.data.prepare import prepare_cache
from flax_train.data.images import PreprocessSpec, SourceSpec
cache_dir, model_dir, source, preprocess = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
assert jax.process_count() == 2 and len(jax.devices()) == 8
report = prepare_cache(cache_dir, model_dir, SourceSpec(**source), PreprocessSpec(**preprocess),
                       batch_size=8, shard_size=6, progress=False)
print("REPORT", json.dumps(dataclasses.asdict(report)))
"""


def run_two_processes(tmp_path, cache_dir, model_dir, source: SourceSpec, preprocess: PreprocessSpec) -> list[dict]:
    """prepare_cache as 2 processes x 4 devices (JAX's multi-process runtime on localhost); their reports."""
    args = [str(cache_dir), str(model_dir), json.dumps(dataclasses.asdict(source)), json.dumps(dataclasses.asdict(preprocess))]
    outputs = run_script_in_processes(tmp_path, WORKER, *args, devices_per_process=4)
    return [json.loads(out.split("REPORT ", 1)[1]) for out in outputs]


def test_two_processes_each_write_their_shards_of_the_same_cache(cache8, model_dir, source_spec, tmp_path):
    """2 processes x 4 devices write what 1 process x 8 does."""
    reports = run_two_processes(tmp_path, tmp_path / "cache", model_dir, source_spec, PREPROCESS)
    assert [r["shards_written"] for r in reports] == [2, 2]  # shards 0, 2 and 1, 3
    assert all(sorted(map(tuple, r["skipped"])) == sorted(BAD.items()) for r in reports)
    assert_same_cache(LatentCache(tmp_path / "cache"), LatentCache(cache8[0]))


def test_interrupted_prepare_resumes_and_finished_one_is_not_redone(cache8, model_dir, source_spec, tmp_path):
    done_dir, _ = cache8
    cache_dir = tmp_path / "cache"
    shutil.copytree(done_dir, cache_dir)
    # The state a prepare killed mid-way leaves: a plan, some shards, no manifest.
    manifest = read_json(cache_dir / MANIFEST)
    write_json(cache_dir / PLAN, {"settings": manifest["settings"], "layout": manifest["layout"]})
    for name in (MANIFEST, SKIPPED, EMPTY_PROMPT):
        (cache_dir / name).unlink()
    shard_path(cache_dir, 1).unlink()
    kept = shard_path(cache_dir, 0).stat().st_mtime_ns

    report = prepare_cache(cache_dir, model_dir, source_spec, PREPROCESS, batch_size=8, shard_size=6, progress=False)
    assert (report.shards_written, report.shards_reused) == (1, 3)
    assert shard_path(cache_dir, 0).stat().st_mtime_ns == kept
    assert not (cache_dir / PLAN).exists()
    resumed, original = LatentCache(cache_dir), LatentCache(done_dir)
    assert len(resumed) == len(original)
    for i in range(len(resumed)):
        for name, value in resumed[i].items():
            np.testing.assert_array_equal(value, original[i][name])
    assert sorted(report.skipped) == sorted(BAD.items())

    stamps = {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("*")}
    again = prepare_cache(cache_dir, model_dir, source_spec, PREPROCESS, batch_size=8, shard_size=6, progress=False)
    assert again.already_done and again.shards_written == 0 and again.num_samples == 15
    assert sorted(again.skipped) == sorted(BAD.items())
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("*")} == stamps


def test_mismatched_cache_is_refused(cache8, model_dir, source_spec, tmp_path):
    cache_dir = cache8[0]
    verify_cache(cache_dir, cache_settings(source_spec, PREPROCESS, model_dir))
    with pytest.raises(CacheMismatchError, match=r"preprocess.resolution: cache has 64, config has 32"):
        verify_cache(cache_dir, cache_settings(source_spec, PreprocessSpec(32, False, True, 100 * 100, 3), model_dir))
    with pytest.raises(CacheMismatchError, match=r'latent_source: cache has "mean", config has "sample"'):
        verify_cache(cache_dir, cache_settings(source_spec, PREPROCESS, model_dir, latent_source="sample"))
    # Another VAE: the fingerprint of its weights differs.
    other_vae = shutil.copytree(model_dir / "vae", tmp_path / "vae")
    weights = next(other_vae.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheMismatchError, match=r"model.vae: cache has") as info:
        verify_cache(cache_dir, cache_settings(source_spec, PREPROCESS, model_dir, vae_path=other_vae))
    assert "text_encoder" not in str(info.value)
    # prepare refuses to mix settings in one directory before doing any work.
    with pytest.raises(CacheMismatchError, match="finished cache with different settings"):
        prepare_cache(cache_dir, model_dir, source_spec, PreprocessSpec(resolution=32), progress=False)


def test_sampled_latents_depend_only_on_seed_and_sample_index(model_dir):
    from flax_train import models

    vae = models.load(model_dir / "vae")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    indices = np.array([7, 3, 11, 5], np.int32)
    encode = jax.jit(lambda p, i, source, seed: encode_image(vae, p, i, source, seed), static_argnums=(2,))
    sampled = np.asarray(encode(pixels, indices, "sample", 0))
    order = [2, 0, 3, 1]
    np.testing.assert_allclose(np.asarray(encode(pixels[order], indices[order], "sample", 0)), sampled[order], rtol=1e-6, atol=1e-6)
    mean = np.asarray(encode(pixels, indices, "mean", 0))
    assert np.abs(sampled - mean).max() > 1e-3
    assert np.abs(np.asarray(encode(pixels, indices, "sample", 1)) - sampled).max() > 1e-3


def test_an_unexpected_error_on_one_sample_becomes_a_skip():
    from flax_train.data.prepare import _load_one

    def read():
        raise RuntimeError("disk hiccup")

    result = _load_one(1, read, PREPROCESS)
    assert (result.index, result.key, result.reason) == (1, "item 1", "unexpected error (RuntimeError)")


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards as the source.

CENTER = PreprocessSpec(resolution=64, center_crop=True, max_pixels=100 * 100)
TAR_BAD = {
    "shard-000.tar/nocaption": "empty caption",
    "shard-000.tar/textonly": "no image in sample",
    "shard-001.tar/notes": "unreadable image",
}


def _add(tar, name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tar_dataset(tmp_path_factory):
    """The 14 synthetic images as an imagefolder, and the same images in three tars (captions as
    .txt in the first, as .json in the second) with a sample of each kind that must be skipped; the
    third tar breaks off inside its last sample."""
    import tarfile

    root = tmp_path_factory.mktemp("webdataset")
    folder = synthetic.write_synthetic_dataset(root / "folder", 14, image_size=64, seed=2)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    stem = lambda row: row["file_name"].split("/")[-1].split(".")[0]  # noqa: E731
    image = lambda row: (folder / row["file_name"]).read_bytes()  # noqa: E731
    (root / "tars").mkdir()
    with tarfile.open(root / "tars" / "shard-000.tar", "w") as tar:
        for row in rows[:6]:
            _add(tar, f"{stem(row)}.png", image(row))
            _add(tar, f"{stem(row)}.txt", row["text"].encode())
        _add(tar, "nocaption.png", image(rows[0]))
        _add(tar, "textonly.txt", b"a caption without an image")
    with tarfile.open(root / "tars" / "shard-001.tar", "w") as tar:
        _add(tar, "notes.png", b"not an image")
        _add(tar, "notes.txt", b"a red square")
        for row in rows[6:11]:
            _add(tar, f"{stem(row)}.json", json.dumps({"text": row["text"], "width": 64}).encode())
            _add(tar, f"{stem(row)}.png", image(row))
    with tarfile.open(root / "tars" / "shard-002.tar", "w") as tar:
        for row in rows[11:] + rows[:1]:
            _add(tar, f"{stem(row)}.png", image(row))
            _add(tar, f"{stem(row)}.txt", row["text"].encode())
    data = (root / "tars" / "shard-002.tar").read_bytes()
    last = data.rindex(image(rows[0])[:64])  # the image of the fourth sample
    (root / "tars" / "shard-002.tar").write_bytes(data[: last + 100])
    return folder, root / "tars"


@pytest.fixture(scope="module")
def folder_cache(model_dir, tar_dataset, tmp_path_factory) -> LatentCache:
    """The imagefolder of the tars' images, prepared: what every tar cache is compared with."""
    cache_dir = tmp_path_factory.mktemp("folder-cache")
    prepare_cache(cache_dir, model_dir, SourceSpec("imagefolder", str(tar_dataset[0])), CENTER, batch_size=8, progress=False)
    return LatentCache(cache_dir)


def assert_same_samples(tars: LatentCache, folder: LatentCache) -> None:
    """Sample by sample (tar keys end with the image's name in the folder), equal up to the order
    of sums that batches of other compositions change."""
    by_name = {folder.key(i).split("/")[-1].split(".")[0]: i for i in range(len(folder))}
    assert len(tars) == len(folder) == 14
    for i in range(len(tars)):
        j = by_name[tars.key(i).split("/")[-1]]
        assert tars.caption(i) == folder.caption(j)
        for name, value in tars[i].items():
            assert_close_in_float32(value, folder[j][name], name)


def test_webdataset_tars_give_the_cache_an_imagefolder_of_the_same_images_gives(model_dir, tar_dataset, folder_cache,
                                                                                 tmp_path):
    _, tars = tar_dataset
    report = prepare_cache(tmp_path / "tars", model_dir, SourceSpec("webdataset", str(tars)), CENTER, batch_size=8,
                           progress=False)
    assert report.num_samples == 14 and report.shards_written == 3
    skipped = dict(report.skipped)
    truncated = [key for key in skipped if key.startswith("shard-002.tar@")]
    assert truncated == ["shard-002.tar@sample3"] and skipped.pop(truncated[0]).startswith("unreadable tar (")
    assert skipped == TAR_BAD
    cache = LatentCache(tmp_path / "tars")
    assert cache.manifest["shards"]["num_samples"] == [6, 5, 3]  # one shard per tar
    assert_same_samples(cache, folder_cache)
    assert "skipped 4 of 18" in report.summary()


def test_an_interrupted_webdataset_prepare_redoes_only_the_missing_tars(model_dir, tar_dataset, tmp_path):
    _, tars = tar_dataset
    spec = SourceSpec("webdataset", f"{tars}/shard-{{000..002}}.tar")
    done = prepare_cache(tmp_path, model_dir, spec, CENTER, batch_size=8, progress=False)
    manifest = read_json(tmp_path / MANIFEST)
    write_json(tmp_path / PLAN, {"settings": manifest["settings"], "layout": manifest["layout"]})
    for name in (MANIFEST, SKIPPED):
        (tmp_path / name).unlink()
    shard_path(tmp_path, 1).unlink()
    resumed = prepare_cache(tmp_path, model_dir, spec, CENTER, batch_size=8, progress=False)
    assert (resumed.shards_written, resumed.shards_reused) == (1, 2)
    assert sorted(resumed.skipped) == sorted(done.skipped) and resumed.num_samples == 14
    again = prepare_cache(tmp_path, model_dir, spec, CENTER, batch_size=8, progress=False)
    assert again.already_done and again.num_items == 18


def test_webdataset_tars_on_cloud_storage_prepare_as_local_ones(model_dir, tar_dataset, folder_cache, tmp_path, gcs_bucket):
    from sdxl_common import storage

    _, tars = tar_dataset
    remote = f"{gcs_bucket}/{tmp_path.name}"
    storage.upload_tree(tars, f"{remote}/tars")
    report = prepare_cache(f"{remote}/cache", model_dir, SourceSpec("webdataset", f"{remote}/tars/shard-{{000..002}}.tar"),
                           CENTER, batch_size=8, progress=False)
    assert report.num_samples == 14 and len(report.skipped) == 4
    assert_same_samples(LatentCache(f"{remote}/cache"), folder_cache)


def test_two_processes_share_the_tars_of_a_webdataset(model_dir, tar_dataset, folder_cache, tmp_path):
    """Process 0 reads tars 0 and 2 (12 samples), process 1 tar 1 (6): the one with fewer runs
    padding steps until the other is done, and the cache is the one process's cache."""
    _, tars = tar_dataset
    reports = run_two_processes(tmp_path, tmp_path / "cache", model_dir, SourceSpec("webdataset", str(tars)), CENTER)
    assert [r["shards_written"] for r in reports] == [2, 1]
    assert all(len(r["skipped"]) == 4 for r in reports)
    cache = LatentCache(tmp_path / "cache")
    assert cache.manifest["shards"]["num_samples"] == [6, 5, 3]
    assert_same_samples(cache, folder_cache)


def test_webdataset_names_are_expanded_and_missing_tars_refused(tar_dataset):
    from flax_train.data.webdataset import expand_braces, list_tars
    from sdxl_common.errors import BadInput, InputNotFound

    assert expand_braces("gs://b/s-{008..011}.tar") == [f"gs://b/s-{i:03d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    with pytest.raises(BadInput, match="runs backwards"):
        expand_braces("s-{3..1}.tar")
    _, tars = tar_dataset
    assert [p.rsplit("/", 1)[1] for p in list_tars(str(tars))] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    with pytest.raises(InputNotFound, match="1 of the 4 tar files"):
        list_tars(f"{tars}/shard-{{000..003}}.tar")
    with pytest.raises(InputNotFound, match="no .tar files"):
        list_tars(str(tars.parent / "folder"))


def test_an_instance_prompt_captions_every_image_of_a_folder(model_dir, tmp_path, capsys):
    """DreamBooth's --instance_prompt: `flax-train prepare` with data.instance_prompt reads every image
    under data.path (captions and metadata beside them are not read), each with that caption."""
    from flax_train import cli, config as config_lib
    from flax_train.data.prepare import open_cache
    from flax_train.demo import CONFIG as DEMO_CONFIG
    from flax_train.models import pretrained_pipeline

    photos = tmp_path / "photos"
    synthetic.write_synthetic_dataset(photos, 5, image_size=64, seed=4)  # images/*.png; metadata.jsonl not read
    shutil.move(next((photos / "images").glob("*.png")), photos / "top.png")
    (photos / "top.txt").write_text("a caption file, not read")
    args = ["--config", str(DEMO_CONFIG), f"model.pretrained={model_dir}", "model.unet_config=null",
            f"data.path={photos}", "data.resolution=64", f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={tmp_path / 'run'}", "data.instance_prompt=a photo of sks dog"]
    assert cli.main(["prepare", *args]) == 0
    cfg = config_lib.load([DEMO_CONFIG], args[2:])
    cache = open_cache(cfg, pretrained_pipeline(cfg.model))
    assert len(cache) == 5 and {cache.caption(i) for i in range(5)} == {"a photo of sks dog"}
    assert cache.manifest["settings"]["source"]["instance_prompt"] == "a photo of sks dog"
    embeds = np.stack([cache[i]["prompt_embeds"] for i in range(5)])
    np.testing.assert_array_equal(embeds, np.broadcast_to(embeds[0], embeds.shape))  # one caption, one encoding
    assert not np.array_equal(embeds[0], cache.empty_prompt()["prompt_embeds"])

    # Another instance prompt is another cache; a cache made without one keeps its settings.
    with pytest.raises(CacheMismatchError, match='source.instance_prompt: cache has "a photo of sks dog"'):
        open_cache(config_lib.load([DEMO_CONFIG], [*args[2:], "data.instance_prompt=a photo of sks cat"]),
                   pretrained_pipeline(cfg.model))
    assert "instance_prompt" not in SourceSpec("imagefolder", str(photos)).to_json()

    # Bad input: one line, exit 2, before anything loads.
    capsys.readouterr()
    for extra, expected in ((["data.instance_prompt=' '"], "data.instance_prompt must not be empty"),
                            (["data.source=hf"], "data.instance_prompt captions a folder of images")):
        assert cli.main(["prepare", *args, *extra]) == 2
        assert expected in capsys.readouterr().err
