"""Tokenizer from an HF model directory or a GGUF file, via transformers' AutoTokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from infercept.weights.errors import InvalidWeightsError, WeightsNotFoundError


class Tokenizer:
    """Text <-> token ids and the model's chat template.

    Attributes:
        eos_token_id: End-of-sequence id, or None.
        bos_token_id: Beginning-of-sequence id, or None.
    """

    def __init__(self, hf_tokenizer: Any) -> None:
        """Wraps a loaded transformers tokenizer (use :meth:`from_path` to load one)."""
        self._tokenizer = hf_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Loads from an HF model directory or a ``.gguf`` file, offline.

        Raises:
            WeightsNotFoundError: ``path`` does not exist.
            InvalidWeightsError: a ``.gguf`` file transformers cannot read (corrupt, truncated,
                an unknown version), naming the file.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.exists():
            raise WeightsNotFoundError(f"tokenizer path {path} does not exist")
        if path.is_dir():
            return cls(AutoTokenizer.from_pretrained(path, local_files_only=True))
        try:
            return cls(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                     local_files_only=True))
        except (ValueError, OSError, KeyError) as exc:
            raise InvalidWeightsError(f"cannot read the tokenizer from {path}: {exc}") from exc

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer (for libraries that read it, e.g. llguidance)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return len(self._tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS when the tokenizer adds one and ``add_special_tokens``)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``token_ids``."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a chat rendered with the model's template.

        Args:
            messages: ``{"role": ..., "content": ...}`` dicts.
            add_generation_prompt: End with the assistant turn's header so the model answers.
            tools: JSON-schema tool descriptions, for templates that render them.
        """
        return list(self.render_chat(messages, add_generation_prompt, tools, tokenize=True))

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    tokenize: bool = False) -> Any:
        """The chat rendered with the template: text, or token ids with ``tokenize=True``."""
        rendered = self._tokenizer.apply_chat_template(
            list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
            tokenize=tokenize)
        # transformers 5 returns a BatchEncoding when tokenizing; 4.x a plain list.
        if tokenize and not isinstance(rendered, list):
            return rendered["input_ids"]
        return rendered
