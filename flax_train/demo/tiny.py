"""A small SDXL-architecture diffusers pipeline, built offline with random weights.

Tests, the demo and the benchmarks need a real SDXL folder (both text encoders, both tokenizers,
the text-time UNet, the VAE, the scheduler) but cannot download one. `save_tiny_pipeline` writes one
with the same structure as stabilityai/stable-diffusion-xl-base-1.0 and tiny widths, through
diffusers' own `save_pretrained`, so every reader of the folder format (diffusers, our weight
conversion, xla_infer) reads exactly what it would read from the Hub.

Only torch / diffusers / transformers / tokenizers are imported here (never JAX), so the PyTorch
side can use it without pulling in the training stack.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from sdxl_common import sdxl

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
KINDS = ("base", "inpainting", "refiner")  # save_tiny_pipeline's folder layouts

# Words that become single tokens by default: enough to write readable demo prompts.
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    red orange yellow green blue purple violet pink brown black white gray grey gold silver cyan magenta
    teal navy beige dark light bright pale
    circle square triangle rectangle star heart diamond hexagon oval ring cross line dot dots stripe stripes
    cube sphere cone cylinder pyramid shape shapes
    a an the of on in at to with and or is are was be by for from as into over under near small large big
    tiny huge little one two three four five many some no not background foreground center left right top
    bottom corner middle image photo picture painting drawing sketch render style art scene view of
    cat dog bird fish tree flower house car sky sun moon cloud water sea mountain road city forest field
    portrait landscape close up detailed simple high quality blurry sharp soft hard smooth rough
    """.split()
)


def _normalise_words(words: Iterable[str]) -> list[str]:
    # The CLIP normaliser lower-cases and the pre-tokenizer cuts text into runs of letters, single
    # digits and runs of punctuation, so only lower-case runs of letters reach the BPE model whole.
    out = []
    for word in words:
        word = word.strip().lower()
        if not word.isalpha():
            raise ValueError(f"tokenizer words must be single words of letters, got {word!r}")
        out.append(word)
    return out


def _vocab_and_merges(words: Iterable[str] | None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout around merges learnt by the `tokenizers` BPE trainer.

    The trainer merges until every word is one symbol (the vocabulary bound is never reached), and
    applying merges in rank order reproduces the training segmentation, so every word encodes to
    exactly one token.
    """
    words = sorted(set(_normalise_words(DEFAULT_WORDS if words is None else words)))
    # ByteLevel keeps printable Latin-1 bytes as themselves and moves the others past U+00FF in byte
    # order, so code-point order is CLIP's order: printable first, "!" at id 0 (SDXL's second
    # tokenizer pads with it).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    word_ends = [c + "</w>" for c in alphabet]
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        # Each merge joins two symbols of some word, so there are fewer merges than bytes.
        vocab_size=len(alphabet) + len(word_ends) + sum(len(w.encode("utf-8")) for w in words),
        show_progress=False,
        initial_alphabet=alphabet,
        # The trainer numbers "x</w>" symbols in hash-map order and breaks count ties by number;
        # declaring them up front fixes their numbers, hence the merges, across runs.
        special_tokens=word_ends,
        end_of_word_suffix="</w>",
    )
    tokenizer.train_from_iterator(words, trainer)
    merges = [(a, b) for a, b in json.loads(tokenizer.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    # Two merges can spell the same string (ab+c, a+bc): the first id is kept.
    for token in [*alphabet, *word_ends, *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def tokenizer_vocab_size(words: Iterable[str] | None = None) -> int:
    """Size of the vocabulary `build_tokenizer(path, words)` writes (without writing it)."""
    return len(_vocab_and_merges(words)[0])


def build_tokenizer(path: str | Path, words: Iterable[str] | None = None, *, pad_token: str = EOS_TOKEN) -> Path:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) into `path`.

    The vocabulary follows CLIP's layout: the 256 byte characters, the same with `</w>` (end of
    word), one entry per merge, then `<|startoftext|>` and `<|endoftext|>` last (the highest ids,
    which CLIP's legacy pooling relies on). Any UTF-8 text tokenizes, unknown words fall back to
    byte pieces. `pad_token="!"` gives SDXL's second tokenizer.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(words)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (path / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": sdxl.TOKEN_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return path


def tiny_component_configs(
    *,
    vocab_size: int | None = None,
    image_size: int = 64,
    unet_channels: tuple[int, ...] = (32, 64),
    unet_heads: tuple[int, ...] | None = None,
    transformer_layers_per_block: tuple[int, ...] | None = None,
    layers_per_block: int = 2,
    vae_channels: tuple[int, ...] = (32, 64),
    text_hidden: tuple[int, int] = (32, 64),
    text_layers: int = 2,
    text_projection_dim: int = 32,
    addition_time_embed_dim: int = 8,
    norm_num_groups: int = 8,
    kind: str = "base",
) -> dict[str, dict[str, Any]]:
    """Keyword arguments for each SDXL component, at tiny widths.

    Returns {"unet", "vae", "text_encoder", "text_encoder_2"}: kwargs for `UNet2DConditionModel`,
    `AutoencoderKL` and two `CLIPTextConfig`s. The structure is SDXL's: the first UNet level has
    no attention, later levels are cross-attention blocks; the UNet conditions on the concatenated
    penultimate states of both encoders (cross_attention_dim = hidden1 + hidden2) and on
    text_time added embeddings (6 micro-conditioning numbers + the pooled projection of encoder 2).
    `vocab_size` defaults to the default tokenizer's.

    `kind="inpainting"` gives SDXL's inpainting UNet (9 input channels: the latents, the mask and
    the masked image's latents); `kind="refiner"` the refiner's, which conditions on the second
    encoder alone (cross_attention_dim = hidden2) and on 5 time ids (the aesthetic score replaces
    the target size).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    levels = len(unet_channels)
    if levels not in (2, 3):
        raise ValueError(f"unet_channels must have 2 or 3 levels, got {unet_channels}")
    if unet_heads is None:
        unet_heads = tuple(max(1, c // 16) for c in unet_channels)
    if transformer_layers_per_block is None:
        transformer_layers_per_block = tuple(range(1, levels + 1))  # SDXL grows depth with level, 1/2/10
    down_blocks = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up_blocks = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    vae_factor = sdxl.vae_scale_factor({"block_out_channels": vae_channels})
    if image_size % vae_factor:
        raise ValueError(f"image_size {image_size} is not divisible by the VAE factor {vae_factor}")

    unet = dict(
        sample_size=image_size // vae_factor,
        in_channels=9 if kind == "inpainting" else 4,
        out_channels=4,
        down_block_types=down_blocks,
        up_block_types=up_blocks,
        block_out_channels=tuple(unet_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=tuple(unet_heads),  # diffusers' name for heads per level, as in SDXL
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        cross_attention_dim=text_hidden[1] if kind == "refiner" else text_hidden[0] + text_hidden[1],
        norm_num_groups=norm_num_groups,
        norm_eps=1e-5,
        act_fn="silu",
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=(5 if kind == "refiner" else 6) * addition_time_embed_dim
        + text_projection_dim,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    # Special-token ids as in SDXL's released configs (bos 0, eos 2, pad 1): eos_token_id == 2 selects
    # transformers' legacy pooling (argmax of the ids), which finds the end token because it has the
    # highest id in CLIP's vocabulary layout.
    common = dict(
        vocab_size=tokenizer_vocab_size() if vocab_size is None else vocab_size,
        max_position_embeddings=sdxl.TOKEN_LENGTH,
        num_hidden_layers=text_layers,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    text_encoder = dict(
        common,
        hidden_size=text_hidden[0],
        intermediate_size=4 * text_hidden[0],
        num_attention_heads=max(1, text_hidden[0] // 16),
        hidden_act="quick_gelu",
        projection_dim=text_hidden[0],
    )
    text_encoder_2 = dict(
        common,
        hidden_size=text_hidden[1],
        intermediate_size=4 * text_hidden[1],
        num_attention_heads=max(1, text_hidden[1] // 16),
        hidden_act="gelu",
        projection_dim=text_projection_dim,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


# The demo's sizes beyond the defaults above, for a 2-core CPU. A 3-level VAE (factor 4) gives 8x8
# latents for 32x32 images; its narrow first level, where the convolutions run at full resolution,
# halves the cost of training it. One transformer layer per attention block instead of SDXL's
# growth made a UNet step 18% cheaper and learnt the captions as well in 500 steps.
DEMO_SIZES: dict[str, Any] = {"vae_channels": (16, 32, 32), "layers_per_block": 1, "transformer_layers_per_block": (1, 1)}


def unet_config(image_size: int, **sizes: Any) -> dict[str, Any]:
    """The tiny UNet's diffusers config alone (its architecture does not depend on the vocabulary)."""
    return {"_class_name": "UNet2DConditionModel", **tiny_component_configs(vocab_size=1, image_size=image_size, **sizes)["unet"]}


def save_tiny_pipeline(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    words: Iterable[str] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    kind: str = "base",
    **config_overrides: Any,
) -> Path:
    """Write a complete SDXL diffusers folder with random weights drawn from `seed`.

    `diffusers.StableDiffusionXLPipeline.from_pretrained(path)` loads it offline. Extra keyword
    arguments go to `tiny_component_configs` (e.g. `unet_channels=(32, 64, 64)`); `scheduler`
    overrides keys of SDXL's scheduler config (e.g. `prediction_type="v_prediction"`).

    `kind="inpainting"` writes a StableDiffusionXLInpaintPipeline folder with a 9-channel UNet;
    `kind="refiner"` a refiner folder as stabilityai/stable-diffusion-xl-refiner-1.0 lays it out
    (StableDiffusionXLImg2ImgPipeline, no first text encoder or tokenizer,
    requires_aesthetics_score true, force_zeros_for_empty_prompt false).
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    # Written in place: save_pretrained adds tokenizer.json next to vocab.json / merges.txt, so the
    # folder also holds the files SDXL's own tokenizer folders carry.
    tokenizer_2 = CLIPTokenizer.from_pretrained(build_tokenizer(path / "tokenizer_2", words, pad_token="!"))
    tokenizer = None
    if kind != "refiner":  # the refiner has no first text encoder, hence no first tokenizer
        tokenizer = CLIPTokenizer.from_pretrained(build_tokenizer(path / "tokenizer", words))
    configs = tiny_component_configs(vocab_size=len(tokenizer_2), image_size=image_size, kind=kind,
                                     **config_overrides)

    # One generator state per component, so adding a component never changes another's weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))

    components = dict(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**{**sdxl.SCHEDULER_CONFIG, **(scheduler or {})}),
        add_watermarker=False,
    )
    if kind == "refiner":
        # The first text encoder built above is dropped; each component has its own seed, so the
        # others equal a base model's of the same seed and sizes.
        components.update(text_encoder=None, tokenizer=None)
        pipeline = StableDiffusionXLImg2ImgPipeline(
            **components, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    elif kind == "inpainting":
        pipeline = StableDiffusionXLInpaintPipeline(**components)
    else:
        pipeline = StableDiffusionXLPipeline(**components)
    pipeline.save_pretrained(path, safe_serialization=True)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text())
    scheduler_config.update(sdxl.SCHEDULER_EXTRA_KEYS)
    scheduler_file.write_text(json.dumps(scheduler_config, indent=2, sort_keys=True) + "\n")
    return path
