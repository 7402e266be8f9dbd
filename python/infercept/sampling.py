"""Sampling parameters, the batched token sampler and the stop check.

A request's random draws come from its own ``torch.Generator`` (CPU, seeded from
``SamplingParams.seed``), so what a seeded request samples never depends on which other
requests share its batch. The uniforms drawn are also the same on every device; the tokens can
differ across devices only where their softmax rounds differently.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

_MAX_SEED = 2**64  # torch.Generator.manual_seed accepts seeds in [0, 2**64).
# Dividing float32 logits by a smaller temperature can overflow to inf (then NaN after the
# softmax), and the distribution is one-hot long before that anyway.
_GREEDY_BELOW_TEMPERATURE = 1e-5


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

    def __post_init__(self) -> None:
        self._validate_sampling()
        self._validate_stopping()
        self._validate_intercepts()

    @property
    def is_greedy(self) -> bool:
        """Whether this request takes the argmax (temperature 0, or below 1e-5)."""
        return self.temperature < _GREEDY_BELOW_TEMPERATURE

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
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop string {s!r} must be a non-empty str")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be a list of ints")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids entry", token_id, 0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be a bool")

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


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies temperature, top-k and top-p, returning the filtered distribution, sorted.

    Args:
        logits: ``[S, V]`` float logits of the sampled (non-greedy) rows.
        temperature: ``[S]`` positive temperatures.
        top_k: ``[S]`` int64; values <= 0 or >= V keep the whole vocabulary.
        top_p: ``[S]`` in (0, 1].

    Returns:
        ``(probs, token_ids)``, both ``[S, V]``: ``probs[i]`` is row i's renormalized
        distribution in descending order (zeros past the cut), ``token_ids[i, j]`` the token of
        ``probs[i, j]``.
    """
    num_rows, vocab_size = logits.shape
    scaled = logits.float() / temperature.unsqueeze(1)  # [S, V]
    # A stable sort breaks ties by token id, so a row's order never depends on its neighbours.
    sorted_logits, token_ids = torch.sort(scaled, dim=1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=1)  # [S, V]
    positions = torch.arange(vocab_size, device=logits.device).expand(num_rows, vocab_size)
    k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)  # [S]
    keep = positions < k.unsqueeze(1)  # [S, V]
    # Nucleus: keep token j while the mass strictly before it is still below top_p, which is
    # the smallest prefix whose mass reaches top_p (the top token is always kept).
    mass_before = torch.cumsum(probs, dim=1) - probs  # [S, V]
    keep &= mass_before < top_p.unsqueeze(1)
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=1, keepdim=True), token_ids


class Sampler:
    """Samples one token per row, each request drawing from its own generator.

    Generators are created on a request's first sampled step and kept until ``release``, so a
    seeded request's sequence of draws is reproducible whatever else is in the batch.
    """

    def __init__(self) -> None:
        self._generators: dict[Hashable, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, request_ids: Sequence[Hashable],
               params: Sequence[SamplingParams]) -> torch.Tensor:
        """Samples the next token of every row.

        Args:
            logits: ``[B, V]`` float logits, one row per request.
            request_ids: ``B`` ids, each naming the generator of its row.
            params: ``B`` sampling parameters, one per row.

        Returns:
            ``[B]`` int64 token ids on the logits' device.

        Raises:
            ValueError: The shapes disagree.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, vocab], got shape {tuple(logits.shape)}")
        num_rows = logits.shape[0]
        if len(request_ids) != num_rows or len(params) != num_rows:
            raise ValueError(
                f"logits has {num_rows} rows but got {len(request_ids)} request ids and "
                f"{len(params)} params"
            )
        tokens = torch.argmax(logits, dim=1)  # [B]
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not sampled_rows:
            return tokens
        device = logits.device
        rows = torch.tensor(sampled_rows, device=device)  # [S]
        probs, token_ids = filter_probs(
            logits[rows],
            torch.tensor([params[i].temperature for i in sampled_rows], dtype=torch.float32,
                         device=device),
            torch.tensor([params[i].top_k for i in sampled_rows], dtype=torch.int64,
                         device=device),
            torch.tensor([params[i].top_p for i in sampled_rows], dtype=torch.float32,
                         device=device),
        )
        # One uniform per sampled row from that request's own generator; the rest is batched
        # inverse-CDF sampling. uniforms: [S, 1]
        uniforms = torch.cat([
            torch.rand(1, generator=self._generator(request_ids[i], params[i].seed))
            for i in sampled_rows
        ]).to(device).unsqueeze(1)
        cdf = torch.cumsum(probs, dim=1)  # [S, V]
        # First position whose cdf exceeds u * total; it always has nonzero probability.
        positions = torch.searchsorted(cdf, uniforms * cdf[:, -1:], right=True)  # [S, 1]
        positions.clamp_(max=probs.shape[1] - 1)
        tokens[rows] = token_ids.gather(1, positions).squeeze(1)
        return tokens

    def release(self, request_id: Hashable) -> None:
        """Forgets a finished or aborted request's generator (no-op if it has none)."""
        self._generators.pop(request_id, None)

    @property
    def num_generators(self) -> int:
        """Number of requests whose generator is held."""
        return len(self._generators)

    def _generator(self, request_id: Hashable, seed: int | None) -> torch.Generator:
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            self._generators[request_id] = generator
        return generator


StopReason = Literal["length", "stop", "eos"]


@dataclass(frozen=True)
class StopDecision:
    """Outcome of a stop check.

    Attributes:
        should_stop: Whether the request is finished.
        reason: 'eos', 'stop' (stop string or stop token) or 'length'; None if not stopping.
        text: The output text, cut before the first stop string when one matched.
        stop_string: The stop string that matched, if any.
    """

    should_stop: bool
    reason: StopReason | None
    text: str
    stop_string: str | None = None


def check_stop(token_ids: Sequence[int], text: str, params: SamplingParams,
               eos_token_id: int | None, num_checked_chars: int = 0) -> StopDecision:
    """Decides whether a request stops after its latest token.

    Stop strings are searched in the tail of the decoded text, so a stop string split across
    several tokens is found once its last piece arrives.

    Args:
        token_ids: The generated token ids so far (tool output excluded).
        text: The decoded output text so far, including the latest token.
        params: The request's sampling parameters.
        eos_token_id: The model's end-of-sequence id, or None if it has none.
        num_checked_chars: Length of the text at the previous check; text before it was
            already searched and is skipped (pass the text length after appended tool output
            to keep tool output from triggering a stop).

    Returns:
        The decision. Checks run in the order eos, stop token, stop string, length; a stop
        string found on the last allowed token still trims the text.
    """
    last_token = token_ids[-1] if token_ids else None
    if last_token is not None:
        if not params.ignore_eos and eos_token_id is not None and last_token == eos_token_id:
            return StopDecision(True, "eos", text)
        if last_token in params.stop_token_ids:
            return StopDecision(True, "stop", text)
    first_match: tuple[int, str] | None = None
    for stop in params.stop:
        # A new match must end past num_checked_chars, so it starts at most len(stop) - 1
        # characters before it.
        start = text.find(stop, max(0, num_checked_chars - len(stop) + 1))
        if start >= 0 and (first_match is None or start < first_match[0]):
            first_match = (start, stop)
    if first_match is not None:
        start, stop = first_match
        return StopDecision(True, "stop", text[:start], stop)
    if len(token_ids) >= params.max_tokens:
        return StopDecision(True, "length", text)
    return StopDecision(False, None, text)
