"""Counts Python -> native-core crossings per engine step (issue 14: the records are the boundary).

A crossing is one call into ``infercept._core`` from Python: a method call or a property read
on a core object (the scheduler, the native swap engine, a plan, a request record, a block
copy, ...). The script wraps the engine's scheduler and native swap engine in counting proxies
(and every core object they hand out), runs B decoding requests while P others sit paused on
a long scripted tool call, and prints crossings per step in that steady state. With
``--tool-every K`` each decoding request also calls a (scripted, instant) tool every K tokens,
staggered, so about B/K requests pause and B/K resume in every step: the steady state of the
resume and intercept traffic. It runs against whatever ``infercept`` is importable, so the same
file counts before and after a change:

    python benchmarks/count_crossings.py --batch 32 --paused 8
    python benchmarks/count_crossings.py --batch 32 --paused 8 --tool-every 4
"""

from __future__ import annotations

import argparse
import json
import platform

from infercept.engine import EngineConfig, LLMEngine
from infercept.sampling import SamplingParams, ScriptedIntercept


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.by_name: dict[str, int] = {}

    def hit(self, name: str) -> None:
        self.n += 1
        self.by_name[name] = self.by_name.get(name, 0) + 1


def _is_core(value: object) -> bool:
    return type(value).__module__ == "infercept._core"


def _unwrap(value: object) -> object:
    if isinstance(value, Counting):
        return object.__getattribute__(value, "_target")
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


class Counting:
    """A proxy that counts each property read and method call on a core object."""

    def __init__(self, target: object, counter: Counter) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_counter", counter)

    def __getattr__(self, name: str) -> object:
        target = object.__getattribute__(self, "_target")
        counter = object.__getattribute__(self, "_counter")
        value = getattr(target, name)
        kind = type(target).__name__
        if callable(value) and not _is_core(value) and type(value).__name__ in (
                "builtin_function_or_method", "method"):
            def call(*args: object, **kwargs: object) -> object:
                counter.hit(f"{kind}.{name}()")
                result = value(*[_unwrap(a) for a in args],
                               **{k: _unwrap(v) for k, v in kwargs.items()})
                return _wrap(result, counter)
            return call
        counter.hit(f"{kind}.{name}")
        return _wrap(value, counter)

    def __bool__(self) -> bool:
        return bool(object.__getattribute__(self, "_target"))


def _wrap(value: object, counter: Counter) -> object:
    if _is_core(value) and not isinstance(value, (int, float, str)):
        return Counting(value, counter)
    if isinstance(value, list) and value and _is_core(value[0]):
        return [Counting(v, counter) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="decoding requests (B)")
    parser.add_argument("--paused", type=int, default=8, help="requests paused on a tool (P)")
    parser.add_argument("--policy", default="infercept")
    parser.add_argument("--steps", type=int, default=6, help="steady-state steps measured")
    parser.add_argument("--tool-every", type=int, default=0, metavar="K",
                        help="decoding requests call an instant scripted tool every K tokens (0: never)")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(policy=args.policy, num_device_blocks=2048,
                                    num_host_blocks=2048, max_batched_tokens=1024))
    counter = Counter()
    engine.scheduler = Counting(engine.scheduler, counter)  # type: ignore[assignment]
    native = engine.swap_engine._native
    engine.swap_engine._native = Counting(native, counter)  # type: ignore[assignment]
    prompt = "The history of paged attention in serving systems starts with"
    decode = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=64)
    pause = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=64,
                           intercepts=[ScriptedIntercept(2, 600.0, num_tokens=4)])
    for i in range(args.paused):
        engine.add_request(prompt + f" {i}", pause)
    for i in range(args.batch):
        params = decode
        if args.tool_every:
            # Staggered: request i pauses after tokens i % K + 1, then every K tokens after its
            # resume turn's first token; each pause lasts 0 s (resumed at the next step).
            k = args.tool_every
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=64, intercepts=[
                ScriptedIntercept(after, 0.0, num_tokens=2) for after in range(i % k + 1, 64, k)])
        engine.add_request(prompt + f" number {i}", params)
    # Warm up: prefill everything and let the paused ones pause.
    for _ in range(6):
        engine.step()
    per_step = []
    names: dict[str, int] = {}
    for _ in range(args.steps):
        before = counter.n
        snapshot = dict(counter.by_name)
        engine.step()
        per_step.append(counter.n - before)
        for k, v in counter.by_name.items():
            names[k] = names.get(k, 0) + v - snapshot.get(k, 0)
    stats = engine.stats
    engine.scheduler = object.__getattribute__(engine.scheduler, "_target")
    engine.swap_engine._native = native
    engine.shutdown()
    print(json.dumps({
        "machine": platform.processor() or platform.machine(),
        "batch": args.batch, "paused": args.paused, "policy": args.policy,
        "num_layers": engine.model.config.num_layers,
        "tool_every": args.tool_every,
        "crossings_per_step": per_step,
        "by_call_per_step": {k: round(v / args.steps, 1) for k, v in sorted(names.items(),
                                                                            key=lambda kv: -kv[1])},
        "num_intercepted": stats["num_intercepted"], "num_running": stats["num_running"],
    }, indent=1))


if __name__ == "__main__":
    main()
