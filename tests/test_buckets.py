"""Aspect-ratio buckets (sdxl_common/buckets.py): SDXL's list, which bucket an image joins, how the
rarest are merged, and the crop and micro-conditioning of an image in a bucket, worked by hand."""

import numpy as np
import pytest

from flax_train.data.images import PreprocessSpec, RawSample, prepare_sample, resize_and_crop
from sdxl_common import buckets
from sdxl_common.errors import BadInput
from test_data_images import check_crop_matches_ids, ramp_image


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


def test_the_rarest_buckets_merge_into_their_nearest_neighbour():
    counts = {(1024, 1024): 10, (832, 1216): 5, (768, 1344): 1, (1216, 832): 4}
    # At most 3 buckets: 768x1344 (1 image) joins 832x1216, the nearest aspect ratio.
    assert buckets.merge_rarest(counts, max_buckets=3) == {
        (1024, 1024): (1024, 1024), (832, 1216): (832, 1216), (768, 1344): (832, 1216), (1216, 832): (1216, 832)}
    # A bucket must also fill a batch of 5: 1216x832 (4) then joins the square, nearer than 832x1216.
    assert buckets.merge_rarest(counts, max_buckets=3, min_count=5) == {
        (1024, 1024): (1024, 1024), (832, 1216): (832, 1216), (768, 1344): (832, 1216), (1216, 832): (1024, 1024)}
    # Nothing to merge; and never below one bucket, however few its images.
    assert buckets.merge_rarest(counts) == {b: b for b in counts}
    assert set(buckets.merge_rarest(counts, min_count=100).values()) == {(1024, 1024)}


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
