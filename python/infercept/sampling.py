"""Sampling parameters: how a request samples, stops and pauses (what users pass to generate).

The sampler that draws tokens lives in ``infercept.engine.sampler``, the stop check in
``infercept.engine.stop``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from infercept.structured_output import StructuredOutput

_MAX_SEED = 2**64  # torch.Generator.manual_seed accepts seeds in [0, 2**64).
# Dividing float32 logits by a smaller temperature can overflow to inf (then NaN after the
# softmax), and the distribution is one-hot long before that anyway.
_GREEDY_BELOW_TEMPERATURE = 1e-5

# Limits a request's sampling surface stays within (the server answers 400 beyond them).
# Every stop string is searched in the new text of every token, so their number and length
# bound the per-token cost of the stop check (OpenAI itself allows 4 stop sequences).
MAX_STOP_SEQUENCES = 16
MAX_STOP_STRING_CHARS = 256
# Top alternatives per token (OpenAI's top_logprobs allows 0..20).
MAX_LOGPROBS = 20
# Choices per prompt: each is an engine request (the prompt's blocks shared through the
# prefix cache), so n multiplies the work; OpenAI allows 128.
MAX_N = 16
# OpenAI's bounds for presence/frequency penalties and logit biases.
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0
# logit_bias entries per request (OpenAI's limit is 300 tokens; we allow more, bounded).
MAX_LOGIT_BIAS_ENTRIES = 1024
# repetition_penalty: 1 is off; above 1 discourages, below 1 encourages repeats.
MAX_REPETITION_PENALTY = 10.0


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    return float(value)


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; True as a count is almost certainly a caller bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an int")
    if value < minimum:
        raise ValueError(f"{name}={value} is below the minimum {minimum}")


@dataclass
class ScriptedIntercept:
    """A scripted pause: the request stops after ``after_tokens`` generated tokens.

    Used by benchmarks and tests to replay an augmented workload without running real tools:
    the request is intercepted for ``duration_s`` seconds and then resumes with ``text``
    (tokenized by the engine) or ``num_tokens`` placeholder tokens appended to its context.

    Attributes:
        after_tokens: Number of generated tokens after which the request pauses (>= 1).
        duration_s: How long the interception lasts, in seconds (>= 0, finite).
        text: Text the "tool" returns; exactly one of ``text`` and ``num_tokens`` is set.
        num_tokens: Number of tokens the "tool" returns (>= 1).
    """

    after_tokens: int
    duration_s: float
    text: str | None = None
    num_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_int("after_tokens", self.after_tokens, 1)
        if not isinstance(self.duration_s, (int, float)) or isinstance(self.duration_s, bool):
            raise ValueError(f"duration_s={self.duration_s!r} must be a number of seconds")
        if not math.isfinite(self.duration_s) or self.duration_s < 0:
            raise ValueError(f"duration_s={self.duration_s} is outside [0, inf)")
        if (self.text is None) == (self.num_tokens is None):
            raise ValueError(
                f"exactly one of text={self.text!r} and num_tokens={self.num_tokens!r} must be set"
            )
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"text={self.text!r} must be a str")
        if self.num_tokens is not None:
            _check_int("num_tokens", self.num_tokens, 1)


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    Attributes:
        temperature: Softmax temperature; 0 means greedy (argmax), as does anything below
            1e-5.
        top_k: Keep only the k most likely tokens; -1 turns it off.
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability reaches
            top_p; 1.0 turns it off.
        seed: Seed of this request's generator; None draws a nondeterministic seed.
        max_tokens: Maximum number of generated tokens (tool output does not count).
        stop: Strings that end generation; they are excluded from the output text.
        stop_token_ids: Token ids that end generation.
        ignore_eos: Keep generating past the end-of-sequence token.
        intercepts: Scripted pauses, in increasing ``after_tokens`` order.
        structured_output: Constrains the generated tokens to a JSON schema, a regex, a
            grammar, ... (see :class:`~infercept.structured_output.StructuredOutput` and
            docs/structured_outputs.md for how the constraint meets tool calls and pauses).
        logprobs: Report each sampled token's log-probability and this many most likely
            alternatives (0..20; None reports nothing). Values are the log_softmax of the
            logits after penalties, logit_bias, min_tokens and a grammar's mask, before
            temperature, top-k and top-p (``RequestOutput.logprobs``).
        presence_penalty: OpenAI's: subtracted from the logit of every token generated at
            least once ([-2, 2]; 0 is off).
        frequency_penalty: OpenAI's: subtracted once per earlier generation of the token
            ([-2, 2]; 0 is off).
        repetition_penalty: HF/vLLM's: the logit of every token in the prompt or generated
            so far is divided by it when positive, multiplied when negative ((0, 10]; 1 is
            off). Tool outputs count as prompt.
        logit_bias: Token id -> bias added to its logit; biases are clamped to [-100, 100]
            (at most 1024 entries; the engine rejects ids outside the vocabulary).
        min_tokens: EOS and ``stop_token_ids`` are masked, and stop strings ignored, until
            this many tokens were generated (<= max_tokens).
        prompt_logprobs: vLLM's: report each prompt token's log-probability given the
            tokens before it, and this many most likely alternatives (0..20; None reports
            nothing): the raw model's log_softmax (no processors apply to the prompt). The
            first token has none. Such a request bypasses prefix-cache hits for its prompt
            (its logits are needed at every position), as in vLLM
            (``RequestOutput.prompt_logprobs``).
        n: Completions per prompt (1..16), in the LLM API (``RequestOutput.choices``); each
            is its own engine request, added once the first has prefilled the prompt so the
            others find its blocks in the prefix cache (``for_choice``). ``add_request``
            runs one choice and refuses n > 1.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    intercepts: list[ScriptedIntercept] = field(default_factory=list)
    structured_output: StructuredOutput | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        self._validate_sampling()
        self._validate_processors()
        self._validate_stopping()
        self._validate_intercepts()
        if self.structured_output is not None and not isinstance(self.structured_output,
                                                                 StructuredOutput):
            raise ValueError(f"structured_output={self.structured_output!r} must be a "
                             "StructuredOutput (e.g. StructuredOutput(json_schema={...}))")

    def for_choice(self, index: int) -> SamplingParams:
        """The params of choice ``index`` of ``n`` (the LLM API and the server fan out alike):
        one completion, seeded with ``seed + index`` (mod 2**64) when a seed is given, so a
        seeded request reproduces every choice and choice 0 equals the request with n=1.
        Only choice 0 asks for ``prompt_logprobs`` (the same prompt's for every choice), so
        the others still find the prompt in the prefix cache."""
        _check_int("choice index", index, 0)
        seed = None if self.seed is None else (self.seed + index) % _MAX_SEED
        prompt_logprobs = self.prompt_logprobs if index == 0 else None
        return dataclasses.replace(self, n=1, seed=seed, prompt_logprobs=prompt_logprobs)

    @property
    def is_greedy(self) -> bool:
        """Whether this request takes the argmax (temperature 0, or below 1e-5)."""
        return self.temperature < _GREEDY_BELOW_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty needs the token counts of this request."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def _validate_processors(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0)
                if value > MAX_LOGPROBS:
                    raise ValueError(f"{name}={value} is above the limit {MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_number(name, getattr(self, name))
            if abs(value) > MAX_ABS_PENALTY:
                raise ValueError(f"{name}={value} is outside [-{MAX_ABS_PENALTY:g}, "
                                 f"{MAX_ABS_PENALTY:g}]")
        value = _check_number("repetition_penalty", self.repetition_penalty)
        if not 0.0 < value <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty={value} is outside (0, "
                             f"{MAX_REPETITION_PENALTY:g}]")
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias={self.logit_bias!r} must be a dict of token id -> bias")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries, above the limit "
                             f"{MAX_LOGIT_BIAS_ENTRIES}")
        clamped: dict[int, float] = {}
        for token_id, bias in self.logit_bias.items():
            _check_int("logit_bias token id", token_id, 0)
            bias = _check_number(f"logit_bias[{token_id}]", bias)
            clamped[token_id] = min(MAX_ABS_LOGIT_BIAS, max(-MAX_ABS_LOGIT_BIAS, bias))
        self.logit_bias = clamped
        _check_int("min_tokens", self.min_tokens, 0)
        _check_int("n", self.n, 1)
        if self.n > MAX_N:
            raise ValueError(f"n={self.n} is above the limit {MAX_N}")

    def _validate_sampling(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError(f"temperature={t!r} must be a number")
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t} is outside [0, inf)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k={self.top_k!r} must be an int")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k} must be -1 (off) or >= 1")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise ValueError(f"top_p={p!r} must be a number")
        if not (0.0 < p <= 1.0):
            raise ValueError(f"top_p={p} is outside (0, 1]")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= _MAX_SEED:
                raise ValueError(f"seed={self.seed} is at or above the limit 2**64")

    def _validate_stopping(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop={self.stop!r} must be a list of strings")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop has {len(self.stop)} sequences, above the limit "
                             f"{MAX_STOP_SEQUENCES}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop string {s!r} must be a non-empty str")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop string of {len(s)} characters is above the limit "
                                 f"{MAX_STOP_STRING_CHARS}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be a list of ints")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids entry", token_id, 0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be a bool")
        if isinstance(self.min_tokens, int) and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is above max_tokens={self.max_tokens}")

    def _validate_intercepts(self) -> None:
        if not isinstance(self.intercepts, (list, tuple)):
            raise ValueError(f"intercepts={self.intercepts!r} must be a list of ScriptedIntercept")
        prev_after = 0
        for intercept in self.intercepts:
            if not isinstance(intercept, ScriptedIntercept):
                raise ValueError(f"intercepts entry {intercept!r} must be a ScriptedIntercept")
            if intercept.after_tokens <= prev_after:
                raise ValueError(
                    f"intercept after_tokens={intercept.after_tokens} must exceed the previous "
                    f"intercept's after_tokens={prev_after}"
                )
            if intercept.after_tokens >= self.max_tokens:
                raise ValueError(
                    f"intercept after_tokens={intercept.after_tokens} is not below "
                    f"max_tokens={self.max_tokens}"
                )
            prev_after = intercept.after_tokens
