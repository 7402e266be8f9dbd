"""Tests of the workload model and trace loader, on the real trace and on small hand-made ones."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infercept.bench.workload import (
    TEXT_KINDS,
    TOKEN_COUNT_KINDS,
    Segment,
    WorkloadRequest,
    load_trace,
    poisson_arrivals,
    scale_to_context,
)

TRACE_PATH = Path(
    os.environ.get("INFERCEPT_TRACE")
    or Path(__file__).resolve().parents[3] / "shared/workloads/infercept_mixed.json"
)
needs_trace = pytest.mark.skipif(
    not TRACE_PATH.is_file(), reason=f"trace {TRACE_PATH} not found (set INFERCEPT_TRACE to its path)"
)


class CharTokenizer:
    """One token per character: makes text counts exact and easy to check."""

    def encode(self, text: str) -> list:
        return list(text)


@pytest.fixture(scope="module")
def raw_trace() -> dict:
    with open(TRACE_PATH) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trace() -> list[WorkloadRequest]:
    return load_trace(TRACE_PATH)


def write_trace(tmp_path: Path, content) -> Path:
    path = tmp_path / "trace.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ---- the real trace ----


@needs_trace
def test_trace_has_all_requests_in_file_order(trace, raw_trace):
    assert len(trace) == 397
    assert [r.request_id for r in trace] == list(raw_trace)
    assert all(r.arrival_s == 0.0 for r in trace)


@needs_trace
def test_intercept_counts_match_readme(trace, raw_trace):
    # The README's counts are the segments carrying an api_time, trailing calls included.
    def is_text(segments):
        return "prompt" in segments[0]

    raw_token = sum("api_time" in s for segs in raw_trace.values() if not is_text(segs) for s in segs)
    raw_text = sum("api_time" in s for segs in raw_trace.values() if is_text(segs) for s in segs)
    assert (raw_token, raw_text) == (716, 1125)
    assert sum(r.num_intercepts for r in trace if r.kind in TOKEN_COUNT_KINDS) == 716
    assert sum(r.num_intercepts for r in trace if r.kind in TEXT_KINDS) == 1125


@needs_trace
def test_kinds_are_inferred(trace):
    counts = {kind: sum(r.kind == kind for r in trace) for kind in TOKEN_COUNT_KINDS + TEXT_KINDS}
    assert sum(counts.values()) == 397
    assert counts["chatbot"] == counts["image"] == counts["tts"] == 65
    assert counts["virtual_env"] == 54
    # 98 math and 50 QA in the file; one QA request's only lookup took 0 s and reads as math.
    assert (counts["math"], counts["qa"]) == (99, 49)


@needs_trace
@pytest.mark.parametrize(
    "kind, intercepts_range, tool_s_range, paper_tool_s",
    [
        # Table 1 gives 3.75 / 2.52 / 28.18 intercepts; this copy of the trace has ~2.8 / ~3.1 /
        # ~5.4 (its ALFWorld episodes stop at a 2048-token context), so the bounds are loose.
        ("math", (2.0, 4.5), (2e-5, 5e-4), 9e-5),
        ("qa", (2.0, 4.5), (0.4, 1.0), 0.69),
        ("virtual_env", (4.0, 8.0), (0.05, 0.15), 0.09),
    ],
)
def test_token_kinds_roughly_reproduce_table_1(trace, kind, intercepts_range, tool_s_range, paper_tool_s):
    requests = [r for r in trace if r.kind == kind]
    mean_intercepts = np.mean([r.num_intercepts for r in requests])
    mean_tool_s = np.mean([s.tool_duration_s for r in requests for s in r.segments[:-1]])
    assert intercepts_range[0] <= mean_intercepts <= intercepts_range[1]
    assert tool_s_range[0] <= mean_tool_s <= tool_s_range[1]
    assert mean_tool_s == pytest.approx(paper_tool_s, rel=0.25)


@needs_trace
def test_text_kinds_tool_times_match_table_1(trace):
    for kind, paper_tool_s in [("chatbot", 28.6), ("image", 20.03), ("tts", 17.24)]:
        durations_s = [s.tool_duration_s for r in trace if r.kind == kind for s in r.segments[:-1]]
        assert np.mean(durations_s) == pytest.approx(paper_tool_s, rel=0.1), kind


@needs_trace
def test_token_segments_count_the_context_once(trace, raw_trace):
    for request in trace:
        if request.kind not in TOKEN_COUNT_KINDS:
            continue
        raw_segments = raw_trace[request.request_id]
        assert request.prompt_tokens == raw_segments[0]["prompt_tokens"]
        assert [s.completion_tokens for s in request.segments[: len(raw_segments)]] == [
            s["completion_tokens"] for s in raw_segments
        ]
        last = raw_segments[-1]
        final_context = last["prompt_tokens"] + last["completion_tokens"]
        if "api_time" in last:  # trailing call: its (clamped) return, then one token
            final_context += max(0, last["api_token_length"]) + 1
        assert request.max_context_tokens == final_context


@needs_trace
def test_text_segments_count_the_context_once(raw_trace):
    # With one token per character, the final context must equal the final conversation's length.
    requests = load_trace(TRACE_PATH, tokenizer=CharTokenizer())
    num_text = 0
    for request in requests:
        raw_segments = raw_trace[request.request_id]
        if "prompt" not in raw_segments[0]:
            continue
        num_text += 1
        last = raw_segments[-1]
        final_text = last["prompt"] + last["completion"] + last.get("api_token", "")
        assert request.prompt_tokens == len(raw_segments[0]["prompt"])
        assert request.max_context_tokens == len(final_text) + ("api_time" in last)
    assert num_text == 195


@needs_trace
def test_trailing_tool_calls_become_an_intercept_and_one_token(trace, raw_trace):
    for request in trace:
        raw_segments = raw_trace[request.request_id]
        if "api_time" in raw_segments[-1]:
            assert len(request.segments) == len(raw_segments) + 1
            assert request.segments[-1] == Segment(completion_tokens=1)
        else:
            assert len(request.segments) == len(raw_segments)


@needs_trace
def test_text_estimate_is_four_characters_per_token(trace, raw_trace):
    chatbot = next(r for r in trace if r.kind == "chatbot")
    prompt = raw_trace[chatbot.request_id][0]["prompt"]
    assert chatbot.prompt_tokens == math.ceil(len(prompt) / 4)


# ---- hand-made traces ----


def test_token_segments_parse(tmp_path):
    path = write_trace(
        tmp_path,
        {
            "r": [
                {"prompt_tokens": 10, "completion_tokens": 5, "api_time": 0.5, "api_token_length": 3},
                # 10 + 5 + 3 = 18 expected; the 2 extra tokens join the previous tool return.
                {"prompt_tokens": 20, "completion_tokens": 7},
            ]
        },
    )
    (request,) = load_trace(path)
    assert request == WorkloadRequest(
        "r", "qa", 10, (Segment(5, 0.5, 5), Segment(7)), arrival_s=0.0
    )
    assert request.num_intercepts == 1
    assert request.num_output_tokens == 12
    assert request.total_tool_time_s == 0.5
    assert request.max_context_tokens == 27


def test_text_prompt_that_only_adds_a_turn_counts_it_once(tmp_path):
    path = write_trace(
        tmp_path,
        {
            "c": [
                {"prompt": "abcdefgh", "completion": "abcd", "api_token": "ab", "api_time": 2.0},
                {"prompt": "new turn", "completion": "x"},
            ]
        },
    )
    (request,) = load_trace(path)
    # Estimate: ceil(chars / 4). Tool return "ab" (1) + added prompt "new turn" (2).
    assert request.kind == "chatbot"
    assert request.prompt_tokens == 2
    assert request.segments == (Segment(1, 2.0, 3), Segment(1))


def test_text_prompt_that_repeats_the_context_counts_only_the_rest(tmp_path):
    instruction = "Generate an image about this. "
    first = {"prompt": "P" * 8, "completion": "C" * 8, "api_token": instruction, "api_time": 9.0}
    context = first["prompt"] + first["completion"] + first["api_token"]
    path = write_trace(tmp_path, {"i": [first, {"prompt": context + "more", "completion": "ok"}]})
    (request,) = load_trace(path, tokenizer=CharTokenizer())
    assert request.kind == "image"
    assert request.segments == (Segment(8, 9.0, len(instruction) + 4), Segment(2))


def test_negative_trailing_return_is_read_as_zero(tmp_path):
    path = write_trace(
        tmp_path,
        {"7_2": [{"prompt_tokens": 2047, "completion_tokens": 4, "api_time": 0.08, "api_token_length": -2}]},
    )
    (request,) = load_trace(path)
    assert request.kind == "virtual_env"
    assert request.segments == (Segment(4, 0.08, 0), Segment(1))


def test_request_without_intercepts_gets_its_shape_as_kind(tmp_path):
    path = write_trace(
        tmp_path,
        {"a": [{"prompt_tokens": 3, "completion_tokens": 2}], "b": [{"prompt": "hi", "completion": "yo"}]},
    )
    assert [r.kind for r in load_trace(path)] == ["token", "text"]


@pytest.mark.parametrize(
    "segments, field",
    [
        ([{"prompt": "a", "completion_tokens": 3}], "prompt_tokens"),
        ([{"foo": 1}], "segment 0"),
        ([{"prompt_tokens": -1, "completion_tokens": 3}], "prompt_tokens"),
        ([{"prompt_tokens": 4, "completion_tokens": -3}], "completion_tokens"),
        ([{"prompt_tokens": 4, "completion_tokens": 0}], "completion_tokens"),
        ([{"prompt_tokens": 4, "completion_tokens": 2.5}], "completion_tokens"),
        (
            [
                {"prompt_tokens": 4, "completion_tokens": 3, "api_time": 1.0, "api_token_length": -1},
                {"prompt_tokens": 4, "completion_tokens": 3},
            ],
            "api_token_length",
        ),
        (
            [
                {"prompt_tokens": 4, "completion_tokens": 3, "api_time": -1.0, "api_token_length": 1},
                {"prompt_tokens": 8, "completion_tokens": 3},
            ],
            "api_time",
        ),
        (
            [{"prompt_tokens": 4, "completion_tokens": 3}, {"prompt_tokens": 7, "completion_tokens": 3}],
            "api_time",
        ),
        ([{"prompt_tokens": 4, "completion_tokens": 3, "api_time": 1.0}], "api_token_length"),
        (
            [
                {"prompt_tokens": 4, "completion_tokens": 3, "api_time": 1.0, "api_token_length": 2},
                {"prompt_tokens": 6, "completion_tokens": 3},
            ],
            "prompt_tokens",
        ),
        ([{"prompt": "a", "completion": 5}], "completion"),
        (
            [{"prompt": "a", "completion": "b", "api_time": 1.0}, {"prompt": "ab", "completion": "c"}],
            "api_token",
        ),
        ([{"prompt": "a", "completion": ""}], "completion_tokens"),
        ([], "non-empty"),
        ({"prompt": "a"}, "non-empty"),
    ],
)
def test_malformed_request_raises_naming_request_and_field(tmp_path, segments, field):
    path = write_trace(tmp_path, {"ok": [{"prompt_tokens": 1, "completion_tokens": 1}], "bad-42": segments})
    with pytest.raises(ValueError, match="bad-42") as info:
        load_trace(path)
    assert field in str(info.value)


def test_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_trace(tmp_path / "nope.json")


def test_malformed_json_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trace(write_trace(tmp_path, '{"r": [{"prompt_tokens": 1,'))


def test_top_level_list_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="top level"):
        load_trace(write_trace(tmp_path, [1, 2]))


# ---- Poisson arrivals ----


def small_templates() -> list[WorkloadRequest]:
    return [WorkloadRequest(f"t{i}", "math", 10 + i, (Segment(3, 0.1, 2), Segment(4))) for i in range(5)]


def test_poisson_arrivals_are_deterministic_per_seed():
    templates = small_templates()
    first = poisson_arrivals(templates, rate_rps=3.0, duration_s=100.0, seed=7)
    assert first == poisson_arrivals(templates, rate_rps=3.0, duration_s=100.0, seed=7)
    assert first != poisson_arrivals(templates, rate_rps=3.0, duration_s=100.0, seed=8)


def test_poisson_arrivals_shape():
    templates = small_templates()
    by_id = {t.request_id: t for t in templates}
    arrivals = poisson_arrivals(templates, rate_rps=2.0, duration_s=2000.0, seed=0)
    times_s = np.array([r.arrival_s for r in arrivals])
    # Count ~ Poisson(4000): 5 standard deviations is about 8%.
    assert len(arrivals) == pytest.approx(4000, rel=0.08)
    assert np.all(np.diff(times_s) > 0) and times_s[0] >= 0 and times_s[-1] < 2000.0
    assert np.mean(np.diff(times_s)) == pytest.approx(0.5, rel=0.08)
    assert len({r.request_id for r in arrivals}) == len(arrivals)
    for i, request in enumerate(arrivals):
        template_id, index = request.request_id.split("#")
        assert int(index) == i
        assert request.segments == by_id[template_id].segments
    uses = np.bincount([int(r.request_id[1]) for r in arrivals], minlength=5)
    assert np.all(np.abs(uses / len(arrivals) - 0.2) < 0.03)


@pytest.mark.parametrize("kwargs", [{"rate_rps": 0.0}, {"duration_s": -1.0}])
def test_poisson_arrivals_rejects_bad_arguments(kwargs):
    arguments = {"rate_rps": 1.0, "duration_s": 10.0, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        poisson_arrivals(small_templates(), **arguments)
    with pytest.raises(ValueError):
        poisson_arrivals([], rate_rps=1.0, duration_s=10.0, seed=0)


# ---- scaling to a context window ----


def test_scale_to_context_fits_and_keeps_structure():
    segments = (Segment(100, 0.7, 50), Segment(1, 0.2, 0), Segment(949))
    request = WorkloadRequest("r", "qa", 900, segments, arrival_s=3.0)
    (scaled,) = scale_to_context([request], 200)
    assert scaled.max_context_tokens <= 200
    assert [s.tool_duration_s for s in scaled.segments] == [0.7, 0.2, None]
    assert scaled.segments[1] == Segment(1, 0.2, 0)
    assert scaled.arrival_s == 3.0 and scaled.request_id == "r"
    # Excess over one token shrinks by (200 - 5) / (2000 - 5).
    assert scaled.prompt_tokens == 1 + 899 * 195 // 1995
    assert scaled.segments[2].completion_tokens == 1 + 948 * 195 // 1995


def test_scale_to_context_leaves_fitting_requests_alone():
    request = small_templates()[0]
    assert scale_to_context([request], request.max_context_tokens) == [request]


def test_scale_to_context_rejects_impossible_limit():
    request = small_templates()[0]  # 4 nonzero counts
    with pytest.raises(ValueError, match="t0"):
        scale_to_context([request], 3)


@settings(max_examples=200, deadline=None)
@given(
    prompt_tokens=st.integers(1, 5000),
    pieces=st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 500)), min_size=0, max_size=30),
    last_completion_tokens=st.integers(1, 3000),
    limit=st.integers(1, 4096),
)
def test_scale_to_context_property(prompt_tokens, pieces, last_completion_tokens, limit):
    segments = tuple(Segment(c, 0.1, t) for c, t in pieces) + (Segment(last_completion_tokens),)
    request = WorkloadRequest("r", "math", prompt_tokens, segments)
    num_nonzero = 2 + sum(1 + (t > 0) for _, t in pieces)
    if num_nonzero > limit and request.max_context_tokens > limit:
        with pytest.raises(ValueError):
            scale_to_context([request], limit)
        return
    (scaled,) = scale_to_context([request], limit)
    assert scaled.max_context_tokens <= limit
    assert len(scaled.segments) == len(segments)
    for before, after in zip(segments, scaled.segments):
        assert 1 <= after.completion_tokens <= before.completion_tokens
        assert (after.tool_tokens > 0) == (before.tool_tokens > 0) and after.tool_tokens <= before.tool_tokens


@needs_trace
def test_scale_real_trace_to_small_window(trace):
    for limit in (2048, 512):
        scaled = scale_to_context(trace, limit)
        assert max(r.max_context_tokens for r in scaled) <= limit
        assert [r.num_intercepts for r in scaled] == [r.num_intercepts for r in trace]
