"""Aspect-ratio buckets (sdxl_common/buckets.py): SDXL's list, which bucket an image joins, how the
rarest are dropped, and the crop and micro-conditioning of an image in a bucket, worked by hand; a
cache grouped by bucket, the loader's one bucket a step, and a run that compiles a step per bucket."""

import collections
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flax_train import checkpoint, cli, train
from flax_train.data import cache as cache_lib, prepare, survey
from flax_train.demo import CONFIG as DEMO_CONFIG
from flax_train.data.cache import LatentCache
from flax_train.data.images import PreprocessSpec, RawSample, prepare_sample, resize_and_crop
from sdxl_common import buckets
from sdxl_common.errors import BadInput
from test_data_images import check_crop_matches_ids, ramp_image
from test_data_prepare import assert_close_in_float32, run_two_processes
from train_support import Workspace, assert_trees_equal, make_config, make_workspace, overrides

# One worker builds the tiny model and the cache the tests below share.
pytestmark = pytest.mark.xdist_group("buckets")


def test_the_sdxl_list_is_the_papers():
    sizes = buckets.SDXL_BUCKETS
    assert len(sizes) == len(set(sizes)) == 40
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in sizes)
    assert all(0.9 <= h * w / 1024**2 <= 1.0 for h, w in sizes)  # about a megapixel each
    assert (1024, 1024) in sizes and sizes[0] == (512, 2048) and sizes[-1] == (2048, 512)  # 1:4 to 4:1
    # Every size has its transpose but one: the paper lists 704x1344 (h x w) and not 1344x704.
    assert [s for s in sizes if s[::-1] not in sizes] == [(704, 1344)]


@pytest.mark.parametrize("image, bucket", [
    ((1024, 1024), (1024, 1024)),
    ((2000, 3000), (832, 1216)),  # 3:2 landscape: log-distance 0.026 to 1216/832, 0.105 to 1280/768
    ((3000, 2000), (1216, 832)),  # the same turned to portrait
    ((1080, 1920), (768, 1344)),  # 16:9: 1.75 is nearest
    ((100, 1000), (512, 2048)),  # beyond the widest: the widest
])
def test_an_image_joins_the_bucket_nearest_its_aspect_ratio(image, bucket):
    assert buckets.nearest(image, buckets.SDXL_BUCKETS) == bucket


def test_the_list_scaled_for_smaller_training_keeps_the_models_multiple():
    half = buckets.scaled(buckets.SDXL_BUCKETS, 512, 32)
    assert len(half) == 40 and half[0] == (256, 1024) and (512, 512) in half and (416, 608) in half
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in half)
    quarter = buckets.scaled(buckets.SDXL_BUCKETS, 256, 32)  # coarser: sizes that meet are kept once
    assert len(quarter) == len(set(quarter)) < 40 and (256, 256) in quarter
    with pytest.raises(ValueError, match="multiple of 32"):
        buckets.scaled(buckets.SDXL_BUCKETS, 500, 32)


def test_the_rarest_buckets_are_dropped_and_their_images_go_to_the_nearest_left():
    # Image sizes (height, width) -> images, and SDXL buckets they fall into as they are.
    sizes = {(1024, 1024): 10, (2000, 3000): 5, (1080, 1920): 1, (3000, 2000): 4}
    candidates = [(1024, 1024), (832, 1216), (768, 1344), (1216, 832), (512, 2048)]
    assert buckets.assign(sizes, candidates) == {(1024, 1024): 10, (832, 1216): 5, (768, 1344): 1, (1216, 832): 4,
                                                 (512, 2048): 0}
    # Empty buckets are never kept; nothing else to drop.
    assert buckets.fit(sizes, candidates) == ((1024, 1024), (832, 1216), (768, 1344), (1216, 832))
    # At most 3: the 16:9 image (alone in 768x1344) goes to 832x1216, nearer its 1.78 than the square.
    assert buckets.fit(sizes, candidates, max_buckets=3) == ((1024, 1024), (832, 1216), (1216, 832))
    # Each bucket must fill a batch of 5: the 4 portraits (3:2, log-distance 0.41 to the square,
    # 0.79 to 832x1216) then join the square.
    chosen = buckets.fit(sizes, candidates, max_buckets=3, min_images=5)
    assert chosen == ((1024, 1024), (832, 1216)) and buckets.assign(sizes, chosen) == {(1024, 1024): 14, (832, 1216): 6}
    # Of equally rare buckets the one furthest from the square goes first; one always remains.
    assert buckets.fit({(832, 1216): 2, (768, 1344): 2, (1024, 1024): 2}, candidates, max_buckets=2) == (
        (1024, 1024), (832, 1216))
    assert buckets.fit(sizes, candidates, min_images=100) == ((1024, 1024),)
    with pytest.raises(ValueError, match="at least 1"):
        buckets.fit(sizes, candidates, max_buckets=0)


def test_sizes_are_written_width_first():
    assert buckets.parse_size("1216x832") == (832, 1216) and buckets.size_text((832, 1216)) == "1216x832"
    for bad in ("1216", "axb", "0x64", "64x-8"):
        with pytest.raises(ValueError):
            buckets.parse_size(bad)


@pytest.mark.parametrize("size, target, ids", [
    # 300 x 150 (w x h) into 64 x 96 (h x w): scaled by max(64/150, 96/300) = 0.4267 to 128 x 64,
    # the middle 96 columns kept: 16 cut on the left.
    ((300, 150), (64, 96), [150, 300, 0, 16, 64, 96]),
    # The same turned to portrait: 64 x 128, the middle 96 rows.
    ((150, 300), (96, 64), [300, 150, 16, 0, 96, 64]),
    # Exactly the bucket's shape: scaled, nothing cut.
    ((192, 128), (64, 96), [128, 192, 0, 0, 64, 96]),
])
def test_an_image_is_scaled_to_cover_its_bucket_and_centre_cropped(size, target, ids):
    image = ramp_image(*size)
    pixels, time_ids = resize_and_crop(image, target, PreprocessSpec(resolution=64), index=0)
    assert time_ids.tolist() == ids
    check_crop_matches_ids(image, pixels, time_ids, target, flipped=False)


def test_a_flipped_random_crop_in_a_bucket_records_where_the_model_sees_it():
    image = ramp_image(400, 150)  # into 64 x 96: scaled to 171 x 64, 76 possible corners
    spec = PreprocessSpec(resolution=64, center_crop=False, random_flip=True, seed=2)
    plain = PreprocessSpec(resolution=64, center_crop=False, seed=2)
    flips = 0
    for index in range(12):
        pixels, time_ids = resize_and_crop(image, (64, 96), spec, index)
        base, base_ids = resize_and_crop(image, (64, 96), plain, index)
        flipped = not np.array_equal(pixels, base)
        flips += flipped
        if flipped:  # the same crop mirrored; its left edge counted from the other side
            np.testing.assert_array_equal(pixels, base[:, ::-1])
            assert time_ids[3] == 171 - base_ids[3] - 96
        check_crop_matches_ids(image, pixels, time_ids, (64, 96), flipped=flipped)
    assert 2 <= flips <= 10


def test_preparing_a_sample_picks_its_bucket(tmp_path):
    path = tmp_path / "wide.png"
    ramp_image(300, 200).save(path)
    raw = RawSample("wide.png", path, "a photo")
    spec = PreprocessSpec(resolution=64, buckets=((64, 64), (48, 80), (80, 48)))
    sample = prepare_sample(raw, 0, spec)
    # 3:2 is nearer 80/48 (log-distance 0.105) than the square (0.405)
    assert sample.pixels.shape == (48, 80, 3)
    assert sample.time_ids.tolist()[4:] == [48, 80]
    assert prepare_sample(raw, 0, PreprocessSpec(resolution=64)).pixels.shape == (64, 64, 3)  # no buckets: square
    with pytest.raises(BadInput, match="multiples of 8"):
        PreprocessSpec(resolution=64, buckets=((64, 60),))


# --------------------------------------------------------------------------------------------
# A cache with buckets, its loader and a run on it (the tests' tiny SDXL-shaped model: its VAE
# downsamples by 2, so the buckets below give latents of 8x8, 8x12 and 12x8).

BUCKETS = ("16x16", "24x16", "16x24")  # WIDTHxHEIGHT: square, landscape, portrait
IMAGES = {"square": ((32, 32), 6), "wide": ((48, 32), 5), "tall": ((30, 46), 3)}  # (width, height), count


def write_mixed_dataset(root: Path) -> Path:
    """An imagefolder of square, landscape and portrait images, each a colour of its own."""
    (root / "images").mkdir(parents=True)
    lines, rng = [], np.random.default_rng(0)
    for kind, ((width, height), count) in IMAGES.items():
        for i in range(count):
            name = f"images/{kind}{i}.png"
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
            lines.append(json.dumps({"file_name": name, "text": f"a {kind} picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def bucket_workspace(tmp_path_factory) -> Workspace:
    ws = make_workspace(tmp_path_factory.mktemp("buckets"))
    write_mixed_dataset(ws.root / "mixed")
    return ws


def bucket_config(ws: Workspace, run_dir: Path, *extra: str):
    return make_config(ws, run_dir, f"data.path={ws.root / 'mixed'}", f"data.cache_dir={ws.root / 'bucket-cache'}",
                       f"data.buckets=[{','.join(BUCKETS)}]", "data.crop=center",
                       "checkpoint.every_steps=2", *extra)


@pytest.fixture(scope="module")
def bucket_cache(bucket_workspace) -> LatentCache:
    cfg = bucket_config(bucket_workspace, bucket_workspace.root / "unused")
    return prepare.open_cache(cfg, bucket_workspace.base)


def test_a_cache_with_buckets_keeps_each_image_at_its_buckets_size(bucket_workspace, bucket_cache):
    manifest = bucket_cache.manifest
    assert [(b["size"], b["num_samples"]) for b in manifest["buckets"]] == [("16x16", 6), ("24x16", 5), ("16x24", 3)]
    cfg = bucket_config(bucket_workspace, bucket_workspace.root / "unused")
    # Asked again, the finished cache: nothing to do, and its report.
    report = prepare.prepare_cache(prepare.cache_dir(cfg), bucket_workspace.base, *prepare.specs_from_config(cfg),
                                   vae_path=cfg.model.vae, latent_source=cfg.data.latent_mode,
                                   shard_size=cfg.data.cache_shard_size, progress=False)
    assert report.already_done and "buckets (width x height: samples): 16x16: 6, 24x16: 5, 16x24: 3" in report.summary()
    assert [(b.size, len(b)) for b in bucket_cache.buckets] == [((16, 16), 6), ((16, 24), 5), ((24, 16), 3)]
    for bucket in bucket_cache.buckets:
        indices = np.arange(bucket.first, bucket.first + len(bucket))
        batch = bucket_cache.read_batch(indices)
        height, width = bucket.size
        assert batch["latents"].shape == (len(bucket), 4, height // 2, width // 2)
        # The micro-conditioning of each: source size, the centre crop's corner, the bucket.
        kind = bucket_cache.caption(int(indices[0])).split()[1]
        (source_w, source_h), _ = IMAGES[kind]
        scale = max(height / source_h, width / source_w)
        resized_h, resized_w = max(height, round(source_h * scale)), max(width, round(source_w * scale))
        expected = [source_h, source_w, round((resized_h - height) / 2), round((resized_w - width) / 2), height, width]
        assert batch["add_time_ids"].tolist() == [expected] * len(bucket)
        assert {bucket_cache.caption(int(i)).split()[1] for i in indices} == {kind}
        assert sorted(bucket_cache.key(int(i)) for i in indices) == sorted(f"images/{kind}{i}.png" for i in range(len(bucket)))
    with pytest.raises(ValueError, match="buckets"):  # a batch is of one size
        bucket_cache.read_batch([0, len(bucket_cache) - 1])


def test_each_step_takes_one_bucket_in_proportion_and_every_process_agrees(bucket_cache):
    steps, batch = 300, 4
    one = cache_lib.BucketBatches(bucket_cache.buckets, batch, seed=5, process_index=0, process_count=1)
    halves = [cache_lib.BucketBatches(bucket_cache.buckets, batch, seed=5, process_index=p, process_count=2) for p in (0, 1)]
    taken = collections.Counter()
    for step in range(steps):
        bucket = one.bucket_of(step)
        indices = one[step]
        assert len(indices) == batch and all(bucket.first <= i < bucket.first + len(bucket) for i in indices)
        # Two processes: the same bucket, each its half of the same global batch.
        assert [h.bucket_of(step).name for h in halves] == [bucket.name] * 2
        np.testing.assert_array_equal(np.concatenate([h[step] for h in halves]), indices)
        taken.update(indices.tolist())
    # Every sample trained as often as every other, give or take one batch of its bucket.
    for bucket in bucket_cache.buckets:
        counts = [taken[i] for i in range(bucket.first, bucket.first + len(bucket))]
        assert max(counts) - min(counts) <= math.ceil(batch / len(bucket)) + 1, (bucket.name, counts)
    per_sample = np.array([taken[i] for i in range(len(bucket_cache))]) / steps
    assert per_sample.min() > 0.5 * per_sample.max()  # in proportion to each bucket's size
    # Another seed, another sequence; a fresh object gives the same batches (nothing depends on history).
    other = cache_lib.BucketBatches(bucket_cache.buckets, batch, seed=6, process_index=0, process_count=1)
    assert [other.bucket_of(s).name for s in range(20)] != [one.bucket_of(s).name for s in range(20)]
    again = cache_lib.BucketBatches(bucket_cache.buckets, batch, seed=5, process_index=0, process_count=1)
    np.testing.assert_array_equal(again[250], one[250])


FIT = ("data.max_buckets=2",)


@pytest.fixture(scope="module")
def fitted_cache(bucket_workspace) -> LatentCache:
    cfg = bucket_config(bucket_workspace, bucket_workspace.root / "unused", *FIT,
                        f"data.cache_dir={bucket_workspace.root / 'fitted-cache'}")
    return prepare.open_cache(cfg, bucket_workspace.base)


def test_prepare_keeps_at_most_max_buckets_and_records_what_it_dropped(fitted_cache):
    # The 3 portraits' bucket goes: they join the square one (as `flax-train buckets` proposes).
    manifest = fitted_cache.manifest
    assert [(b["size"], b["num_samples"]) for b in manifest["buckets"]] == [("16x16", 9), ("24x16", 5), ("16x24", 0)]
    assert manifest["buckets_dropped"] == {"16x24": 3}
    assert manifest["settings"]["preprocess"]["max_buckets"] == 2
    square = next(b for b in fitted_cache.buckets if b.name == "16x16")
    batch = fitted_cache.read_batch(np.arange(square.first, square.first + len(square)))
    tall = [i for i in range(square.first, square.first + len(square)) if "tall" in fitted_cache.caption(i)]
    assert len(tall) == 3 and batch["latents"].shape[2:] == (8, 8)
    # Their micro-conditioning: the portrait's own size, cropped to the square.
    assert {tuple(batch["add_time_ids"][i - square.first][[0, 1, 4, 5]]) for i in tall} == {(46, 30, 16, 16)}


def test_two_processes_prepare_the_same_buckets(bucket_workspace, fitted_cache, tmp_path):
    """2 processes x 4 devices (each encoding step of one bucket, the same on both; each reading
    the sizes of its half of the images, both choosing the same buckets) write the samples one
    process does, in the same buckets."""
    source, preprocess = prepare.specs_from_config(bucket_config(bucket_workspace, tmp_path / "unused", *FIT))
    run_two_processes(tmp_path, tmp_path / "cache", bucket_workspace.base, source, preprocess)
    two = LatentCache(tmp_path / "cache")
    assert [(b.size, len(b)) for b in two.buckets] == [(b.size, len(b)) for b in fitted_cache.buckets]
    assert two.manifest["buckets_dropped"] == fitted_cache.manifest["buckets_dropped"]
    bucket_cache = fitted_cache
    one = {bucket_cache.key(i): bucket_cache[i] for i in range(len(bucket_cache))}
    for i in range(len(two)):
        for name, value in two[i].items():  # as in test_data_prepare: only the batch split differs
            assert_close_in_float32(value, one[two.key(i)][name], f"{two.key(i)} {name}")


def test_a_run_with_buckets_compiles_a_step_per_bucket_and_resumes_bit_exactly(bucket_workspace, tmp_path, caplog,
                                                                               monkeypatch):
    # Two buckets (the portraits join the square one): a compile each, as few as shows it.
    two = ("data.buckets=[16x16,24x16]", f"data.cache_dir={bucket_workspace.root / 'two-buckets'}")
    full_cfg = bucket_config(bucket_workspace, tmp_path / "full", *two, "validation.every_steps=4",
                             "validation.num_steps=2", "validation.sizes=[24x16,16x24]")
    with caplog.at_level(logging.INFO, logger="flax_train"):
        full = train.train(full_cfg)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step compiled")]
    assert len(compiled) == 2 and all(f"({k} of 2)" in line for k, line in enumerate(compiled, 1)), compiled
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {(row["image_height"], row["image_width"]) for row in rows} <= {(16, 16), (16, 24)}
    assert all(np.isfinite(full.losses))
    # A validation grid per size asked for: the demo config's two prompts side by side.
    for name, (width, height) in {"24x16": (24, 16), "16x24": (16, 24)}.items():
        with Image.open(tmp_path / "full" / "samples" / f"step_0000004_{name}.png") as grid:
            assert grid.size == (2 * width, height)

    # A preemption notice at step 2, a step that also saves a checkpoint, then the rerun: the same
    # losses and state (parameters, optimizer state, EMA, step, RNG key, the buckets' order) as
    # without a stop.
    cfg = bucket_config(bucket_workspace, tmp_path / "resumed", *two)
    monkeypatch.setattr(checkpoint.PreemptionGuard, "stop", lambda self, step: step == 2)
    first = train.train(cfg)
    monkeypatch.undo()
    assert first.stopped_by_preemption and first.step == 2 and first.export_dir is None
    assert first.losses == full.losses[:2]
    resumed = train.train(cfg)
    assert resumed.step == 4 and not resumed.stopped_by_preemption
    assert resumed.losses == full.losses[2:]
    assert_trees_equal(train.restore_checkpoint(cfg)[1], train.restore_checkpoint(full_cfg)[1])


def test_flax_train_buckets_counts_what_prepare_makes_and_proposes_fewer(bucket_workspace, bucket_cache, tmp_path, capsys):
    args = ["buckets", "--config", str(DEMO_CONFIG),
            *overrides(bucket_workspace, tmp_path, f"data.path={bucket_workspace.root / 'mixed'}", f"data.buckets=[{','.join(BUCKETS)}]")]
    assert cli.main([*args, "--min-images", "1"]) == 0
    out = capsys.readouterr().out
    # From the headers alone, the counts the prepared cache holds (16x24 portraits listed last).
    counted = [line.split()[:2] for line in out.splitlines() if line.startswith("  ")]
    assert counted == [[b["size"], str(b["num_samples"])] for b in bucket_cache.manifest["buckets"]]
    assert out.rstrip().endswith("train with: data.buckets=[16x16,24x16,16x24]")
    # At most 2: the 3 portraits (46/30, log-distance 0.43 to the square, 0.83 to 24x16) join the square.
    assert cli.main([*args, "--min-images", "1", "--max-buckets", "2"]) == 0
    out = capsys.readouterr().out
    assert "kept 2" in out and "   16x16         9" in out and out.rstrip().endswith("data.buckets=[16x16,24x16]")
    # By default each must fill a global batch (8): only the square is left.
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "fewer than a global batch" in out and out.rstrip().endswith("data.buckets=[16x16]")
    assert cli.main([*args, "--max-buckets", "0"]) == 2  # one line, not a traceback


def test_a_header_gives_the_upright_size_prepare_sees(tmp_path):
    # Stored 48 wide and 32 high, with EXIF orientation 6 (turned a quarter): upright it is a portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(path, exif=exif)
    assert survey.upright_size(path, max_pixels=10_000) == (48, 32)
    sample = prepare_sample(RawSample("turned.jpg", path, "x"), 0, PreprocessSpec(resolution=16))
    assert sample.time_ids.tolist()[:2] == [48, 32]  # prepare's original size: the same
    assert survey.upright_size(path, max_pixels=1000) is None  # over the limit: prepare skips it
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert survey.upright_size(tmp_path / "broken.png", max_pixels=10_000) is None


def test_flax_train_sample_draws_any_size(bucket_workspace, tmp_path):
    out = tmp_path / "samples"
    assert cli.main(["sample", "--model", str(bucket_workspace.base), "--prompt", "a wide picture", "--steps", "2",
                     "--size", "24x16", "--out", str(out)]) == 0
    with Image.open(out / "0000.png") as png:
        assert png.size == (24, 16) and "Size: 24x16" in png.text["parameters"]
    with pytest.raises(SystemExit):  # argparse: a size must be WIDTHxHEIGHT
        cli.main(["sample", "--model", str(bucket_workspace.base), "--prompt", "x", "--size", "24", "--out", str(out)])
    assert cli.main(["sample", "--model", str(bucket_workspace.base), "--prompt", "x", "--size", "25x16",
                     "--out", str(out)]) == 2  # not a multiple of the VAE's factor: one line, exit 2
