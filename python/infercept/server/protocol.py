"""The OpenAI wire format: request models (validated by pydantic) and response builders.

Requests are pydantic models so a bad field becomes a 400 naming the field; responses are
plain dicts built by small functions (they are only ever serialized).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infercept.engine.llm_engine import MAX_PREDICTED_OUTPUT_TOKENS
from infercept.sampling import (MAX_ABS_PENALTY, MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS, MAX_N,
                                MAX_REPETITION_PENALTY, MAX_STOP_SEQUENCES, MAX_STOP_STRING_CHARS)

# OpenAI's rule for function names.
_FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(BaseModel):
    """``tools[i].function``: a function the model may call."""

    name: str = Field(pattern=_FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Arguments are a JSON object, so the schema must describe one.
        if value is None:
            return value
        schema_type = value.get("type", "object")
        if schema_type != "object":
            raise ValueError(f"parameters must be a JSON schema of type 'object', got type "
                             f"{schema_type!r}")
        properties = value.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError(f"parameters.properties must be an object, got "
                             f"{type(properties).__name__}")
        required = value.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError(f"parameters.required must be a list of strings, got {required!r}")
        return value


class ToolDefinition(BaseModel):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice={"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCallMessage(BaseModel):
    """An assistant message's ``tool_calls[i]`` as a client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined; None is empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must follow."""

    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(pattern=_FUNCTION_NAME_PATTERN)
    description: str | None = None
    # ``schema`` would shadow a pydantic BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a json_schema "
                             "object ({'name': ..., 'schema': {...}})")
        return self


class _SamplingFields(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    ignore_eos: bool = False
    presence_penalty: float | None = Field(default=None, ge=-MAX_ABS_PENALTY,
                                           le=MAX_ABS_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_ABS_PENALTY,
                                            le=MAX_ABS_PENALTY)
    # vLLM extensions (send with extra_body).
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(default=0, ge=0)
    # Token id (as a JSON string key) -> bias, clamped to [-100, 100].
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # OpenAI/vLLM extension: requests share prefix-cache entries (and paused contexts) only
    # with requests of the same salt, so tenants cannot probe each other's prompts by timing.
    cache_salt: str | None = None
    # InferCept extension: a predictor's count of the tokens this request will still generate
    # (over all its remaining turns). With `serve --rank-s-per-predicted-token S` the queue is
    # ranked by arrival + S x this count (LAMPS-style, docs/baselines.md); under FCFS (S = 0,
    # the default) it is kept and has no effect. A follow-up that resumes a paused context
    # updates the prediction.
    predicted_output_tokens: int | None = Field(default=None, ge=0,
                                                lt=MAX_PREDICTED_OUTPUT_TOKENS)

    @field_validator("cache_salt", mode="before")
    @classmethod
    def _salt_is_text(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, str) or not value):
            # The 400 handler shows the value after this (except for an object).
            raise ValueError(f"cache_salt must be a non-empty string, not {type(value).__name__}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_within_limits(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"{len(stops)} stop sequences given, above the limit "
                             f"{MAX_STOP_SEQUENCES}")
        for stop in stops:
            if len(stop) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"a stop sequence of {len(stop)} characters is above the "
                                 f"limit {MAX_STOP_STRING_CHARS}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, value: dict[str, float] | None
                                 ) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias key {key!r} is not a token id (a non-negative "
                                 "integer)")
        if value is not None and len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(value)} entries, above the limit "
                             f"{MAX_LOGIT_BIAS_ENTRIES}")
        return value

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token to report (None: no logprobs)."""
        return None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # InferCept extra (send with extra_body): ties a tool-result follow-up to the paused
    # context of an earlier response; without it the server matches by token prefix alone.
    session_id: str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        names = [t.function.name for t in self.tools or []]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tools: duplicate function names {duplicates}")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not "
                             f"in tools ({', '.join(names) or 'none given'})")
        if choice == "required" and not names:
            raise ValueError("tool_choice='required' needs at least one entry in tools")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (one prompt: a string or a list of token ids)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    # Completions' logprobs is the number of top alternatives (OpenAI allows 0..5; 0..20 here).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        """The prompt, unwrapped from a one-element batch.

        Raises:
            ValueError: A batch of several prompts, or an empty one.
        """
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and all(isinstance(p, int) for p in prompt):
            return prompt  # type: ignore[return-value]
        if len(prompt) != 1:
            raise ValueError(f"prompt: batches of {len(prompt)} prompts are not supported; "
                             "send one prompt per request")
        return prompt[0]  # type: ignore[return-value]


# ---- responses -------------------------------------------------------------------------------

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort",
                  "error": "error"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, param: str | None = None, code: str | None = None,
               error_type: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def tool_call_json(call_id: str, name: str, arguments: str, index: int | None = None
                   ) -> dict[str, Any]:
    out: dict[str, Any] = {"id": call_id, "type": "function",
                           "function": {"name": name, "arguments": arguments}}
    if index is not None:
        out["index"] = index
    return out


def chat_choice(index: int, content: str | None, tool_calls: list[dict[str, Any]] | None,
                finish_reason: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry of a chat completion's ``choices``."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "finish_reason": finish_reason,
            "logprobs": logprobs}


def chat_completion(response_id: str, model: str, choices: list[dict[str, Any]],
                    usage_json: dict[str, Any]) -> dict[str, Any]:
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": usage_json, "choices": choices}


def chat_chunk(response_id: str, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_json: dict[str, Any] | None = None,
               index: int = 0, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": index, "delta": delta,
                                         "finish_reason": finish_reason, "logprobs": logprobs}]
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": choices}
    if usage_json is not None:
        chunk["usage"] = usage_json
    return chunk


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def completion(response_id: str, model: str, text: str | None, finish_reason: str | None,
               usage_json: dict[str, Any] | None = None, obj: str = "text_completion",
               index: int = 0, logprobs: dict[str, Any] | None = None,
               choices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A completion, or one streamed chunk of it (``text`` None: a usage-only chunk);
    ``choices`` gives all of them at once (n > 1)."""
    if choices is None:
        choices = [] if text is None else [completion_choice(index, text, finish_reason,
                                                             logprobs)]
    body = {"id": response_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_json is not None:
        body["usage"] = usage_json
    return body
