"""The offline API: ``LLM(...).generate(prompts, SamplingParams(...), tools=...)`` and ``chat``.

A thin layer over :class:`~infercept.engine.LLMEngine`: it queues the requests, steps the
engine until each has finished (tools run while it steps) and returns the outputs in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from infercept.engine import EngineConfig, LLMEngine, RequestOutput
from infercept.sampling import SamplingParams
from infercept.tools import Tool, ToolCallParser

Message = Mapping[str, Any]


class LLM:
    """A model served by the InferCept engine.

    Args:
        model: A ``.gguf`` file, an HF model directory, or None for the embedded
            SmolLM2-135M-Instruct.
        policy: 'infercept' (min-waste, default) or a baseline: 'vllm-0.2', 'discard',
            'preserve', 'swap', 'vllm-v1', 'vllm-v1-offload', 'continuum' (docs/baselines.md).
        tools: Server-side tools (``Tool`` objects) available to every request.
        tool_errors: 'abort' or 'return' (see :class:`LLMEngine`).
        parser: Finds tool calls in generated text (default ``<tool_call>{json}</tool_call>``).
        **config: Any other :class:`EngineConfig` field (dtype, kv_cache_bytes, ...).
    """

    def __init__(self, model: str | None = None, policy: str = "infercept", *,
                 tools: Iterable[Tool] = (), tool_errors: str = "abort",
                 parser: ToolCallParser | None = None, **config: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, policy=policy, **config),
                                tools=list(tools), tool_errors=tool_errors, parser=parser)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wraps an engine built directly (e.g. several engines sharing one loaded model)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        return llm

    @property
    def tokenizer(self):  # noqa: ANN201 - infercept.model.Tokenizer
        return self.engine.tokenizer

    def register_tool(self, fn: Callable[..., Any] | Tool, *, name: str | None = None,
                      expected_duration_s: float | None = None, **kwargs: Any) -> Tool:
        """Registers a server-side tool (sync or async callable) under ``name``."""
        if name is not None:
            kwargs["name"] = name
        if expected_duration_s is not None:
            kwargs["expected_duration_s"] = expected_duration_s
        return self.engine.register_tool(fn, **kwargs)

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 tools: Iterable[Tool] = (), use_tools: bool = True,
                 client_tools: Iterable[str] = (),
                 cache_salt: str | None = None) -> list[RequestOutput]:
        """Generates a completion for each prompt, running tool calls as they appear.

        Args:
            prompts: One prompt or a list.
            sampling_params: One for all prompts, or one per prompt.
            prompt_token_ids: Prompts as tokens, instead of ``prompts``.
            tools: Tools to register before running (kept for later calls).
            use_tools: Whether calls to registered tools run inside the engine.
            client_tools: Tool names the caller runs: such a call returns the request paused
                (``output.paused``); continue it with ``resume``.
            cache_salt: Keeps these requests' cached prefixes apart from other tenants'.

        Returns:
            One output per prompt, in order (finished, or paused on a client tool); with
            ``n > 1`` it is choice 0 and ``output.choices`` holds all n.

        Raises:
            ValueError: Bad prompts or params, or ``n > 1`` with ``client_tools`` (each
                choice could pause on its own call).
        """
        for tool in tools:
            self.engine.register_tool(tool)
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("give prompts or prompt_token_ids, not both")
            items: list[dict[str, Any]] = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        else:
            if prompts is None:
                raise ValueError("give prompts or prompt_token_ids")
            items = [{"prompt": p} for p in ([prompts] if isinstance(prompts, str) else prompts)]
        params = self._per_prompt(sampling_params, len(items))
        client = tuple(client_tools)
        fanned = [i for i, p in enumerate(params) if p.n > 1]
        if fanned and client:
            raise ValueError(f"n={params[fanned[0]].n} is not supported with client_tools: "
                             "each choice could pause on its own call")

        def add(index: int, choice: int) -> int:
            return self.engine.add_request(params=params[index].for_choice(choice),
                                           use_tools=use_tools, client_tools=client,
                                           cache_salt=cache_salt, **items[index])

        ids = [add(i, 0) for i in range(len(items))]
        others = self._add_other_choices(ids, params, fanned, add)
        outputs = self.engine.run_until_done(ids + [i for c in others.values() for i in c])
        for index, choice_ids in others.items():
            outputs[index].other_choices = [self.engine.get(i) for i in choice_ids]
        return outputs[:len(ids)]

    def _add_other_choices(self, first_ids: list[int], params: list[SamplingParams],
                           fanned: list[int], add: Callable[[int, int], int]
                           ) -> dict[int, list[int]]:
        """Choices 1..n-1 of each prompt with n > 1, added once its choice 0 has prefilled
        the prompt (sampled its first token), so they find the prompt's blocks in the prefix
        cache instead of computing them again, as the server does; returns prompt index ->
        their ids."""
        if not fanned:
            return {}
        waiting = [first_ids[i] for i in fanned]
        while any(self.engine.get(i).first_token_s is None and not self.engine.get(i).finished
                  for i in waiting):
            self.engine.step()
        added: dict[int, list[int]] = {}
        try:
            for index in fanned:
                added[index] = []
                for choice in range(1, params[index].n):
                    added[index].append(add(index, choice))
        except BaseException:
            for request_id in [*first_ids, *(i for ids in added.values() for i in ids)]:
                self.engine.abort(request_id)
            raise
        return added

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             tools: Iterable[Tool] = (), use_tools: bool = True,
             client_tools: Iterable[str] = (),
             cache_salt: str | None = None) -> list[RequestOutput]:
        """Like ``generate`` for conversations rendered with the model's chat template.

        Args:
            messages: One conversation (a list of ``{"role", "content"}`` dicts) or a list of
                them.
        """
        conversations = ([messages] if messages and isinstance(messages[0], Mapping)
                         else list(messages))
        tools = list(tools)
        schemas = [t.to_openai() for t in [*tools, *(self.engine.tools.get(n)
                                                   for n in self.engine.tools.names)]] or None
        token_ids = [self.engine.tokenizer.apply_chat_template(c, tools=schemas)
                     for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompt_token_ids=token_ids, sampling_params=sampling_params,
                             tools=tools, use_tools=use_tools, client_tools=client_tools,
                             cache_salt=cache_salt)

    def resume(self, request_id: int, tool_output: str, *, raw: bool = False) -> RequestOutput:
        """Continues a request paused on a client tool and runs it to its next stop."""
        self.engine.resume(request_id, tool_output, raw=raw)
        return self.engine.run_until_done([request_id])[0]

    @staticmethod
    def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None,
                    num_prompts: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(num_prompts)]
        if isinstance(params, SamplingParams):
            return [params] * num_prompts
        if len(params) != num_prompts:
            raise ValueError(f"got {len(params)} sampling params for {num_prompts} prompts")
        return list(params)

    def shutdown(self) -> None:
        """Aborts live requests and stops tool threads."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
