"""Checks shared by the tests that drive a real LLMEngine."""

from __future__ import annotations

from infercept import LLMEngine


def assert_all_memory_returned(engine: LLMEngine) -> None:
    """Blocks conserved, both pools wholly free (cached blocks count as free), no live request."""
    engine.check_invariants()
    config = engine.scheduler.config
    assert engine.scheduler.num_free_device_blocks == config.num_device_blocks
    assert engine.scheduler.num_free_host_blocks == config.num_host_blocks
    assert engine.scheduler.num_live_requests == 0
