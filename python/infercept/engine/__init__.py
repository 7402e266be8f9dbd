"""The engine over a real model: the step loop, per-request sequences, the model runner, the
sampler and stop check, the swap engine, the cost profile (measured or loaded by name), and the
tensor-parallel executor over N ranks."""

from infercept.engine.config import EngineConfig
from infercept.engine.llm_engine import LLMEngine
from infercept.engine.outputs import InterceptRecord, RequestOutput
from infercept.engine.tp_executor import TensorParallelError

__all__ = ["EngineConfig", "InterceptRecord", "LLMEngine", "RequestOutput", "TensorParallelError"]
