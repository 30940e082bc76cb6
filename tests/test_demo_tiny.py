"""The offline SDXL folder builder: diffusers loads what it writes, and runs it."""
import json

import numpy as np
import pytest
import torch

from flax_train.demo.tiny import (
    DEFAULT_WORDS,
    build_tokenizer,
    save_tiny_pipeline,
    tiny_component_configs,
    tokenizer_vocab_size,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


def test_tokenizer_makes_given_words_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    words = ["zebra", "zebras", "aaa", "banana", "bandana", "über"]
    tok = CLIPTokenizer.from_pretrained(build_tokenizer(tmp_path, words))
    for word in words:
        ids = tok(word).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    # Special tokens take the two highest ids, as in CLIP (legacy pooling depends on it).
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    # CLIP's layout: 256 byte characters ("!" first), the same with "</w>", then one per merge in order.
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["Ā"] == 188  # byte 0 after the 188 printable
    assert [vocab[merge.replace(" ", "")] for merge in merges] == list(range(512, 512 + len(merges)))


def test_default_tokenizer_is_deterministic_and_round_trips_any_text(tmp_path):
    from transformers import CLIPTokenizer

    build_tokenizer(tmp_path / "a")
    build_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tok = CLIPTokenizer.from_pretrained(tmp_path / "a")
    assert all(len(tok(w).input_ids) == 3 for w in DEFAULT_WORDS)
    assert len(tok) == tokenizer_vocab_size() == tiny_component_configs()["text_encoder"]["vocab_size"]
    text = "a red circle, on a blue background! ünïcødé 日本語 😀 zyzzyva"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids[1:-1]  # every byte has a token: nothing is unknown
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle , on a blue background ! ünïcødé 日本語 😀 zyzzyva"


def test_configs_are_sdxl_shaped():
    cfg = tiny_component_configs(vocab_size=900, unet_channels=(32, 64, 64))
    unet, te1, te2 = cfg["unet"], cfg["text_encoder"], cfg["text_encoder_2"]
    assert unet["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert te1["hidden_act"] == "quick_gelu" and te2["hidden_act"] == "gelu"
    with pytest.raises(ValueError, match="divisible"):
        tiny_component_configs(vocab_size=900, image_size=63)


def test_folder_loads_and_runs_in_diffusers(tiny_folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert list((tiny_folder / sub).glob("*.safetensors")), sub
    for sub in ("tokenizer", "tokenizer_2"):
        assert (tiny_folder / sub / "vocab.json").exists() and (tiny_folder / sub / "merges.txt").exists()

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.model_max_length == 77

    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    out = pipe.text_encoder_2(ids, output_hidden_states=True)
    assert out.text_embeds.shape == (1, pipe.text_encoder_2.config.projection_dim)

    images = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images
    pixels = np.asarray(images[0])
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 1.0  # random weights still give a non-constant image


def test_same_seed_same_weights_other_seed_differs(tiny_folder, tmp_path):
    from safetensors.torch import load_file

    again = save_tiny_pipeline(tmp_path / "again", seed=0)
    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(folder / name) for folder in (tiny_folder, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
