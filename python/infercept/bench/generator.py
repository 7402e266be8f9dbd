"""A seeded generator of the paper's six augmentation types (arXiv 2402.01869, Table 1).

Each type draws, per request, its number of intercepts, its final context length and each
intercept's duration from distributions with Table 1's mean and standard deviation
(log-normal, so every draw is positive). The context is split into the user prompt, the
completions and the tool returns by per-type shares that follow what the types do: a
calculator returns a number, a Wikipedia lookup a paragraph, ALFWorld an observation, a
chatbot user a message, image and TTS models a short handle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infercept.bench.workload import Segment, WorkloadRequest


@dataclass(frozen=True)
class AugmentationType:
    """One row of Table 1 plus how its context splits.

    Attributes:
        kind: the name the trace loader gives this type.
        intercept_s: mean and std of one intercept's duration, seconds.
        num_intercepts: mean and std of intercepts per request.
        context_tokens: mean and std of the final context, tokens.
        prompt_share: the user prompt's share of the context.
        tool_share: the tool returns' share of what follows the prompt (the rest is decoded).
    """

    kind: str
    intercept_s: tuple[float, float]
    num_intercepts: tuple[float, float]
    context_tokens: tuple[float, float]
    prompt_share: float
    tool_share: float


AUGMENTATION_TYPES: dict[str, AugmentationType] = {t.kind: t for t in (
    AugmentationType("math", (9e-5, 6e-5), (3.75, 1.3), (1422, 738), 0.6, 0.1),
    AugmentationType("qa", (0.69, 0.17), (2.52, 1.73), (1846, 428), 0.4, 0.7),
    AugmentationType("virtual_env", (0.09, 0.014), (28.18, 15.2), (2185, 115), 0.3, 0.6),
    AugmentationType("chatbot", (28.6, 15.6), (4.45, 1.96), (753, 703), 0.1, 0.4),
    AugmentationType("image", (20.03, 7.8), (6.91, 3.93), (1247, 792), 0.1, 0.2),
    AugmentationType("tts", (17.24, 7.6), (6.91, 3.93), (1251, 792), 0.1, 0.2),
)}


def _lognormal(rng: np.random.Generator, mean: float, std: float) -> float:
    """A positive draw with the given mean and standard deviation."""
    sigma2 = np.log1p((std / mean) ** 2)
    return float(rng.lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2)))


def _split(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """``total`` tokens into ``parts`` counts of at least 1, in random proportions."""
    weights = rng.dirichlet(np.full(parts, 4.0))
    counts = np.maximum(1, np.floor(weights * max(total, parts))).astype(int)
    return counts.tolist()


def generate_request(kind: AugmentationType, request_id: str, rng: np.random.Generator) -> WorkloadRequest:
    """One request of ``kind``: prompt, then intercepts with decoding between them."""
    num_intercepts = max(1, round(_lognormal(rng, *kind.num_intercepts)))
    context = max(4 * (num_intercepts + 1), round(_lognormal(rng, *kind.context_tokens)))
    prompt_tokens = max(1, round(context * kind.prompt_share))
    rest = max(2 * num_intercepts + 1, context - prompt_tokens)
    tool_tokens = _split(round(rest * kind.tool_share), num_intercepts, rng)
    completions = _split(rest - sum(tool_tokens), num_intercepts + 1, rng)
    segments = [Segment(completions[i], _lognormal(rng, *kind.intercept_s), tool_tokens[i])
                for i in range(num_intercepts)]
    segments.append(Segment(completions[-1]))
    return WorkloadRequest(request_id, kind.kind, prompt_tokens, tuple(segments))


def generate_workload(num_requests: int, seed: int,
                      mix: Mapping[str, float] | None = None,
                      types: Sequence[AugmentationType] | None = None) -> list[WorkloadRequest]:
    """Request templates of the six types, drawn by one seeded generator.

    Args:
        num_requests: templates to draw.
        seed: seeds everything; the same arguments give the same templates.
        mix: kind -> weight (default: equal weights over ``types``).
        types: the types to draw from (default: Table 1's six).

    Returns:
        Templates with ``arrival_s`` 0, ids ``"{kind}-{i}"``; give them to
        :func:`infercept.bench.workload.poisson_arrivals` (and ``scale_to_context``).

    Raises:
        ValueError: ``num_requests`` < 1, or a mix naming an unknown kind or weighing nothing.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} must be >= 1")
    by_kind = {t.kind: t for t in (types or AUGMENTATION_TYPES.values())}
    mix = dict(mix) if mix is not None else {kind: 1.0 for kind in by_kind}
    unknown = sorted(set(mix) - set(by_kind))
    if unknown:
        raise ValueError(f"mix names unknown kinds {unknown}; known: {sorted(by_kind)}")
    kinds = list(mix)
    weights = np.array([mix[k] for k in kinds], dtype=float)
    if not (weights >= 0).all() or weights.sum() <= 0:
        raise ValueError(f"mix weights {mix} must be >= 0 and not all 0")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(kinds), size=num_requests, p=weights / weights.sum())
    return [generate_request(by_kind[kinds[k]], f"{kinds[k]}-{i}", rng) for i, k in enumerate(picks)]


def scale_tool_time(requests: Sequence[WorkloadRequest], factor: float) -> list[WorkloadRequest]:
    """Multiplies every intercept's duration by ``factor`` (shrinks a workload to a short run)."""
    if factor == 1.0:
        return list(requests)
    if not factor >= 0:
        raise ValueError(f"time scale {factor} must be >= 0")
    return [dataclasses.replace(r, segments=tuple(
        s if s.tool_duration_s is None else dataclasses.replace(s, tool_duration_s=s.tool_duration_s * factor)
        for s in r.segments)) for r in requests]
