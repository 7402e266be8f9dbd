"""Part 1 of the demo: one conversation per KV action the policy takes on a paused request.

1. A calculator call that returns in milliseconds: cheapest to keep the KV where it is.
2. A search tool that takes seconds, while other requests queue for memory: the policy moves
   the paused KV to the host pool (or drops it for recompute) and brings it back after.
3. A human-in-the-loop wait (the caller answers after seconds, ``resume``) under the same
   pressure: swapped or discarded.
4. A short chat waiting seconds for its user while the device is full, on an engine with no
   host pool to swap to: holding its few blocks the whole wait wastes more (memory x time)
   than recomputing its few tokens costs the running batch, so min-waste discards it.
5. A client tool through the OpenAI server (in-process on loopback) with the official openai
   client and ``tool_choice="required"``: the follow-up carrying the result resumes the paused
   request in place, so its prompt is not prefilled again.

Every line about KV comes from what the engine recorded (``InterceptRecord.kv_actions``, which
the engine fills from ``StepOutput.kv_changes``; the scheduler's stats; the server's
``/metrics``), never from what the demo expects.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from infercept.engine import EngineConfig, LLMEngine, RequestOutput
from infercept.model import LlamaForCausalLM, Tokenizer
from infercept.sampling import SamplingParams
from infercept.tools import Tool, calculator_tool
from infercept.tools.calculator import calculate

SEARCH_S = 2.0  # the slow tool's latency
HUMAN_S = 3.0   # how long the "person" takes to answer
# Scene 4: what its caller expects a person to take (the hint), and when the person answers.
HUMAN_EXPECTED_S = 30.0
HUMAN_LONG_S = 8.0
SEARCH = Tool(name="web_search", fn=lambda query: (time.sleep(SEARCH_S), "Mount Everest is "
                                                   "8849 m high.")[1],
              description="Search the web.", expected_duration_s=SEARCH_S,
              # Bounded strings: a small model can babble inside an open string, and the
              # grammar then closes it at the bound.
              parameters={"type": "object", "properties": {"query": {"type": "string",
                                                                     "maxLength": 24}},
                          "required": ["query"]})
ASK_HUMAN = {"type": "function", "function": {
    "name": "ask_human", "description": "Ask the user a question and wait for the answer.",
    "parameters": {"type": "object", "properties": {"question": {"type": "string",
                                                                 "maxLength": 32}},
                   "required": ["question"]}}}
# Unrelated requests that arrive while 2 and 3 are paused: distinct long prompts (about 13
# blocks each, so the prefix cache cannot share them) that together want more than the pool.
BACKGROUND = [f"Summarize these notes (set {i}): " + " ".join(
    f"Note {i}.{j}: item {100 * i + j} was checked on day {j} and found in order."
    for j in range(8)) for i in range(4)]

def _forced_call(tool: dict[str, Any]) -> Any:
    """The grammar of one call to ``tool`` (what tool_choice='required' builds)."""
    from infercept.server.structured import structured_output_for

    return structured_output_for(None, "required", [tool])


def _kv(output: RequestOutput) -> str:
    if not output.intercepts:
        return (f"  no pause: it finished ({output.finish_reason}) after "
                f"{output.num_generated_tokens} tokens without completing a call")
    lines = []
    for call in output.intercepts:
        kv = " -> ".join(call.kv_actions) or "(none recorded)"
        lines.append(f"  paused on {call.name or 'a scripted intercept'}({call.arguments}) for "
                     f"{1000 * (call.duration_s or 0):.0f} ms; KV while paused: {kv}")
    return "\n".join(lines)


def _show(title: str, output: RequestOutput) -> None:
    print(f"\n[{title}]\nassistant: {output.text.strip()[:300]}\n{_kv(output)}")


def run_engine_scenes(model: LlamaForCausalLM, tokenizer: Tokenizer, policy: str,
                      num_device_blocks: int = 40) -> None:
    """Scenes 1-3 on one engine with a small device pool (so waiting requests need the
    memory paused ones hold)."""
    from infercept.demo import calculator_conversation

    config = EngineConfig(policy=policy, num_device_blocks=num_device_blocks,
                          max_batched_tokens=256)
    with LLMEngine(config, model=model, tokenizer=tokenizer,
                   tools=[calculator_tool(), SEARCH]) as engine:
        render = tokenizer.apply_chat_template
        greedy = dict(temperature=0.0, max_tokens=64)
        fast = engine.add_request(prompt_token_ids=render(calculator_conversation(
            "What is 37 * 91?")), params=SamplingParams(**greedy))
        (fast_out,) = engine.run_until_done([fast])
        _show("1. a tool that answers in milliseconds (idle device)", fast_out)

        def forced(tool: dict[str, Any]) -> SamplingParams:
            # Room for the call (its bounded arguments) and an answer after the tool's output.
            return SamplingParams(temperature=0.0, max_tokens=128,
                                  structured_output=_forced_call(tool))

        slow = engine.add_request(
            prompt_token_ids=render([{"role": "user",
                                      "content": "Search the web: how high is Mount Everest?"}],
                                    tools=[SEARCH.to_openai()]),
            params=forced(SEARCH.to_openai()))
        human = engine.add_request(
            prompt_token_ids=render([{"role": "user", "content": "Plan my weekend trip."}],
                                    tools=[ASK_HUMAN]),
            params=forced(ASK_HUMAN), client_tools=["ask_human"])
        # A forced call always comes, but its arguments could run past max_tokens: then the
        # request finishes without a pause, and the scene says so.
        while not all(engine.get(r).intercepts or engine.get(r).finished for r in (slow, human)):
            engine.step()
        # Both are paused now; the background requests arrive and need memory.
        background = _add_background(engine, tokenizer)
        human_paused_at = time.monotonic()
        answered = False
        while True:
            if not answered and (engine.get(human).finished
                                 or time.monotonic() - human_paused_at >= HUMAN_S):
                if engine.get(human).paused:
                    engine.resume(human, "Saturday: hiking; Sunday: a museum.")
                answered = True
            ids = [slow, human, *background]
            if answered and all(engine.get(r).finished for r in ids):
                break
            engine.step()
        _show(f"2. a tool that takes {SEARCH_S:g} s while {len(BACKGROUND)} requests wait for "
              "memory", engine.get(slow))
        _show(f"3. a human-in-the-loop wait of {HUMAN_S:g} s under the same load",
              engine.get(human))
        stats = engine.stats
        print(f"\n  engine: {int(stats['num_swap_out_blocks'])} blocks swapped out, "
              f"{int(stats['num_swap_in_blocks'])} swapped in, "
              f"{int(stats['num_recomputed_tokens'])} tokens recomputed, "
              f"{int(stats['num_preemptions'])} preemptions "
              f"(device pool {num_device_blocks} blocks of {config.block_size} tokens)")


def _add_background(engine: LLMEngine, tokenizer: Tokenizer) -> list[int]:
    """Adds the BACKGROUND chats that fill the device while a scene's request is paused."""
    return [engine.add_request(
        prompt_token_ids=tokenizer.apply_chat_template([{"role": "user", "content": q}]),
        params=SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        for q in BACKGROUND]


def run_discard_scene(model: LlamaForCausalLM, tokenizer: Tokenizer, policy: str,
                      num_device_blocks: int = 40) -> None:
    """Scene 4: a short context paused for a long human wait, the device full, no host pool
    (``num_host_blocks=0``: no swap). The policy weighs keeping its blocks against recomputing
    it (DESIGN.md §2: preserve waste = its memory x the expected wait; discard waste = the
    recompute's forward time x the batch it delays) and the engine reports what it chose."""
    config = EngineConfig(policy=policy, num_device_blocks=num_device_blocks, num_host_blocks=0,
                          max_batched_tokens=256)
    with LLMEngine(config, model=model, tokenizer=tokenizer) as engine:
        render = tokenizer.apply_chat_template
        short = engine.add_request(
            prompt_token_ids=render([{"role": "user", "content": "Book me a table."}]),
            params=SamplingParams(temperature=0.0, max_tokens=32))
        while len(engine.get(short).token_ids) < 4 and not engine.get(short).finished:
            engine.step()
        # The caller pauses it to ask its user, expecting an answer in about HUMAN_EXPECTED_S
        # (the hint the scheduler plans with); the person answers after HUMAN_LONG_S.
        engine.intercept(short, expected_duration_s=HUMAN_EXPECTED_S, name="ask_human")
        background = _add_background(engine, tokenizer)
        paused_at = time.monotonic()
        answered = False
        ids = [short, *background]
        while not (answered and all(engine.get(r).finished for r in ids)):
            if not answered and time.monotonic() - paused_at >= HUMAN_LONG_S:
                engine.resume(short, "Two people at 8 pm, please.")
                answered = True
            engine.step()
        num_context = len(engine.get(short).prompt_token_ids) + 4
        _show(f"4. a {num_context}-token chat waiting for its user (expected "
              f"{HUMAN_EXPECTED_S:g} s), the device full and no host pool", engine.get(short))
        stats = engine.stats
        print(f"\n  engine: {int(stats['num_recomputed_tokens'])} tokens recomputed, "
              f"{int(stats['num_swap_out_blocks'])} blocks swapped out (host pool: 0 blocks)")


def _free_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def run_server_scene(model: LlamaForCausalLM, tokenizer: Tokenizer, policy: str) -> None:
    """Scene 5: a client tool round trip through the OpenAI server."""
    import httpx
    import openai
    import uvicorn

    from infercept.server import ServerConfig, create_app
    from infercept.server.few_shot import CALCULATOR, FEW_SHOT
    from infercept.server.metrics import parse_metrics

    engine = LLMEngine(EngineConfig(policy=policy, num_device_blocks=256,
                                    enable_prefix_caching=False),
                       model=model, tokenizer=tokenizer)
    app = create_app(engine, ServerConfig(served_model_name="smollm2"))  # the in-thread engine
    sock = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        while not server.started:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages: list[dict[str, Any]] = [*FEW_SHOT,
                                          {"role": "user", "content": "What is 123 * 456?"}]
        first = client.chat.completions.create(model="smollm2", messages=messages,
                                               tools=[CALCULATOR], tool_choice="required",
                                               temperature=0, max_tokens=64)
        (call,) = first.choices[0].message.tool_calls
        result = calculate(json.loads(call.function.arguments)["expression"])
        print(f"\n[5. a client tool through the OpenAI server ({url}, openai client, "
              f"tool_choice='required')]\n  call: {call.function.name}"
              f"({call.function.arguments}) -> the client runs it: {result}")
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result}]
        second = client.chat.completions.create(model="smollm2", messages=messages,
                                                tools=[CALCULATOR], temperature=0,
                                                max_tokens=32)
        usage = second.usage
        cached = usage.prompt_tokens_details.cached_tokens
        samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        outcome = 'infercept_paused_context_total{outcome="%s"}'
        print(f"assistant: {second.choices[0].message.content}\n"
              f"  follow-up: {usage.prompt_tokens} prompt tokens, {cached} of them the paused "
              f"context resumed in place ({usage.prompt_tokens - cached} computed); server: "
              f"{samples[outcome % 'reused']:.0f} resumed, "
              f"{samples[outcome % 'fallback']:.0f} re-prefilled, "
              f"{samples['infercept_reused_prompt_tokens_total']:.0f} prompt tokens not "
              "prefilled")
        client.close()
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
