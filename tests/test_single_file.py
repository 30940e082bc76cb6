"""Single-file SDXL checkpoints (Stability's original layout): written, read, loaded by diffusers'
``from_single_file``, generated from with xla-infer, fine-tuned and exported by flax-train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdxl_common import model_source, single_file
from flax_train.demo import CONFIG as DEMO_CONFIG
from flax_train.demo.tiny import save_tiny_pipeline
from train_support import cli_env, make_workspace, overrides, run_cli
from xla_infer.cli import main as xla_infer

pytestmark = pytest.mark.xdist_group("single_file")  # the tiny folders and files are shared

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SDXL_UNET_PARAMETERS = 2_567_463_684


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The trainer tests' tiny base folder and dataset, and its single file written by us."""
    ws = make_workspace(tmp_path_factory.mktemp("single_file"))
    return ws, single_file.write_single_file(ws.base, ws.root / "tiny_base.safetensors")


def folder_weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(folder / name / single_file.WEIGHT_FILES[name])
            for name in COMPONENTS if (folder / name).is_dir()}


def assert_same_weights(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            assert a[name][key].dtype == b[name][key].dtype and torch.equal(a[name][key], b[name][key]), f"{name} {key}"


def assert_loads_in_diffusers(file: Path, folder: Path, pipeline_class) -> tuple:
    """diffusers' own single-file reader gives every component exactly the folder's weights;
    returns its pipeline and the folder's."""
    ours = pipeline_class.from_single_file(str(file), config=str(folder), local_files_only=True)
    reference = pipeline_class.from_pretrained(folder)
    for name in COMPONENTS:
        if getattr(reference, name) is None:
            assert getattr(ours, name) is None
            continue
        got, expected = getattr(ours, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == expected.keys(), name
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name} {key}"
    return ours, reference


def test_our_file_loads_in_diffusers_and_reads_back_exactly(workspace):
    from diffusers import StableDiffusionXLPipeline

    ws, file = workspace
    ours, reference = assert_loads_in_diffusers(file, ws.base, StableDiffusionXLPipeline)
    args = dict(prompt="a red circle", num_inference_steps=2, height=16, width=16, output_type="np")
    images = [pipe(**args, generator=torch.Generator().manual_seed(0)).images for pipe in (ours, reference)]
    assert images[0].std() > 0.01
    np.testing.assert_array_equal(*images)

    back = single_file.convert_to_folder(file, ws.root / "read_back", ws.base)
    assert_same_weights(folder_weights(back), folder_weights(ws.base))
    for name in COMPONENTS:
        assert (back / name / "config.json").read_text() == (ws.base / name / "config.json").read_text()
    assert (back / "tokenizer_2" / "vocab.json").read_bytes() == (ws.base / "tokenizer_2" / "vocab.json").read_bytes()


def test_a_bfloat16_file_holds_the_folder_in_bfloat16(workspace):
    ws, _ = workspace
    file = single_file.write_single_file(ws.base, ws.root / "bf16.safetensors", dtype="bfloat16")
    tensors = load_file(file)
    assert {t.dtype for k, t in tensors.items() if k not in single_file.IGNORED_KEYS} == {torch.bfloat16}
    assert torch.equal(tensors[single_file.IGNORED_KEYS[0]], torch.arange(77)[None])  # CLIP's position ids
    back = single_file.convert_to_folder(file, ws.root / "bf16_back", ws.base)
    cast = {name: {k: v.bfloat16() for k, v in weights.items()} for name, weights in folder_weights(ws.base).items()}
    assert_same_weights(folder_weights(back), cast)


def test_refiner_layout_round_trips(tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder = save_tiny_pipeline(tmp_path / "refiner", kind="refiner", image_size=16, layers_per_block=1,
                                transformer_layers_per_block=(1, 1), text_layers=1)
    file = single_file.write_single_file(folder, tmp_path / "refiner.safetensors")
    keys = single_file.file_keys(file)
    assert single_file.detect_kind(keys) == "refiner"
    assert "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
    assert_loads_in_diffusers(file, folder, StableDiffusionXLImg2ImgPipeline)
    back = single_file.convert_to_folder(file, tmp_path / "back", folder)
    assert_same_weights(folder_weights(back), folder_weights(folder))


def test_conversion_is_cached_per_version_of_the_file(workspace, tmp_path, monkeypatch):
    ws, file = workspace
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(file.read_bytes())
    first = model_source.local_folder(copy, config=ws.base)
    assert model_source.local_folder(copy, config=ws.base) == first  # not converted again
    tensors = load_file(copy)
    tensors["model.diffusion_model.out.2.bias"] += 1
    save_file(tensors, copy)
    second = model_source.local_folder(copy, config=ws.base)
    assert second != first
    assert torch.equal(load_file(second / "unet" / single_file.WEIGHT_FILES["unet"])["conv_out.bias"],
                       tensors["model.diffusion_model.out.2.bias"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, second.name])


def test_a_gs_file_converts_as_a_local_one(workspace, gcs_bucket, tmp_path, monkeypatch):
    from sdxl_common import storage

    ws, file = workspace
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    url = f"{gcs_bucket}/{tmp_path.name}/model.safetensors"
    storage.copy_file(file, url)
    folder = model_source.local_folder(url, config=ws.base)
    assert_same_weights(folder_weights(folder), folder_weights(ws.base))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in ws.base.iterdir())  # no download left
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]


def test_xla_infer_makes_the_same_image_from_the_file_as_from_the_folder(workspace, tmp_path, monkeypatch):
    ws, file = workspace
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    images = []
    for model, extra in ((ws.base, []), (file, ["--config", str(ws.base)])):
        out = tmp_path / f"out_{len(images)}"
        args = ["--model", str(model), *extra, "--device", "cpu", "--dtype", "fp32", "--steps", "2",
                "--width", "16", "--height", "16", "--prompt", "a blue square", "--out", str(out)]
        assert xla_infer(args) == 0
        images.append(np.asarray(Image.open(out / "00000.png")))
    assert images[0].std() > 1
    np.testing.assert_array_equal(images[0], images[1])


def test_flax_train_fine_tunes_a_single_file_and_exports_one(workspace, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ws, file = workspace
    run_dir = tmp_path / "run"
    env = cli_env(**{model_source.CACHE_ENV: str(tmp_path / "cache")})
    run_cli("train", "--config", str(DEMO_CONFIG),
            *overrides(ws, run_dir, f"model.pretrained={file}", f"model.config_from={ws.base}", "train.max_steps=2",
                       "export.at_end=true", "export.single_file=true"),
            env=env)
    export = run_dir / "export"
    exported = export.with_name("export.safetensors")
    assert exported.is_file()
    trained = folder_weights(export)
    start = folder_weights(ws.base)
    assert any(not torch.equal(trained["unet"][k], start["unet"][k]) for k in start["unet"])  # it trained
    assert_same_weights({k: v for k, v in trained.items() if k != "unet"}, {k: v for k, v in start.items() if k != "unet"})
    assert_loads_in_diffusers(exported, export, StableDiffusionXLPipeline)


def bad_file(kind: str, tmp_path: Path, file: Path) -> tuple[Path, str]:
    if kind == "pickle":
        path = tmp_path / "model.ckpt"
        torch.save({"state_dict": {}}, path)
        return path, "a pickle checkpoint; only .safetensors single files are read"
    if kind == "renamed_pickle":
        path = tmp_path / "model.safetensors"
        torch.save({"state_dict": {}}, path)
        return path, "not a safetensors file"
    tensors = load_file(file)
    if kind == "unrelated":
        path = tmp_path / "unrelated.safetensors"
        save_file({"encoder.weight": torch.zeros(3), "decoder.weight": torch.zeros(3)}, path)
        return path, "not an SDXL base or refiner single file"
    if kind == "extra_key":
        tensors["model.diffusion_model.extra.weight"] = torch.zeros(1)
        path = tmp_path / "extra.safetensors"
        save_file(tensors, path)
        return path, "1 tensors the configs in"
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:])
    path = tmp_path / "wrong_shape.safetensors"
    save_file(tensors, path)
    shape = list(tensors[key].shape)
    return path, f"{key!r} has shape {shape}, the configs in"


@pytest.mark.parametrize("kind", ["pickle", "renamed_pickle", "unrelated", "extra_key", "wrong_shape"])
def test_bad_files_exit_2_with_one_line(workspace, tmp_path, capsys, monkeypatch, kind):
    ws, file = workspace
    monkeypatch.setenv(model_source.CACHE_ENV, str(tmp_path / "cache"))
    path, expected = bad_file(kind, tmp_path, file)
    config = [] if kind == "unrelated" else ["--config", str(ws.base)]
    code = xla_infer(["--model", str(path), *config, "--device", "cpu", "--prompt", "x", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "cache").exists() or not [p for p in (tmp_path / "cache").iterdir()]  # nothing half-made


def test_shipped_tokenizers_encode_as_clip(tmp_path):
    from transformers import CLIPTokenizer

    single_file.copy_other_files(single_file.SHIPPED["base"], tmp_path)
    for name, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):  # tokenizer_2 pads with "!"
        tokenizer = CLIPTokenizer.from_pretrained(tmp_path / name)
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizer.pad_token_id == pad and tokenizer.model_max_length == 77


def tags(entries, hidden: int = 0) -> dict[str, torch.Tensor]:
    """One small tensor per original key whose values name it (a stacked in_proj: its rows, so that
    a split in the wrong order shows)."""
    out = {}
    for i, entry in enumerate(entries):
        if entry.kind == "conv1x1":
            out[entry.original] = torch.full((1, 1, 1, 1), float(i))
        elif len(entry.keys) > 1:
            rows = torch.arange(3 * hidden).float() + 10_000 * i
            out[entry.original] = rows[:, None] if entry.original.endswith("weight") else rows
        elif entry.kind == "transpose":  # diffusers splits in_proj by this matrix's first dimension
            out[entry.original] = torch.zeros(hidden, 1)
        else:
            out[entry.original] = torch.full((1,), float(i))
    return out


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_shipped_configs_are_sdxl_and_the_mapping_agrees_with_diffusers(kind):
    """Full-size SDXL, shapes only: the shipped configs build SDXL's UNet, and our mapping covers
    every parameter of the full-size models, as diffusers' own single-file converter maps them
    (fed small tensors whose values say which original key they came from)."""
    from diffusers.loaders import single_file_utils as reference
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from flax_train import models
    from flax_train.models import weights

    folder = single_file.SHIPPED[kind]
    names = [n for n in COMPONENTS if (folder / n).is_dir()]
    assert names == (list(COMPONENTS) if kind == "base" else ["unet", "vae", "text_encoder_2"])
    configs = {name: models.read_config(folder / name) for name in names}
    keys = {}
    for name in names:
        model = models.abstract(configs[name])  # our Flax model at full size, no memory
        if name == "unet" and kind == "base":
            assert models.count_params(model) == SDXL_UNET_PARAMETERS
        keys[name] = set(weights.torch_layout(model))
        # ... whose parameters are those of the model diffusers / transformers build from the config
        assert {"text_model." + k.removeprefix("text_model.") if "text_model" in k or "encoder" in name else k
                for k in single_file._expected_shapes(name, configs[name])} == \
            {"text_model." + k.removeprefix("text_model.") if "text_model" in k or "encoder" in name else k
             for k in keys[name]}, name
    entries = single_file.layout(configs, keys)
    assert sorted(k for e in entries for k in e.keys) == sorted(k for ks in keys.values() for k in ks)  # each once

    for name, convert in (("unet", lambda ckpt: reference.convert_ldm_unet_checkpoint(ckpt, configs["unet"])),
                          ("vae", lambda ckpt: reference.convert_ldm_vae_checkpoint(ckpt, configs["vae"]))):
        mine = [e for e in entries if e.component == name]
        tagged = tags(mine)
        theirs = convert(tagged)
        assert set(theirs) == keys[name], name
        for entry in mine:
            assert torch.equal(theirs[entry.keys[0]].flatten(), tagged[entry.original].flatten()), entry

    open_clip = [e for e in entries if e.component == "text_encoder_2"]
    assert all(e.original.startswith(single_file.open_clip_prefix(kind == "base")) for e in open_clip)
    hidden = configs["text_encoder_2"]["hidden_size"]
    tagged = tags(open_clip, hidden)
    with torch.device("meta"):
        text_model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"]))
    theirs = reference.convert_open_clip_checkpoint(text_model, tagged, prefix=single_file.open_clip_prefix(kind == "base"))
    assert set(theirs) == keys["text_encoder_2"]
    for entry in open_clip:
        for key, part in zip(entry.keys, entry.to_diffusers(tagged[entry.original], [hidden] * len(entry.keys))):
            assert torch.equal(theirs[key], part), key
    if kind == "base":  # transformers' own names below the prefix
        assert {e.original for e in entries if e.component == "text_encoder"} == {
            single_file.CLIP_PREFIX + "text_model." + k.removeprefix("text_model.") for k in keys["text_encoder"]}
