"""The engine over a real model: the step loop, the model runner, the swap engine, profiling."""

from infercept.engine.config import EngineConfig
from infercept.engine.llm_engine import LLMEngine
from infercept.engine.outputs import InterceptRecord, RequestOutput

__all__ = ["EngineConfig", "InterceptRecord", "LLMEngine", "RequestOutput"]
