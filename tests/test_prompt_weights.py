"""Prompt weighting and long prompts (sdxl_common.prompt_weights): the parser and the chunk layout
(a one-token-per-word tokenizer keeps the layout readable).
"""
import numpy as np
import pytest

from sdxl_common.errors import BadInput
from sdxl_common.prompt_weights import BREAK, Fragment, PromptSyntaxError, chunk, compel_downweights, parse


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
