"""Training on captions longer than CLIP's 77 tokens (`data.max_text_chunks`): the cache holds what
the sampler's encoding of the same text in as many chunks gives, counts the captions it cuts,
refuses a cache of another chunk count, and a run trains on it and exports an ordinary folder."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from flax_train import config as config_lib, diffusion, lora, sampling, sharding, train
from flax_train.data import prepare
from flax_train.data.cache import MANIFEST, CacheMismatchError, CacheSettings, LatentCache, read_json, verify_cache
from flax_train.demo import CONFIG as DEMO_CONFIG, tiny
from flax_train.train import step as train_step, unconditional_inputs
from sdxl_common import prompt_weights, sdxl
from train_support import BATCH, make_config, make_workspace, overrides, run_cli

pytestmark = pytest.mark.xdist_group("long_captions")

CHUNKS = 2
LONG = (f"data.max_text_chunks={CHUNKS}",)
WORDS = tiny.DEFAULT_WORDS  # each one token of the tiny tokenizers
CUT_WORDS = 170  # 20 tokens past 2 chunks of 75


def words(count: int, start: int) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The trainer's tiny workspace with its captions made long: one short, one of CUT_WORDS
    tokens, the rest about 100 (more than one chunk, less than two)."""
    ws = make_workspace(tmp_path_factory.mktemp("long-captions"))
    metadata = ws.root / "synthetic" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    for i, row in enumerate(rows[1:], 1):
        row["text"] = words(CUT_WORDS if i == 1 else 95 + i, 7 * i)
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert len(rows) == BATCH
    return ws


def text_lora_config(ws) -> config_lib.Config:
    return make_config(ws, ws.root / "unused", *LONG, "train.method=lora", "lora.train_text_encoder=true")


@pytest.fixture(scope="module")
def cache(workspace):
    """The cache of a LoRA-of-the-text-encoders run with two chunks: it keeps the token ids as
    well as the embeddings, so it also serves the full fine-tune below."""
    prepare.open_cache(text_lora_config(workspace), workspace.base)
    return LatentCache(workspace.cache)


@pytest.fixture(scope="module")
def generator(workspace):
    return sampling.Generator(workspace.base, load_unet=False, max_text_chunks=CHUNKS)


def test_cached_captions_are_the_samplers_encoding_in_chunks(cache, generator, workspace):
    token_ids = prepare.open_cache(text_lora_config(workspace), workspace.base)  # the ids a text-encoder LoRA reads
    captions = [cache.caption(i) for i in range(len(cache))]
    assert len(cache) == BATCH and max(len(c.split()) for c in captions) == CUT_WORDS
    expected = generator.encode(captions, captions)
    ids = [prompt_weights.text_arrays(tokenizer, captions, CHUNKS, sdxl.TOKEN_LENGTH, None)["ids"]
           for tokenizer in generator.tokenizers]
    for i in range(len(cache)):
        sample = cache[i]
        assert sample["prompt_embeds"].shape == (CHUNKS * sdxl.TOKEN_LENGTH, expected["prompt_embeds"].shape[-1])
        np.testing.assert_allclose(sample["prompt_embeds"], expected["prompt_embeds"][i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sample["pooled_prompt_embeds"], expected["pooled"][i], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(token_ids[i]["input_ids"], ids[0][i])
        np.testing.assert_array_equal(token_ids[i]["input_ids_2"], ids[1][i])


def test_captions_past_the_chunks_are_cut_and_counted(cache, workspace):
    manifest = read_json(workspace.cache / MANIFEST)
    assert manifest["captions_cut"] == {"count": 1, "max_tokens_dropped": CUT_WORDS - CHUNKS * 75}
    assert manifest["settings"]["max_text_chunks"] == CHUNKS


def test_empty_prompt_is_the_samplers_empty_text_in_chunks(cache, generator, workspace):
    empty = cache.empty_prompt()
    expected = generator.encode([""], [""])
    assert empty["prompt_embeds"].shape == expected["prompt_embeds"].shape[1:]
    assert empty["prompt_embeds"].shape[0] == CHUNKS * sdxl.TOKEN_LENGTH
    np.testing.assert_allclose(empty["prompt_embeds"], expected["prompt_embeds"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(empty["pooled_prompt_embeds"], expected["pooled"][0], rtol=1e-5, atol=1e-5)
    # Caption dropout's input: zeros of that shape for SDXL (force_zeros_for_empty_prompt).
    assert sdxl.force_zeros_for_empty_prompt(workspace.base)
    unconditional = unconditional_inputs(cache, workspace.base)
    assert unconditional["prompt_embeds"].shape == empty["prompt_embeds"].shape
    assert not any(np.any(np.asarray(v)) for v in unconditional.values())


def test_a_cache_of_another_chunk_count_is_refused(cache, workspace, tmp_path):
    one_chunk = make_config(workspace, tmp_path / "run")
    settings = prepare.cache_settings(*prepare.specs_from_config(one_chunk), workspace.base)
    assert settings.max_text_chunks == 1 and "max_text_chunks" not in settings.to_json()
    assert "max_text_chunks" not in CacheSettings(*prepare.specs_from_config(config_lib.Config()), {}).to_json()
    with pytest.raises(CacheMismatchError, match="max_text_chunks: cache has 2, config has \"<absent>\""):
        verify_cache(workspace.cache, settings)
    # A cache of one chunk is this one's manifest without the setting (as a default config writes it).
    manifest = read_json(workspace.cache / MANIFEST)
    del manifest["settings"]["max_text_chunks"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    two = prepare.cache_settings(*prepare.specs_from_config(one_chunk), workspace.base, max_text_chunks=CHUNKS)
    with pytest.raises(CacheMismatchError, match="max_text_chunks: cache has \"<absent>\", config has 2"):
        verify_cache(tmp_path, two)
    with pytest.raises(config_lib.ConfigError, match="data.max_text_chunks must be >= 1"):
        config_lib.validate(make_config(workspace, tmp_path / "run", "data.max_text_chunks=0"))


def test_a_text_encoder_lora_step_encodes_the_chunks_as_prepare(cache, workspace):
    """With lora.train_text_encoder the step encodes each caption's 2 x 77 ids itself; with the
    LoRA factors at their start (B = 0) that is the cached embeddings' loss."""
    cfg = text_lora_config(workspace)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.merged_rules(cfg.mesh.rules)
    graphdef, factors, frozen = train.build_lora_unet(cfg, mesh, workspace.base, rules)
    schedule = diffusion.NoiseSchedule.from_scheduler_config(sdxl.scheduler_config(workspace.base))
    step = train.step_config(cfg, "epsilon")
    empty = unconditional_inputs(cache, workspace.base)
    token_ids = prepare.open_cache(cfg, workspace.base)
    ids = {k: np.stack([token_ids[i][k] for i in range(2)]) for k in token_ids.arrays}
    embeds = {k: np.stack([cache[i][k] for i in range(2)]) for k in cache.arrays}

    @jax.jit
    def losses(factors, ids, embeds):
        key = jax.random.PRNGKey(0)
        encoding = train.diffusion_loss(factors, ids, key, graphdef=graphdef, schedule=schedule, timestep_weights=None,
                                        empty=empty, cfg=step, frozen=frozen)
        unet = lora.components(nnx.merge(graphdef, lora.combine(factors, frozen)))["unet"]
        cached = train_step._unet_loss(unet, embeds, key, schedule, None, empty, step)
        return encoding, cached

    encoding, cached = losses(factors, ids, embeds)
    assert ids["input_ids"].shape == (2, CHUNKS * sdxl.TOKEN_LENGTH)
    np.testing.assert_allclose(float(encoding), float(cached), rtol=1e-5)


def test_a_run_on_long_captions_with_caption_dropout_exports_a_diffusers_folder(cache, workspace, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run_dir = tmp_path / "run"
    out = run_cli("train", "--config", str(DEMO_CONFIG),
                  *overrides(workspace, run_dir, *LONG, "train.caption_dropout=0.5", "export.at_end=true"))
    assert "trained to step" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(row["loss"]) for row in rows)
    pipe = StableDiffusionXLPipeline.from_pretrained(run_dir / "export")
    assert pipe.unet.config.cross_attention_dim == cache[0]["prompt_embeds"].shape[-1]
