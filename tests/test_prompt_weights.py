"""Prompt weighting and long prompts (sdxl_common.prompt_weights, xla_infer's text encoding).

The parser and the chunk layout on their own (a one-token-per-word tokenizer keeps the layout
readable); then the text embeddings of the tiny SDXL pipeline's two encoders: compel's weighting
equal to compel's own output, A1111's to its definition written out below, no weighting to
diffusers' encode_prompt. Plain torch on the CPU; tests/test_xla_device.py runs the same on a
torch_xla device and counts its compilations.
"""
import logging

import numpy as np
import pytest
import torch

from flax_train.demo.tiny import save_tiny_pipeline
from sdxl_common.errors import BadInput
from sdxl_common.prompt_weights import BREAK, Fragment, PromptSyntaxError, chunk, compel_downweights, parse
from xla_infer import InputError, Pipeline

ATOL = 1e-5  # fp32 on the same CPU kernels, summed in other orders
LONG = " ".join(["red circle"] * 50)  # 100 tokens: two chunks


# ---------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("syntax, prompt, expected", [
    ("a1111", "a red circle", [("a red circle", 1.0)]),
    ("a1111", "", [("", 1.0)]),
    ("a1111", "a (red:1.3) hat", [("a ", 1.0), ("red", 1.3), (" hat", 1.0)]),
    ("a1111", "(red) ((hat)) [blue]", [("red", 1.1), (" ", 1.0), ("hat", 1.1 * 1.1), (" ", 1.0), ("blue", 1 / 1.1)]),
    # nesting multiplies, each bracket as it closes
    ("a1111", "(a [b] c:1.5)", [("a ", 1.5), ("b", 1 / 1.1 * 1.5), (" c", 1.5)]),
    ("a1111", r"\(literal\) \[too\] \\ and\x", [(r"(literal) [too] \ andx", 1.0)]),
    ("a1111", "(photo: a cat) at 12:30", [("photo: a cat", 1.1), (" at 12:30", 1.0)]),
    ("a1111", "a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a1111", "(x BREAK y) BREAKfast", [("x", 1.1), BREAK, ("y", 1.1), (" BREAKfast", 1.0)]),
    ("a1111", "(a)(b)", [("ab", 1.1)]),  # equal weights merge, their text joined as A1111 joins it
    ("compel", "a red circle", [("a red circle", 1.0)]),
    ("compel", "  ", [("", 1.0)]),
    ("compel", "a red+ circle-", [("a", 1.0), ("red", 1.1), ("circle", 0.9)]),
    ("compel", "red++ hat--", [("red", 1.1 ** 2), ("hat", 0.9 ** 2)]),
    ("compel", "(red hat)1.3 on a (cat)+", [("red hat", 1.3), ("on a", 1.0), ("cat", 1.1)]),
    ("compel", "(a (b)1.2 c)1.1", [("a", 1.1), ("b", 1.1 * 1.2), ("c", 1.1)]),
    ("compel", "a- b-", [("a b", 0.9)]),  # compel skips the space between: one fragment
    ("compel", "well-lit (just grouped)", [("well-lit just grouped", 1.0)]),
    ("compel", r'\(literal\) C\+\+ "quoted words"0.5', [("(literal) C++", 1.0), ("quoted words", 0.5)]),
    ("compel", "a BREAK b", [("a BREAK b", 1.0)]),  # no BREAK in compel's syntax
])
def test_parse(syntax, prompt, expected):
    got = [f if f is BREAK else (f.text, f.weight) for f in parse(prompt, syntax)]
    assert got == expected


def test_compel_syntax_reads_as_compel_does():
    from compel import Compel

    for prompt in ["a red+ circle--", "(a (b)1.2 c)1.1 d", "a- b- (c d)0.5, e+", r"a \(red\) circle", ""]:
        theirs = Compel.parse_prompt_string(prompt).prompts[0].children
        ours = parse(prompt, "compel")
        assert [f.weight for f in ours] == [f.weight for f in theirs]
        assert [f.text.split() for f in ours] == [f.text.split() for f in theirs]


@pytest.mark.parametrize("syntax, prompt, expected", [
    ("a1111", "(red", "character 1 ('(red'): '(' is never closed"),
    ("a1111", "red)", "character 4 ('red)'): ')' closes no bracket"),
    ("a1111", "a (red]", "character 7 ('a (red]'): ']' does not close the '(' at character 3"),
    ("a1111", "(red:abc)", "character 6 ('(red:abc)'): the weight 'abc' is not a number"),
    ("a1111", "(red:1.2.3)", "character 6 ('(red:1.2.3)'): the weight '1.2.3' is not a number"),
    ("a1111", "(red: )", "character 5 ('(red: )'): ':' is followed by no weight"),
    ("a1111", "[cat:dog:0.5]", "character 5 ('[cat:dog:0.5]'): prompt editing ([from:to:when]) is not supported"),
    ("a1111", "[cat|dog]", "character 5 ('[cat|dog]'): alternation ([a|b]) is not supported"),
    ("a1111", "x" * 30 + "((red)", "character 31 ('..." + "x" * 20 + "((red)'): '(' is never closed"),
    ("compel", "(red", "character 1 ('(red'): '(' is never closed"),
    ("compel", 'a "red', "character 3 ('a \"red'): '\"' is never closed"),
    ("compel", "red)+", "character 4 ('red)+'): ')' closes no bracket"),
    ("compel", "(a, b).blend(1, 1)", "character 7 ('(a, b).blend(1, 1)'): compel's .blend() is not supported"),
])
def test_bad_syntax_names_the_character(syntax, prompt, expected):
    with pytest.raises(PromptSyntaxError) as error:
        parse(prompt, syntax)
    assert str(error.value) == expected and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------- chunks


class WordTokenizer:
    """One token per word, numbered as first seen: enough to read a layout."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=True, verbose=True):
        assert not add_special_tokens
        return {"input_ids": [[self.id(word) for word in text.split()] for text in texts]}

    def id(self, word: str) -> int:
        return self.vocab.setdefault(word, 10 + len(self.vocab))


def layout(fragments, chunks, length=7):
    """Each chunk's tokens as words (BOS "<", EOS ">", padding "_") with their weights."""
    tokenizer = WordTokenizer()
    laid_out = chunk(fragments, tokenizer, chunks, length)
    words = {v: k for k, v in tokenizer.vocab.items()} | {0: "<", 1: ">", 2: "_"}
    rows = [" ".join(words[int(i)] for i in row) for row in laid_out.ids]
    dropped = [words[i] for i in laid_out.dropped]
    return rows, laid_out.weights.tolist(), laid_out.parts.tolist(), dropped


def test_chunks_hold_five_tokens_here_between_bos_and_eos_then_padding():
    rows, weights, parts, dropped = layout([Fragment("a b"), Fragment("c", 1.5)], chunks=2)
    assert rows == ["< a b c > _ _", "< > _ _ _ _ _"]  # the second chunk empty: BOS, EOS, padding
    assert weights[0] == [1, 1, 1, 1.5, 1, 1, 1] and weights[1] == [1] * 7
    assert parts[0] == [-1, 0, 0, 1, -1, -1, -1] and dropped == []
    rows, *_ = layout([Fragment("a b c d e")], chunks=2)  # exactly full: EOS last
    assert rows == ["< a b c d e >", "< > _ _ _ _ _"]
    rows, *_ = layout([Fragment("a b c d e f")], chunks=2)
    assert rows == ["< a b c d e >", "< f > _ _ _ _"]


def test_a_longer_prompt_is_cut_and_what_is_cut_is_said():
    rows, _, _, dropped = layout([Fragment("a b c d e f g h i j k l")], chunks=2)
    assert rows == ["< a b c d e >", "< f g h i j >"] and dropped == ["k", "l"]


def test_break_pads_out_the_chunk_as_a1111():
    rows, *_ = layout(parse("a b BREAK c", "a1111"), chunks=3)
    assert rows == ["< a b > _ _ _", "< c > _ _ _ _", "< > _ _ _ _ _"]
    rows, *_ = layout(parse("BREAK a BREAK", "a1111"), chunks=3)  # an empty first chunk; nothing after the last
    assert rows == ["< > _ _ _ _ _", "< a > _ _ _ _", "< > _ _ _ _ _"]
    rows, *_ = layout(parse("a b c d e BREAK f", "a1111"), chunks=2)  # a full chunk is not followed by an empty one
    assert rows == ["< a b c d e >", "< f > _ _ _ _"]


def test_compel_downweights_one_pass_per_fragment_and_chunk():
    fragments = [Fragment("a"), Fragment("b c d e f", 0.5), Fragment("g"), Fragment("h", 0.9)]
    laid_out = chunk(fragments, WordTokenizer(), 2, length=7)  # "< a b c d e >", "< f g h > _ _"
    passes = compel_downweights(laid_out, fragments, slots=4)
    t_half, t_h = np.tan(0.5 * np.pi / 2), np.tan(0.1 * np.pi / 2)
    total = 1 + t_half + t_h  # each fragment once, though "b c d e f" spans both chunks
    np.testing.assert_allclose(passes.mix, [[t_half / total, 0, 0, 0], [0, t_half / total, t_h / total, 0]], rtol=1e-6)
    assert passes.mask.tolist()[:3] == [[1, 1, 0, 0, 0, 0, 1], [1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1]]
    assert (passes.ids[:3] == laid_out.ids[[0, 1, 1]]).all() and (passes.weights[1] == laid_out.weights[1]).all()
    with pytest.raises(BadInput, match="3 down-weighted parts .* 2 at most"):
        compel_downweights(laid_out, fragments, slots=2)


# ---------------------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("prompt_weights") / "sdxl", seed=0)


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder)


def load(folder, **kwargs):
    return Pipeline.from_pretrained(folder, device="cpu", dtype="fp32", batch_size=1, steps=1, **kwargs)


# (prompt, the same text without compel's syntax): compel's pooled embedding reads the prompt as
# written, syntax and all (its get_pooled_embeddings([text])); ours the first chunk of the text read.
COMPEL_PROMPTS = [
    ("a red circle", None),
    ("", None),
    ("a red+ circle--", "a red circle"),
    ("(a red (blue)1.4 circle)1.2 square", "a red blue circle square"),
    (r"a \(red\) circle", "a (red) circle"),
    ("a- b- (c d)0.5, e", "a b c d, e"),
    (LONG, None),
    ("(" + " ".join(["blue square"] * 40) + ")0.8 red-", " ".join(["blue square"] * 40) + " red"),  # across chunks
    ("blue+ " + " ".join(["red circle"] * 90), "blue " + " ".join(["red circle"] * 90)),  # cut after two chunks
]


def test_compel_weighting_equals_compel(folder, reference):
    from compel import Compel, ReturnedEmbeddingsType
    from compel.embeddings_provider import SplitLongTextMode

    chunks = 2
    compel = Compel(tokenizer=[reference.tokenizer, reference.tokenizer_2],
                    text_encoder=[reference.text_encoder, reference.text_encoder_2],
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    requires_pooled=[False, True], truncate_long_prompts=False,
                    # compel ends a chunk at the last sentence, phrase or word that fits; A1111 and
                    # kohya's sd-scripts (and we) after 75 tokens, as this mode does.
                    split_long_text_mode=SplitLongTextMode.BRUTAL)
    # compel 2.5.1's two-encoder provider has no empty_z of its own; its padding is each encoder's, side by side.
    with torch.no_grad():
        empty = torch.cat([provider.empty_z for provider in compel.conditioning_provider.embedding_providers], -1)
    pipe = load(folder, max_text_chunks=chunks, prompt_weighting="compel")
    embeds, pooled = pipe.text_embeddings([prompt for prompt, _ in COMPEL_PROMPTS])
    assert embeds.shape == (len(COMPEL_PROMPTS), chunks * 77, 96) and pooled.shape == (len(COMPEL_PROMPTS), 32)
    for i, (prompt, plain) in enumerate(COMPEL_PROMPTS):
        with torch.no_grad():
            theirs, _ = compel(prompt)
            _, their_pooled = compel(prompt if plain is None else plain)
        theirs = compel.pad_conditioning_tensors_to_same_length([theirs, embeds[:1]], empty)[0]
        # Past the chunk count compel goes on; its first chunks are the same (encoded apart).
        np.testing.assert_allclose(embeds[i], theirs[0, :chunks * 77], rtol=0, atol=ATOL, err_msg=prompt)
        np.testing.assert_allclose(pooled[i], their_pooled[0], rtol=0, atol=ATOL, err_msg=prompt)


def a1111_definition(reference, prompt: str, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's emphasis ("Original"), written out: each chunk's penultimate hidden states times each
    token's weight, scaled back to the chunk's unweighted mean; the encoders side by side; the
    pooled embedding the second encoder's of the first chunk, unweighted."""
    fragments = parse(prompt, "a1111")
    embeds = []
    for tokenizer, encoder in ((reference.tokenizer, reference.text_encoder),
                               (reference.tokenizer_2, reference.text_encoder_2)):
        laid_out = chunk(fragments, tokenizer, chunks)
        with torch.no_grad():
            out = encoder(torch.from_numpy(laid_out.ids), output_hidden_states=True)
        z = out.hidden_states[-2]
        weighted = z * torch.from_numpy(laid_out.weights)[..., None]
        weighted = weighted * (z.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
        embeds.append(weighted.reshape(1, -1, z.shape[-1]))
    return torch.cat(embeds, dim=-1)[0], out.text_embeds[0]


def test_a1111_weighting_equals_its_definition(folder, reference):
    chunks = 3
    prompts = ["a (red:1.3) circle", "((a)) [b] c, (square:0.5)", "a red circle BREAK (blue square:0.7) BREAK star",
               "", "(" + LONG + ":1.2) " + LONG]
    pipe = load(folder, max_text_chunks=chunks, prompt_weighting="a1111")
    embeds, pooled = pipe.text_embeddings(prompts)
    for i, prompt in enumerate(prompts):
        expected, expected_pooled = a1111_definition(reference, prompt, chunks)
        np.testing.assert_allclose(embeds[i], expected, rtol=0, atol=ATOL, err_msg=prompt)
        np.testing.assert_allclose(pooled[i], expected_pooled, rtol=0, atol=ATOL, err_msg=prompt)
    unweighted, _ = pipe.text_embeddings(["a red circle"])  # weights of 1: the scale is 1 exactly
    assert torch.equal(unweighted, load(folder, max_text_chunks=chunks).text_embeddings(["a red circle"])[0])


def test_without_weighting_one_chunk_is_diffusers_and_more_chunks_follow_on(folder, reference):
    prompts = ["a red circle", LONG, ""]
    embeds, pooled = load(folder).text_embeddings(prompts)

    def diffusers(texts):
        with torch.no_grad():
            embeds, _, pooled, _ = reference.encode_prompt(texts, do_classifier_free_guidance=False)
        return embeds, pooled

    expected, expected_pooled = diffusers(prompts)
    assert torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)  # bit for bit: today's path
    two, two_pooled = load(folder, max_text_chunks=2).text_embeddings(prompts)
    np.testing.assert_allclose(two[:, :77], embeds, rtol=0, atol=ATOL)  # the first chunk, then the rest
    np.testing.assert_allclose(two_pooled, pooled, rtol=0, atol=ATOL)
    rest, _ = diffusers(["circle " + " ".join(["red circle"] * 12)])
    np.testing.assert_allclose(two[1, 77:], rest[0], rtol=0, atol=ATOL)  # tokens 76-100 in a chunk of their own
    empty, _ = diffusers([""])
    np.testing.assert_allclose(two[0, 77:], empty[0], rtol=0, atol=ATOL)  # a short prompt's second chunk: the empty one


def test_generation_reads_every_prompt_first_and_names_what_is_cut(folder, caplog):
    pipe = load(folder, max_text_chunks=2, prompt_weighting="compel")
    with pytest.raises(InputError, match=r"^negative prompt 1: character 1 \('\(blurry'\): '\(' is never closed$"):
        pipe(["a cat", "a dog"], negative_prompts=[None, "(blurry"])
    assert pipe.warmed_up == set()  # refused before compiling
    with pytest.raises(InputError, match="prompt 0: 17 down-weighted parts .* 16 at most"):
        pipe([" ".join(["red-, blue"] * 17)])
    too_long = " ".join(["red circle"] * 80)
    with caplog.at_level(logging.WARNING, logger="xla_infer"):
        image = pipe(["a red circle+", too_long], seeds=[1, 2])[1]
    messages = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert messages == ["prompt 1 is longer than 2 chunks of 75 tokens: the last 10 token(s) were dropped "
                        "('red circle red circle red circle red circle red circle'...)"]
    assert image.info["prompt"] == too_long and image.info["tokens_dropped"] == 10
    assert image.info["prompt_weighting"] == "compel" and image.info["max_text_chunks"] == 2
    assert pipe.describe()["max_text_chunks"] == 2 and pipe.describe()["prompt_weighting"] == "compel"


def test_options_are_checked_before_loading(folder):
    with pytest.raises(InputError, match="max_text_chunks must be a positive integer, got 0"):
        load(folder, max_text_chunks=0)
    with pytest.raises(InputError, match="prompt_weighting must be None or one of a1111, compel, got 'comfy'"):
        load(folder, prompt_weighting="comfy")
