"""Tests for infercept.tools: parser, registry, runtime, estimator and calculator."""

import asyncio
import json
import re
import threading

import pytest

from infercept.tools import (
    CalculatorError,
    DurationEstimator,
    PatternParser,
    TagParser,
    Tool,
    ToolCall,
    ToolCallError,
    ToolRegistry,
    ToolRuntime,
    UnknownToolError,
    calculate,
    calculator_tool,
)

# Generous bound for waits that only fail if the code under test is broken.
WAIT_S = 10.0


def _poll_until(runtime: ToolRuntime, num_results: int) -> list:
    results = []
    while len(results) < num_results:
        assert runtime.wait(WAIT_S), f"only {len(results)} of {num_results} results arrived"
        results += runtime.poll()
    return results


def _call(name: str, **arguments) -> ToolCall:
    return ToolCall(name, arguments)


# --- parser -------------------------------------------------------------------------------

def test_tag_parser_finds_call_with_whitespace():
    text = ('Let me compute.\n<tool_call>\n  {"name": "calculator",\n'
            '   "arguments": {"expression": "2+2"}}\n</tool_call> rest')
    call = TagParser().find(text)
    assert isinstance(call, ToolCall)
    assert call.name == "calculator" and call.arguments == {"expression": "2+2"}
    start, end = call.span
    assert text[start:end] == call.raw
    assert call.raw.startswith("<tool_call>") and call.raw.endswith("</tool_call>")


def test_tag_parser_streaming_completes_at_close_tag():
    full = '<tool_call>{"name": "search", "arguments": {"q": "llm"}}</tool_call>'
    parser = TagParser()
    for num_chars in range(len(full)):
        assert parser.find(full[:num_chars]) is None, full[:num_chars]
    assert parser.find(full).name == "search"


@pytest.mark.parametrize("num_chars_per_step", [1, 3, 7])
def test_tag_parser_fed_only_new_text_finds_what_a_full_search_finds(num_chars_per_step):
    # The engine passes new_from (the text length at the previous search); a close tag split
    # across steps must still be found on the step that completes it, with the same result.
    full = ('a</tool_ca <tool_call>{"name": "x"}</tool_call> mid '
            '<tool_call>{"name": "y", "arguments": {"q": 1}}</tool_call>')
    parser = TagParser()
    start, searched, found = 0, 0, []
    for end in range(num_chars_per_step, len(full) + num_chars_per_step, num_chars_per_step):
        text = full[:end]
        result = parser.find(text, start, new_from=searched)
        assert result == parser.find(text, start)
        searched = len(text)
        if result is not None:
            found.append(result.name)
            start = searched = result.span[1]
    assert found == ["x", "y"]


def test_find_new_call_passes_new_from_only_to_parsers_that_take_it():
    from infercept.tools.parser import find_new_call

    seen = []

    class OldParser:
        def find(self, text, start=0):
            seen.append((text, start))
            return None

    assert find_new_call(OldParser(), "abc", 1, 2) is None and seen == [("abc", 1)]
    assert find_new_call(TagParser(), '<tool_call>{"name": "z"}</tool_call>', 0, 30).name == "z"


def test_tag_parser_accepts_json_string_arguments_and_missing_arguments():
    encoded = json.dumps({"name": "f", "arguments": json.dumps({"x": 1})})
    assert TagParser().find(f"<tool_call>{encoded}</tool_call>").arguments == {"x": 1}
    assert TagParser().find('<tool_call>{"name": "now"}</tool_call>').arguments == {}


@pytest.mark.parametrize("body, message", [
    ('{"name": "f", "arguments": {"x": 1}', "not valid JSON"),
    ('["f"]', "must be a JSON object, got list"),
    ('{"arguments": {}}', "non-empty string 'name'"),
    ('{"name": "f", "arguments": [1]}', "'arguments' must be an object, got list"),
    ('{"name": "f", "arguments": "{bad"}', "'arguments' string is not valid JSON"),
])
def test_tag_parser_malformed_call_is_an_error_record(body, message):
    result = TagParser().find(f"x <tool_call>{body}</tool_call>")
    assert isinstance(result, ToolCallError)
    assert message in result.message
    assert result.raw == f"<tool_call>{body}</tool_call>"


def test_tag_parser_start_skips_previous_calls():
    first = '<tool_call>{"name": "a"}</tool_call>'
    text = first + ' then <tool_call>{"name": "b"}</tool_call>'
    parser = TagParser()
    call = parser.find(text)
    assert call.name == "a"
    assert parser.find(text, start=call.span[1]).name == "b"
    assert parser.find(first + " then <tool_call>{", start=len(first)) is None


def test_tag_parser_close_without_open_is_an_error_record():
    result = TagParser().find("oops</tool_call>")
    assert isinstance(result, ToolCallError) and "without a preceding" in result.message


def test_pattern_parser_regex_and_literal():
    parser = PatternParser(r"CALC\((.*?)\)", lambda m: ("calculator", {"expression": m[1]}))
    assert parser.find("x = CALC(3*4") is None
    call = parser.find("x = CALC(3*4) and")
    assert call.arguments == {"expression": "3*4"} and call.raw == "CALC(3*4)"
    literal = PatternParser("[SEARCH]", lambda m: ("search", {}), literal=True)
    assert literal.find("go [SEARCH]").span == (3, 11)


def test_pattern_parser_mapping_failure_is_an_error_record():
    parser = PatternParser(r"<(\w+)>", lambda m: (m[1], json.loads(m[1])))
    result = parser.find("run <abc>")
    assert isinstance(result, ToolCallError) and "JSONDecodeError" in result.message
    with pytest.raises(ValueError, match="not a valid regex"):
        PatternParser("(", lambda m: ("x", {}))


# --- registry -----------------------------------------------------------------------------

def test_registry_lookup_and_openai_schema():
    def echo(text: str) -> str:
        """Repeat the text."""
        return text

    registry = ToolRegistry([calculator_tool()])
    registry.register(echo, timeout_s=1.0)
    assert registry.names == ["calculator", "echo"] and "echo" in registry
    assert registry.get("echo").description == "Repeat the text."
    schema = registry.to_openai()
    assert schema[0]["function"]["name"] == "calculator"
    assert schema[0]["function"]["parameters"]["required"] == ["expression"]
    assert schema[1] == {"type": "function", "function": {
        "name": "echo", "description": "Repeat the text.",
        "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(UnknownToolError, match=r"unknown tool 'nope' \(registered: "
                                               r"calculator, echo\)"):
        registry.get("nope")
    with pytest.raises(ValueError, match="'echo' is already registered"):
        registry.register(echo)


def test_tool_validation():
    with pytest.raises(ValueError, match=r"timeout_s=0 is outside \(0, inf\)"):
        Tool("t", print, timeout_s=0)
    with pytest.raises(ValueError, match="is not callable"):
        Tool("t", 3)


# --- runtime ------------------------------------------------------------------------------

def test_sync_tools_run_concurrently():
    # Each call blocks until both are running: run one after the other, the barrier breaks.
    barrier = threading.Barrier(2, timeout=WAIT_S)

    def meet(tag: str) -> str:
        barrier.wait()
        return tag

    with ToolRuntime(ToolRegistry([Tool("meet", meet)])) as runtime:
        runtime.submit("r1", _call("meet", tag="one"))
        runtime.submit("r2", _call("meet", tag="two"))
        results = _poll_until(runtime, 2)
    assert {(r.request_id, r.output, r.error) for r in results} == {
        ("r1", "one", None), ("r2", "two", None)}


def test_async_tools_run_concurrently_and_results_are_text():
    arrived = []

    async def meet(tag: str) -> dict:
        arrived.append(tag)
        while len(arrived) < 2:  # returns only once the other call has started
            await asyncio.sleep(0.001)
        return {"tag": tag}

    with ToolRuntime(ToolRegistry([Tool("meet", meet, timeout_s=WAIT_S)])) as runtime:
        runtime.submit("r1", _call("meet", tag="a"))
        runtime.submit("r2", _call("meet", tag="b"))
        results = sorted(_poll_until(runtime, 2), key=lambda r: r.request_id)
    assert [r.output for r in results] == ['{"tag": "a"}', '{"tag": "b"}']
    assert all(r.error is None and r.duration_s >= 0 for r in results)


def test_poll_does_not_block_on_running_tool():
    release = threading.Event()
    with ToolRuntime(ToolRegistry([Tool("block", lambda: release.wait(WAIT_S))])) as runtime:
        runtime.submit("r", _call("block"))
        assert runtime.poll() == [] and runtime.num_in_flight == 1
        release.set()
        (result,) = _poll_until(runtime, 1)
    assert result.output == "true" and runtime.num_in_flight == 0


def test_raising_tool_gives_error_result():
    def broken(x: int) -> int:
        raise RuntimeError(f"cannot handle {x}")

    with ToolRuntime(ToolRegistry([Tool("broken", broken)])) as runtime:
        runtime.submit("r", _call("broken", x=3))
        runtime.submit("bad-args", _call("broken", y=3))
        results = {r.request_id: r for r in _poll_until(runtime, 2)}
    assert results["r"].error == "tool 'broken' raised RuntimeError: cannot handle 3"
    assert results["r"].output == ""
    assert results["bad-args"].error.startswith("tool 'broken' raised TypeError")


def test_timeout_gives_error_result_and_runtime_goes_on():
    release = threading.Event()

    async def hang() -> str:
        await asyncio.sleep(3600)
        return "never"

    def own_timeout() -> str:
        raise TimeoutError("upstream")

    registry = ToolRegistry([
        Tool("slow_sync", lambda: release.wait(WAIT_S), timeout_s=0.05),
        Tool("slow_async", hang, timeout_s=0.05),
        Tool("own_timeout", own_timeout),
        calculator_tool(),
    ])
    with ToolRuntime(registry) as runtime:
        runtime.submit("s", _call("slow_sync"))
        runtime.submit("a", _call("slow_async"))
        runtime.submit("o", _call("own_timeout"))
        results = {r.request_id: r for r in _poll_until(runtime, 3)}
        release.set()
        runtime.submit("c", _call("calculator", expression="6*7"))
        (after,) = _poll_until(runtime, 1)
    assert results["s"].error == "tool 'slow_sync' timed out after 0.05 s"
    assert results["a"].error == "tool 'slow_async' timed out after 0.05 s"
    assert results["o"].error == "tool 'own_timeout' raised TimeoutError: upstream"
    assert after.output == "42" and after.error is None


def test_unknown_tool_and_duplicate_submit():
    release = threading.Event()
    with ToolRuntime(ToolRegistry([Tool("block", lambda: release.wait(WAIT_S))])) as runtime:
        runtime.submit("r", _call("missing"))
        (result,) = _poll_until(runtime, 1)
        assert result.error == "unknown tool 'missing' (registered: block)"
        runtime.submit("busy", _call("block"))
        with pytest.raises(ValueError, match="'busy' already has a tool call in flight"):
            runtime.submit("busy", _call("block"))
        release.set()
        _poll_until(runtime, 1)
    with pytest.raises(RuntimeError, match="shut down"):
        runtime.submit("late", _call("block"))


def test_cancel_drops_the_result():
    async def hang() -> str:
        await asyncio.sleep(3600)
        return "never"

    with ToolRuntime(ToolRegistry([Tool("hang", hang), calculator_tool()])) as runtime:
        runtime.submit("r", _call("hang"))
        assert runtime.cancel("r") and not runtime.cancel("r")
        runtime.submit("r", _call("calculator", expression="1+1"))
        (result,) = _poll_until(runtime, 1)
    assert result.output == "2"


def test_shutdown_with_calls_in_flight():
    async def hang() -> str:
        await asyncio.sleep(3600)
        return "never"

    runtime = ToolRuntime(ToolRegistry([Tool("hang", hang)]))
    runtime.submit("r", _call("hang"))
    runtime.shutdown()
    runtime.shutdown()
    assert runtime.poll() == [] and runtime.num_in_flight == 0


# --- estimator ----------------------------------------------------------------------------

def test_estimator_learns_and_prefers_hint():
    estimator = DurationEstimator(smoothing=0.5)
    assert estimator.estimate("search") is None
    estimator.observe("search", 2.0)
    assert estimator.estimate("search") == 2.0
    estimator.observe("search", 4.0)
    assert estimator.estimate("search") == pytest.approx(3.0)
    assert estimator.estimate("search", hint_s=0.5) == 0.5
    assert estimator.num_observations("search") == 2
    assert estimator.estimate("other") is None


def test_estimator_tracks_drift_and_validates():
    estimator = DurationEstimator()
    for _ in range(5):
        estimator.observe("api", 1.0)
    for _ in range(40):
        estimator.observe("api", 5.0)
    assert estimator.estimate("api") == pytest.approx(5.0, abs=0.01)
    with pytest.raises(ValueError, match=r"duration_s=-1.0 is outside \[0, inf\)"):
        estimator.observe("api", -1.0)
    with pytest.raises(ValueError, match=r"smoothing=0 is outside \(0, 1\]"):
        DurationEstimator(smoothing=0)


# --- calculator ---------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("-2 ** 2", "-4"),
    ("7 // 2 + 7 % 3", "4"),
    ("1 / 4", "0.25"),
    ("0.1 + 0.2", "0.3"),
    ("2 ** 100", str(2**100)),
    ("sqrt(16) + abs(-3) + max(1, 5)", "12"),
    ("round(pi, 3)", "3.142"),
    ("factorial(10)", "3628800"),
    (" 1 +\n 1 ", "2"),
])
def test_calculator_good_expressions(expression, expected):
    assert calculate(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "unknown function '__import__'"),
    ("(1).__class__", "Attribute is not allowed"),
    ("x + 1", "unknown name 'x'"),
    ("'a' * 3", "only numbers are allowed"),
    ("2 ^ 3", "use ** for powers"),
    ("1 < 2", "Compare is not allowed"),
    ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "would exceed 10000 bits"),
    ("factorial(100000)", "over the limit 1000"),
    ("sqrt(-1)", "math error"),
    ("(-8) ** 0.5", "complex"),
    ("2 +", "cannot parse"),
    ("1" * 1001, "over the limit 1000"),
    ("sqrt(x=4)", "takes no keyword arguments"),
])
def test_calculator_rejects_bad_expressions(expression, message):
    with pytest.raises(CalculatorError, match=re.escape(message)):
        calculate(expression)
