"""Tests of run summaries on hand-computed records."""

import math

import numpy as np
import pytest

from infercept.bench.metrics import RequestRecord, format_table, highest_sustained_rate, summarize

RECORDS = [
    # latency 10 - 0 - 2 = 8 over 4 tokens: 2 s/token; ttft 1
    RequestRecord("a", arrival_s=0.0, first_token_s=1.0, finish_s=10.0, num_output_tokens=4, tool_time_s=2.0),
    # latency 6 - 2 - 0 = 4 over 8 tokens: 0.5 s/token; ttft 0.5
    RequestRecord("b", arrival_s=2.0, first_token_s=2.5, finish_s=6.0, num_output_tokens=8, tool_time_s=0.0),
    # unfinished: counts toward tokens_per_s and ttft (3), not latency
    RequestRecord("c", arrival_s=4.0, first_token_s=7.0, finish_s=None, num_output_tokens=3, tool_time_s=1.0),
    # never started
    RequestRecord("d", arrival_s=9.0, first_token_s=None, finish_s=None, num_output_tokens=0),
]


def test_summarize_hand_computed():
    summary = summarize(RECORDS, duration_s=20.0)
    # No resumed turns in these records: their statistics are over the empty set.
    assert math.isnan(summary.pop("mean_resumed_ttft_s")) and math.isnan(summary.pop("p95_resumed_ttft_s"))
    assert summary == {
        "num_requests": 4,
        "num_finished": 2,
        "throughput_rps": 0.1,
        "tokens_per_s": 15 / 20,
        "normalized_latency": 1.25,
        "mean_latency_s": 6.0,
        "p50_latency_s": 6.0,
        "p90_latency_s": pytest.approx(4.0 + 0.9 * 4.0),
        "p99_latency_s": pytest.approx(4.0 + 0.99 * 4.0),
        "mean_ttft_s": pytest.approx((1.0 + 0.5 + 3.0) / 3),
        # completion = finish - arrival, tool time included: 10 and 4
        "mean_completion_s": 7.0,
        "p95_completion_s": pytest.approx(4.0 + 0.95 * 6.0),
        "num_resumed_turns": 0,
    }


def test_throughput_counts_only_requests_finished_within_the_window():
    summary = summarize(RECORDS, duration_s=8.0)  # "a" finishes at 10, after the window
    assert summary["num_finished"] == 2
    assert summary["throughput_rps"] == 1 / 8.0


def test_latency_property_excludes_tool_time():
    assert RECORDS[0].latency_s == 8.0
    assert RECORDS[2].latency_s is None


def test_percentiles_are_numpys():
    records = [RequestRecord(str(i), 0.0, 0.1, float(i), 1) for i in range(1, 101)]
    summary = summarize(records, duration_s=100.0)
    expected = np.percentile(np.arange(1, 101, dtype=float), [50, 90, 99])
    assert [summary["p50_latency_s"], summary["p90_latency_s"], summary["p99_latency_s"]] == list(expected)
    assert summary["normalized_latency"] == pytest.approx(50.5)


def test_finished_request_without_tokens_is_left_out_of_normalized_latency():
    records = [RequestRecord("a", 0.0, 1.0, 4.0, 2), RequestRecord("b", 0.0, None, 3.0, 0)]
    summary = summarize(records, duration_s=1.0)
    assert summary["normalized_latency"] == 2.0
    assert summary["mean_latency_s"] == 3.5


@pytest.mark.parametrize("records", [[], [RECORDS[3]]])
def test_summarize_with_nothing_finished(records):
    summary = summarize(records, duration_s=5.0)
    assert summary["num_finished"] == 0
    assert summary["throughput_rps"] == 0.0 and summary["tokens_per_s"] == 0.0
    statistics = ("normalized_latency", "mean_latency_s", "p50_latency_s", "p90_latency_s", "p99_latency_s")
    for key in statistics + ("mean_ttft_s",):
        assert math.isnan(summary[key]), key


def test_summarize_rejects_zero_duration():
    with pytest.raises(ValueError, match="duration_s"):
        summarize(RECORDS, duration_s=0.0)


def rows(policy, points):
    return [{"policy": policy, "rate": rate, "normalized_latency": latency} for rate, latency in points]


def test_highest_sustained_rate_interpolates():
    table = rows("preserve", [(3.0, 0.5), (1.0, 0.1), (2.0, 0.2)]) + rows("swap", [(1.0, 0.1), (2.0, 0.15)])
    result = highest_sustained_rate(table, threshold=0.3)
    # preserve crosses between (2, 0.2) and (3, 0.5): 2 + (0.3 - 0.2) / 0.3 = 2.333...
    assert result["preserve"] == pytest.approx(2.0 + 1.0 / 3.0)
    # swap never exceeds: highest measured rate
    assert result["swap"] == 2.0
    assert list(result) == ["preserve", "swap"]


def test_highest_sustained_rate_stops_at_first_crossing():
    table = rows("p", [(1.0, 0.1), (2.0, 0.5), (3.0, 0.2)])
    assert highest_sustained_rate(table, threshold=0.3)["p"] == pytest.approx(1.5)


def test_highest_sustained_rate_at_threshold_counts_as_sustained():
    assert highest_sustained_rate(rows("p", [(1.0, 0.1), (2.0, 0.3)]), threshold=0.3)["p"] == 2.0


def test_highest_sustained_rate_edge_cases():
    assert math.isnan(highest_sustained_rate(rows("p", [(1.0, 0.9)]), threshold=0.3)["p"])
    assert highest_sustained_rate(rows("p", [(1.0, 0.1), (2.0, math.nan)]), threshold=0.3)["p"] == 1.0
    with pytest.raises(ValueError, match="more than once"):
        highest_sustained_rate(rows("p", [(1.0, 0.1), (1.0, 0.2)]), threshold=0.3)


def test_format_table():
    table = format_table(
        [
            {"policy": "swap", "rate": 1.0, "normalized_latency": 0.123456},
            {"policy": "infercept", "rate": 2.5},
        ],
        ["policy", "rate", "normalized_latency"],
    )
    assert table.splitlines() == [
        "policy     rate  normalized_latency",
        "---------  ----  ------------------",
        "swap          1              0.1235",
        "infercept   2.5",
    ]
