"""Long and weighted prompts in the JAX sampler (`Generator`, `flax-train sample`, validation images).

The text embeddings equal xla_infer's for the same pipeline folder (tests/test_prompt_weights.py
shows xla_infer's equal to compel's and to A1111's definition, so this chains to them); new
prompts, weights and lengths within the chunks compile nothing; the command line reads the
syntax before loading and records the prompt as written.
"""
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flax_train import cli
from flax_train.demo.tiny import save_tiny_pipeline
from flax_train.models import clip
from flax_train.sampling import Generator
from sdxl_common import sdxl

ATOL = 1e-5  # fp32 on the CPU, torch's kernels against XLA's
LONG = " ".join(["red circle"] * 50)  # 100 tokens: two chunks
CHUNKS = 2

PROMPTS = {
    None: ["a red circle", "", LONG, " ".join(["red circle"] * 90)],  # the last cut after two chunks
    "a1111": ["a (red:1.3) circle", "((a)) [b] c, (square:0.5)", "a red circle BREAK (blue square:0.7) BREAK star",
              "", "(" + LONG + ":1.2) " + LONG],
    "compel": ["a red+ circle--", "(a red (blue)1.4 circle)1.2 square", r"a \(red\) circle", "a- b- (c d)0.5, e", "",
               "(" + " ".join(["blue square"] * 40) + ")0.8 red-", "blue+ " + " ".join(["red circle"] * 90)],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("prompts") / "pipe", seed=3, image_size=32, layers_per_block=1)


def text_generator(folder, weighting, chunks=CHUNKS):
    return Generator(folder, load_unet=False, max_text_chunks=chunks, prompt_weighting=weighting)


@pytest.mark.parametrize("weighting", [None, "a1111", "compel"])
def test_embeddings_equal_xla_infers(folder, weighting):
    from xla_infer import Pipeline

    prompts = PROMPTS[weighting]
    embeds = text_generator(folder, weighting).encode(prompts, [None] * len(prompts))
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype="fp32", batch_size=1, steps=1,
                                    max_text_chunks=CHUNKS, prompt_weighting=weighting)
    theirs, their_pooled = pipe.text_embeddings(prompts)
    assert embeds["prompt_embeds"].shape == tuple(theirs.shape) == (len(prompts), CHUNKS * 77, 96)
    np.testing.assert_allclose(embeds["prompt_embeds"], theirs, rtol=0, atol=ATOL)
    np.testing.assert_allclose(embeds["pooled"], their_pooled, rtol=0, atol=ATOL)


def test_one_chunk_unweighted_is_the_plain_encoding_bit_for_bit(folder):
    generator = Generator(folder, load_unet=False)
    prompts = ["a red circle", LONG, ""]
    embeds = generator.encode(prompts, [None] * len(prompts))
    te1, te2 = nnx.merge(*generator._text)
    expected, expected_pooled = jax.jit(clip.encode_prompts)(te1, te2, *sdxl.tokenize(generator.tokenizers, prompts))
    np.testing.assert_array_equal(embeds["prompt_embeds"], expected)
    np.testing.assert_array_equal(embeds["pooled"], expected_pooled)


@pytest.mark.parametrize("weighting", ["a1111", "compel"])
def test_new_prompts_weights_and_lengths_compile_nothing(folder, weighting):
    generator = text_generator(folder, weighting)
    generator.encode(["a cat", "a dog"], [None, "blurry"])
    compiled = Generator._encode._cache_size()
    for prompts, negatives in [(PROMPTS[weighting][:2], [None, None]), (PROMPTS[weighting][-2:], ["ugly", ""]),
                               ([LONG, "x"], [PROMPTS[weighting][0], None])]:
        generator.encode(prompts, negatives)
    assert Generator._encode._cache_size() == compiled


def test_a_prompt_too_long_says_what_it_loses(folder, caplog):
    with caplog.at_level("WARNING"):
        text_generator(folder, "a1111").encode([" ".join(["red circle"] * 80)], ["(blurry)"])
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "prompt 0 is longer than 2 chunks of 75 tokens: the last 10 token(s) were dropped "
        "('red circle red circle red circle red circle red circle'...)"]


def test_sample_writes_the_prompt_as_written_and_refuses_bad_syntax(folder, tmp_path, capsys):
    out = tmp_path / "samples"
    prompt = "a (red circle:1.3) BREAK [blue] " + "square " * 60
    assert cli.main(["sample", "--model", str(folder), "--prompt", prompt, "--negative-prompt", "(blurry)",
                     "--prompt-weighting", "a1111", "--max-text-chunks", "2", "--steps", "2", "--out", str(out)]) == 0
    with Image.open(out / "0000.png") as png:
        assert png.text["prompt"] == prompt and png.text["negative_prompt"] == "(blurry)"
        assert png.text["prompt_weighting"] == "a1111" and png.text["max_text_chunks"] == "2"
        assert png.text["parameters"].startswith(prompt)
    capsys.readouterr()
    for args, message in [
        (["--prompt", "a (red circle:1.x)", "--prompt-weighting", "a1111"],
         "prompt 0: character 15 ('a (red circle:1.x)'): the weight '1.x' is not a number"),
        (["--prompt", "a cat", "--negative-prompt", "(blurry", "--prompt-weighting", "compel"],
         "--negative-prompt: character 1 ('(blurry'): '(' is never closed"),
        (["--prompt", "a cat", "--max-text-chunks", "0"], "max_text_chunks must be a positive integer, got 0"),
    ]:
        assert cli.main(["sample", "--model", str(tmp_path / "no model"), *args, "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"flax-train sample: error: {message}\n"


def test_validation_images_read_the_prompts_as_configured(folder, tmp_path):
    from flax_train import config
    from flax_train.sampling import Validator

    prompts = PROMPTS["compel"][:2]
    cfg = config.load(overrides=["model.dtype=float32", f"validation.prompts={prompts}",
                                 "validation.max_text_chunks=2", "validation.prompt_weighting=compel"])
    validator = Validator(cfg, folder, tmp_path, writer=None)
    expected = text_generator(folder, "compel").encode(prompts, [None] * len(prompts))
    np.testing.assert_array_equal(validator.embeds["prompt_embeds"], expected["prompt_embeds"])
    # Left unset, the chunks are the captions' (data.max_text_chunks), as the model was trained.
    trained = config.load(overrides=["model.dtype=float32", f"validation.prompts={prompts}", "data.max_text_chunks=3"])
    assert Validator(trained, folder, tmp_path, writer=None).embeds["prompt_embeds"].shape[1] == 3 * 77
