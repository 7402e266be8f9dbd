"""min_tokens, logit_bias, the penalties and logprobs on random logits, against references:
transformers' RepetitionPenaltyLogitsProcessor, OpenAI's formula for presence/frequency, and
torch.log_softmax. No model needed."""

from __future__ import annotations

import pytest
import torch

from infercept.engine.logits_processors import LogitsProcessors
from infercept.sampling import (MAX_LOGPROBS, MAX_STOP_SEQUENCES, MAX_STOP_STRING_CHARS,
                                SamplingParams)

VOCAB = 97
EOS = 3


def _processors() -> LogitsProcessors:
    return LogitsProcessors(VOCAB, [EOS], torch.device("cpu"))


def _run(processors: LogitsProcessors, params: list[SamplingParams], prompts: list[list[int]],
         steps: list[list[int]], seed: int = 0) -> torch.Tensor:
    """Registers one request per params, feeds ``steps`` sampled tokens (one list per step),
    then returns the processed logits of fresh random logits for every request."""
    for request_id, (p, prompt) in enumerate(zip(params, prompts)):
        processors.add(request_id, p, prompt)
    ids = list(range(len(params)))
    for tokens in steps:
        processors.accept(ids, tokens)
    logits = torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    processors.apply(logits, ids)
    return logits


def _openai_penalties(logits: torch.Tensor, generated: list[int], presence: float,
                      frequency: float) -> torch.Tensor:
    """OpenAI's documented formula: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence."""
    counts = torch.bincount(torch.tensor(generated, dtype=torch.int64), minlength=VOCAB).float()
    return logits - counts * frequency - (counts > 0).float() * presence


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    prompts = [[5, 6, 7, 5], [10, 11], [20]]
    steps = [[8, 12, 20], [8, 40, 21], [9, 11, 22]]
    penalties = [1.3, 0.7, 2.0]
    params = [SamplingParams(repetition_penalty=r) for r in penalties]
    got = _run(_processors(), params, prompts, steps)
    raw = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    for row, (prompt, penalty) in enumerate(zip(prompts, penalties)):
        history = torch.tensor([prompt + [s[row] for s in steps]])
        penalty_processor = transformers.RepetitionPenaltyLogitsProcessor(penalty)
        reference = penalty_processor(history, raw[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], reference)


def test_presence_and_frequency_penalties_follow_openai_formula_over_generated_tokens():
    prompts = [[1, 2, 3, 4], [1, 2]]
    steps = [[10, 50], [10, 51], [11, 50], [10, 2]]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5)]
    got = _run(_processors(), params, prompts, steps)
    raw = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    for row, p in enumerate(params):
        generated = [s[row] for s in steps]  # the prompt's tokens are not penalized
        want = _openai_penalties(raw[row], generated, p.presence_penalty, p.frequency_penalty)
        torch.testing.assert_close(got[row], want)


def test_rows_without_processing_are_untouched_and_mixed_batches_agree_with_single_rows():
    prompts = [[1, 2], [3, 4], [5]]
    steps = [[7, 7, 7], [8, 8, 9]]
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2),
              SamplingParams(logit_bias={4: 5.0})]
    batched = _run(_processors(), params, prompts, steps)
    raw = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(batched[0], raw[0])
    alone = _processors()
    alone.add(0, params[1], prompts[1])
    alone.accept([0], [7])
    alone.accept([0], [8])
    row = raw[1:2].clone()
    alone.apply(row, [0])
    torch.testing.assert_close(batched[1:2], row)


def test_logit_bias_is_added_and_clamped():
    params = SamplingParams(logit_bias={5: 250.0, 6: -1000.0, 7: 0.5})
    assert params.logit_bias == {5: 100.0, 6: -100.0, 7: 0.5}
    got = _run(_processors(), [params], [[1]], [])
    raw = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    want = raw.clone()
    want[0, 5] += 100.0
    want[0, 6] -= 100.0
    want[0, 7] += 0.5
    torch.testing.assert_close(got, want)
    assert int(got.argmax()) == 5


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    processors = _processors()
    params = SamplingParams(min_tokens=2, stop_token_ids=[9])
    processors.add(0, params, [1, 2])
    for num_sampled in range(4):
        logits = torch.zeros(1, VOCAB)
        processors.apply(logits, [0])
        masked = bool(torch.isinf(logits[0, EOS])) and bool(torch.isinf(logits[0, 9]))
        assert masked == (num_sampled < 2)
        assert torch.isfinite(logits[0, 10])
        processors.accept([0], [10])


def test_resume_counts_the_earlier_context_as_prompt():
    processors = _processors()
    processors.add(0, SamplingParams(frequency_penalty=1.0), [1])
    processors.accept([0], [20])
    processors.accept([0], [20])
    # A follow-up: the 20s are prompt now (no frequency penalty), but repetition sees them.
    processors.set_params(0, SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0),
                          [1, 20, 20, 30])
    logits = torch.ones(1, VOCAB)
    processors.apply(logits, [0])
    assert logits[0, 20] == 0.5 and logits[0, 30] == 0.5 and logits[0, 40] == 1.0


def test_logprobs_are_log_softmax_with_top_alternatives():
    processors = _processors()
    processors.add(0, SamplingParams(logprobs=3), [1])
    processors.add(1, SamplingParams(), [1])
    processors.add(2, SamplingParams(logprobs=0), [1])
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))
    out = processors.logprobs(logits, [0, 1, 2], [4, 5, 6])
    assert set(out) == {0, 2}
    reference = torch.log_softmax(logits, dim=1)
    token, logprob, top = out[0]
    assert token == 4 and logprob == pytest.approx(float(reference[0, 4]), abs=1e-6)
    want_ids = torch.topk(reference[0], 3).indices.tolist()
    assert [t for t, _ in top] == want_ids
    assert [lp for _, lp in top] == pytest.approx(reference[0, want_ids].tolist(), abs=1e-6)
    assert out[2][2] == ()


@pytest.mark.parametrize("kwargs, message", [
    ({"logprobs": MAX_LOGPROBS + 1}, "limit 20"),
    ({"logprobs": -1}, "minimum 0"),
    ({"presence_penalty": 2.5}, r"presence_penalty=2.5 is outside \[-2, 2\]"),
    ({"frequency_penalty": float("nan")}, "finite"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty=0.0 is outside \(0, 10\]"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias token id=-1"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, "1025 entries, above the limit 1024"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens=20 is above max_tokens=10"),
    ({"stop": ["x"] * (MAX_STOP_SEQUENCES + 1)}, "17 sequences, above the limit 16"),
    ({"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "257 characters is above the limit 256"),
])
def test_bad_values_name_the_value_and_the_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
