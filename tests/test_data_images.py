"""Preprocessing records the original size and the crop corner that produced the pixels; bad inputs are skipped."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from flax_train.data.images import (
    PreprocessSpec,
    SkippedSample,
    decode_image,
    pick_caption,
    prepare_sample,
    resize_and_crop,
)
from flax_train.data.images import CaptionTxtSource, HFSource, ImageFolderSource, RawSample


def ramp_image(width: int, height: int) -> Image.Image:
    """Red rises left to right, green top to bottom: a pixel's colour says where it came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def source_x(red: np.ndarray, width: int) -> np.ndarray:
    return red.astype(np.float64) / 255 * (width - 1)


def check_crop_matches_ids(image: Image.Image, pixels: np.ndarray, time_ids: np.ndarray, target: tuple[int, int],
                           flipped: bool):
    """The pixels at the crop's centre column/row come from where the recorded corner says."""
    orig_h, orig_w, top, left, target_h, target_w = time_ids.tolist()
    assert (orig_h, orig_w) == (image.height, image.width)
    assert (target_h, target_w) == target and pixels.shape == (*target, 3)
    scale = max(target_h / orig_h, target_w / orig_w)  # the resize that covers the target
    resized_w = max(target_w, round(orig_w * scale))
    unflipped_left = resized_w - left - target_w if flipped else left
    row, mid = target_h // 2, target_w // 2
    column = mid if not flipped else target_w - 1 - mid
    expected_x = (unflipped_left + column + 0.5) / scale - 0.5  # pixel centres, as in resampling
    measured_x = source_x(pixels[row, mid, 0], orig_w)
    assert abs(measured_x - expected_x) < 1.5 / scale + 1.0, (measured_x, expected_x, time_ids)
    expected_y = (top + row + 0.5) / scale - 0.5
    measured_y = source_x(pixels[row, mid, 1], orig_h)
    assert abs(measured_y - expected_y) < 1.5 / scale + 1.0, (measured_y, expected_y, time_ids)
    # A flip shows red falling left to right.
    assert (pixels[row, -4, 0] < pixels[row, 3, 0]) == flipped


@pytest.mark.parametrize("size", [(200, 100), (100, 200), (64, 64), (40, 30)])
def test_center_crop_records_original_size_and_corner(size):
    image = ramp_image(*size)
    spec = PreprocessSpec(resolution=64, center_crop=True)
    pixels, time_ids = resize_and_crop(image, (64, 64), spec, index=0)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    width, height = size
    scale = 64 / min(width, height)
    resized = (max(64, round(width * scale)), max(64, round(height * scale)))
    assert time_ids.tolist() == [height, width, (resized[1] - 64) // 2, (resized[0] - 64) // 2, 64, 64]
    check_crop_matches_ids(image, pixels, time_ids, (64, 64), flipped=False)


def test_random_crop_corner_is_recorded_and_deterministic():
    image = ramp_image(300, 120)  # resized to 160 x 64: 97 possible corners
    spec = PreprocessSpec(resolution=64, center_crop=False, seed=3)
    corners = set()
    for index in range(12):
        pixels, time_ids = resize_and_crop(image, (64, 64), spec, index)
        assert time_ids[2] == 0 and 0 <= time_ids[3] <= 160 - 64
        check_crop_matches_ids(image, pixels, time_ids, (64, 64), flipped=False)
        again, again_ids = resize_and_crop(image, (64, 64), spec, index)
        np.testing.assert_array_equal(again, pixels)
        np.testing.assert_array_equal(again_ids, time_ids)
        corners.add(int(time_ids[3]))
    assert len(corners) > 6  # corners differ between samples
    other_seed = [int(resize_and_crop(image, (64, 64), PreprocessSpec(64, False, seed=4), i)[1][3]) for i in range(12)]
    assert other_seed != [int(resize_and_crop(image, (64, 64), spec, i)[1][3]) for i in range(12)]


@pytest.mark.parametrize("center_crop", [True, False])
def test_flip_mirrors_pixels_and_the_recorded_corner(center_crop):
    image = ramp_image(250, 100)  # resized to 160 x 64
    flipping = PreprocessSpec(resolution=64, center_crop=center_crop, random_flip=True, seed=1)
    plain = PreprocessSpec(resolution=64, center_crop=center_crop, random_flip=False, seed=1)
    flips = 0
    for index in range(16):
        pixels, time_ids = resize_and_crop(image, (64, 64), flipping, index)
        base_pixels, base_ids = resize_and_crop(image, (64, 64), plain, index)
        flipped = not np.array_equal(pixels, base_pixels)
        if flipped:
            flips += 1
            # Same crop, mirrored; its left edge measured from the mirrored side.
            np.testing.assert_array_equal(pixels, base_pixels[:, ::-1])
            assert time_ids[3] == 160 - base_ids[3] - 64
            assert time_ids[2] == base_ids[2]
        else:
            np.testing.assert_array_equal(time_ids, base_ids)
        check_crop_matches_ids(image, pixels, time_ids, (64, 64), flipped=flipped)
    assert 3 <= flips <= 13


def test_original_size_follows_exif_orientation(tmp_path):
    image = ramp_image(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    sample = prepare_sample(RawSample("rotated.jpg", path, "a photo"), 0, PreprocessSpec(resolution=64))
    assert sample.time_ids[:2].tolist() == [120, 80]  # height, width as displayed


def test_transparent_pixels_are_shown_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), max_pixels=1000)
    assert decoded.mode == "RGB"
    assert np.asarray(decoded)[0, 0].tolist() == [255, 255, 255]


def encoded(width: int, height: int, format: str) -> bytes:
    # Noise does not compress, so cutting the file in half cuts into the pixel data.
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=format)
    return buffer.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    return encoded(width, height, "PNG")


@pytest.mark.parametrize(
    "data, reason",
    [
        (png_bytes(64, 64)[: len(png_bytes(64, 64)) // 2], "truncated image"),
        (encoded(64, 64, "JPEG")[: len(encoded(64, 64, "JPEG")) // 2], "truncated image"),
        (b"this is not an image", "unreadable image"),
        (b"", "unreadable image"),
        (png_bytes(100, 100), "image too large"),
    ],
    ids=["truncated-png", "truncated-jpeg", "text", "empty", "oversized"],
)
def test_bad_images_are_skipped_with_a_reason(data, reason):
    with pytest.raises(SkippedSample) as info:
        prepare_sample(RawSample("bad", data, "a caption"), 0, PreprocessSpec(resolution=64, max_pixels=90 * 90))
    assert info.value.reason == reason


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(SkippedSample) as info:
        decode_image(tmp_path / "nope.png", max_pixels=10**6)
    assert info.value.reason == "unreadable image"


@pytest.mark.parametrize("caption", ["", "   ", None, [], ["", " "], 7])
def test_empty_captions_are_skipped(caption):
    with pytest.raises(SkippedSample) as info:
        prepare_sample(RawSample("x", png_bytes(64, 64), caption), 0, PreprocessSpec(resolution=64))
    assert info.value.reason == "empty caption"


def test_list_captions_pick_one_per_sample_with_the_seed():
    captions = ["one", "two", "three", "four"]
    picks = [pick_caption(captions, seed=0, index=i) for i in range(40)]
    assert set(picks) == set(captions)
    assert picks == [pick_caption(captions, seed=0, index=i) for i in range(40)]
    assert picks != [pick_caption(captions, seed=1, index=i) for i in range(40)]
    assert pick_caption(["", " only "], seed=0, index=0) == "only"


def write_png(path, width=64, height=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp_image(width, height).save(path)


def test_imagefolder_rejects_paths_outside_the_folder(tmp_path):
    root = tmp_path / "data"
    write_png(root / "a.png")
    write_png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    rows = [
        {"file_name": "a.png", "text": "inside"},
        {"file_name": "../secret.png", "text": "escapes"},
        {"file_name": str(tmp_path / "secret.png"), "text": "absolute"},
        {"file_name": "link.png", "text": "symlink out"},
        {"text": "no file name"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    source = ImageFolderSource(root)
    assert len(source) == 1 and source[0].caption == "inside" and source[0].key == "a.png"
    reasons = [reason for _, reason in source.rejected]
    assert reasons.count("path outside dataset folder") == 3
    assert sum(r.startswith("bad metadata line") for r in reasons) == 2


def test_captions_txt_source(tmp_path):
    write_png(tmp_path / "b" / "cat.png")
    (tmp_path / "b" / "cat.txt").write_text("a cat\n")
    write_png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a dog")
    write_png(tmp_path / "uncaptioned.png")
    source = CaptionTxtSource(tmp_path)
    assert [source[i].key for i in range(len(source))] == ["a.png", "b/cat.png"]
    assert source[1].caption == "a cat\n"
    assert prepare_sample(source[1], 1, PreprocessSpec(resolution=64)).caption == "a cat"
    assert source.rejected == [("uncaptioned.png", "missing caption file")]


def test_hf_source_reads_encoded_images_and_list_captions():
    import datasets

    rows = {"image": [{"bytes": png_bytes(80, 64), "path": None}, {"bytes": b"broken", "path": None}],
            "caption": [["first", "second"], ["x"]]}
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}))
    source = HFSource(dataset, image_column="image", caption_column="caption")
    sample = prepare_sample(source[0], 0, PreprocessSpec(resolution=64))
    assert sample.caption in ("first", "second") and sample.time_ids[:2].tolist() == [64, 80]
    with pytest.raises(SkippedSample, match="unreadable image"):
        prepare_sample(source[1], 1, PreprocessSpec(resolution=64))
    with pytest.raises(ValueError, match="no column 'text'"):
        HFSource(dataset, caption_column="text")


def test_hf_source_spec_loads_a_local_dataset_folder(tmp_path):
    import datasets

    from flax_train.data.images import SourceSpec, open_source

    features = datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")})
    rows = {"picture": [{"bytes": png_bytes(64, 70), "path": None}] * 3, "prompt": ["a", "b", "c"]}
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    spec = SourceSpec("hf", str(tmp_path), image_column="picture", caption_column="prompt")
    source = open_source(spec)
    assert len(source) == 3 and source[2].caption == "c"
    assert prepare_sample(source[1], 1, PreprocessSpec(resolution=64)).time_ids[:2].tolist() == [70, 64]
