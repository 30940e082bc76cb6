"""Prompts as users write them: weighting syntax, and text longer than CLIP's 77 tokens.

`parse(text, syntax)` reads a prompt into fragments of text, each with a weight:

- ``syntax="a1111"``, as the AUTOMATIC1111 web UI reads it (its wiki, "Features" > "Attention/emphasis";
  ComfyUI reads the same brackets): ``(text)`` x1.1, ``(text:1.3)``, ``[text]`` /1.1, nesting
  multiplies; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the characters themselves (a backslash before
  anything else is dropped, as there); ``BREAK`` ends the current chunk (see `chunk`).
- ``syntax="compel"``, as the compel library reads it (its README, "Syntax"): ``word+`` / ``word++``
  / ``word-`` weigh a word by 1.1^n / 0.9^n (n the signs), ``(several words)1.3``, ``(text)+``,
  ``"text"-``; a group without a weight only groups; ``\\(`` ``\\)`` ``\\"`` ``\\+`` ``\\-`` ``\\\\`` are
  the characters themselves. compel's ``.blend()``, ``.and()``, ``.swap()`` and ``.attend()`` are refused.

Where the tools are lenient this is strict: an unbalanced bracket (A1111 closes it silently), a
weight that is not a number and the syntax not supported here (A1111's ``[from:to:when]`` and
``[a|b]``) are a `PromptSyntaxError` naming the character. Fragments of equal weight next to each
other are merged, as both tools merge them.

`chunk(fragments, tokenizer, chunks)` lays the tokens out as A1111, kohya's sd-scripts and compel
(with truncate_long_prompts=False) do: the text in chunks of 75 tokens, each encoded as BOS + its
tokens + EOS, padded to 77 with the tokenizer's pad token; a prompt ends a chunk early only at
``BREAK``. Where a chunk ends differs by default: compel ends it at the last sentence, phrase or
word that fits, and A1111 moves the words after a comma among the chunk's last 20 tokens to the
next; kohya's sd-scripts, compel's SplitLongTextMode.BRUTAL and A1111 with comma_padding_backtrack
at 0 cut after 75 tokens, as here.

`compel_downweights` is the host half of compel's weights below 1 (see its docstring).

For both generators (xla_infer's text-encode graph, flax_train's sampler): `check_syntax` reads a
command line's texts before its model loads; `check_texts` reads every text of a call first,
refusing bad syntax and warning of what a text too long loses; `text_arrays` lays a batch of
texts out for one text encoder as both encode graphs read them (ids, weights, compel's passes).

Numpy, no torch or JAX: the PyTorch generator and the JAX sampler both use it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sdxl_common.errors import BadInput
from sdxl_common.sdxl import TOKEN_LENGTH

SYNTAXES = ("a1111", "compel")


class PromptSyntaxError(BadInput):
    """A prompt the weighting syntax cannot read; the message names the character."""


@dataclass(frozen=True)
class Fragment:
    """Text whose tokens all carry `weight`."""

    text: str
    weight: float = 1.0


class _Break:
    def __repr__(self) -> str:
        return "BREAK"


BREAK = _Break()  # A1111's BREAK among the fragments: the current chunk ends there


def parse(text: str, syntax: str = "a1111") -> list[Fragment | _Break]:
    """The fragments of ``text`` (and `BREAK` markers) as ``syntax`` ("a1111" or "compel") reads it;
    at least one fragment (an empty prompt is ``[Fragment("")]``)."""
    if syntax == "a1111":
        pieces = _Scanner(text).a1111()
        # A1111 multiplies a fragment's weight by each bracket as the bracket closes, innermost
        # first; compel by each group from the outermost in. The orders round differently, and
        # merging compares weights for equality, so each is followed.
        fragments = [p if p is BREAK else Fragment(p.text, _product(p.factors)) for p in pieces]
        return _merged(fragments, joiner="")
    if syntax == "compel":
        pieces = _Scanner(text).compel()
        # compel skips white space between its fragments, so runs of equal weight around it merge.
        fragments = [Fragment(p.text.strip(), _product(reversed(p.factors))) for p in pieces if p.text.strip()]
        return _merged(fragments, joiner=" ")
    raise BadInput(f"unknown prompt syntax {syntax!r}; use one of {', '.join(SYNTAXES)}")


@dataclass
class _Piece:
    text: str
    factors: list[float] = field(default_factory=list)  # the weights of the groups around it, innermost first


def _product(factors) -> float:
    weight = 1.0
    for factor in factors:
        weight *= factor
    return weight


def _merged(fragments: list, joiner: str) -> list:
    out: list = []
    for fragment in fragments:
        previous = out[-1] if out else None
        if fragment is not BREAK and previous not in (None, BREAK) and previous.weight == fragment.weight:
            out[-1] = Fragment(previous.text + joiner + fragment.text, fragment.weight)
        else:
            out.append(fragment)
    return out or [Fragment("")]


_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# A1111 reads ":<number>)" as a weight; any single word there is taken for one, so that a weight
# mistyped as "(red:1.x)" or "(red:high)" is refused instead of read as text.
_A1111_WEIGHT = re.compile(r":\s*([^\s()\[\]:]*)\s*\)")
_COMPEL_NUMBER = re.compile(r"\d+\.\d*|\.\d+|\d+")
_COMPEL_OPERATORS = re.compile(r"\.(?:blend|and|add|swap|attend)\s*\(|\b(?:withLora|useLora)\s*\(")
_CLOSES = {"(": ")", "[": "]", '"': '"'}


class _Scanner:
    """One pass over a prompt: text between brackets into pieces, each group's weight applied to
    the pieces inside it when it closes."""

    def __init__(self, text: str):
        self.text = text
        self.pieces: list = []
        self.buffer: list[str] = []  # the text since the last piece
        self.open: list[tuple[str, int, int]] = []  # (bracket, its position, its first piece)
        self.breaks = False  # A1111's BREAK splits the text

    def fail(self, problem: str, position: int) -> PromptSyntaxError:
        start = max(0, position - 20)
        context = ("..." if start else "") + self.text[start:position + 20]
        return PromptSyntaxError(f"character {position + 1} ({context!r}): {problem}")

    def flush(self) -> None:
        text, self.buffer = "".join(self.buffer), []
        if not text:
            return
        parts = _A1111_BREAK.split(text) if self.breaks else [text]
        for i, part in enumerate(parts):
            if i:
                self.pieces.append(BREAK)
            self.pieces.append(_Piece(part))

    def weigh(self, start: int, factor: float) -> None:
        for piece in self.pieces[start:]:
            if piece is not BREAK:
                piece.factors.append(factor)

    def close(self, bracket: str, position: int) -> int:
        """Closes the innermost group with ``bracket``; returns its first piece."""
        if not self.open:
            raise self.fail(f"{bracket!r} closes no bracket", position)
        opener, at, start = self.open.pop()
        if _CLOSES[opener] != bracket:
            raise self.fail(f"{bracket!r} does not close the {opener!r} at character {at + 1}", position)
        return start

    def finish(self) -> list:
        if self.open:
            opener, at, _ = self.open[-1]
            raise self.fail(f"{opener!r} is never closed", at)
        return self.pieces

    def a1111(self) -> list:
        text, i = self.text, 0
        self.breaks = True
        while i < len(text):
            c = text[i]
            inside = self.open[-1][0] if self.open else None
            if c == "\\":
                if text[i + 1:i + 2] in ("(", ")", "[", "]", "\\"):
                    self.buffer.append(text[i + 1])
                    i += 1
            elif c in "([":
                self.flush()
                self.open.append((c, i, len(self.pieces)))
            elif c in ")]":
                self.flush()
                self.weigh(self.close(c, i), 1.1 if c == ")" else 1 / 1.1)
            elif c == ":" and inside == "(" and (weight := _A1111_WEIGHT.match(text, i)):
                self.flush()
                self.weigh(self.close(")", weight.end() - 1), self.number(weight))
                i = weight.end() - 1
            elif c in ":|" and inside == "[":
                what = "prompt editing ([from:to:when])" if c == ":" else "alternation ([a|b])"
                raise self.fail(f"{what} is not supported", i)
            else:
                self.buffer.append(c)
            i += 1
        self.flush()
        return self.finish()

    def number(self, weight: re.Match) -> float:
        """The weight of a ``:<weight>)`` match: a finite number, or the prompt is refused."""
        if not weight[1]:
            raise self.fail("':' is followed by no weight", weight.start())
        try:
            value = float(weight[1])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise self.fail(f"the weight {weight[1]!r} is not a number", weight.start(1))
        return value

    def compel(self) -> list:
        text, i = self.text, 0
        unsupported = _COMPEL_OPERATORS.search(text)
        if unsupported:
            raise self.fail(f"compel's {unsupported[0].rstrip('( ')}() is not supported", unsupported.start())
        closed = None  # the first piece of a group that closed just before i, which a weight may follow
        while i < len(text):
            c = text[i]
            if c == "\\" and text[i + 1:i + 2] in ("(", ")", '"', "+", "-", "\\"):
                self.buffer.append(text[i + 1])
                i, closed = i + 2, None
                continue
            if c in "+-":
                signs = len(text[i:]) - len(text[i:].lstrip(c))
                end = i + signs
                factor = (1.1 if c == "+" else 0.9) ** signs
                # After a word the signs are a weight only where the word ends ("well-lit" is a word).
                ends_word = end == len(text) or text[end].isspace() or text[end] in '()",.'
                word = self.word_start() if ends_word else None
                if closed is not None:
                    self.weigh(closed, factor)
                elif word is not None:
                    self.buffer, target = self.buffer[:word], "".join(self.buffer[word:])
                    self.flush()
                    self.pieces.append(_Piece(target, [factor]))
                else:
                    self.buffer.append(text[i:end])
                i, closed = end, None
                continue
            if closed is not None and (number := _COMPEL_NUMBER.match(text, i)):
                self.weigh(closed, float(number[0]))
                i, closed = number.end(), None
                continue
            closed = None
            if c == "(" or (c == '"' and not (self.open and self.open[-1][0] == '"')):
                self.flush()
                self.open.append((c, i, len(self.pieces)))
            elif c in ')"':
                self.flush()
                closed = self.close(c, i)
            else:
                self.buffer.append(c)
            i += 1
        self.flush()
        return self.finish()

    def word_start(self) -> int | None:
        """Where the word at the end of the buffer starts (None: the buffer ends in no word)."""
        start = len(self.buffer)
        while start and not (self.buffer[start - 1].isspace() or self.buffer[start - 1] in ",."):
            start -= 1
        return None if start == len(self.buffer) else start


@dataclass(frozen=True)
class Chunks:
    """One prompt's tokens laid out in chunks of the text encoder's length (77 for CLIP)."""

    ids: np.ndarray  # (chunks, length) int64: BOS, up to length - 2 tokens, EOS, padding
    weights: np.ndarray  # (chunks, length) float32: each token's fragment's weight; 1 for BOS, EOS, padding
    parts: np.ndarray  # (chunks, length) int32: each token's fragment's index; -1 for BOS, EOS, padding
    dropped: list[int]  # the token ids past the last chunk, cut off


def chunk(fragments: Sequence[Fragment | _Break], tokenizer: Any, chunks: int, length: int = TOKEN_LENGTH) -> Chunks:
    """The fragments' tokens in ``chunks`` chunks (see the module's docstring); a prompt with fewer
    is followed by empty chunks (BOS, EOS, padding), one with more loses the rest (`Chunks.dropped`).

    ``tokenizer``: a Hugging Face CLIP tokenizer (or anything called the same way with
    bos_token_id, eos_token_id and pad_token_id). Each fragment is tokenised on its own, as A1111
    and compel do.
    """
    texts = [f.text for f in fragments if f is not BREAK]
    # verbose=False: the tokenizer would warn of every prompt longer than its 77 tokens, which chunking is for.
    tokenized = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
    body = length - 2
    rows: list[list[tuple[int, float, int]]] = []
    current: list[tuple[int, float, int]] = []
    for index, fragment in enumerate(fragments):
        if fragment is BREAK:  # as A1111: the chunk so far, even an empty one, is complete
            rows.append(current)
            current = []
            continue
        for token in next(tokenized):
            if len(current) == body:
                rows.append(current)
                current = []
            current.append((token, fragment.weight, index))
    if current or not rows:
        rows.append(current)
    kept, cut = rows[:chunks], rows[chunks:]
    kept += [[] for _ in range(chunks - len(kept))]
    ids = np.full((chunks, length), tokenizer.pad_token_id, dtype=np.int64)
    weights = np.ones((chunks, length), dtype=np.float32)
    parts = np.full((chunks, length), -1, dtype=np.int32)
    for row, tokens in enumerate(kept):
        ids[row, 0], ids[row, len(tokens) + 1] = tokenizer.bos_token_id, tokenizer.eos_token_id
        if tokens:
            ids[row, 1:len(tokens) + 1], weights[row, 1:len(tokens) + 1], parts[row, 1:len(tokens) + 1] = zip(*tokens)
    return Chunks(ids, weights, parts, [token for tokens in cut for token, _, _ in tokens])


@dataclass(frozen=True)
class Downweights:
    """compel's extra text-encoder passes for one prompt's weights below 1, as fixed-size arrays."""

    ids: np.ndarray  # (slots, length) int64: the chunk each pass encodes
    weights: np.ndarray  # (slots, length) float32: that chunk's weights
    mask: np.ndarray  # (slots, length) int64: 0 where the pass hides a fragment's tokens, else 1
    mix: np.ndarray  # (chunks, slots) float32: how much of each pass each chunk's embedding takes


def compel_downweights(chunks: Chunks, fragments: Sequence[Fragment | _Break], slots: int) -> Downweights:
    """The passes that compel's weights below 1 add, in ``slots`` slots (unused ones take no part).

    compel (its embeddings_provider, DownweightMode.MASK, the default) first gives every token
    ``e + (h - e) * w`` (h its hidden state, e the empty prompt's, w its weight; h where w is 1).
    Then each fragment f of weight w_f < 1 adds an embedding of the prompt with f's tokens masked
    out of the text encoder's attention, weighed t_f = tan((1 - w_f) * pi / 2) against the prompt's
    1, all normalised to sum 1. Chunks are encoded apart, so f's masked embedding differs from the
    prompt's only in the chunks holding f's tokens: each slot here is one (fragment, chunk) pair,
    and chunk c's embedding is ``base_c + sum_k mix[c, k] * (pass_k - base_c)`` with mix[c, k] =
    t_f / (1 + sum of all t). A prompt with more pairs than ``slots`` is refused.
    """
    length = chunks.ids.shape[1]
    lowered = [i for i, f in enumerate(fragments) if f is not BREAK and f.weight < 1 and (chunks.parts == i).any()]
    pairs = [(i, row) for i in lowered for row in range(len(chunks.ids)) if (chunks.parts[row] == i).any()]
    if len(pairs) > slots:
        raise BadInput(f"{len(pairs)} down-weighted parts (a fragment of weight below 1 in a chunk), {slots} at most: "
                       "compel's weighting encodes each once more")
    # The tangent's pole at weight 0 is kept off as compel keeps it off.
    lerp = {i: math.tan((1.0 - max(1e-5, fragments[i].weight)) * math.pi / 2) for i in lowered}
    total = 1.0 + sum(lerp.values())
    ids = np.repeat(chunks.ids[:1], slots, axis=0)  # unused slots encode the first chunk, mixed in by 0
    weights = np.repeat(chunks.weights[:1], slots, axis=0)
    mask = np.ones((slots, length), dtype=np.int64)
    mix = np.zeros((len(chunks.ids), slots), dtype=np.float32)
    for slot, (i, row) in enumerate(pairs):
        ids[slot], weights[slot] = chunks.ids[row], chunks.weights[row]
        mask[slot] = chunks.parts[row] != i
        mix[row, slot] = lerp[i] / total
    return Downweights(ids, weights, mask, mix)


def check_syntax(named_texts: Sequence[tuple[str, str]], syntax: str) -> None:
    """Each (name, text) read in ``syntax``, as a command line does before its model loads: a
    PromptSyntaxError naming the first bad text and its character."""
    for name, text in named_texts:
        try:
            parse(text, syntax)
        except PromptSyntaxError as error:
            raise PromptSyntaxError(f"{name}: {error}") from None


# compel's weights below 1 each cost one more text-encoder pass over a chunk (`compel_downweights`);
# the text-encode graph has room for this many per chunk of a prompt, used or not, so that its
# shapes stay fixed.
COMPEL_PASSES_PER_CHUNK = 8


def prompt_tokens(tokenizer: Any, text: str, chunks: int, length: int,
                  weighting: str | None) -> tuple[Chunks, Downweights | None]:
    """One text's tokens for ``tokenizer`` in ``chunks`` chunks of ``length``: the text as written
    without weighting, else read in the weighting's syntax ("a1111" or "compel"), with compel's
    extra passes for its weights below 1. Bad syntax, or too many down-weighted parts, is a BadInput."""
    fragments = [Fragment(text)] if weighting is None else parse(text, weighting)
    laid_out = chunk(fragments, tokenizer, chunks, length)
    if weighting != "compel":
        return laid_out, None
    return laid_out, compel_downweights(laid_out, fragments, COMPEL_PASSES_PER_CHUNK * chunks)


def text_arrays(tokenizer: Any, texts: Sequence[str], chunks: int, length: int,
                weighting: str | None) -> dict[str, np.ndarray]:
    """One text encoder's input for ``texts`` (the rows), as `prompt_tokens` lays each out:

    - ``ids`` (rows, chunks * length) int64, always;
    - ``weights`` (rows, chunks * length) float32, with a weighting;
    - with compel's, its passes for weights below 1 (`Downweights` of each row, stacked):
      ``pass_ids``, ``pass_weights``, ``pass_mask`` (rows, passes * length) and ``pass_mix``
      (rows, chunks, passes).
    """
    prepared = [prompt_tokens(tokenizer, text, chunks, length, weighting) for text in texts]

    def rows(arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays).reshape(len(arrays), -1)

    arrays = {"ids": rows([laid_out.ids for laid_out, _ in prepared])}
    if weighting is not None:
        arrays["weights"] = rows([laid_out.weights for laid_out, _ in prepared])
    if weighting == "compel":
        passes = [downweights for _, downweights in prepared]
        arrays |= {"pass_ids": rows([p.ids for p in passes]), "pass_weights": rows([p.weights for p in passes]),
                   "pass_mask": rows([p.mask for p in passes]), "pass_mix": np.stack([p.mix for p in passes])}
    return arrays


def check_texts(tokenizers: tuple[Any, Any], chunks: int, length: int, weighting: str | None, prompts, prompts_2,
                negatives, negatives_2, *, logger: logging.Logger, error: type[BadInput] = BadInput) -> list[int]:
    """Every text of a call read and laid out before anything runs: bad syntax is an ``error``
    naming the text, and a text longer than the chunks hold is logged to ``logger`` with what it
    lost. Returns each image's most tokens lost (of its texts, for either encoder). ``tokenizers``:
    the first (None for the refiner) and the second; ``negatives`` entries of None stand for ""."""
    limit = f"CLIP's {length} tokens" if chunks == 1 else f"{chunks} chunks of {length - 2} tokens"
    most_lost = []
    for i in range(len(prompts)):
        lost_here = 0
        for text_1, text_2, kind in ((negatives[i] or "", negatives_2[i], "negative prompt"),
                                     (prompts[i], prompts_2[i], "prompt")):
            # One warning when both encoders read the same text, else one per encoder's text.
            texts = [(tokenizers[0], text_1, kind), (tokenizers[1], text_2, kind if text_1 == text_2 else f"{kind} 2")]
            lost: dict[str, list] = {}
            for tokenizer, text, name in texts:
                if tokenizer is None:
                    continue
                try:
                    laid_out, _ = prompt_tokens(tokenizer, text, chunks, length, weighting)
                except BadInput as problem:
                    raise error(f"{name} {i}: {problem}") from None
                lost.setdefault(name, []).append((len(laid_out.dropped), laid_out.dropped, tokenizer))
            for name, candidates in lost.items():
                count, dropped, tokenizer = max(candidates, key=lambda candidate: candidate[0])
                if count:
                    logger.warning("%s %d is longer than %s: the last %d token(s) were dropped (%.60r...)",
                                   name, i, limit, count, tokenizer.decode(dropped))
                lost_here = max(lost_here, count)
        most_lost.append(lost_here)
    return most_lost
