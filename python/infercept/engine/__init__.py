"""The engine over a real model: the step loop, per-request sequences, the model runner, the
sampler and stop check, the swap engine, and the cost profile (measured or loaded by name)."""

from infercept.engine.config import EngineConfig
from infercept.engine.llm_engine import LLMEngine
from infercept.engine.outputs import InterceptRecord, RequestOutput

__all__ = ["EngineConfig", "InterceptRecord", "LLMEngine", "RequestOutput"]
