"""xla-infer command line, on plain torch (the device code path is covered by test_xla_device.py)."""
import json

import pytest
from PIL import Image

from flax_train.demo.tiny import save_tiny_pipeline
from xla_infer.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_cli") / "sdxl", seed=0)


def exit_code_and_stderr(args, capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse reports usage errors by exiting
        code = exit_.code
    return code, capsys.readouterr().err


def cpu_args(folder, out, *extra):
    return ["--model", str(folder), "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--out", str(out), *extra]


def test_generates_pngs_with_parameters_and_a_manifest(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  ünïcødé 日本語  \r\na blue square\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(cpu_args(folder, out, "--prompts", str(prompts), "--batch-size", "2", "--seed", "40",
                         "--negative-prompt", "blurry", "--scheduler", "dpmpp_2m"))
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [e["prompt"] for e in manifest["images"]] == ["a red circle", "ünïcødé 日本語", "a blue square"]
    assert [e["seed"] for e in manifest["images"]] == [40, 41, 42]
    assert manifest["pipeline"]["scheduler"] == "dpmpp_2m" and manifest["pipeline"]["batch_size"] == 2
    assert manifest["timing"]["images_per_second"] > 0 and manifest["timing"]["compilations_after_warmup"] == 0
    png = Image.open(out / "00001.png")
    assert png.size == (64, 64)
    assert png.text["prompt"] == "ünïcødé 日本語" and png.text["seed"] == "41"
    assert png.text["negative_prompt"] == "blurry"
    # The web UIs' "PNG info" layout: prompt, negative prompt, then the settings on one line.
    assert png.text["parameters"].startswith(
        "ünïcødé 日本語\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 5.0, Seed: 41, Size: 64x64, Model: ")
    err = capsys.readouterr().err
    assert "s/image steady" in err and "images/s" in err and "warm-up" in err


def test_single_prompt_with_num_images(folder, tmp_path):
    out = tmp_path / "out"
    assert main(cpu_args(folder, out, "--prompt", "a cat", "--num-images", "3", "--batch-size", "2")) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]


def bad_prompt_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("fine line\ncaf\xe9 au lait\n".encode("latin-1"))
    return empty, latin1


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_folder", "does not exist"),
        ("missing_component", "missing text_encoder_2"),
        ("bad_width", "width 65 is not a positive multiple of the VAE factor 2"),
        ("zero_steps", "--steps: must be positive"),
        ("empty_prompt_file", "no prompts (the file is empty)"),
        ("non_utf8_line", "latin1.txt:2: not UTF-8"),
        ("unknown_scheduler", "unknown scheduler 'heun'"),
        ("missing_prompt_file", "no such prompt file"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_traceback(folder, tmp_path, capsys, case, expected):
    import shutil

    out = tmp_path / "out"
    empty, latin1 = bad_prompt_files(tmp_path)
    args = {
        "missing_folder": cpu_args(tmp_path / "nowhere", out, "--prompt", "x"),
        "missing_component": None,
        "bad_width": cpu_args(folder, out, "--prompt", "x", "--width", "65"),
        "zero_steps": ["--model", str(folder), "--prompt", "x", "--steps", "0", "--out", str(out)],
        "empty_prompt_file": cpu_args(folder, out, "--prompts", str(empty)),
        "non_utf8_line": cpu_args(folder, out, "--prompts", str(latin1)),
        "unknown_scheduler": cpu_args(folder, out, "--prompt", "x", "--scheduler", "heun"),
        "missing_prompt_file": cpu_args(folder, out, "--prompts", str(tmp_path / "none.txt")),
    }[case]
    if case == "missing_component":
        broken = tmp_path / "broken"
        shutil.copytree(folder, broken)
        shutil.rmtree(broken / "text_encoder_2")
        args = cpu_args(broken, out, "--prompt", "x")
    code, err = exit_code_and_stderr(args, capsys)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert not out.exists()


def test_image_to_image_with_prompt_2(folder, tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(source)
    out = tmp_path / "out"
    code = main(cpu_args(folder, out, "--prompt", "a red circle", "--prompt-2", "a blue square",
                         "--negative-prompt", "blurry", "--negative-prompt-2", "dark", "--image", str(source),
                         "--strength", "0.5", "--steps", "4"))
    assert code == 0
    png = Image.open(out / "00000.png")
    assert png.size == (64, 48)  # the image's size, with no --width/--height
    assert png.text["prompt_2"] == "a blue square" and png.text["negative_prompt_2"] == "dark"
    assert png.text["image"] == str(source) and png.text["strength"] == "0.5"
    assert png.text["denoising_steps"] == "2"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["timing"]["compilations_after_warmup"] == 0


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not_an_image", "cannot read --image"),
        ("missing", "cannot read --image"),
        ("odd_size", "is 65x64 pixels: width 65 is not a positive multiple of the VAE factor 2"),
        ("other_size", "is 64x48 pixels, but --width/--height ask for 64x64"),
        ("strength_without_image", "--strength needs --image"),
        ("strength_of_no_step", "strength 0.25 of 2 steps runs no denoising step"),
        ("strength_above_one", "--strength: must be in (0, 1]"),
    ],
)
def test_bad_image_exits_2_with_one_line_before_loading(folder, tmp_path, capsys, monkeypatch, case, expected):
    from diffusers import UNet2DConditionModel

    def no_loading(*args, **kwargs):  # a bad image must be refused before any weights are loaded or compiled
        raise AssertionError("the UNet was loaded")

    paths = {"not_an_image": tmp_path / "notes.png", "missing": tmp_path / "none.png",
             "odd_size": tmp_path / "odd.png", "other_size": tmp_path / "small.png"}
    paths["not_an_image"].write_text("not a PNG", encoding="utf-8")
    Image.new("RGB", (65, 64)).save(paths["odd_size"])
    Image.new("RGB", (64, 48)).save(paths["other_size"])
    out = tmp_path / "out"
    image = ["--image", str(paths.get(case, paths["other_size"]))]
    extra = {"other_size": ["--width", "64", "--height", "64"], "strength_without_image": ["--strength", "0.5"],
             "strength_of_no_step": ["--strength", "0.25"], "strength_above_one": ["--strength", "1.5"]}
    args = cpu_args(folder, out, "--prompt", "x", *extra.get(case, ["--strength", "1"]),
                    *([] if case == "strength_without_image" else image))
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    code, err = exit_code_and_stderr(args, capsys)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists()


def test_inpainting_and_base_plus_refiner(folder, tmp_path):
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(source)
    mask_image = Image.new("L", (64, 48), 0)
    mask_image.paste(255, (16, 8, 48, 40))
    mask_image.save(mask)
    out = tmp_path / "inpainted"
    code = main(cpu_args(folder, out, "--prompt", "a blue square", "--image", str(source), "--mask", str(mask),
                         "--mask-blur", "3", "--steps", "4"))
    assert code == 0
    png = Image.open(out / "00000.png")
    assert png.size == (64, 48) and png.text["mask"] == str(mask) and png.text["mask_blur"] == "3.0"
    # diffusers' inpainting defaults: strength 0.9999 (3 of the 4 steps run), guidance 7.5
    assert png.text["strength"] == "0.9999" and png.text["denoising_steps"] == "3"
    assert png.text["guidance_scale"] == "7.5"
    assert json.loads((out / "manifest.json").read_text())["timing"]["compilations_after_warmup"] == 0

    refiner = save_tiny_pipeline(tmp_path / "refiner", seed=4, kind="refiner", layers_per_block=1,
                                 transformer_layers_per_block=(1, 1))
    out = tmp_path / "refined"
    code = main(cpu_args(folder, out, "--prompt", "a red circle", "--refiner", str(refiner), "--high-noise-frac",
                         "0.5", "--steps", "4"))
    assert code == 0
    png = Image.open(out / "00000.png")
    assert png.text["refiner"] == str(refiner) and png.text["high_noise_frac"] == "0.5"
    assert (png.text["base_steps"], png.text["refiner_steps"]) == ("2", "2")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("mask_not_an_image", "cannot read --mask"),
        ("mask_missing", "cannot read --mask"),
        ("mask_other_size", "--mask {mask} is 64x48 pixels, but --image {image} is 64x64"),
        ("mask_without_image", "--mask needs --image"),
        ("blur_without_mask", "--mask-blur needs --mask"),
        ("frac_without_refiner", "--high-noise-frac needs --refiner"),
        ("refiner_with_image", "--refiner is for text-to-image"),
        ("frac_of_one", "--high-noise-frac: must be in (0, 1)"),
    ],
)
def test_bad_mask_or_refiner_exits_2_with_one_line_before_loading(folder, tmp_path, capsys, monkeypatch, case,
                                                                  expected):
    from diffusers import UNet2DConditionModel

    def no_loading(*args, **kwargs):  # refused before any weights are loaded or compiled
        raise AssertionError("the UNet was loaded")

    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64)).save(image)
    if case == "mask_not_an_image":
        mask.write_text("not a PNG", encoding="utf-8")
    elif case != "mask_missing":
        Image.new("L", (64, 48) if case == "mask_other_size" else (64, 64)).save(mask)
    out = tmp_path / "out"
    with_image = ["--image", str(image)]
    extra = {
        "mask_without_image": ["--mask", str(mask)],
        "blur_without_mask": [*with_image, "--mask-blur", "4"],
        "frac_without_refiner": ["--high-noise-frac", "0.5"],
        "refiner_with_image": [*with_image, "--refiner", str(folder)],
        "frac_of_one": ["--refiner", str(folder), "--high-noise-frac", "1"],
    }.get(case, [*with_image, "--mask", str(mask)])
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    code, err = exit_code_and_stderr(cpu_args(folder, out, "--prompt", "x", *extra), capsys)
    assert code == 2
    assert expected.format(mask=mask, image=image) in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists()


def test_every_prompt_at_every_size_asked_for(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = exit_code_and_stderr(cpu_args(folder, out, "--prompt", "a red circle", "--size", "80x48",
                                              "--size", "48x80"), capsys)
    assert code == 0, err
    assert "compiled for 80x48, 48x80" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"]["sizes"] == ["80x48", "48x80"]
    assert [e["file"] for e in manifest["images"]] == ["00000_80x48.png", "00000_48x80.png"]
    for name, size in (("00000_80x48.png", (80, 48)), ("00000_48x80.png", (48, 80))):
        with Image.open(out / name) as png:
            assert png.size == size and f"Size: {size[0]}x{size[1]}" in png.text["parameters"]
    code, err = exit_code_and_stderr(cpu_args(folder, out, "--prompt", "x", "--size", "80x48", "--width", "64"),
                                     capsys)
    assert code == 2 and "--size is for text-to-image" in err
    code, err = exit_code_and_stderr(cpu_args(folder, out, "--prompt", "x", "--size", "81x48"), capsys)
    assert code == 2 and "81" in err  # not a multiple of the VAE's factor: one line, before loading


def test_a_prompt_file_that_names_sizes_draws_each_prompt_at_its_own(folder, tmp_path, capsys):
    prompts = tmp_path / "sized.txt"
    prompts.write_text("80x48: a red circle\n48x80 : a blue square\n\n80X48:a green triangle\n", encoding="utf-8")
    out = tmp_path / "out"
    code, err = exit_code_and_stderr(cpu_args(folder, out, "--prompts", str(prompts), "--seed", "7",
                                              "--batch-size", "2"), capsys)
    assert code == 0, err
    assert "compiled for 80x48, 48x80" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timing"]["compilations_after_warmup"] == 0
    # Each prompt once, at its size, with the seed and number of its place in the file.
    drawn = {e["file"]: (e["prompt"], e["seed"]) for e in manifest["images"]}
    assert drawn == {"00000_80x48.png": ("a red circle", 7), "00002_80x48.png": ("a green triangle", 9),
                     "00001_48x80.png": ("a blue square", 8)}
    for name in drawn:
        with Image.open(out / name) as png:
            assert f"{png.width}x{png.height}" == name[6:11]

    # Sizes on some lines only, a size with no prompt, or with --size / --width: one line, exit 2.
    for text, extra, expected in (
        ("80x48: a\nb\n", [], "sized.txt:2: the first prompt names a size, this one none"),
        ("a\n80x48: b\n", [], "sized.txt:2: the first prompt names none, this one does"),
        ("80x48:\n", [], "sized.txt:1: a size with no prompt after it"),
        ("0x48: a\n", [], "sized.txt:1: 0x48: width and height must be positive"),
        ("80x48: a\n", ["--size", "48x80"], "names a size for each prompt: --size would add others"),
        ("80x48: a\n", ["--width", "64"], "naming sizes is for text-to-image"),
        ("81x48: a\n", [], "81"),  # not a multiple of the VAE's factor
    ):
        prompts.write_text(text, encoding="utf-8")
        code, err = exit_code_and_stderr(cpu_args(folder, out, "--prompts", str(prompts), *extra), capsys)
        assert code == 2 and expected in err.strip().splitlines()[-1] and "Traceback" not in err, (text, err)


def test_weighted_long_prompt_in_two_chunks(folder, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    prompt = "a (red circle:1.3) BREAK [blue] " + "square " * 100  # the second chunk: 101 tokens, 75 kept
    code, err = exit_code_and_stderr(cpu_args(folder, out, "--prompt", prompt, "--negative-prompt", "(blurry)",
                                              "--prompt-weighting", "a1111", "--max-text-chunks", "2"), capsys)
    assert code == 0, err
    assert "prompt 0 is longer than 2 chunks of 75 tokens: the last 26 token(s) were dropped" in caplog.text
    png = Image.open(out / "00000.png")
    assert png.text["prompt"] == prompt and png.text["negative_prompt"] == "(blurry)"  # as written
    assert png.text["prompt_weighting"] == "a1111" and png.text["max_text_chunks"] == "2"
    assert png.text["parameters"].startswith(prompt + "\nNegative prompt: (blurry)\n")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["pipeline"]["max_text_chunks"] == 2 and manifest["pipeline"]["prompt_weighting"] == "a1111"
    assert manifest["images"][0]["tokens_dropped"] == 26 and manifest["timing"]["compilations_after_warmup"] == 0


@pytest.mark.parametrize("args, expected", [
    (["--prompt", "a (red circle:1.x)", "--prompt-weighting", "a1111"],
     "prompt 0: character 15 ('a (red circle:1.x)'): the weight '1.x' is not a number"),
    (["--prompt", "a cat", "--negative-prompt", "(blurry", "--prompt-weighting", "compel"],
     "--negative-prompt: character 1 ('(blurry'): '(' is never closed"),
    (["--prompt", "a cat", "--prompt-weighting", "comfy"], "--prompt-weighting: invalid choice: 'comfy'"),
    (["--prompt", "a cat", "--max-text-chunks", "0"], "--max-text-chunks: must be positive"),
])
def test_bad_prompt_syntax_exits_2_with_one_line_before_loading(folder, tmp_path, capsys, monkeypatch, args, expected):
    from diffusers import UNet2DConditionModel

    def no_loading(*args, **kwargs):
        raise AssertionError("the UNet was loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    out = tmp_path / "out"
    code, err = exit_code_and_stderr(cpu_args(folder, out, *args), capsys)
    assert code == 2 and expected in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists()
