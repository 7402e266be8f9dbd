"""A seeded generator of multi-turn agent programs (issue 13's agent workloads).

A program is one WorkloadRequest whose segments are its turns: the model decodes a turn's
output (a tool call, or the final answer in the last turn), the tool runs, its output is
appended to the context and the next turn decodes. Every program of one app starts with the
app's system prompt and tool schemas (``shared_prefix_tokens`` of its prompt), so programs of an
app share a prefix, as agents built on one framework do. After it comes the program's own task.

Three shapes (full scale; docs/workloads.md gives the reasoning and the CPU-scaled numbers):

- ``coding``: 10-20 turns; short outputs (tens of tokens: a tool call or an edit); tool outputs
  (file contents, search hits, test logs) that grow the context to several thousand tokens;
  tool times mostly under 1 s (reads, searches, edits) with a long tail (test runs: Pareto).
- ``function-calling``: 4-8 turns (about 6); short API calls; small tool outputs.
- ``chat``: 3-10 turns with a human in the loop: tens of seconds between turns (the "tool" is
  the user), replies of a few hundred tokens.

Counts are log-normal with the stated mean and standard deviation (clipped where a range is
given); the tool of each turn is drawn by weight and brings its own duration and output-size
distributions, so a per-tool policy (Continuum's TTL) has distributions to learn.

Scaling (``max_context_tokens``): every token count of a shape is multiplied by one factor,
limit / the shape's nominal context, so a program keeps its turns and tool times and programs
of an app still share one (shorter) prefix; a program still over the limit then has its tool
outputs shrunk proportionally (at least 1 token each) until it fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infercept.bench.workload import Segment, WorkloadRequest


@dataclass(frozen=True)
class LogNormal:
    """A positive draw with this mean and standard deviation, clipped to [low, high]."""

    mean: float
    std: float
    low: float = 0.0
    high: float = math.inf

    def draw(self, rng: np.random.Generator) -> float:
        sigma2 = math.log1p((self.std / self.mean) ** 2)
        value = float(rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2)))
        return min(max(value, self.low), self.high)


@dataclass(frozen=True)
class Pareto:
    """A heavy tail: ``scale * (1 + Lomax(alpha))`` (a Pareto of minimum ``scale``), capped."""

    scale: float
    alpha: float
    cap: float = math.inf

    def draw(self, rng: np.random.Generator) -> float:
        return min(self.scale * (1.0 + float(rng.pareto(self.alpha))), self.cap)


@dataclass(frozen=True)
class ToolSpec:
    """One tool of a shape: how often it is called, how long it runs, how much it returns."""

    name: str
    weight: float
    duration_s: LogNormal | Pareto
    output_tokens: LogNormal


@dataclass(frozen=True)
class AgentShape:
    """A kind of agent program.

    Attributes:
        name: the workload name (``--workload``) and the requests' kind.
        turns: inclusive range of turns (segments); every turn but the last calls a tool.
        task_tokens: the program's own first message, after the shared prefix.
        call_tokens: what a turn that calls a tool decodes.
        answer_tokens: what the last turn decodes.
        tools: drawn per turn by weight.
        prefix_tokens: inclusive range of an app's shared prefix, drawn once per app.
        nominal_context_tokens: the context the counts are drawn for, and the cap at full scale.
    """

    name: str
    turns: tuple[int, int]
    task_tokens: LogNormal
    call_tokens: LogNormal
    answer_tokens: LogNormal
    tools: tuple[ToolSpec, ...]
    prefix_tokens: tuple[int, int] = (1024, 2048)
    nominal_context_tokens: int = 8192


AGENT_SHAPES: dict[str, AgentShape] = {s.name: s for s in (
    AgentShape(
        "coding", turns=(10, 20), task_tokens=LogNormal(200, 120, 16),
        call_tokens=LogNormal(40, 20, 8, 128), answer_tokens=LogNormal(80, 40, 16, 256),
        tools=(
            ToolSpec("read_file", 0.30, LogNormal(0.05, 0.03), LogNormal(450, 350, 16)),
            ToolSpec("search", 0.20, LogNormal(0.2, 0.15), LogNormal(200, 150, 8)),
            ToolSpec("edit_file", 0.25, LogNormal(0.1, 0.05), LogNormal(50, 30, 4)),
            ToolSpec("run_tests", 0.15, Pareto(1.0, 1.5, 120.0), LogNormal(350, 300, 16)),
            ToolSpec("shell", 0.10, LogNormal(0.5, 0.8), LogNormal(150, 200, 4)),
        ),
        nominal_context_tokens=8192),
    AgentShape(
        "function-calling", turns=(4, 8), task_tokens=LogNormal(120, 60, 8),
        call_tokens=LogNormal(35, 15, 8, 96), answer_tokens=LogNormal(80, 40, 16, 256),
        tools=(
            ToolSpec("search_api", 0.3, LogNormal(0.3, 0.2), LogNormal(150, 100, 8)),
            ToolSpec("get_record", 0.3, LogNormal(0.08, 0.05), LogNormal(80, 50, 4)),
            ToolSpec("calculator", 0.2, LogNormal(0.001, 0.0005), LogNormal(8, 4, 1)),
            ToolSpec("send_message", 0.2, LogNormal(0.2, 0.1), LogNormal(20, 10, 1)),
        ),
        nominal_context_tokens=4096),
    AgentShape(
        "chat", turns=(3, 10), task_tokens=LogNormal(60, 40, 4),
        call_tokens=LogNormal(150, 100, 16, 512), answer_tokens=LogNormal(150, 100, 16, 512),
        tools=(ToolSpec("user", 1.0, LogNormal(30.0, 20.0, 3.0, 300.0), LogNormal(50, 40, 2)),),
        nominal_context_tokens=6144),
)}

# `--workload` choices: the paper's trace and these shapes, alone or mixed.
AGENT_MIX = "agents"
WORKLOADS = ("mixed", *AGENT_SHAPES, AGENT_MIX)


def _scaled(count: float, factor: float) -> int:
    return max(1, round(count * factor))


def app_prefix_tokens(shape: AgentShape, num_apps: int, seed: int, factor: float = 1.0) -> dict[str, int]:
    """Each app of ``shape``: its name and shared-prefix length (drawn once, then scaled)."""
    rng = np.random.default_rng([seed, 1 + list(AGENT_SHAPES).index(shape.name)])
    low, high = shape.prefix_tokens
    return {f"{shape.name}-app{k}": _scaled(int(rng.integers(low, high + 1)), factor)
            for k in range(num_apps)}


def generate_program(shape: AgentShape, request_id: str, app: str, prefix_tokens: int,
                     rng: np.random.Generator, factor: float = 1.0,
                     max_context_tokens: int | None = None) -> WorkloadRequest:
    """One program of ``shape`` in ``app``, its counts scaled by ``factor`` and capped."""
    num_turns = int(rng.integers(shape.turns[0], shape.turns[1] + 1))
    weights = np.array([t.weight for t in shape.tools])
    picks = rng.choice(len(shape.tools), size=num_turns - 1, p=weights / weights.sum())
    task = _scaled(shape.task_tokens.draw(rng), factor)
    outputs, durations, returns, names = [], [], [], []
    for pick in picks:
        tool = shape.tools[int(pick)]
        outputs.append(_scaled(shape.call_tokens.draw(rng), factor))
        durations.append(tool.duration_s.draw(rng))
        returns.append(_scaled(tool.output_tokens.draw(rng), factor))
        names.append(tool.name)
    outputs.append(_scaled(shape.answer_tokens.draw(rng), factor))
    limit = max_context_tokens or shape.nominal_context_tokens
    budget = limit - prefix_tokens - task
    if sum(outputs) + len(returns) > budget:  # rare: long replies in many turns
        outputs = _shrink(request_id, outputs, budget - len(returns), limit)
    returns = _shrink(request_id, returns, budget - sum(outputs), limit)
    segments = [Segment(outputs[i], durations[i], returns[i], names[i]) for i in range(num_turns - 1)]
    segments.append(Segment(outputs[-1]))
    return WorkloadRequest(request_id, shape.name, prefix_tokens + task, tuple(segments),
                           app=app, shared_prefix_tokens=prefix_tokens)


def _shrink(request_id: str, counts: list[int], budget: int, limit: int) -> list[int]:
    """``counts`` shrunk proportionally (each >= 1) to sum to at most ``budget``."""
    if sum(counts) <= budget:
        return counts
    if budget < len(counts):
        raise ValueError(f"program {request_id}: {len(counts)} counts of at least 1 token do not fit the "
                         f"{budget} tokens left within max_context_tokens={limit}")
    excess = sum(counts) - len(counts)
    return [1 + (c - 1) * (budget - len(counts)) // excess for c in counts]


def generate_programs(num_programs: int, seed: int, shapes: Sequence[str] | str = "coding",
                      num_apps: int = 2, max_context_tokens: int | None = None,
                      mix: Mapping[str, float] | None = None) -> list[WorkloadRequest]:
    """Program templates of the named shapes, drawn by one seeded generator.

    Args:
        num_programs: templates to draw.
        seed: seeds everything; the same arguments give the same programs.
        shapes: a shape name, ``"agents"`` (all three), or a sequence of names.
        num_apps: apps per shape; each program belongs to one, drawn uniformly.
        max_context_tokens: scale every shape to this context (a small model's window);
            None: full scale (each shape's nominal context is then its cap).
        mix: shape -> weight (default: equal).

    Returns:
        Templates with ``arrival_s`` 0 and ids ``"{shape}-{i}"``; give them to
        :func:`infercept.bench.workload.poisson_arrivals`.

    Raises:
        ValueError: an unknown shape, ``num_programs`` or ``num_apps`` < 1, or a limit too small
            for a program's turns.
    """
    if num_programs < 1:
        raise ValueError(f"num_programs={num_programs} must be >= 1")
    if num_apps < 1:
        raise ValueError(f"num_apps={num_apps} must be >= 1")
    names = list(AGENT_SHAPES) if shapes == AGENT_MIX else [shapes] if isinstance(shapes, str) else list(shapes)
    unknown = sorted(set(names) - set(AGENT_SHAPES))
    if unknown:
        raise ValueError(f"unknown agent shapes {unknown}; known: {sorted(AGENT_SHAPES)} or {AGENT_MIX!r}")
    weights = np.array([1.0 if mix is None else float(mix.get(n, 0.0)) for n in names])
    if not (weights >= 0).all() or weights.sum() <= 0:
        raise ValueError(f"mix {mix} must weigh the shapes {names} >= 0 and not all 0")
    if max_context_tokens is not None and max_context_tokens < 1:
        raise ValueError(f"max_context_tokens={max_context_tokens} must be >= 1")

    factors = {n: _factor(AGENT_SHAPES[n], max_context_tokens) for n in names}
    apps = {n: app_prefix_tokens(AGENT_SHAPES[n], num_apps, seed, factors[n]) for n in names}
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(names), size=num_programs, p=weights / weights.sum())
    programs = []
    for i, pick in enumerate(picks):
        name = names[int(pick)]
        app = list(apps[name])[int(rng.integers(num_apps))]
        programs.append(generate_program(AGENT_SHAPES[name], f"{name}-{i}", app, apps[name][app], rng,
                                         factors[name], max_context_tokens))
    return programs


def _factor(shape: AgentShape, max_context_tokens: int | None) -> float:
    """The count scale that brings the shape's nominal context to the limit (at most 1)."""
    if max_context_tokens is None:
        return 1.0
    return min(1.0, max_context_tokens / shape.nominal_context_tokens)
