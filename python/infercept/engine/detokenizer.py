"""Incremental detokenization: the text of a growing token list at constant work per token.

Decoding the whole output after every token is quadratic in its length. As in vLLM v1's
incremental detokenizer, each step decodes only a short window of trailing tokens: from
``prefix_offset`` (a few tokens already shown, kept as context so a SentencePiece decoder
treats the first new token's leading space as it does in a full decode) to the end, and
appends what the window adds past the text of ``[prefix_offset, read_offset)``.

A character whose UTF-8 bytes are split across tokens decodes to U+FFFD until its last byte
arrives, so the U+FFFD run that ends a window is held back (bytes that never form a character
stay U+FFFD and show once a real character follows, or on ``flush``); the text before the run
shows at once, so a stop string is found on the token that completes it. The window slides
only when it ends on a character boundary, so every window starts on one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer (``infercept.model.Tokenizer`` has it)."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ...


class _Window(NamedTuple):
    """Where the decode window stands; saved before each update so the last one can be undone."""

    num_tokens: int
    num_chars: int
    prefix_offset: int
    read_offset: int
    prefix_chars: int
    emitted_chars: int


class IncrementalDetokenizer:
    """The text of ``token_ids``, kept equal to a full decode of them as tokens are appended.

    Attributes:
        token_ids: Every token appended so far (the caller may read it, never mutate it).
        text: Their text, less a trailing U+FFFD run still waiting for bytes; after
            ``flush`` it equals ``decode(token_ids)`` exactly.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0   # first token of the decode window
        self._read_offset = 0     # tokens before this one ended on a character boundary
        self._prefix_chars = 0    # len(decode(token_ids[prefix_offset:read_offset]))
        self._emitted_chars = 0   # chars of the window's decode already in ``text``
        self._before_last: _Window | None = None

    @property
    def is_holding(self) -> bool:
        """Whether trailing U+FFFD characters are held back, waiting for more bytes."""
        return self._emitted_chars < len(self._decode_window())

    def append(self, token_ids: Sequence[int]) -> str:
        """Appends tokens and returns the text they add (possibly empty while a char waits)."""
        self._before_last = _Window(len(self.token_ids), len(self.text), self._prefix_offset,
                                    self._read_offset, self._prefix_chars, self._emitted_chars)
        self.token_ids.extend(token_ids)
        window = self._decode_window()
        num_stable = len(window.rstrip(_REPLACEMENT_CHAR))
        delta = window[self._emitted_chars:num_stable]
        if delta:
            self.text += delta
            self._emitted_chars = num_stable
        if num_stable == len(window) and len(self.token_ids) > self._read_offset:
            # The window ends on a character boundary: the next one starts at the read offset,
            # keeping the tokens shown since as the new prefix.
            self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
            self._prefix_chars = self._emitted_chars = len(self._decode_window())
        return delta

    def replace_last(self, token_ids: Sequence[int]) -> str:
        """Replaces the last appended token by ``token_ids`` (a re-tokenization of it).

        Returns:
            The text the replacement adds after the text that preceded the replaced token.

        Raises:
            ValueError: Nothing was appended since the last replacement or flush.
        """
        saved = self._before_last
        if saved is None or len(self.token_ids) != saved.num_tokens + 1:
            raise ValueError("replace_last needs exactly one token appended since the last "
                             f"update; {len(self.token_ids)} tokens held")
        del self.token_ids[saved.num_tokens:]
        self.text = self.text[:saved.num_chars]
        (_, _, self._prefix_offset, self._read_offset, self._prefix_chars,
         self._emitted_chars) = saved
        return self.append(token_ids)

    def flush(self) -> str:
        """Shows the held-back U+FFFD run as the full decode does, once no more tokens follow.

        Returns:
            The text it adds.
        """
        window = self._decode_window()
        delta = window[self._emitted_chars:]
        self.text += delta
        self._emitted_chars = len(window)
        self._before_last = None
        return delta

    def _decode_window(self) -> str:
        return self._tokenizer.decode(self.token_ids[self._prefix_offset:],
                                      skip_special_tokens=self._skip_special_tokens)
