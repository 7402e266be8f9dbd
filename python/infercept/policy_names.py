"""The intercept policies' names, read from the core's policy table, and the deprecated alias.

Every place that lists or checks policy names (the CLI, the benchmark, the engine and server
configuration) goes through here, so a policy added to the core's table appears everywhere.
"""

from __future__ import annotations

import warnings

from infercept._core import Policy

#: Every policy, the paper's five first (vllm-0.2, discard, preserve, swap, infercept), then
#: today's baselines (vllm-v1, vllm-v1-offload, continuum); docs/baselines.md says what each is.
POLICY_NAMES: tuple[str, ...] = tuple(policy.label for policy in Policy.all())

#: The paper's comparison: the four fixed policies and min-waste.
PAPER_POLICIES: tuple[str, ...] = ("vllm-0.2", "discard", "preserve", "swap", "infercept")

#: Old names still accepted, with what they mean now.
DEPRECATED_ALIASES = {"vllm": "vllm-0.2"}


def canonical_policy(name: str) -> str:
    """The policy's current name; a deprecated alias warns (DeprecationWarning) and is mapped.

    Raises:
        ValueError: ``name`` is no policy (the message names the accepted ones).
    """
    if name in DEPRECATED_ALIASES:
        new = DEPRECATED_ALIASES[name]
        warnings.warn(f"policy {name!r} is deprecated; it stands for vLLM 0.2, use {new!r} "
                      f"(today's vLLM is 'vllm-v1' or 'vllm-v1-offload')", DeprecationWarning,
                      stacklevel=2)
        return new
    Policy.parse(name)  # raises ValueError naming the accepted policies
    return name
