"""Tests for infercept.sampling (parameter validation), infercept.engine.sampler and the stop check."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infercept.engine.sampler import Sampler, filter_probs
from infercept.engine.stop import check_stop
from infercept.sampling import SamplingParams, ScriptedIntercept

VOCAB_SIZE = 50


def _logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB_SIZE, generator=generator) * 3  # [B, V]


def _filtered(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1,
              top_p: float = 1.0) -> torch.Tensor:
    """Row 0's filtered distribution in vocabulary order. logits: [1, V] -> [V]."""
    return filter_probs(logits, torch.tensor([temperature]), torch.tensor([top_k]),
                        torch.tensor([top_p]))[0]


# --- SamplingParams validation ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature=-0.5 is outside [0, inf)"),
    ({"temperature": math.nan}, "temperature=nan is outside [0, inf)"),
    ({"top_k": 0}, "top_k=0 must be -1 (off) or >= 1"),
    ({"top_k": -2}, "top_k=-2 must be -1 (off) or >= 1"),
    ({"top_p": 1.5}, "top_p=1.5 is outside (0, 1]"),
    ({"top_p": 0.0}, "top_p=0.0 is outside (0, 1]"),
    ({"seed": -1}, "seed=-1 is below the minimum 0"),
    ({"seed": 2**64}, "at or above the limit 2**64"),
    ({"max_tokens": 0}, "max_tokens=0 is below the minimum 1"),
    ({"max_tokens": True}, "max_tokens=True must be an int"),
    ({"stop": "###"}, "stop='###' must be a list of strings"),
    ({"stop": [""]}, "stop string '' must be a non-empty str"),
    ({"stop_token_ids": [-3]}, "stop_token_ids entry=-3 is below the minimum 0"),
    ({"ignore_eos": 1}, "ignore_eos=1 must be a bool"),
    ({"n": 0}, "n=0 is below the minimum 1"),
    ({"n": 17}, "n=17 is above the limit 16"),
    ({"n": 2.0}, "n=2.0 must be an int"),
    ({"prompt_logprobs": 21}, "prompt_logprobs=21 is above the limit 20"),
    ({"prompt_logprobs": -1}, "prompt_logprobs=-1 is below the minimum 0"),
])
def test_sampling_params_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_scripted_intercept_validation():
    with pytest.raises(ValueError, match="exactly one of text"):
        ScriptedIntercept(after_tokens=3, duration_s=1.0)
    with pytest.raises(ValueError, match="exactly one of text"):
        ScriptedIntercept(after_tokens=3, duration_s=1.0, text="x", num_tokens=2)
    with pytest.raises(ValueError, match=r"duration_s=-1.0 is outside \[0, inf\)"):
        ScriptedIntercept(after_tokens=3, duration_s=-1.0, text="x")
    with pytest.raises(ValueError, match="after_tokens=0 is below the minimum 1"):
        ScriptedIntercept(after_tokens=0, duration_s=1.0, num_tokens=4)
    with pytest.raises(ValueError, match="num_tokens=0 is below the minimum 1"):
        ScriptedIntercept(after_tokens=2, duration_s=1.0, num_tokens=0)


def test_intercepts_must_increase_and_fit_in_max_tokens():
    first = ScriptedIntercept(after_tokens=5, duration_s=0.1, num_tokens=3)
    second = ScriptedIntercept(after_tokens=5, duration_s=0.1, text="ok")
    with pytest.raises(ValueError, match="must exceed the previous intercept's after_tokens=5"):
        SamplingParams(max_tokens=10, intercepts=[first, second])
    with pytest.raises(ValueError, match="after_tokens=5 is not below max_tokens=5"):
        SamplingParams(max_tokens=5, intercepts=[first])
    later = ScriptedIntercept(after_tokens=8, duration_s=0.1, text="ok")
    assert SamplingParams(max_tokens=10, intercepts=[first, later]).intercepts[1].text == "ok"


# --- Sampler ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_rows", [1, 3, 7])
def test_greedy_equals_argmax(num_rows):
    logits = _logits(num_rows)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-7)] * num_rows
    params = params[:num_rows]
    tokens = Sampler().sample(logits, list(range(num_rows)), params)
    assert torch.equal(tokens, logits.argmax(dim=1))


def test_top_k_one_equals_greedy():
    logits = _logits(5, seed=1)
    params = [SamplingParams(temperature=0.8, top_k=1, seed=i) for i in range(5)]
    sampler = Sampler()
    for _ in range(10):
        assert torch.equal(sampler.sample(logits, list(range(5)), params), logits.argmax(dim=1))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().unsqueeze(0)  # [1, V]
    # Sorted mass: 0.4, 0.7, 0.85, 0.95, 1.0; top_p=0.8 needs the first three tokens.
    filtered = _filtered(logits, top_p=0.8)
    assert torch.allclose(filtered, torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85)
    # top_p below the top token's mass keeps that token alone.
    assert torch.allclose(_filtered(logits, top_p=0.1), torch.tensor([0.0, 1, 0, 0, 0]))
    assert torch.allclose(_filtered(logits, top_p=1.0), probs)


def test_top_k_and_temperature_filter():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().unsqueeze(0)  # [1, V]
    assert torch.allclose(_filtered(logits, top_k=2), torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7)
    # Temperature 0.5 squares then renormalizes the probabilities.
    assert torch.allclose(_filtered(logits, temperature=0.5), probs**2 / (probs**2).sum())


def test_sampled_frequencies_follow_filtered_distribution():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().unsqueeze(0)  # [1, V]
    sampler = Sampler()
    params = [SamplingParams(top_p=0.8, seed=1234)]
    num_draws = 4000
    counts = torch.zeros(5)
    for _ in range(num_draws):
        counts[sampler.sample(logits, ["r"], params)[0]] += 1
    assert counts[0] == 0 and counts[2] == 0  # cut by top-p, never drawn
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    assert torch.allclose(counts / num_draws, expected, atol=0.03)


def test_same_seed_same_samples_regardless_of_batch():
    logits = _logits(4, seed=2)
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    alone = Sampler()
    crowded = Sampler()
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, seed=3),
              SamplingParams(temperature=0.7, top_k=5)]
    for step in range(20):
        solo = alone.sample(logits[2:3], ["target"], [target])
        # In the crowded batch the target sits at row 2, among greedy and sampled rows, and
        # the neighbours change from step to step.
        order = [others[step % 3], others[(step + 1) % 3], target, others[(step + 2) % 3]]
        batch = crowded.sample(logits, ["a", "b", "target", "c"], order)
        assert batch[2] == solo[0]


def test_release_restarts_the_generator():
    logits = _logits(1, seed=3)
    params = [SamplingParams(seed=11)]
    sampler = Sampler()
    first = [int(sampler.sample(logits, ["r"], params)[0]) for _ in range(8)]
    assert sampler.num_generators == 1
    sampler.release("r")
    assert sampler.num_generators == 0
    again = [int(sampler.sample(logits, ["r"], params)[0]) for _ in range(8)]
    assert first == again


def test_sampler_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="logits has 2 rows but got 1 request ids and 2"):
        Sampler().sample(_logits(2), ["a"], [SamplingParams()] * 2)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0.1, 2.0), st.integers(-1, VOCAB_SIZE + 5),
                          st.floats(0.01, 1.0)), min_size=1, max_size=6))
def test_sampled_token_is_always_in_the_kept_set(rows):
    rows = [(t, k if k != 0 else 1, p) for t, k, p in rows]
    logits = _logits(len(rows), seed=len(rows))
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=i)
              for i, (t, k, p) in enumerate(rows)]
    tokens = Sampler().sample(logits, list(range(len(rows))), params)
    for i, (t, k, p) in enumerate(rows):
        assert _filtered(logits[i:i + 1], t, k, p)[tokens[i]] > 0


def _reference_filtered(logits: torch.Tensor, temperature: float, top_k: int,
                        top_p: float) -> torch.Tensor:
    """top-k / top-p over a full stable sort of the vocabulary. logits: [V] -> [V]."""
    probs = torch.softmax(logits.float() / temperature, dim=0)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if 0 < top_k < len(probs):
        keep[top_k:] = False
    if top_p < 1:
        keep &= (torch.cumsum(sorted_probs, dim=0) - sorted_probs) < top_p
    keep[0] = True
    kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    return torch.zeros_like(probs).scatter(0, order, kept / kept.sum())


@settings(max_examples=60, deadline=None)
@given(st.floats(0.05, 4.0), st.sampled_from([-1, 1, 3, 63, 64, 65, 200, 999, 1000, 1500]),
       st.floats(0.05, 1.0), st.integers(0, 2**16), st.booleans())
def test_candidates_equal_a_full_sort(temperature, top_k, top_p, seed, quantized):
    # A vocabulary of 1000: nuclei and top-k cuts land before, at and past the 64 first
    # candidates (high temperatures flatten the row), and past the whole vocabulary.
    # Quantized logits make ties, which must be broken by token id as a stable sort does.
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(seed)) * 3
    if quantized:
        logits = logits.round()
    got = _filtered(logits, temperature, top_k, top_p)
    want = _reference_filtered(logits[0], temperature, top_k, top_p)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, atol=1e-5)


def test_rows_that_keep_everything_sample_every_token():
    # No top-k, top-p 1: inverse CDF over the vocabulary in id order, no token excluded.
    logits = torch.zeros(1, 8)
    sampler = Sampler()
    params = [SamplingParams(temperature=1.0, seed=5)]
    seen = {int(sampler.sample(logits, ["r"], params)[0]) for _ in range(400)}
    assert seen == set(range(8))


# --- check_stop ---------------------------------------------------------------------------

def test_stop_string_across_token_boundaries():
    params = SamplingParams(stop=["###"])
    pieces = ["The answer", " is 4", "#", "#", "# trailing"]
    text, num_checked_chars = "", 0
    for num_tokens, piece in enumerate(pieces, start=1):
        text += piece
        decision = check_stop(list(range(num_tokens)), text, params, eos_token_id=None,
                              num_checked_chars=num_checked_chars)
        num_checked_chars = len(text)
        if decision.should_stop:
            break
    assert num_tokens == 5
    assert decision.reason == "stop" and decision.stop_string == "###"
    assert decision.text == "The answer is 4"


@settings(max_examples=200, deadline=None)
@given(st.text("ab#", max_size=12), st.text("ab#", max_size=12),
       st.lists(st.integers(1, 4), min_size=1, max_size=30))
def test_stop_string_found_however_the_text_is_split(prefix, suffix, piece_lengths):
    text = prefix + "##" + suffix
    params = SamplingParams(stop=["##"])
    first_stop_end = text.index("##") + 2
    seen, num_checked_chars, num_tokens = "", 0, 0
    while not seen or len(seen) < len(text):
        seen += text[len(seen):len(seen) + piece_lengths[num_tokens % len(piece_lengths)]]
        num_tokens += 1
        decision = check_stop([0] * num_tokens, seen, params, None, num_checked_chars)
        num_checked_chars = len(seen)
        # It stops exactly on the piece that completes the first "##", never before.
        assert decision.should_stop == (len(seen) >= first_stop_end)
        if decision.should_stop:
            assert decision.text == text[:first_stop_end - 2]
            break


def test_earliest_stop_string_wins():
    params = SamplingParams(stop=["END", "\n\n"])
    decision = check_stop([1, 2], "a\n\nbEND", params, eos_token_id=None)
    assert decision.text == "a" and decision.stop_string == "\n\n"


def test_checked_text_is_not_searched_again():
    # Tool output appended before num_checked_chars must not end the request.
    params = SamplingParams(stop=["STOP"])
    decision = check_stop([1], "tool said STOP. ok", params, None, num_checked_chars=16)
    assert not decision.should_stop


def test_eos_stop_token_and_length():
    params = SamplingParams(max_tokens=3, stop_token_ids=[9])
    assert check_stop([4, 2], "ab", params, eos_token_id=2).reason == "eos"
    assert check_stop([4, 9], "ab", params, eos_token_id=2).reason == "stop"
    assert check_stop([4, 5, 6], "abc", params, eos_token_id=2).reason == "length"
    assert not check_stop([4, 5], "ab", params, eos_token_id=2).should_stop
    ignoring = SamplingParams(ignore_eos=True)
    assert not check_stop([4, 2], "ab", ignoring, eos_token_id=2).should_stop


def test_stop_string_on_last_token_is_still_trimmed():
    params = SamplingParams(max_tokens=2, stop=["!"])
    decision = check_stop([1, 2], "hi!", params, eos_token_id=None)
    assert decision.reason == "stop" and decision.text == "hi"
