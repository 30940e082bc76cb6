"""LoRA in xla_infer: merged into the weights on the device, outside the compiled graphs.

The LoRA files are made with peft and diffusers alone (random factors, `save_lora_weights`), and
the reference images come from diffusers' StableDiffusionXLPipeline with the same files loaded
and fused at the same scales. On torch_xla, loading, swapping and rescaling LoRAs between prompts
compiles no generation graph, and `set_loras([])` gives back the loaded weights bit for bit.
"""
import json

import numpy as np
import pytest

from sdxl_common import lora_files
from flax_train.demo.tiny import save_tiny_pipeline
from lora_support import make_lora
from test_xla_cli import cpu_args, exit_code_and_stderr
from test_xla_device import SMALL
from test_xla_pipeline import NEGATIVES, PROMPTS, SEEDS, diffusers_images
from xla_infer import InputError, Pipeline
from xla_infer.cli import main

pytestmark = pytest.mark.xdist_group("xla_lora")

STEPS = 2
SIZE = 32
# XLA's CPU kernels differ from ATen's in summation order; fp32 results agree to ~1e-6 (as in
# test_xla_device.py and test_xla_modes.py).
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xla_lora") / "sdxl", seed=0, image_size=SIZE, **SMALL)


@pytest.fixture(scope="module")
def loras(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        # Attention projections, alpha != rank, read from the metadata; a folder.
        "a": make_lora(folder, root / "a", seed=1,
                       unet=dict(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])),
        # Convolutions (3x3 and the 1x1 shortcut), the GEGLU projection and proj_in, without
        # metadata: alpha = rank, as diffusers assumes; a file.
        "b": make_lora(folder, root / "b", seed=2, metadata=False,
                       unet=dict(r=2, lora_alpha=2, target_modules=["conv1", "conv2", "conv_shortcut",
                                                                    "ff.net.0.proj", "proj_in"]))
        / "pytorch_lora_weights.safetensors",
        # Overlaps A on to_k / to_v, with an alpha_pattern, and both text encoders.
        "c": make_lora(folder, root / "c", seed=3,
                       unet=dict(r=3, lora_alpha=6, target_modules=["to_k", "to_v", "ff.net.2"],
                                 alpha_pattern={"attn2.to_k": 1.5}),
                       text=dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "fc1"])),
    }


def diffusers_with(folder, pipe, combo):
    """diffusers' images with the LoRAs of `combo` loaded, set to their scales and fused."""
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    if combo:
        names = [f"lora{i}" for i in range(len(combo))]
        for name, (path, _) in zip(names, combo):
            reference.load_lora_weights(path, adapter_name=name)
        reference.set_adapters(names, adapter_weights=[scale for _, scale in combo])
        reference.fuse_lora(adapter_names=names)
        reference.unload_lora_weights()  # keeps the fused weights
    return diffusers_images(reference, pipe, PROMPTS, NEGATIVES, SEEDS)


def host_weights(pipe) -> dict[str, np.ndarray]:
    return {f"{name}.{key}": value.cpu().numpy().copy()
            for name in ("unet", "text_encoder", "text_encoder_2")
            for key, value in getattr(pipe, name).state_dict().items()}


def test_swapping_and_rescaling_loras_compiles_nothing_and_matches_diffusers(folder, loras):
    pipe = Pipeline.from_pretrained(folder, device="xla", dtype="fp32", batch_size=2, steps=STEPS, scheduler="euler",
                                    loras=[(loras["a"], 1.0)])
    loaded = host_weights(pipe)
    assert pipe.merged_loras.loaded
    for key, (_, base) in pipe.merged_loras.loaded.items():  # the loaded weights LoRA A was merged into
        assert not np.array_equal(loaded[key + ".weight"], base.cpu().numpy())
        loaded[key + ".weight"] = base.cpu().numpy().copy()
    pipe.warmup()
    # Text encode, denoise step, decode (fewer when an earlier test in this process compiled the
    # same graph: torch_xla keeps its compiled graphs); merging counts apart.
    warm = pipe.compile_count
    assert 1 <= warm <= 3
    assert pipe.lora_compile_count > 0

    def generate():
        return pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")

    a, b, c = loras["a"], loras["b"], loras["c"]
    combos = [
        [(a, 1.0)],
        [(b, 1.0)],
        [(a, 0.5), (c, 0.8)],
        [(a, -0.4), (c, 1.3)],  # rescaled: the merge graphs of the line above, nothing new
    ]
    images = []
    merge_compiles = None
    for i, combo in enumerate(combos):
        if i:
            pipe.set_loras(combo)
        if i == 3:
            assert pipe.lora_compile_count == merge_compiles
        got = generate()
        assert pipe.compile_count == warm
        expected = diffusers_with(folder, pipe, combo)
        assert expected.std() > 0.01
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
        images.append(got)
        merge_compiles = pipe.lora_compile_count
    assert pipe.loras == [(str(a), -0.4), (str(c), 1.3)]
    assert pipe.describe()["loras"] == [{"path": str(a), "scale": -0.4}, {"path": str(c), "scale": 1.3}]

    # Each LoRA and scale changes the images (the comparisons above are not of one image).
    for first in range(len(images)):
        for second in range(first):
            assert np.abs(images[first] - images[second]).max() > 1e-2

    pipe.set_loras([])
    base_image = generate()
    assert pipe.compile_count == warm and pipe.loras == [] and not pipe.merged_loras.loaded
    np.testing.assert_allclose(base_image, diffusers_with(folder, pipe, []), rtol=0, atol=ATOL)
    weights = host_weights(pipe)
    assert weights.keys() == loaded.keys()
    for key, value in loaded.items():
        np.testing.assert_array_equal(weights[key], value)
    # And back: the merge reuses its graphs (A's shapes were merged before), the generation graphs
    # are untouched.
    merge_compiles = pipe.lora_compile_count
    pipe.set_loras([(a, 1.0)])
    np.testing.assert_array_equal(generate(), images[0])
    pipe.set_loras([])
    np.testing.assert_array_equal(generate(), base_image)
    assert pipe.compile_count == warm and pipe.lora_compile_count == merge_compiles


def test_a_lora_exported_by_our_trainer_merges_as_diffusers_loads_it(folder, tmp_path):
    import jax

    from flax_train import config as config_lib, export, lora, models

    # Every kind of target the trainer has (attention, GEGLU, 3x3 and 1x1 convolutions), alpha != rank.
    cfg = config_lib.LoraConfig(rank=3, alpha=5.0, target_modules=lora.SUPPORTED_TARGETS)
    _, factors, _ = lora.split(lora.inject(models.load(folder, subfolder="unet"), cfg, seed=0))
    noise = np.random.default_rng(1)  # stand-in for training: B away from zero
    factors = jax.tree.map(lambda v: np.asarray(v) + 0.1 * noise.standard_normal(v.shape).astype(np.float32), factors)
    out = export.export_lora(factors, cfg, tmp_path / "export")
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32", batch_size=2, steps=STEPS, scheduler="euler",
                                    loras=[(out, 0.6)])
    got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")
    np.testing.assert_allclose(got, diffusers_with(folder, pipe, [(out, 0.6)]), rtol=0, atol=ATOL)
    pipe.set_loras([])
    assert np.abs(pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np") - got).max() > 1e-2


def test_kohya_lora_files_merge_as_diffusers_loads_them(folder, loras, tmp_path):
    """kohya keys (lora_unet_<module with _>.lora_down.weight / lora_up.weight / alpha), under the
    original (sgm) UNet layout's names, as A1111 / ComfyUI files have them, and under diffusers'
    names, as diffusers' convert_state_dict_to_kohya writes them."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32", batch_size=2, steps=STEPS, scheduler="euler")
    peft_file = make_lora(folder, tmp_path / "peft", seed=4, unet=dict(
        r=3, lora_alpha=6, target_modules=["to_k", "to_v", "ff.net.2", "conv1", "conv_shortcut", "proj_in"]))
    peft_file = peft_file / lora_files.WEIGHT_NAME
    sgm = tmp_path / "sgm.safetensors"
    lora_files.write_kohya(lora_files.read(peft_file), sgm, dict(pipe.unet.config))
    assert any(key.startswith("lora_unet_input_blocks_") for key in load_file(sgm))
    named = tmp_path / "diffusers_names.safetensors"
    save_file(convert_state_dict_to_kohya(load_file(peft_file)), named)
    assert any(key.startswith("lora_unet_down_blocks_") for key in load_file(named))
    images = {}
    for file in (peft_file, sgm, named):
        pipe.set_loras([(file, 0.8)])
        images[file] = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")
        np.testing.assert_allclose(images[file], diffusers_with(folder, pipe, [(file, 0.8)]), rtol=0, atol=ATOL)
    # The sgm-named file holds the peft file's factors and alpha: the same LoRA.
    np.testing.assert_allclose(images[sgm], images[peft_file], rtol=0, atol=ATOL)
    both = [(sgm, 0.5), (named, -0.7)]
    pipe.set_loras(both)
    got = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")
    np.testing.assert_allclose(got, diffusers_with(folder, pipe, both), rtol=0, atol=ATOL)
    pipe.set_loras([])
    base = pipe(PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np")
    assert np.abs(images[named] - base).max() > 1e-2 and np.abs(images[sgm] - base).max() > 1e-2


def test_bad_loras_are_refused_in_one_line_before_any_weight_changes(folder, loras, tmp_path):
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32", batch_size=1, steps=1)
    before = host_weights(pipe)
    other = save_tiny_pipeline(tmp_path / "other", seed=0, image_size=SIZE, unet_channels=(16, 32))
    wrong_shapes = make_lora(other, tmp_path / "other_lora", seed=1, unet=dict(r=2, lora_alpha=2,
                                                                                target_modules=["to_q"]))
    refiner = save_tiny_pipeline(tmp_path / "refiner", seed=0, image_size=SIZE, kind="refiner", **SMALL)
    cases = [
        ([(tmp_path / "missing.safetensors", 1.0)], "missing.safetensors"),
        ([(loras["a"], "abc")], "scale of LoRA"),
        ([(loras["a"], float("nan"))], "scale of LoRA"),
        ([(loras["b"], 1.0), (wrong_shapes, 1.0)], "do not fit this model's weight"),
    ]
    for combo, message in cases:
        with pytest.raises(InputError, match=message) as caught:
            pipe.set_loras(combo)
        assert "\n" not in str(caught.value)
    first_key = "unet." + next(iter(lora_files.read(wrong_shapes)["unet"]))
    assert first_key in str(caught.value)  # the first key that does not fit
    assert pipe.loras == [] and not pipe.merged_loras.loaded
    after = host_weights(pipe)
    assert all(np.array_equal(after[key], value) for key, value in before.items())

    # A refiner has no first text encoder: a LoRA for it does not fit, and says so.
    refiner_pipe = Pipeline.from_pretrained(refiner, device="cpu", dtype="fp32", batch_size=1, steps=1)
    with pytest.raises(InputError, match="adapts the text_encoder .*which this model does not have"):
        refiner_pipe.set_loras([(loras["c"], 1.0)])


def test_cli_merges_loras_and_records_them(folder, loras, tmp_path, capsys):
    out = tmp_path / "out"
    spec_a = f"{loras['a']}:0.7"
    code = main(cpu_args(folder, out, "--prompt", "a red circle", "--lora", spec_a, "--lora", str(loras["b"])))
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    expected = [{"path": str(loras["a"]), "scale": 0.7}, {"path": str(loras["b"]), "scale": 1.0}]
    assert manifest["pipeline"]["loras"] == expected
    assert manifest["images"][0]["loras"] == expected


def test_cli_reads_a_lora_folder_from_cloud_storage(folder, loras, gcs_bucket, tmp_path):
    from PIL import Image

    from sdxl_common import storage

    url = f"{gcs_bucket}/{tmp_path.name}/lora_a"
    storage.copy_file(loras["a"] / lora_files.WEIGHT_NAME, f"{url}/{lora_files.WEIGHT_NAME}")
    runs = {"remote": ["--lora", f"{url}:0.7"], "local": ["--lora", f"{loras['a']}:0.7"], "none": []}
    for name, lora in runs.items():
        assert main(cpu_args(folder, tmp_path / name, "--prompt", "a red circle", *lora)) == 0
    manifest = json.loads((tmp_path / "remote" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["pipeline"]["loras"] == [{"path": url, "scale": 0.7}]
    remote, local, none = (np.asarray(Image.open(tmp_path / name / "00000.png")) for name in runs)
    np.testing.assert_array_equal(remote, local)
    assert not np.array_equal(remote, none)


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such LoRA file"),
    ("bad_scale", "the scale after ':' must be a number"),
    ("other_model", "do not fit this model's weight"),
])
def test_cli_refuses_a_bad_lora_in_one_line(folder, loras, tmp_path, capsys, case, expected):
    if case == "other_model":
        other = save_tiny_pipeline(tmp_path / "other", seed=0, image_size=SIZE, unet_channels=(16, 32))
        spec = str(make_lora(other, tmp_path / "other_lora", seed=1,
                             unet=dict(r=2, lora_alpha=2, target_modules=["to_q"])))
    else:
        spec = {"missing": str(tmp_path / "nothing_here"), "bad_scale": f"{loras['a']}:abc"}[case]
    code, err = exit_code_and_stderr(cpu_args(folder, tmp_path / "out", "--prompt", "a cat", "--lora", spec), capsys)
    lines = [line for line in err.splitlines() if line.startswith("xla-infer: error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
