"""xla-infer command line, on plain torch (the device code path is covered by test_xla_device.py)."""
import json

import pytest
from PIL import Image

from flax_train.demo.tiny import save_tiny_pipeline
from xla_infer.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_cli") / "sdxl", seed=0)


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
    assert png.text["negative_prompt"] == "blurry" and json.loads(png.text["parameters"])["steps"] == 2
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
        ("empty_prompt_file", "is empty"),
        ("non_utf8_line", "line 2: not valid UTF-8"),
        ("unknown_scheduler", "unknown scheduler 'heun'"),
        ("missing_prompt_file", "cannot read prompt file"),
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
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse reports usage errors by exiting
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert not out.exists()
