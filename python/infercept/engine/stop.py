"""The stop check: eos, stop tokens, stop strings (searched only in new text) and length."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from infercept.sampling import SamplingParams

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
        string found on the last allowed token still trims the text. Before
        ``params.min_tokens`` tokens only the length can stop a request (the sampler masks
        EOS and stop tokens meanwhile; a stop string is ignored, as in vLLM).
    """
    if len(token_ids) < params.min_tokens:
        return StopDecision(False, None, text)
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
