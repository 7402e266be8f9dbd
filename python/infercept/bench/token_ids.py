"""Token ids for replayed workloads, so the prefix cache sees what a real engine would.

A trace gives counts; the core's prefix cache keys blocks by content. These functions turn
counts into ids that are deterministic in (seed, what they belong to):

- an app's shared prefix (system prompt + tool schemas): a function of (seed, app), the same for
  every program of the app;
- a request's own prompt (what follows the prefix) and each tool return: functions of
  (seed, request id[, segment]), different for every arrival;
- a sampled token: a function of (seed, core request id, position), so a request that is
  recomputed or resumed meets the same ids it had (the simulator's stand-in for greedy
  decoding of the same context).

Ids lie in [FIRST_ID, vocab_size): past the special tokens of common vocabularies.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from infercept.bench.workload import WorkloadRequest

# Below this, ids are special tokens in Llama / GPT-2 / SmolLM-style vocabularies.
FIRST_ID = 100
# The simulator's vocabulary (its ids are never decoded; SmolLM2's size, for the real engine too).
SIM_VOCAB_SIZE = 49152

_MASK64 = (1 << 64) - 1


def _stable_key(text: str) -> int:
    """A 32-bit key of ``text`` that is the same in every process (``hash()`` is salted)."""
    return zlib.crc32(text.encode("utf-8"))


def _draw(seed: int, keys: tuple[int, ...], count: int, vocab_size: int) -> list[int]:
    if count <= 0:
        return []
    rng = np.random.default_rng([seed & 0xFFFFFFFF, *keys])
    return rng.integers(FIRST_ID, vocab_size, size=count).tolist()


def prefix_token_ids(app: str, num_tokens: int, seed: int, vocab_size: int = SIM_VOCAB_SIZE) -> list[int]:
    """The shared prefix of ``app``: the same ids for every program of the app."""
    return list(_prefix(app, num_tokens, seed, vocab_size))


@functools.lru_cache(maxsize=64)
def _prefix(app: str, num_tokens: int, seed: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(_draw(seed, (0, _stable_key(app)), num_tokens, vocab_size))


def prompt_token_ids(request: WorkloadRequest, seed: int, vocab_size: int = SIM_VOCAB_SIZE) -> list[int]:
    """The request's prompt: its app's shared prefix, then ids of its own."""
    shared = prefix_token_ids(request.app, request.shared_prefix_tokens, seed, vocab_size)
    own = _draw(seed, (1, _stable_key(request.request_id)),
                request.prompt_tokens - request.shared_prefix_tokens, vocab_size)
    return shared + own


def tool_token_ids(request: WorkloadRequest, segment: int, seed: int,
                   vocab_size: int = SIM_VOCAB_SIZE) -> list[int]:
    """What the tool of ``request.segments[segment]`` returns."""
    return _draw(seed, (2, _stable_key(request.request_id), segment),
                 request.segments[segment].tool_tokens, vocab_size)


def sampled_token_id(seed: int, request_id: int, position: int, vocab_size: int = SIM_VOCAB_SIZE) -> int:
    """The token a request samples at ``position`` (splitmix64 of the three; cheap, per step)."""
    x = (seed * 0x9E3779B97F4A7C15 + request_id * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return FIRST_ID + x % (vocab_size - FIRST_ID)
