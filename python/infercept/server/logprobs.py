"""Logprobs in OpenAI's wire format, from the engine's ``(token_id, logprob, top)`` entries.

Chat: ``choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs":
[{"token", "logprob", "bytes"}]}], "refusal": None}``. Completions: ``{"tokens",
"token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``; with ``echo`` the
prompt's tokens come first, the first with a null logprob and null top_logprobs (it has no
context). A token's string is
its own decode (a piece of a multi-byte character reads as U+FFFD, as in vLLM); ``bytes``
are that string's UTF-8.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from infercept.engine.logits_processors import TokenLogprob


class LogprobFormatter:
    """Turns engine logprob entries into the chat or completions JSON for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one formatter per server, bounded
    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _chat_token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """``choices[i].logprobs`` of a chat completion (or of one streamed chunk)."""
        content = []
        for token_id, logprob, top in entries:
            item = self._chat_token(token_id, logprob)
            item["top_logprobs"] = [self._chat_token(t, lp) for t, lp in top]
            content.append(item)
        return {"content": content, "refusal": None}

    def completion(self, entries: Sequence[TokenLogprob], text_offset: int = 0
                   ) -> dict[str, Any]:
        """``choices[i].logprobs`` of a completion; offsets count from ``text_offset``."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = text_offset
        for token_id, logprob, top in entries:
            text = self.token_text(token_id)
            tokens.append(text)
            token_logprobs.append(_finite(logprob))
            top_logprobs.append({self.token_text(t): _finite(lp) for t, lp in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": offsets}


    def prompt(self, entries: Sequence[TokenLogprob | None], prompt_token_ids: Sequence[int]
               ) -> dict[str, Any]:
        """The prompt part of an echoed completion's logprobs (offsets from 0): ``entries``
        as ``RequestOutput.prompt_logprobs``, one per prompt token, the first None."""
        first = {"tokens": [self.token_text(prompt_token_ids[0])], "token_logprobs": [None],
                 "top_logprobs": [None], "text_offset": [0]}
        rest = self.completion([e for e in entries[1:] if e is not None], len(first["tokens"][0]))
        return join_completion_logprobs(first, rest)


def join_completion_logprobs(*parts: dict[str, Any]) -> dict[str, Any]:
    """Completion logprobs of consecutive pieces of text, as one (their lists concatenated)."""
    return {key: [item for part in parts for item in part[key]]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def _finite(logprob: float) -> float:
    # JSON has no -inf; a token a grammar or min_tokens masked out reads as OpenAI's floor.
    return logprob if logprob > -9999.0 else -9999.0
