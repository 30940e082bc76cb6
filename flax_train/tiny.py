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
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77

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


def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: every byte maps to one printable unicode character.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) are
    shifted past 255 so that no byte maps to whitespace. This is the mapping the `ByteLevel`
    pre-tokenizer applies, so the vocabulary must be written in these characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    # Keep the printable ones first: CLIP's vocabulary starts with "!" (id 0), which SDXL's second
    # tokenizer uses as its pad token.
    return {b: mapping[b] for b in printable + [b for b in range(256) if b not in printable]}


def _learn_merges(words: Iterable[str], byte_chars: dict[int, str]) -> list[tuple[str, str]]:
    """Plain BPE learning, run until every word is a single symbol.

    Each step merges the most frequent adjacent pair (ties broken by the pair itself, so the result
    is deterministic). Encoding a training word with merges applied in rank order reproduces the
    training segmentation, hence every given word encodes to exactly one token.
    """
    sequences = []
    for word in sorted(set(words)):
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        sequences.append(symbols)
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in sequences:
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best_count = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best_count)
        merges.append(pair)
        merged = pair[0] + pair[1]
        for i, symbols in enumerate(sequences):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            sequences[i] = out


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
    byte_chars = bytes_to_unicode()
    merges = _learn_merges(_normalise_words(DEFAULT_WORDS if words is None else words), byte_chars)
    vocab_list = list(byte_chars.values())
    vocab_list += [c + "</w>" for c in byte_chars.values()]
    vocab_list += [a + b for a, b in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in vocab_list:  # two merges can spell the same string (ab+c, a+bc): keep the first id
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
        "model_max_length": MAX_LENGTH,
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
) -> dict[str, dict[str, Any]]:
    """Keyword arguments for each SDXL component, at tiny widths.

    Returns {"unet", "vae", "text_encoder", "text_encoder_2"}: kwargs for `UNet2DConditionModel`,
    `AutoencoderKL` and two `CLIPTextConfig`s. The structure is SDXL's: the first UNet level has
    no attention, later levels are cross-attention blocks; the UNet conditions on the concatenated
    penultimate states of both encoders (cross_attention_dim = hidden1 + hidden2) and on
    text_time added embeddings (6 micro-conditioning numbers + the pooled projection of encoder 2).
    `vocab_size` defaults to the default tokenizer's.
    """
    levels = len(unet_channels)
    if levels not in (2, 3):
        raise ValueError(f"unet_channels must have 2 or 3 levels, got {unet_channels}")
    if unet_heads is None:
        unet_heads = tuple(max(1, c // 16) for c in unet_channels)
    if transformer_layers_per_block is None:
        transformer_layers_per_block = tuple(range(1, levels + 1))  # SDXL grows depth with level, 1/2/10
    down_blocks = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up_blocks = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    vae_factor = 2 ** (len(vae_channels) - 1)
    if image_size % vae_factor:
        raise ValueError(f"image_size {image_size} is not divisible by the VAE factor {vae_factor}")

    unet = dict(
        sample_size=image_size // vae_factor,
        in_channels=4,
        out_channels=4,
        down_block_types=down_blocks,
        up_block_types=up_blocks,
        block_out_channels=tuple(unet_channels),
        layers_per_block=layers_per_block,
        attention_head_dim=tuple(unet_heads),  # diffusers' name for heads per level, as in SDXL
        transformer_layers_per_block=tuple(transformer_layers_per_block),
        cross_attention_dim=text_hidden[0] + text_hidden[1],
        norm_num_groups=norm_num_groups,
        norm_eps=1e-5,
        act_fn="silu",
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + text_projection_dim,
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
        max_position_embeddings=MAX_LENGTH,
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


# SDXL 1.0 base's scheduler (see REFERENCE.md).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)
# Keys SDXL base's scheduler_config.json also carries, for the schedulers users swap in from it
# (DDIM reads clip_sample / set_alpha_to_one); EulerDiscreteScheduler itself does not take them.
SDXL_SCHEDULER_EXTRA_KEYS: dict[str, Any] = dict(
    clip_sample=False,
    set_alpha_to_one=False,
    sample_max_value=1.0,
    skip_prk_steps=True,
)


def save_tiny_pipeline(
    path: str | Path,
    *,
    seed: int = 0,
    image_size: int = 64,
    words: Iterable[str] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a complete SDXL diffusers folder with random weights drawn from `seed`.

    `diffusers.StableDiffusionXLPipeline.from_pretrained(path)` loads it offline. Extra keyword
    arguments go to `tiny_component_configs` (e.g. `unet_channels=(32, 64, 64)`); `scheduler`
    overrides keys of SDXL's scheduler config (e.g. `prediction_type="v_prediction"`).
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    # Written in place: save_pretrained adds tokenizer.json next to vocab.json / merges.txt, so the
    # folder also holds the files SDXL's own tokenizer folders carry.
    tokenizer = CLIPTokenizer.from_pretrained(build_tokenizer(path / "tokenizer", words))
    tokenizer_2 = CLIPTokenizer.from_pretrained(build_tokenizer(path / "tokenizer_2", words, pad_token="!"))
    configs = tiny_component_configs(vocab_size=len(tokenizer), image_size=image_size, **config_overrides)

    # One generator state per component, so adding a component never changes another's weights.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))

    pipeline = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**{**SDXL_SCHEDULER_CONFIG, **(scheduler or {})}),
        add_watermarker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text())
    scheduler_config.update(SDXL_SCHEDULER_EXTRA_KEYS)
    scheduler_file.write_text(json.dumps(scheduler_config, indent=2, sort_keys=True) + "\n")
    return path
